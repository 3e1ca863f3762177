"""The pipeline's stages: each one a plain async function from an envelope to outputs.

moderate-in → route → model → moderate-out → send. A stage that decides the final
answer early (input blocked, unsupported message type, content rejected by the
provider) emits straight to ``imbot.outbound`` with ``reply`` set; the sender
delivers whatever reaches it. Agents (``streams.worker``) only decode, call
``handle`` inside the error boundary, and publish.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter

from adapters import ChatMessage, ChatRequest, ModelCatalog
from core import topics
from core.envelope import Completion, Envelope, Reply, ReplyKind, RouteDecision, Verdict
from core.errors import ContentRejected, RetryableError, StorageError, StorageUnavailable
from core.settings import Policy, Settings
from storage import AuditEntry, StageStorage
from streams.boundary import AfterPublish, Emit

if TYPE_CHECKING:  # loaded only by the workers that run these stages
    from moderation import ModerationResult, Moderator
    from sender.service import ReplySender

MODERATION_DECISIONS = Counter(
    "imbot_moderation_decisions_total",
    "Moderation decisions that were not a plain allow",
    ["stage", "category", "action"],
)
REPLIES = Counter("imbot_replies_total", "Replies decided, by kind", ["kind"])
USAGE_LOST = Counter(
    "imbot_usage_write_failures_total", "Model calls whose usage row could not be written"
)

log = logging.getLogger("imbot.stages")


@dataclass
class Context:
    """What the stages of one worker share (built once in the worker's main)."""

    settings: Settings
    policy: Policy
    store: StageStorage  # the repositories the stages use (storage.Storage in production)
    moderator: Moderator | None = None
    catalog: ModelCatalog | None = None
    sender: ReplySender | None = None


def _answer(env: Envelope, stage: str, text: str, kind: ReplyKind, **changes: object) -> Emit:
    REPLIES.labels(kind).inc()
    reply = Reply(text=text, kind=kind)
    return Emit(topics.OUTBOUND, env.stamped(stage, reply=reply, **changes))


def _fallback(ctx: Context, env: Envelope, stage: str) -> Emit:
    return _answer(env, stage, ctx.policy.replies.fallback, "fallback")


async def _audit(ctx: Context, env: Envelope, stage: str, result: ModerationResult) -> None:
    if result.action == "allow":
        return
    entries = [AuditEntry(f.detector, f.rule, f.category, f.action) for f in result.findings]
    for f in result.findings:
        MODERATION_DECISIONS.labels(stage, f.category, f.action).inc()
    await ctx.store.audit.record_audit(env.msg_id, stage, entries)


class _UserFacingStage:
    """A stage whose fatal failure answers the waiting user with the fallback reply."""

    name: str
    input_topic: str
    user_waiting = True

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def fallback(self, env: Envelope, error: BaseException) -> Emit | None:
        return _fallback(self.ctx, env, self.name)


class ModerateIn(_UserFacingStage):
    name = "moderate-in"
    input_topic = topics.INBOUND

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        assert ctx.moderator is not None
        self.moderator = ctx.moderator

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit]:
        text = env.content.text
        if env.content.type != "txt" or not text:
            return [
                Emit(
                    topics.MODERATED, env.stamped(self.name, moderation_in=Verdict(action="allow"))
                )
            ]
        result = self.moderator.check_input(text)
        await _audit(self.ctx, env, "input", result)
        verdict = result.as_verdict()
        if result.action == "block":
            return [
                _answer(
                    env,
                    self.name,
                    self.ctx.policy.replies.blocked_input,
                    "blocked_input",
                    moderation_in=verdict,
                )
            ]
        return [Emit(topics.MODERATED, env.stamped(self.name, moderation_in=verdict))]


class Route(_UserFacingStage):
    name = "route"
    input_topic = topics.MODERATED

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit]:
        policy = self.ctx.policy
        if env.content.type not in ("txt", "combine") or not env.user_text:
            return [_answer(env, self.name, policy.replies.unsupported, "unsupported")]
        bot = policy.bot(env.bot)
        route_name = bot.route if bot is not None and bot.route in policy.routes else "default"
        route = policy.routes[route_name]
        history = await self.ctx.store.history.history_window(
            env.conversation_id,
            turns=route.history_turns,
            token_budget=route.history_token_budget,
            before_msg_id=env.msg_id,
        )
        decision = RouteDecision(
            route=route_name,
            models=route.models,
            system_prompt=route.system_prompt,
            history=history,
            max_output_tokens=route.max_output_tokens,
        )
        return [Emit(topics.ROUTED, env.stamped(self.name, route=decision))]


