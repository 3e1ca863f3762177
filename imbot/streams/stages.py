"""The pipeline's stages: each one a plain async function from an envelope to outputs.

moderate-in → route → model → moderate-out → send. A stage that decides the final
answer early (input blocked, unsupported message type, content rejected by the
provider) emits straight to ``imbot.outbound`` with ``reply`` set; the sender
delivers whatever reaches it. Agents (``streams.worker``) only decode, call
``handle`` inside the error boundary, and publish.

Each class names its row of the pipeline table (``streams.pipeline``), from which
it takes its name, its input topic, the topic its main output goes to (the next
row's input) and whether a fatal failure answers the user. Its constructor takes
exactly what it uses; ``build`` picks that out of the worker's ``Resources``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, Self

from imbot.adapters import (
    ChatMessage,
    ChatRequest,
    CompletionResult,
    Delta,
    ImagePart,
    ModelCatalog,
    UnsupportedInput,
    Usage,
    UsageEvent,
    image_from_bytes,
)
from imbot.core import topics
from imbot.core.envelope import (
    Completion,
    Envelope,
    ImageRef,
    QuotaView,
    Reply,
    ReplyKind,
    RouteDecision,
    Turn,
    Verdict,
)
from imbot.core.errors import (
    ConfigurationError,
    ContentRejected,
    FatalError,
    RetryableError,
    StorageError,
    StorageUnavailable,
)
from imbot.core.retry import Backoff
from imbot.core.routing import MICROS, QuotaScope, Routing, to_micros
from imbot.core.settings import Policy, Replies, RoutePolicy, Settings
from imbot.core.tokens import estimate_tokens
from imbot.moderation.metrics import MODERATION_DECISIONS
from imbot.routing.choice import Price, scopes_for, standing, worst_case_micros
from imbot.routing.complexity import score_complexity
from imbot.storage import (
    AuditEntry,
    AuditLog,
    Health,
    History,
    Quotas,
    QuotaStates,
    Reservation,
    ScopeState,
    StageStorage,
    Tiers,
    UsageRecords,
)
from imbot.streams import pipeline
from imbot.streams.boundary import AfterPublish, Emit
from imbot.streams.metrics import QUOTA_SETTLE_LOST, REPLIES, ROUTE_DECISIONS, SANDBOXED, USAGE_LOST
from imbot.streams.pipeline import StageSpec

if TYPE_CHECKING:  # loaded only by the workers that run these stages
    from imbot.moderation import ModerationResult, Moderator
    from imbot.sender.easemob import Attachment, EasemobClient
    from imbot.sender.service import ReplySender


log = logging.getLogger("imbot.stages")


class Resources:
    """What the stages of one worker share, opened once by the worker for the rows it
    runs (``StageSpec.needs``). Asking for a part no selected row declared is a
    configuration error, so a row's ``needs`` cannot fall behind its class."""

    def __init__(
        self,
        settings: Settings,
        *,
        storage: StageStorage | None = None,
        moderator: Moderator | None = None,
        catalog: ModelCatalog | None = None,
        sender: ReplySender | None = None,
        easemob: EasemobClient | None = None,
    ) -> None:
        self.settings = settings
        self.policy: Policy = settings.policy
        self._parts: dict[pipeline.Resource, Any] = {
            "storage": storage,
            "moderator": moderator,
            "catalog": catalog,
            "sender": sender,
            "easemob": easemob,
        }

    def _part(self, name: pipeline.Resource) -> Any:
        part = self._parts[name]
        if part is None:
            raise ConfigurationError(f"no {name} opened: the stage's row must name it in needs")
        return part

    @property
    def storage(self) -> StageStorage:
        part: StageStorage = self._part("storage")
        return part

    @property
    def moderator(self) -> Moderator:
        part: Moderator = self._part("moderator")
        return part

    @property
    def catalog(self) -> ModelCatalog:
        part: ModelCatalog = self._part("catalog")
        return part

    @property
    def sender(self) -> ReplySender:
        part: ReplySender = self._part("sender")
        return part

    @property
    def easemob(self) -> EasemobClient:
        part: EasemobClient = self._part("easemob")
        return part


def _answer(env: Envelope, stage: str, text: str, kind: ReplyKind, **changes: object) -> Emit:
    REPLIES.labels(kind).inc()
    reply = Reply(text=text, kind=kind)
    return Emit(topics.OUTBOUND, env.stamped(stage, reply=reply, **changes))


async def _audit(audit: AuditLog, env: Envelope, stage: str, result: ModerationResult) -> None:
    if result.action == "allow":
        return
    entries = [AuditEntry(f.detector, f.rule, f.category, f.action) for f in result.findings]
    for f in result.findings:
        MODERATION_DECISIONS.labels(stage, f.category, f.action).inc()
    await audit.record_audit(env.msg_id, stage, entries)


