"""route: which model answers, and why (the pure parts are in ``imbot.routing``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Literal, Self

from imbot.core.envelope import ChatType, Envelope, ImageRef, QuotaView, RouteDecision, Turn
from imbot.core.routing import MICROS
from imbot.core.settings import Policy, RoutePolicy
from imbot.core.tokens import estimate_tokens
from imbot.routing.budgets import DEFAULT_OUTPUT_CAP, Budgets, budget_view
from imbot.routing.complexity import score_complexity
from imbot.routing.health import OpenCircuits, healthy
from imbot.routing.tiers import TierBook
from imbot.storage import History, QuotaStates, UsageRecords
from imbot.streams.boundary import Emit
from imbot.streams.metrics import ROUTE_DECISIONS
from imbot.streams.stages.base import PipelineStage, Resources, answer

log = logging.getLogger("imbot.stages")


def is_demo(policy: Policy, model: str) -> bool:
    entry = policy.models.get(model)
    return entry is not None and entry.provider == "demo"


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
        usage: UsageRecords | None = None,
    ) -> None:
        self.usage = usage
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
            usage=store.usage,
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
            return [answer(env, self.name, self.replies.reset_done, "command")]
        tier = await self.tiers.tier_of(env.sender) if self.routing.enabled else None
        if command == "help":
            ROUTE_DECISIONS.labels("command_help", tier or "").inc()
            return [answer(env, self.name, await self._help(env, tier), "command")]
        routed = await self._route(env, text, tier, images)
        return [] if routed is None else [routed]

    async def _route(
        self, env: Envelope, text: str, tier: str | None, images: tuple[ImageRef, ...]
    ) -> Emit | None:
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
        # The budgets' standing does not depend on the history: both are read at once,
        # so a budget costs the route no round trip of its own.
        standing = (
            asyncio.ensure_future(self.quota.states(self.budgets.scopes(env, tier)))
            if tier is not None
            else None
        )
        try:
            history = await self._history(env, route, chain)
        except BaseException:
            if standing is not None:
                standing.cancel()
                standing.add_done_callback(_retrieved)
            raise
        if complexity is not None and history:
            complexity = complexity.with_turns(len(history))
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
            assert standing is not None
            assert user_tier is not None
            states = await standing

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
                usage = self.usage if env.replay is None else None  # a replay runs again
                if usage is not None and await usage.answered(env.msg_id):
                    # Its own first copy spent the budget: that copy's answer is the one.
                    log.info("already answered: copy dropped", extra={"msg_id": env.msg_id})
                    return None
                ROUTE_DECISIONS.labels("quota_exhausted", tier).inc()
                decision = RouteDecision(
                    route=route_name, models=(), rule="quota_exhausted", tier=tier, quota=quota
                )
                return answer(env, self.name, self.replies.quota_exhausted, "quota", route=decision)
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
            live=self._live(env),
        )
        return Emit(self.forward, env.stamped(self.name, route=decision))

    def _live(self, env: Envelope) -> Literal["stream", "typing", ""]:
        """How the user sees the answer coming (policy ``streaming``): streamed in the
        chats it is on for, else a typing indicator where that is on."""
        streaming = self.policy.streaming
        where = {ChatType.direct: "chat", ChatType.group: "group"}.get(env.chat_type)
        if streaming.enabled and where in streaming.chat_types:
            return "stream"
        return "typing" if streaming.typing else ""

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
        return [answer(env, self.name, self.replies.unsupported, "unsupported")]

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


def _retrieved(task: asyncio.Task[Any]) -> None:
    """A read given up (the history read failed): its own error, if any, is dropped."""
    if not task.cancelled():
        task.exception()
