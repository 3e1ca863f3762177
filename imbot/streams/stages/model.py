"""model: the model call, its reservation and settlement, usage and refusals."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Protocol, Self

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
    Partial,
    QuotaView,
    RouteDecision,
    encode_envelope,
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
from imbot.core.settings import Policy
from imbot.core.tokens import estimate_tokens
from imbot.moderation.metrics import MODERATION_DECISIONS
from imbot.moderation.release import CLAUSE_BREAKS, SENTENCE_ENDS, release_point
from imbot.routing.budgets import DEFAULT_OUTPUT_CAP, Budgets
from imbot.storage import AuditEntry, AuditLog, Health, History, Quotas, Reservation, UsageRecords
from imbot.streams.boundary import AfterPublish, Emit, Outputs
from imbot.streams.metrics import CHUNK_RECORDS, QUOTA_SETTLE_LOST, ROUTE_DECISIONS, USAGE_LOST
from imbot.streams.stages.base import PipelineStage, Resources, answer

if TYPE_CHECKING:  # loaded only by the workers that run these stages
    from imbot.sender.easemob import Attachment


log = logging.getLogger("imbot.stages")


class Files(Protocol):
    """Where the model stage fetches an image message's file (``EasemobClient``)."""

    async def download_file(
        self, url: str, *, secret: str | None = None, max_bytes: int, timeout_s: float
    ) -> Attachment: ...


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
        chunks: Outputs | None = None,
    ) -> None:
        self.health = health
        # Where the answer goes as it is written (docs/streaming.md); None: nowhere.
        self.chunks = chunks
        self.streaming = policy.streaming
        self.live_streams = 0  # calls of this worker streaming to a user now
        self._circuits: dict[str, str] = {}  # model → the state last written to health
        self.replies = policy.replies
        self.routing = policy.routing
        self.files = files
        self._next_sweep = 0.0
        self._settling: set[asyncio.Task[None]] = set()  # settlements being written
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
            chunks=r.outputs,
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
            return [answer(env, self.name, self.replies.unsupported, "unsupported")]
        request = chat_request(env, images)
        await self._sweep()
        # Is this a copy of a message this stage already answered (a route worker died
        # before committing it, and it was routed again)? Its answer is on its way; a
        # second call would be paid twice, and a quota reply could reach the user first.
        # An operator's replay is meant to call the model again. The check and the
        # reservation are made at once (the call waits one round trip, not two); a copy,
        # rare, gives back the reservation it took.
        held, copy = await asyncio.gather(
            self._reserve(env, route, request), self._answered(env), return_exceptions=True
        )
        if isinstance(copy, BaseException) or copy:
            if isinstance(held, Reservation):
                await self._settle(env, held, None)
            if isinstance(copy, BaseException):
                raise copy
            log.info("already answered: copy dropped", extra={"msg_id": env.msg_id})
            return []
        if isinstance(held, BaseException):
            raise held
        if isinstance(held, QuotaView):
            ROUTE_DECISIONS.labels("quota_refused", route.tier or "").inc()
            refused = route.model_copy(update={"quota": held})
            return [answer(env, self.name, self.replies.quota_exhausted, "quota", route=refused)]
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
            async with self._typing(env, route):
                if route.stream or (route.live == "stream" and self.chunks is not None):
                    result = await self._streamed(env, route, request, remaining, held)
                else:
                    result = await self.catalog.complete(
                        route.models, request, deadline_s=remaining
                    )
        except ContentRejected as exc:
            await self._report_circuits(route.models)
            await self._settle(env, held, None)
            # The provider's safety system refused: audited like our own moderation.
            # The audit row (and the history clear a provider may ask for) is written
            # after the reply is published, like the usage row: a database hiccup here
            # must not make the boundary call the provider again.
            MODERATION_DECISIONS.labels("model", f"provider_{exc.stage}", "block").inc()
            return [
                answer(env, self.name, self.replies.rejected, "rejected"),
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
            first_token_ms=result.first_token_ms,
            provider_request_id=result.provider_request_id,
            attempts=result.attempts,
        )
        # Settled while the completion is published, not before: a round trip off the
        # path the user waits on. The settlement goes on whatever becomes of the
        # publish (a failed one re-runs the call, and that second call is reserved and
        # settled again); the record is acknowledged only once it is written. The usage
        # row follows it, once the completion is on its way to the next stage.
        settling = self._settle_soon(env, held, completion)
        return [
            Emit(self.forward, env.stamped(self.name, completion=completion)),
            AfterPublish(functools.partial(self._after_answer, settling, env, completion)),
        ]

    async def _answered(self, env: Envelope) -> bool:
        return env.replay is None and await self.usage.answered(env.msg_id)

    def _settle_soon(
        self, env: Envelope, held: Reservation | None, completion: Completion
    ) -> asyncio.Task[None] | None:
        if held is None:
            return None
        task = asyncio.ensure_future(self._settle(env, held, completion))
        self._settling.add(task)  # held until done: the loop keeps only weak references
        task.add_done_callback(self._settling.discard)
        return task

    async def _after_answer(
        self, settling: asyncio.Task[None] | None, env: Envelope, completion: Completion
    ) -> None:
        if settling is not None:
            await asyncio.shield(settling)  # never raises (``_settle``)
        await self._record_usage(env, completion)

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
        live = _Live(self, env) if route.live == "stream" and self.chunks is not None else None
        if live is not None:
            self.live_streams += 1
        try:
            async for event in self.catalog.stream(route.models, request, deadline_s=remaining):
                if isinstance(event, Delta):
                    text.append(event.text)
                    if live is not None and live.due(event.text):
                        await live.publish("".join(text))
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
        finally:
            if live is not None:
                self.live_streams -= 1
        raise RetryableError("the model's stream ended without its end event", code="stream_cut")

    async def publish_partial(self, env: Envelope, partial: Partial) -> None:
        """A record of the answer being written (best effort: the final reply follows on
        the chain whatever happens to it). Small: without the history."""
        if self.chunks is None:
            return
        route = env.route
        if route is not None and route.history:
            route = route.model_copy(update={"history": ()})
        record = env.model_copy(update={"route": route, "partial": partial})
        try:
            await asyncio.wait_for(
                self.chunks.publish(
                    topics.CHUNKS, env.conversation_id.encode(), encode_envelope(record)
                ),
                timeout=_CHUNK_PUBLISH_S,
            )
        except Exception as exc:
            CHUNK_RECORDS.labels(partial.kind, "failed").inc()
            log.info(
                "chunk record not published",
                extra={"msg_id": env.msg_id, "error": type(exc).__name__},
            )
        else:
            CHUNK_RECORDS.labels(partial.kind, "published").inc()

    @contextlib.asynccontextmanager
    async def _typing(self, env: Envelope, route: RouteDecision) -> AsyncIterator[None]:
        """While the call runs, the user sees that the bot is typing (``route.live``
        "typing"): from a second into the call (a quicker answer needs none), then every
        ``streaming.typing_every_s``."""
        if route.live != "typing" or self.chunks is None:
            yield
            return

        async def tick() -> None:
            await asyncio.sleep(min(_TYPING_AFTER_S, self.streaming.typing_every_s))
            while True:
                await self.publish_partial(env, Partial(kind="typing"))
                await asyncio.sleep(self.streaming.typing_every_s)

        ticker = asyncio.create_task(tick())
        try:
            yield
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker

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