class PipelineStage:
    """A stage class; ``class Route(PipelineStage, stage="route")`` binds it to its row
    of ``streams.pipeline.PIPELINE`` and registers it in ``STAGES``."""

    spec: StageSpec
    name: str
    input_topic: str
    forward: str  # where its main output goes: the next row's input
    replies: Replies  # the policy's replies (a stage whose row answers on failure sets it)

    def __init_subclass__(cls, *, stage: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if stage not in pipeline.BY_NAME:
            raise TypeError(f"no row {stage!r} in streams.pipeline.PIPELINE: add it there")
        if stage in STAGES:
            raise TypeError(f"stage {stage!r} has two classes")
        cls.spec = pipeline.spec(stage)
        cls.name = cls.spec.name
        cls.input_topic = cls.spec.input
        cls.forward = cls.spec.forward
        STAGES[stage] = cls

    @classmethod
    def build(cls, r: Resources) -> Self:
        """The stage over the parts of ``r`` its row names in ``needs``."""
        raise NotImplementedError

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit | AfterPublish]:
        raise NotImplementedError

    def fallback(self, env: Envelope, error: BaseException) -> Emit | None:
        """What the user gets when this stage fails for good; None when its row says
        nobody is waiting on it (``StageSpec.answers_on_failure``)."""
        return self._fallback(env) if self.spec.answers_on_failure else None

    def _fallback(self, env: Envelope) -> Emit:
        return _answer(env, self.name, self.replies.fallback, "fallback")


STAGES: dict[str, type[PipelineStage]] = {}
"""The class of each row of ``streams.pipeline.PIPELINE``, by stage name."""


class ModerateIn(PipelineStage, stage="moderate-in"):
    def __init__(self, policy: Policy, moderator: Moderator, audit: AuditLog) -> None:
        self.replies = policy.replies
        self.moderator = moderator
        self.audit = audit

    @classmethod
    def build(cls, r: Resources) -> Self:
        return cls(r.policy, r.moderator, r.storage.audit)

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit]:
        text = env.content.text
        if env.content.type != "txt" or not text:
            return [
                Emit(self.forward, env.stamped(self.name, moderation_in=Verdict(action="allow")))
            ]
        result = self.moderator.check_input(text)
        await _audit(self.audit, env, "input", result)
        verdict = result.as_verdict()
        if result.action == "block":
            return [
                _answer(
                    env,
                    self.name,
                    self.replies.blocked_input,
                    "blocked_input",
                    moderation_in=verdict,
                )
            ]
        return [Emit(self.forward, env.stamped(self.name, moderation_in=verdict))]


class Files(Protocol):
    """Where the model stage fetches an image message's file (``EasemobClient``)."""

    async def download_file(
        self, url: str, *, secret: str | None = None, max_bytes: int, timeout_s: float
    ) -> Attachment: ...


class TierBook:
    """A user's tier from server-side sources only: the tiers table (``imbot users
    set-tier``), then the policy's ``routing.users``, then ``routing.default_tier``;
    never the message's ``ext``. Table answers are cached ``routing.tier_cache_s``."""

    def __init__(self, routing: Routing, tiers: Tiers) -> None:
        self._routing = routing
        self._tiers = tiers
        self._cache: dict[str, tuple[float, str | None]] = {}

    async def tier_of(self, user: str) -> str:
        now = time.monotonic()
        hit = self._cache.get(user)
        if hit is not None and hit[0] > now:
            stored = hit[1]
        else:
            stored = await self._tiers.tier_of(user)
            if len(self._cache) >= 100_000:
                self._cache.clear()
            self._cache[user] = (now + self._routing.tier_cache_s, stored)
        if stored in self._routing.tiers:
            return stored
        return self._routing.users.get(user, self._routing.default_tier)


class OpenCircuits:
    """The models whose circuit some model worker reported open (``ModelHealth``), read
    at most every ``ttl_s`` by this process; a database hiccup reads as none open."""

    def __init__(self, health: Health, *, ttl_s: float = 2.0) -> None:
        self._health = health
        self._ttl_s = ttl_s
        self._until = 0.0
        self._open: frozenset[str] = frozenset()

    async def models(self) -> frozenset[str]:
        now = time.monotonic()
        if now >= self._until:
            self._until = now + self._ttl_s
            try:
                self._open = await self._health.open_models()
            except (StorageUnavailable, StorageError):
                self._open = frozenset()
        return self._open


