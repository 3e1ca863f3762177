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
import functools
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Self

from prometheus_client import Counter

from imbot.adapters import ChatMessage, ChatRequest, ModelCatalog
from imbot.core import topics
from imbot.core.envelope import Completion, Envelope, Reply, ReplyKind, RouteDecision, Verdict
from imbot.core.errors import (
    ConfigurationError,
    ContentRejected,
    RetryableError,
    StorageError,
    StorageUnavailable,
)
from imbot.core.retry import Backoff
from imbot.core.settings import Policy, Replies, Settings
from imbot.storage import AuditEntry, AuditLog, History, StageStorage, UsageRecords
from imbot.streams import pipeline
from imbot.streams.boundary import AfterPublish, Emit
from imbot.streams.pipeline import StageSpec

if TYPE_CHECKING:  # loaded only by the workers that run these stages
    from imbot.moderation import ModerationResult, Moderator
    from imbot.sender.service import ReplySender

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
    ) -> None:
        self.settings = settings
        self.policy: Policy = settings.policy
        self._parts: dict[pipeline.Resource, Any] = {
            "storage": storage,
            "moderator": moderator,
            "catalog": catalog,
            "sender": sender,
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


class Route(PipelineStage, stage="route"):
    def __init__(self, policy: Policy, history: History) -> None:
        self.policy = policy
        self.replies = policy.replies
        self.history = history

    @classmethod
    def build(cls, r: Resources) -> Self:
        return cls(r.policy, r.storage.history)

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit]:
        policy = self.policy
        if env.content.type not in ("txt", "combine") or not env.user_text:
            return [_answer(env, self.name, policy.replies.unsupported, "unsupported")]
        bot = policy.bot(env.bot)
        route_name = bot.route if bot is not None and bot.route in policy.routes else "default"
        route = policy.routes[route_name]
        history = await self.history.history_window(
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
        return [Emit(self.forward, env.stamped(self.name, route=decision))]


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


class CallModel(PipelineStage, stage="model"):
    def __init__(
        self,
        policy: Policy,
        catalog: ModelCatalog,
        *,
        audit: AuditLog,
        history: History,
        usage: UsageRecords,
    ) -> None:
        self.replies = policy.replies
        self.catalog = catalog
        self.audit = audit
        self.history = history
        self.usage = usage

    @classmethod
    def build(cls, r: Resources) -> Self:
        store = r.storage
        return cls(r.policy, r.catalog, audit=store.audit, history=store.history, usage=store.usage)

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit | AfterPublish]:
        if env.route is None:
            return [self._fallback(env)]
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RetryableError("no time left for the model call")
        try:
            result = await self.catalog.complete(
                env.route.models, chat_request(env), deadline_s=remaining
            )
        except ContentRejected as exc:
            # The provider's safety system refused: audited like our own moderation.
            # The audit row (and the history clear a provider may ask for) is written
            # after the reply is published, like the usage row: a database hiccup here
            # must not make the boundary call the provider again.
            MODERATION_DECISIONS.labels("model", f"provider_{exc.stage}", "block").inc()
            return [
                _answer(env, self.name, self.replies.rejected, "rejected"),
                AfterPublish(functools.partial(self._record_refusal, env, exc)),
            ]
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
            Emit(self.forward, env.stamped(self.name, completion=completion)),
            AfterPublish(functools.partial(self._record_usage, env, completion)),
        ]

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
        delivery = await self.sender.deliver(env, deadline=deadline)
        return [Emit(self.forward, env.stamped(self.name, delivery=delivery))]


_unbound = set(pipeline.STAGE_NAMES) ^ set(STAGES)
if _unbound:  # a row without its class, or a class without its row
    raise ImportError(f"streams.pipeline and streams.stages disagree on {sorted(_unbound)}")
