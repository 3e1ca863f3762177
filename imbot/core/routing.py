"""The routing policy: what the operator edits to decide which model answers what, at what cost.

This is data (the ``routing:`` section of the policy file), validated here so a mistake
names its key when a service starts. The decisions themselves are made by the route
stage (``imbot.streams.stages.Route``) with ``imbot.routing``; money is reserved and
settled by the quota ledger (``imbot.storage.quota``).

    routing:
      levels:                       # complexity score (0..1) → model level, first match
        - {name: light, below: 0.5}
        - {name: strong}
      default_tier: free
      tiers:                        # user tiers: each names its models, quota and budget
        free:
          models: {light: [demo-lite], strong: [demo-pro, demo-lite]}
          quota: {daily: {tokens: 200000, cost: 2}, monthly: {cost: 30}}
          downgrade_at: 0.8         # share of any budget spent from which `light` is used
      users: {vip_user: pro}        # server-side tier assignments (also `imbot users set-tier`)
      tenant_quota: {daily: {cost: 500}}   # the whole Easemob app
      group_quota: {}               # per group or chatroom (optional)
      vision_models: []             # chain for images; empty → the `unsupported` reply
      message_types: {audio: reply, custom: ignore}
      commands: {reset: [/reset, "#清除记忆"], help: [/help, /usage, "#用量"]}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from imbot.core.limits import USER_ID_MAX


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Budget(_Frozen):
    """One period's limits; a limit left out is no limit. ``cost`` is in the policy's
    currency (``routing.currency``), at the model catalog's prices."""

    tokens: int | None = Field(default=None, ge=0)
    cost: float | None = Field(default=None, ge=0)

    @property
    def limited(self) -> bool:
        return self.tokens is not None or self.cost is not None


class Quota(_Frozen):
    """Daily and monthly budgets (UTC days and calendar months)."""

    daily: Budget = Budget()
    monthly: Budget = Budget()

    @property
    def limited(self) -> bool:
        return self.daily.limited or self.monthly.limited


class Level(_Frozen):
    """A band of the complexity score: scores below ``below`` get this level's models."""

    name: str = Field(min_length=1, max_length=32)
    below: float | None = Field(default=None, gt=0, le=1)


class UserTier(_Frozen):
    models: dict[str, tuple[str, ...]]  # level name → model chain (first tried first)
    quota: Quota = Quota()
    # From this share of any of the tier's budgets spent, the cheapest level's models
    # answer (the first level); at the limit no model is called.
    downgrade_at: float = Field(default=0.8, gt=0, le=1)
    max_output_tokens: int | None = Field(default=None, gt=0)


class Commands(_Frozen):
    """Words that, sent alone, are a command for the bot instead of a question.
    Matched after trimming whitespace, case-insensitively; never sent to a model."""

    reset: tuple[str, ...] = ("/reset", "/clear", "#清除记忆", "清除记忆", "/重置")
    help: tuple[str, ...] = ("/help", "/usage", "/quota", "#用量", "/帮助")

    @model_validator(mode="after")
    def _disjoint(self) -> Commands:
        both = {w.casefold() for w in self.reset} & {w.casefold() for w in self.help}
        if both:
            raise ValueError(f"words are both reset and help commands: {sorted(both)}")
        return self


TypeAction = Literal["reply", "ignore"]


class MessageTypes(_Frozen):
    """What a non-text message gets: ``reply`` (the ``unsupported`` reply) or ``ignore``
    (no answer). Images go to ``vision_models`` when there are any (``img: vision``)."""

    img: Literal["vision", "reply", "ignore"] = "vision"
    audio: TypeAction = "reply"
    video: TypeAction = "reply"
    file: TypeAction = "reply"
    loc: TypeAction = "reply"
    custom: TypeAction = "ignore"
    cmd: TypeAction = "ignore"