_CHUNK_PUBLISH_S = 2.0  # a chunk record later than this is not worth waiting for
_TYPING_AFTER_S = 1.0


class _Live:
    """The model's text so far, published as it grows: once the review would have
    something new to release (``moderation.release``: a sentence, or the clauses of a
    long one, ended since the last record), and at most every
    ``streaming.chunk_interval_s`` — less often when this worker streams so many answers
    at once that its records would pass ``streaming.max_chunk_records_per_s``: each
    record can become an Easemob call, and the app has 100 a second."""

    def __init__(self, stage: CallModel, env: Envelope) -> None:
        self.stage = stage
        self.env = env
        self.last = -math.inf  # the first words go as soon as they can be released
        self.seq = 0
        self.tail = ""  # the text since the last record's release point
        self.ready = False  # the tail holds something the review can release
        self.breaking = False  # the last delta ended with a break

    def due(self, delta: str) -> bool:
        if not delta:
            return False
        self.tail += delta
        if not self.ready and (self.breaking or any(ch in _BREAKS for ch in delta)):
            self.ready = self._cut() > 0
        self.breaking = delta[-1] in _BREAKS
        if not self.ready:
            return False
        streaming = self.stage.streaming
        every = max(
            streaming.chunk_interval_s,
            self.stage.live_streams / streaming.max_chunk_records_per_s,
        )
        return time.monotonic() - self.last >= every

    def _cut(self) -> int:
        return release_point(self.tail, max_hold_chars=self.stage.streaming.max_hold_chars)

    async def publish(self, text: str) -> None:
        self.last = time.monotonic()
        self.tail = self.tail[self._cut() :]
        self.ready = False
        await self.stage.publish_partial(self.env, Partial(text=text, seq=self.seq))
        self.seq += 1


_BREAKS = SENTENCE_ENDS | CLAUSE_BREAKS


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