def chat_request(env: Envelope) -> ChatRequest:
    route = env.route
    assert route is not None
    messages: list[ChatMessage] = []
    if route.system_prompt:
        messages.append(ChatMessage(role="system", content=route.system_prompt))
    messages.extend(ChatMessage(role=t.role, content=t.content) for t in route.history)
    messages.append(ChatMessage(role="user", content=env.user_text))
    # Providers get an opaque id for abuse tracking, never the Easemob user id.
    user_hash = hashlib.sha256(env.sender.encode()).hexdigest()[:16]
    return ChatRequest(
        messages=tuple(messages), max_output_tokens=route.max_output_tokens, user_id=user_hash
    )


class CallModel(_UserFacingStage):
    name = "model"
    input_topic = topics.ROUTED

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        assert ctx.catalog is not None
        self.catalog = ctx.catalog

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit | AfterPublish]:
        if env.route is None:
            return [_fallback(self.ctx, env, self.name)]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RetryableError("no time left for the model call")
        try:
            result = await self.catalog.complete(
                env.route.models, chat_request(env), deadline_s=remaining
            )
        except ContentRejected as exc:
            # The provider's safety system refused: audited like our own moderation.
            category = f"provider_{exc.stage}"
            MODERATION_DECISIONS.labels("model", category, "block").inc()
            await self.ctx.store.audit.record_audit(
                env.msg_id,
                "model",
                [AuditEntry("provider", (exc.provider or "unknown")[:120], category, "block")],
            )
            if exc.clear_history:
                # e.g. ERNIE's need_clear_history: later turns would be refused again
                # (and the provider asks for it) unless the risky context is dropped.
                await self.ctx.store.history.clear_history(env.conversation_id)
            return [_answer(env, self.name, self.ctx.policy.replies.rejected, "rejected")]
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
        # The usage row is written once the completion is on its way to the next
        # stage, and before this record is acknowledged: durable, but off the path
        # the user waits on (a commit costs milliseconds).
        return [
            Emit(topics.COMPLETED, env.stamped(self.name, completion=completion)),
            AfterPublish(functools.partial(self._record_usage, env, completion)),
        ]

    async def _record_usage(self, env: Envelope, completion: Completion) -> None:
        """Account for the paid call now; a database hiccup must not buy it twice.

        Raising here would make the boundary call the model again, so the write is
        retried a few times on its own and then given up with an error line (the
        token and cost metrics were already counted by the adapter). Three tries,
        waiting up to 0.1 s and 0.2 s between them (core.retry's full jitter).
        """
        from core.retry import Backoff  # local: this method's edit stays in this method

        tries, backoff = 3, Backoff(base=0.1, cap=0.2)
        for attempt in range(1, tries + 1):
            try:
                await self.ctx.store.usage.record_usage(env, completion)
                return
            except (StorageUnavailable, StorageError) as exc:
                if attempt == tries:
                    USAGE_LOST.inc()
                    log.error(
                        "usage row not written",
                        extra={"msg_id": env.msg_id, "error": type(exc).__name__},
                    )
                    return
                await asyncio.sleep(backoff.delay(attempt))


class ModerateOut(_UserFacingStage):
    name = "moderate-out"
    input_topic = topics.COMPLETED

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        assert ctx.moderator is not None
        self.moderator = ctx.moderator

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit]:
        completion = env.completion
        if completion is None:
            return [_fallback(self.ctx, env, self.name)]
        result = self.moderator.check_output(
            completion.text,
            finish_reason=completion.finish_reason,
            system_prompt=env.route.system_prompt if env.route else None,
        )
        await _audit(self.ctx, env, "output", result)
        verdict = result.as_verdict()
        if result.action == "block" or not result.text.strip():
            return [
                _answer(
                    env,
                    self.name,
                    self.ctx.policy.replies.blocked_output,
                    "blocked_output",
                    moderation_out=verdict,
                )
            ]
        return [_answer(env, self.name, result.text, "answer", moderation_out=verdict)]


class Send:
    name = "send"
    input_topic = topics.OUTBOUND
    user_waiting = False  # the fallback would go through this very stage

    def __init__(self, ctx: Context) -> None:
        assert ctx.sender is not None
        self.ctx = ctx
        self.sender = ctx.sender
        # Keep trying through an Easemob outage far longer than a model stage would:
        # the answer exists and was paid for; only delivery is waiting.
        self.deadline_s = ctx.settings.sender_deadline_s

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit]:
        delivery = await self.sender.deliver(env, deadline=deadline)
        return [Emit(topics.DELIVERED, env.stamped(self.name, delivery=delivery))]

    def fallback(self, env: Envelope, error: BaseException) -> Emit | None:
        return None


StageClass = type[ModerateIn] | type[Route] | type[CallModel] | type[ModerateOut] | type[Send]
STAGES: dict[str, StageClass] = {
    "moderate-in": ModerateIn,
    "route": Route,
    "model": CallModel,
    "moderate-out": ModerateOut,
    "send": Send,
}