class Routing(_Frozen):
    levels: tuple[Level, ...] = (Level(name="light", below=0.5), Level(name="strong"))
    default_tier: str = "free"
    # No tiers: every bot's route names its own fixed model chain (``routes.*.models``).
    tiers: dict[str, UserTier] = Field(default_factory=dict)
    users: dict[str, str] = Field(default_factory=dict)
    currency: str = "CNY"
    tenant_quota: Quota = Quota()
    group_quota: Quota = Quota()
    vision_models: tuple[str, ...] = ()
    image_max_bytes: int = Field(default=5 * 1024 * 1024, gt=0)
    image_timeout_s: float = Field(default=5.0, gt=0)
    message_types: MessageTypes = MessageTypes()
    commands: Commands = Commands()
    # A reservation whose worker died is released after this long (longer than any
    # model call with its retries: the model stage's deadline).
    reservation_ttl_s: float = Field(default=300.0, gt=0)
    tier_cache_s: float = Field(default=30.0, ge=0)  # how long a tier looked up is trusted

    @field_validator("users")
    @classmethod
    def _user_ids(cls, users: dict[str, str]) -> dict[str, str]:
        for user in users:
            if not user or len(user) > USER_ID_MAX:
                raise ValueError(f"user id {user[:USER_ID_MAX]!r} is empty or too long")
        return users

    @model_validator(mode="after")
    def _consistent(self) -> Routing:
        names = [level.name for level in self.levels]
        if not names:
            raise ValueError("levels: at least one level")
        if len(set(names)) != len(names):
            raise ValueError(f"levels: names repeat: {names}")
        bounds = [level.below for level in self.levels]
        if bounds[-1] is not None:
            raise ValueError("levels: the last level takes every higher score (no `below`)")
        inner = [b for b in bounds[:-1] if b is not None]
        if len(inner) != len(bounds) - 1 or inner != sorted(inner) or len(set(inner)) != len(inner):
            raise ValueError("levels: every level but the last needs a `below`, increasing")
        for tier_name, tier in self.tiers.items():
            missing = [n for n in names if not tier.models.get(n)]
            extra = sorted(set(tier.models) - set(names))
            if missing or extra:
                raise ValueError(
                    f"tiers.{tier_name}.models: needs a model chain for each level {names}"
                    + (f"; missing {missing}" if missing else "")
                    + (f"; unknown levels {extra}" if extra else "")
                )
        if self.tiers and self.default_tier not in self.tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not one of the tiers")
        unknown = sorted({t for t in self.users.values() if t not in self.tiers})
        if unknown:
            raise ValueError(f"users: unknown tiers {unknown}")
        return self

    @property
    def enabled(self) -> bool:
        """Whether tiers choose the models (else each route's fixed chain does)."""
        return bool(self.tiers)

    def level_for(self, score: float) -> Level:
        for level in self.levels:
            if level.below is None or score < level.below:
                return level
        return self.levels[-1]

    def model_names(self) -> set[str]:
        names = set(self.vision_models)
        for tier in self.tiers.values():
            for chain in tier.models.values():
                names.update(chain)
        return names

    def command(self, text: str) -> Literal["reset", "help"] | None:
        word = text.strip().casefold()
        if not word or len(word) > 32:
            return None
        if word in {w.casefold() for w in self.commands.reset}:
            return "reset"
        if word in {w.casefold() for w in self.commands.help}:
            return "help"
        return None


MICROS = 1_000_000  # money is counted in millionths of the policy's currency


def to_micros(amount: float) -> int:
    """An amount of money in micro-units, rounded up (a budget is never under-charged)."""
    return int(-(-round(amount * MICROS * 1000) // 1000))


class QuotaScope(BaseModel):
    """One budget a call is counted against: a key naming its owner and period
    (``user:U:d:2026-12-01``) and its limits (None: not limited, only counted)."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(max_length=200)
    label: str  # "user daily", "tenant monthly", … (what an answer or `imbot usage` shows)
    tokens: int | None = None
    micros: int | None = None
    # Counted by every message (the tenant's): held against budget leases, never
    # reserved per call in its row (storage.leases).
    shared: bool = False