def healthy(
    chain: Sequence[str], open_models: frozenset[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the chain without models whose circuit is open, those left out). When every model
    of the chain is open the chain stays whole: the catalog's own breakers decide then
    (one may be half-open), and the fallback reply follows if none answers."""
    kept = tuple(m for m in chain if m not in open_models)
    if not kept:
        return tuple(chain), ()
    return kept, tuple(m for m in chain if m in open_models)


def budget_view(
    states: Sequence[ScopeState], tokens: int, micros: int, downgrade_at: float
) -> QuotaView:
    """Where the budgets stand for a call of this size, as the route stage sees them.

    Only what was spent closes a budget here. Calls in flight hold reservations that may
    settle for less, or belong to a worker that died: they make it "near", and the model
    stage's reservation (atomic, expiring the dead) decides."""
    used = standing([(s.scope, s.used_tokens, s.used_micros) for s in states], tokens, micros)
    view = used.view(downgrade_at, limited=bool(states))
    if view.state == "exhausted":
        spent = [(s.scope, s.spent_tokens, s.spent_micros) for s in states]
        if standing(spent, tokens, micros).fits:
            return view.model_copy(update={"state": "near"})
    return view


@dataclasses.dataclass(frozen=True, slots=True)
class Budgets:
    """The quota arithmetic both the route and the model stage do, over the policy."""

    policy: Policy
    prices: dict[str, Price]
    tenant: str

    @classmethod
    def of(cls, settings: Settings) -> Budgets:
        return cls(settings.policy, policy_prices(settings.policy), tenant_of(settings))

    def scopes(self, env: Envelope, tier: str) -> list[QuotaScope]:
        """The budgets a call for ``env`` counts against. A sandboxed replay is an
        operator's experiment: the app pays for its calls (the tenant's budgets), the
        user and the group whose message it replays do not."""
        if env.replay is not None and env.replay.sandbox:
            return self.scopes_of(tier, user=None, group=None)
        group = env.to if env.chat_type.value != "chat" else None
        return self.scopes_of(tier, user=env.sender, group=group)

    def scopes_of(self, tier: str, *, user: str | None, group: str | None) -> list[QuotaScope]:
        return scopes_for(
            self.policy.routing,
            tier,
            user=user,
            tenant=self.tenant,
            group=group,
            now=datetime.now(UTC),
        )

    def worst_case(self, chain: Sequence[str], input_tokens: int, max_output: int | None) -> int:
        return worst_case_micros(self.prices, chain, input_tokens, max_output or DEFAULT_OUTPUT_CAP)

    def spent_micros(self, model: str | None, completion: Completion | None) -> int:
        """What a finished call cost, in micro-units of the policy's currency."""
        if completion is None:
            return 0
        if completion.cost is not None and completion.currency == self.policy.routing.currency:
            return to_micros(completion.cost)
        price = self.prices.get(model or "")
        if price is None:
            return 0
        return price.micros(completion.input_tokens or 0, completion.output_tokens or 0)


class _PaidFailure(Exception):
    """A failed call whose reservation is already settled with what it produced."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _partial(model: str, usage: Usage) -> Completion:
    """What a broken stream is settled with (priced at the chain's first model)."""
    return Completion(
        text="",
        finish_reason="error",
        model=model,
        provider="",
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
    )


SWEEP_EVERY_S = 30.0  # how often a model worker looks for reservations of dead workers
DEFAULT_OUTPUT_CAP = 1024  # output tokens reserved for a route without max_output_tokens


def tenant_of(settings: Settings) -> str:
    """The tenant a tenant quota counts: the Easemob app."""
    return f"{settings.easemob_org}#{settings.easemob_app}"


def policy_prices(policy: Policy) -> dict[str, Price]:
    """Each catalog model's price in the policy's currency (the routing budgets' one)."""
    prices = {}
    for name, entry in policy.models.items():
        price = entry.get("price")
        if not isinstance(price, dict):
            continue
        if price.get("currency", policy.routing.currency) != policy.routing.currency:
            raise ConfigurationError(
                f"models.{name}.price is in {price.get('currency')}, the budgets in"
                f" {policy.routing.currency} (routing.currency): one currency per policy"
            )
        prices[name] = Price(float(price.get("input", 0)), float(price.get("output", 0)))
    return prices


def is_demo(policy: Policy, model: str) -> bool:
    return bool(policy.models.get(model, {}).get("provider") == "demo")


class Route(PipelineStage, stage="route"):
    """Which model answers, and why: message type, commands, the user's tier, the
    question's complexity, the budgets' standing. Every decision is written on the
    envelope (``RouteDecision``), so trace and replay say why."""

    def __init__(
        self,
        policy: Policy,
        history: History,
        *,
        tiers: TierBook,
        quota: QuotaStates,
        budgets: Budgets,
        circuits: OpenCircuits | None = None,
    ) -> None:
        self.policy = policy
        self.circuits = circuits
        self.routing = policy.routing
        self.replies = policy.replies
        self.history = history
        self.tiers = tiers
        self.quota = quota
        self.budgets = budgets

    @classmethod
    def build(cls, r: Resources) -> Self:
        store = r.storage
        return cls(
            r.policy,
            store.history,
            tiers=TierBook(r.policy.routing, store.tiers),
            quota=store.quota,
            budgets=Budgets.of(r.settings),
            circuits=OpenCircuits(store.health),
        )

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit]:
        kind = env.content.type
        text = env.user_text
        images: tuple[ImageRef, ...] = ()
        if kind == "img":
            action = self.routing.message_types.img
            if action == "vision" and self.routing.vision_models:
                images = _image_refs(env)
            if not images:
                return self._non_text(env, "ignore" if action == "ignore" else "reply")
        elif kind not in ("txt", "combine"):
            return self._non_text(env, getattr(self.routing.message_types, kind, "reply"))
        elif not text.strip():
            return self._ignore(env, "empty")
        command = self.routing.command(text) if not images else None
        if command == "reset":
            await self.history.clear_history(env.conversation_id)
            ROUTE_DECISIONS.labels("command_reset", "").inc()
            return [_answer(env, self.name, self.replies.reset_done, "command")]
        tier = await self.tiers.tier_of(env.sender) if self.routing.enabled else None
        if command == "help":
            ROUTE_DECISIONS.labels("command_help", tier or "").inc()
            return [_answer(env, self.name, await self._help(env, tier), "command")]
        return [await self._route(env, text, tier, images)]

    async def _route(
        self, env: Envelope, text: str, tier: str | None, images: tuple[ImageRef, ...]
    ) -> Emit:
        policy, routing = self.policy, self.routing
        bot = policy.bot(env.bot)
        route_name = bot.route if bot is not None and bot.route in policy.routes else "default"
        route = policy.routes[route_name]
        user_tier = routing.tiers.get(tier) if tier is not None else None
        max_output = (user_tier.max_output_tokens if user_tier else None) or route.max_output_tokens
        # The window a candidate chain would be shown (the demo's turns left out of a
        # real model's), read once for the chain we start from.
        rule, level, complexity = "fixed", None, None
        if images:
            chain, rule = routing.vision_models, "vision"
        elif route.models or user_tier is None:
            chain = route.models
        else:
            complexity = score_complexity(text, turns=0)
            level = routing.level_for(complexity.score).name
            chain, rule = user_tier.models[level], "level"
        history = await self._history(env, route, chain)
        if complexity is not None and history:
            complexity = score_complexity(text, turns=len(history))
            level = routing.level_for(complexity.score).name
            assert user_tier is not None
            chain = user_tier.models[level]
        quota = QuotaView()
        if tier is not None:
            prompt = (
                estimate_tokens(route.system_prompt or "")
                + estimate_tokens(text)
                + sum(estimate_tokens(t.content) for t in history)
            )
            states = await self.quota.states(self.budgets.scopes(env, tier))
            assert user_tier is not None

            def standing_of(chain: Sequence[str]) -> QuotaView:
                return budget_view(
                    states,
                    prompt + (max_output or DEFAULT_OUTPUT_CAP),
                    self.budgets.worst_case(chain, prompt, max_output),
                    user_tier.downgrade_at,
                )

            quota = standing_of(chain)
            if quota.state in ("near", "exhausted") and rule == "level":
                cheapest = user_tier.models[routing.levels[0].name]
                if tuple(cheapest) != tuple(chain):
                    chain, rule, level = cheapest, "downgrade", routing.levels[0].name
                    quota = standing_of(chain)
            if quota.state == "exhausted":
                ROUTE_DECISIONS.labels("quota_exhausted", tier).inc()
                decision = RouteDecision(
                    route=route_name, models=(), rule="quota_exhausted", tier=tier, quota=quota
                )
                return _answer(
                    env, self.name, self.replies.quota_exhausted, "quota", route=decision
                )
        skipped: tuple[str, ...] = ()
        if self.circuits is not None:
            chain, skipped = healthy(chain, await self.circuits.models())
        ROUTE_DECISIONS.labels(rule, tier or "").inc()
        decision = RouteDecision(
            route=route_name,
            models=tuple(chain),
            skipped=skipped,
            system_prompt=route.system_prompt,
            history=history,
            max_output_tokens=max_output,
            rule=rule,
            tier=tier,
            level=level,
            score=None if complexity is None else round(complexity.score, 4),
            # The features that fired (the others are 0): the record stays small.
            features={}
            if complexity is None
            else {k: v for k, v in complexity.features.items() if v},
            quota=quota,
            images=images,
            stream=route.stream,
        )
        return Emit(self.forward, env.stamped(self.name, route=decision))

    async def _history(
        self, env: Envelope, route: RoutePolicy, chain: Sequence[str]
    ) -> tuple[Turn, ...]:
        real = bool(chain) and not is_demo(self.policy, chain[0])
        return await self.history.history_window(
            env.conversation_id,
            turns=route.history_turns,
            token_budget=route.history_token_budget,
            before_msg_id=env.msg_id,
            skip_providers=DEMO_PROVIDERS if real else frozenset(),
        )

    def _non_text(self, env: Envelope, action: str) -> list[Emit]:
        if action == "ignore":
            return self._ignore(env, env.content.type)
        ROUTE_DECISIONS.labels("unsupported", "").inc()
        return [_answer(env, self.name, self.replies.unsupported, "unsupported")]

    def _ignore(self, env: Envelope, why: str) -> list[Emit]:
        """Nothing to answer (empty text, a type the policy ignores): acknowledged and
        counted, never sent on."""
        ROUTE_DECISIONS.labels(f"ignored_{why}", "").inc()
        log.info("message ignored", extra={"msg_id": env.msg_id, "reason": why})
        return []

    async def _help(self, env: Envelope, tier: str | None) -> str:
        left = {"daily_tokens_left": "不限", "daily_cost_left": "不限", "monthly_cost_left": "不限"}
        if tier is not None:
            for state in await self.quota.states(self.budgets.scopes(env, tier)):
                scope = state.scope
                if not scope.label.startswith("user "):
                    continue
                period = scope.label.removeprefix("user ")
                if scope.tokens is not None and period == "daily":
                    left["daily_tokens_left"] = str(max(0, scope.tokens - state.used_tokens))
                if scope.micros is not None:
                    money = max(0, scope.micros - state.used_micros) / MICROS
                    left[f"{period}_cost_left"] = f"{money:.2f}"
        reset = self.routing.commands.reset[0] if self.routing.commands.reset else ""
        return self.replies.help.format_map(
            {**left, "tier": tier or "-", "currency": self.routing.currency, "reset": reset}
        )


DEMO_PROVIDERS = frozenset({"demo"})


def _image_refs(env: Envelope) -> tuple[ImageRef, ...]:
    url = env.content.body.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        return ()
    secret = env.content.body.get("secret")
    filename = env.content.body.get("filename")
    return (
        ImageRef(
            url=url[:2048],
            secret=secret[:256] if isinstance(secret, str) else None,
            filename=filename[:256] if isinstance(filename, str) else None,
        ),
    )


def chat_request(env: Envelope, images: Sequence[ImagePart] = ()) -> ChatRequest:
    route = env.route
    assert route is not None
    messages: list[ChatMessage] = []
    if route.system_prompt:
        messages.append(ChatMessage(role="system", content=route.system_prompt))
    messages.extend(ChatMessage(role=t.role, content=t.content) for t in route.history)
    messages.append(ChatMessage(role="user", content=env.user_text, images=tuple(images)))
    # Providers get an opaque id for abuse tracking, never the Easemob user id.
    user_hash = hashlib.sha256(env.sender.encode()).hexdigest()[:16]
    return ChatRequest(
        messages=tuple(messages), max_output_tokens=route.max_output_tokens, user_id=user_hash
    )


class CallModel(PipelineStage, stage="model"):
    """The model call, paid for in advance: the worst case it may cost is reserved in the
    shared quota ledger before any provider is called (refused: the quota reply, no
    call), and settled with the real usage as soon as the call returns or fails."""

    def __init__(
        self,
        policy: Policy,
        catalog: ModelCatalog,
        *,
        audit: AuditLog,
        history: History,
        usage: UsageRecords,
        quota: Quotas,
        budgets: Budgets,
        files: Files | None = None,
        health: Health | None = None,
    ) -> None:
        self.health = health
        self._circuits: dict[str, str] = {}  # model → the state last written to health
        self.replies = policy.replies
        self.routing = policy.routing
        self.files = files
        self._next_sweep = 0.0
        self.catalog = catalog
        self.audit = audit
        self.history = history
        self.usage = usage
        self.quota = quota
        self.budgets = budgets

    @classmethod
    def build(cls, r: Resources) -> Self:
        store = r.storage
        return cls(
            r.policy,
            r.catalog,
            audit=store.audit,
            history=store.history,
            usage=store.usage,
            quota=store.quota,
            budgets=Budgets.of(r.settings),
            files=r.easemob,
            health=store.health,
        )

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit | AfterPublish]:
        route = env.route
        if route is None or not route.models:
            return [self._fallback(env)]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RetryableError("no time left for the model call")
        try:
            images = await self._images(route)
        except (UnsupportedInput, FatalError) as exc:
            # A file Easemob no longer has, one too large, a format no provider reads.
            log.info(
                "image not sent to a model",
                extra={"msg_id": env.msg_id, "error": type(exc).__name__},
            )
            return [_answer(env, self.name, self.replies.unsupported, "unsupported")]
        request = chat_request(env, images)
        await self._sweep()
        held = await self._reserve(env, route, request)
        if isinstance(held, QuotaView):
            ROUTE_DECISIONS.labels("quota_refused", route.tier or "").inc()
            refused = route.model_copy(update={"quota": held})
            return [_answer(env, self.name, self.replies.quota_exhausted, "quota", route=refused)]
        if held is not None:
            route = route.model_copy(
                update={
                    "quota": route.quota.model_copy(
                        update={
                            "reservation": held.id,
                            "reserved_tokens": held.tokens,
                            "reserved_micros": held.micros,
                        }
                    )
                }
            )
            env = env.model_copy(update={"route": route})
        try:
            if route.stream:
                result = await self._streamed(env, route, request, remaining, held)
            else:
                result = await self.catalog.complete(route.models, request, deadline_s=remaining)
        except ContentRejected as exc:
            await self._report_circuits(route.models)
            await self._settle(env, held, None)
            # The provider's safety system refused: audited like our own moderation.
            # The audit row (and the history clear a provider may ask for) is written
            # after the reply is published, like the usage row: a database hiccup here
            # must not make the boundary call the provider again.
            MODERATION_DECISIONS.labels("model", f"provider_{exc.stage}", "block").inc()
            return [
                _answer(env, self.name, self.replies.rejected, "rejected"),
                AfterPublish(functools.partial(self._record_refusal, env, exc)),
            ]
        except _PaidFailure as failed:
            await self._report_circuits(route.models)
            raise failed.error from None  # settled with what the stream had produced
        except Exception:
            await self._report_circuits(route.models)
            # Failed calls are not billed by the providers we speak to (an error status,
            # a broken connection before the answer): the reservation is released.
            await self._settle(env, held, None)
            raise
        except BaseException:
            await self._settle(env, held, None)
            raise
        await self._report_circuits(route.models)
        completion = Completion(
            text=result.text,
            finish_reason=result.finish_reason,
            model=result.model_id,
            provider=result.provider,
            input_tokens=result.usage.input_tokens if result.usage else None,
            output_tokens=result.usage.output_tokens if result.usage else None,
            cost=result.cost,
            currency=result.currency,
            latency_ms=result.latency_ms,
            provider_request_id=result.provider_request_id,
            attempts=result.attempts,
        )
        # Settled before the completion goes on: a crash after this point re-runs the
        # call, and that second call is paid (and reserved, and settled) again.
        await self._settle(env, held, completion)
        # The usage row is written once the completion is on its way to the next
        # stage, and before this record is acknowledged: durable, but off the path
        # the user waits on (a commit costs milliseconds).
        return [
            Emit(self.forward, env.stamped(self.name, completion=completion)),
            AfterPublish(functools.partial(self._record_usage, env, completion)),
        ]

    async def _report_circuits(self, chain: Sequence[str]) -> None:
        """Tell the other workers (the route stage) when a circuit of this chain changed
        state: open until its cooldown ends, or closed again. Rare, and best effort."""
        if self.health is None:
            return
        for model in chain:
            try:
                breaker = self.catalog.entry(model).breaker
            except ConfigurationError:
                continue
            state = "open" if breaker.state == "open" else "closed"
            if self._circuits.get(model, "closed") == state:
                continue
            until = datetime.now(UTC) + timedelta(seconds=breaker.retry_in() or 0)
            try:
                await self.health.set_open_until(model, until)
            except (StorageUnavailable, StorageError):
                continue  # tried again at the next call
            self._circuits[model] = state
            log.info("circuit state shared", extra={"model": model, "state": state})

    async def _reserve(
        self, env: Envelope, route: RouteDecision, request: ChatRequest
    ) -> Reservation | QuotaView | None:
        """The reservation for this call; a ``QuotaView`` saying which budget refused it;
        None when the user's tier has no budget to count against."""
        if route.tier is None:
            return None
        scopes = self.budgets.scopes(env, route.tier)
        if not scopes:
            return None
        prompt = sum(estimate_tokens(m.content) for m in request.messages)
        if route.images:
            prompt += max(self.catalog.image_tokens(m, request) for m in route.models)
        cap = route.max_output_tokens or DEFAULT_OUTPUT_CAP
        outcome = await self.quota.reserve(
            reservation_id=uuid.uuid4().hex,
            msg_id=env.msg_id,
            user_id=env.sender,
            tier=route.tier,
            model=route.models[0],
            scopes=scopes,
            tokens=prompt + cap,
            micros=self.budgets.worst_case(route.models, prompt, cap),
            ttl_s=self.routing.reservation_ttl_s,
        )
        if isinstance(outcome, str):
            return QuotaView(state="exhausted", share=1.0, scope=outcome)
        return outcome

    async def _streamed(
        self,
        env: Envelope,
        route: RouteDecision,
        request: ChatRequest,
        remaining: float,
        held: Reservation | None,
    ) -> CompletionResult:
        """The call as a stream (``routes.<name>.stream``), assembled. A stream that
        breaks after its first event was partly produced, and providers bill what they
        produced: it is settled with the last usage the provider reported, else with
        an estimate of the prompt and the text received, before the error goes on."""
        text: list[str] = []
        usage: Usage | None = None
        try:
            async for event in self.catalog.stream(route.models, request, deadline_s=remaining):
                if isinstance(event, Delta):
                    text.append(event.text)
                elif isinstance(event, UsageEvent):
                    usage = event.usage
                elif event.result is not None:
                    return event.result
        except Exception as exc:
            if not text and usage is None:
                raise  # nothing was produced: released like any failed call
            partial = usage or Usage(
                input_tokens=sum(estimate_tokens(m.content) for m in request.messages),
                output_tokens=estimate_tokens("".join(text)),
            )
            await self._settle(env, held, _partial(route.models[0], partial))
            raise _PaidFailure(exc) from None
        raise RetryableError("the model's stream ended without its end event", code="stream_cut")

    async def _images(self, route: RouteDecision) -> list[ImagePart]:
        """The route's images, downloaded from Easemob (bounded in size and time)."""
        if not route.images:
            return []
        if self.files is None:
            raise UnsupportedInput("no Easemob client to fetch images with", code="no_files")
        parts = []
        for ref in route.images:
            file: Attachment = await self.files.download_file(
                ref.url,
                secret=ref.secret,
                max_bytes=self.routing.image_max_bytes,
                timeout_s=self.routing.image_timeout_s,
            )
            parts.append(image_from_bytes(file.data))
        return parts

    async def _sweep(self) -> None:
        """Now and then, return the reservations of workers that died (a refused
        reservation also does it at once, see ``QuotaLedger.reserve``)."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + SWEEP_EVERY_S
        with contextlib.suppress(StorageUnavailable, StorageError):
            expired = await self.quota.expire_stale()
            if expired:
                log.info("reservations expired", extra={"count": expired})

    async def _settle(
        self, env: Envelope, held: Reservation | None, completion: Completion | None
    ) -> None:
        """Replace the reservation by the real spend. Never raises: after a paid call a
        raise would make the boundary pay for it again. Unwritten, the reservation
        expires after its time to live (and the spend is lost, and counted)."""
        if held is None:
            return
        tokens = 0
        if completion is not None:
            tokens = (completion.input_tokens or 0) + (completion.output_tokens or 0)
        micros = self.budgets.spent_micros(completion.model if completion else None, completion)
        if not await _after_call_write(
            "quota settlement",
            env,
            functools.partial(self.quota.settle, held, tokens=tokens, micros=micros),
        ):
            QUOTA_SETTLE_LOST.inc()

    async def _record_usage(self, env: Envelope, completion: Completion) -> None:
        """Account for the paid call now; a database hiccup must not buy it twice."""
        if not await _after_call_write(
            "usage row", env, functools.partial(self.usage.record_usage, env, completion)
        ):
            USAGE_LOST.inc()

    async def _record_refusal(self, env: Envelope, exc: ContentRejected) -> None:
        category = f"provider_{exc.stage}"
        entry = AuditEntry("provider", (exc.provider or "unknown")[:120], category, "block")
        await _after_call_write(
            "refusal audit",
            env,
            functools.partial(self.audit.record_audit, env.msg_id, "model", [entry]),
        )
        if exc.clear_history:
            # e.g. ERNIE's need_clear_history: later turns would be refused again
            # (and the provider asks for it) unless the risky context is dropped.
            await _after_call_write(
                "history clear",
                env,
                functools.partial(self.history.clear_history, env.conversation_id),
            )


async def _after_call_write(what: str, env: Envelope, write: Callable[[], Awaitable[None]]) -> bool:
    """A write that follows a paid model call; True when it was written.

    Raising would make the boundary call the model again, so the write is retried a
    few times on its own and then given up with an error line: three tries, waiting
    up to 0.1 s and 0.2 s between them (core.retry's full jitter).
    """
    tries, backoff = 3, Backoff(base=0.1, cap=0.2)
    for attempt in range(1, tries + 1):
        try:
            await write()
            return True
        except (StorageUnavailable, StorageError) as exc:
            if attempt == tries:
                log.error(
                    f"{what} not written",
                    extra={"msg_id": env.msg_id, "error": type(exc).__name__},
                )
                return False
            await asyncio.sleep(backoff.delay(attempt))
    return False


class ModerateOut(PipelineStage, stage="moderate-out"):
    def __init__(self, policy: Policy, moderator: Moderator, audit: AuditLog) -> None:
        self.replies = policy.replies
        self.moderator = moderator
        self.audit = audit

    @classmethod
    def build(cls, r: Resources) -> Self:
        return cls(r.policy, r.moderator, r.storage.audit)

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit]:
        completion = env.completion
        if completion is None:
            return [self._fallback(env)]
        result = self.moderator.check_output(
            completion.text,
            finish_reason=completion.finish_reason,
            system_prompt=env.route.system_prompt if env.route else None,
        )
        await _audit(self.audit, env, "output", result)
        verdict = result.as_verdict()
        if result.action == "block" or not result.text.strip():
            return [
                _answer(
                    env,
                    self.name,
                    self.replies.blocked_output,
                    "blocked_output",
                    moderation_out=verdict,
                )
            ]
        # Its row's main output is the sender's input: the answer goes to the user.
        return [_answer(env, self.name, result.text, "answer", moderation_out=verdict)]


class Send(PipelineStage, stage="send"):
    def __init__(self, sender: ReplySender, *, deadline_s: float) -> None:
        self.sender = sender
        # Keep trying through an Easemob outage far longer than a model stage would:
        # the answer exists and was paid for; only delivery is waiting.
        self.deadline_s = deadline_s

    @classmethod
    def build(cls, r: Resources) -> Self:
        return cls(r.sender, deadline_s=r.settings.sender_deadline_s)

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit]:
        if env.replay is not None and env.replay.sandbox:
            # A sandboxed replay: its reply is recorded for trace, never sent to a user.
            SANDBOXED.inc()
            return [Emit(topics.SANDBOX, env.stamped(self.name))]
        delivery = await self.sender.deliver(env, deadline=deadline)
        return [Emit(self.forward, env.stamped(self.name, delivery=delivery))]


class FeedbackRecords(Protocol):
    """Where the feedback stage writes a rating (``storage.FeedbackLog``)."""

    async def record_feedback(
        self,
        *,
        msg_id: str,
        reply_msg_id: str,
        rating: str,
        user_id: str,
        conversation_id: str,
        at: datetime,
    ) -> bool: ...


class RecordFeedback(PipelineStage, stage="feedback"):
    """A side stage: a user's rating of an answer (docs/feedback.md), as the gateway
    published it, written to the feedback table once per feedback message (a
    redelivered record writes nothing). Nothing goes on from here, and nobody waits
    on it: a record it cannot read goes to the DLQ without a reply."""

    def __init__(self, feedback: FeedbackRecords) -> None:
        self.feedback = feedback

    @classmethod
    def build(cls, r: Resources) -> Self:
        # The feedback table is the sender process's storage (``storage.Storage``), not
        # part of what the stages before the sender use (``StageStorage``).
        feedback: FeedbackRecords | None = getattr(r.storage, "feedback", None)
        if feedback is None:
            raise ConfigurationError("the feedback stage needs a storage with the feedback table")
        return cls(feedback)

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit]:
        body = env.content.body
        reply_msg_id, rating = body.get("reply_msg_id"), body.get("rating")
        if not (isinstance(reply_msg_id, str) and reply_msg_id and isinstance(rating, str)):
            raise FatalError("a feedback record without its reply_msg_id and rating")
        at = env.easemob_timestamp if env.easemob_timestamp is not None else env.received_at
        written = await self.feedback.record_feedback(
            msg_id=env.msg_id,
            reply_msg_id=reply_msg_id,
            rating=rating,
            user_id=env.sender,
            conversation_id=env.conversation_id,
            at=datetime.fromtimestamp(at / 1000, UTC),
        )
        if not written:
            log.info("feedback recorded before", extra={"msg_id": env.msg_id})
        return []


_unbound = set(pipeline.STAGE_NAMES) ^ set(STAGES)
if _unbound:  # a row without its class, or a class without its row
    raise ImportError(f"streams.pipeline and streams.stages disagree on {sorted(_unbound)}")
