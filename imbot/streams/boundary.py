"""The per-message error boundary every stage runs inside.

Nothing escapes it: a Faust agent that raises skips the message for good, so
each record ends in exactly one of these ways —

* handled: the stage's outputs are published (acks=all), then the record is
  acknowledged;
* undecodable (not an envelope): a DLQ record with the raw bytes;
* retryable failure (``RetryableError``, timeouts, a database connection lost,
  refused or busy): retried with jittered exponential backoff (core.retry) until
  the stage's deadline (``stage.deadline_s`` if it has one, else
  ``IMBOT_STAGE_DEADLINE_S``), then DLQ — unless the error says its repeats were
  already made below (``core.retry.spent_attempts``: the model catalog's retries
  and fallbacks): then it goes to the DLQ at once, so a failing provider is paid
  for at most the catalog's attempts per message, never that many per re-run;
* fatal (``FatalError``, ``ConfigurationError``, any unexpected exception): DLQ.

After DLQ, when a user is waiting for an answer, the stage's polite fallback
reply goes to ``imbot.outbound`` so the conversation does not just go silent.
If Kafka itself cannot take the DLQ record the boundary keeps trying (the
record stays unacknowledged, so even a crash meanwhile loses nothing).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError

from imbot.core import topics
from imbot.core.envelope import DlqRecord, Envelope, decode_envelope, encode_envelope
from imbot.core.errors import (
    FatalError,
    ImbotError,
    RetryableError,
    StorageError,
    StorageUnavailable,
    UndecodableError,
)
from imbot.core.retry import Backoff, Deadline, spent_attempts
from imbot.core.settings import Settings
from imbot.storage import translated
from imbot.streams.metrics import DLQ_RECORDS, PROCESSED, STAGE_RETRIES, STAGE_SECONDS

log = logging.getLogger("imbot.boundary")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Emit:
    topic: str  # base topic name (core.topics), prefixed on publish
    envelope: Envelope


@dataclass(frozen=True, slots=True)
class AfterPublish:
    """Work that must be done before the record is acknowledged, but need not hold
    up the next stage: run once the outputs are published (e.g. the usage row of a
    model call). It handles its own failures; the record is acknowledged after it."""

    run: Callable[[], Awaitable[None]]


class Stage(Protocol):
    name: str
    input_topic: str

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit | AfterPublish]: ...

    def fallback(self, env: Envelope, error: BaseException) -> Emit | None:
        """The reply for the waiting user after a fatal failure; None when nobody
        waits on this stage (streams.pipeline's ``answers_on_failure``)."""
        ...


class Outputs:
    """Publishes stage outputs with acks=all; shared by the stages of one worker."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer) -> None:
        self.settings = settings
        self.producer = producer

    async def publish(self, base_topic: str, key: bytes | None, value: bytes) -> None:
        await self.producer.send_and_wait(self.settings.topic(base_topic), value, key=key)


# Publishing to Kafka: 0.1 s doubling to 10 s, full jitter, for as long as it takes.
_PUBLISH_BACKOFF = Backoff(base=0.1, cap=10.0)


class Boundary:
    def __init__(self, stage: Stage, outputs: Outputs, settings: Settings) -> None:
        self.stage = stage
        self.outputs = outputs
        self.settings = settings
        self.backoff = Backoff(settings.stage_retry_base_s, settings.stage_retry_max_s)

    async def __call__(self, event: Any) -> None:
        """Handle one Faust event; once this returns, it may be acknowledged (its
        outputs or its DLQ record are published)."""
        message = event.message
        started = time.perf_counter()
        outcome = await self.process(
            event.key, event.value, message.topic, message.partition, message.offset
        )
        PROCESSED.labels(self.stage.name, outcome).inc()
        STAGE_SECONDS.labels(self.stage.name).observe(time.perf_counter() - started)

    async def process(
        self, key: bytes | None, value: bytes | None, topic: str, partition: int, offset: int
    ) -> str:
        where = {"stage": self.stage.name, "topic": topic, "partition": partition, "offset": offset}
        try:
            env = decode_envelope(value)
        except UndecodableError as exc:
            log.warning("undecodable record to DLQ", extra={**where, "error": str(exc)})
            await self._dlq(key, value, where, exc, attempts=1, env=None)
            return "undecodable"

        ids = {"msg_id": env.msg_id, "conversation": env.conversation_id}
        deadline = Deadline.after(
            getattr(self.stage, "deadline_s", None) or self.settings.stage_deadline_s
        )
        attempt = 0
        while True:
            attempt += 1
            try:
                emits = await _database_errors_ours(self.stage.handle(env, deadline=deadline.at))
            except (RetryableError, TimeoutError, ConnectionError) as exc:
                spent = spent_attempts(exc)
                if spent is not None:
                    # Retried where it happened (the model catalog): repeating the stage
                    # would repeat those calls (paid ones, for a model) once per re-run.
                    log.error(
                        "retries exhausted below, to DLQ",
                        extra={**where, **ids, "attempts": spent, "error": _loggable(exc)},
                    )
                    await self._fail(key, value, where, exc, spent, env)
                    return "exhausted"
                retry_after = exc.retry_after if isinstance(exc, RetryableError) else None
                delay = self.backoff.delay(attempt, retry_after)
                if deadline.allows(delay):
                    STAGE_RETRIES.labels(self.stage.name, _kind(exc)).inc()
                    log.info(
                        "retrying",
                        extra={
                            **where,
                            **ids,
                            "attempt": attempt,
                            "delay_s": round(delay, 3),
                            "error": _loggable(exc),
                        },
                    )
                    await asyncio.sleep(delay)
                    continue
                log.error(
                    "retries exhausted, to DLQ",
                    extra={**where, **ids, "attempts": attempt, "error": _loggable(exc)},
                )
                await self._fail(key, value, where, exc, attempt, env)
                return "exhausted"
            except StorageError as exc:
                log.error("database error, to DLQ", extra={**where, **ids, "error": exc.kind})
                await self._fail(key, value, where, exc, attempt, env)
                return "fatal"
            except ImbotError as exc:
                log.error(
                    "fatal, to DLQ", extra={**where, **ids, "error": str(exc), "kind": exc.kind}
                )
                await self._fail(key, value, where, exc, attempt, env)
                return "fatal"
            except Exception as exc:  # a bug: never let it kill the agent
                log.exception("unexpected error, to DLQ", extra={**where, **ids})
                await self._fail(key, value, where, exc, attempt, env)
                return "error"
            # Publishing is retried on its own, never by re-running the stage: a
            # completed model call must not be paid for again because Kafka hiccuped.
            try:
                for emit in emits:
                    if isinstance(emit, Emit):
                        await self._publish_forever(emit.topic, key, encode_envelope(emit.envelope))
            except _UNPUBLISHABLE as exc:
                log.error(
                    "output cannot be published, to DLQ",
                    extra={**where, **ids, "error": str(exc)},
                )
                await self._fail(key, value, where, exc, attempt, env)
                return "unpublishable"
            for after in emits:
                if isinstance(after, AfterPublish):
                    await after.run()
            return "ok"

    async def _fail(
        self,
        key: bytes | None,
        value: bytes | None,
        where: dict[str, Any],
        exc: BaseException,
        attempts: int,
        env: Envelope,
    ) -> None:
        await self._dlq(key, value, where, exc, attempts=attempts, env=env)
        emit = self.stage.fallback(env, exc)
        if emit is not None:
            await self._publish_forever(emit.topic, key, encode_envelope(emit.envelope))

    async def _dlq(
        self,
        key: bytes | None,
        value: bytes | None,
        where: dict[str, Any],
        exc: BaseException,
        *,
        attempts: int,
        env: Envelope | None,
    ) -> None:
        text: str | None = None
        b64: str | None = None
        if value is not None:
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                b64 = base64.b64encode(value).decode()
        reason = exc.reason if isinstance(exc, FatalError) and exc.reason else None
        DLQ_RECORDS.labels(
            self.stage.name, reason or (exc.kind if isinstance(exc, ImbotError) else "unexpected")
        ).inc()
        record = DlqRecord(
            stage=self.stage.name,
            topic=where["topic"],
            partition=where["partition"],
            offset=where["offset"],
            key=key.decode("utf-8", "replace") if key is not None else None,
            value=text,
            value_b64=b64,
            error_kind=exc.kind if isinstance(exc, ImbotError) else type(exc).__name__,
            error=str(exc)[:2000],  # a database error's is free of user data (storage.errors)
            reason=exc.reason if isinstance(exc, FatalError) else None,
            status=exc.status if isinstance(exc, ImbotError) else None,
            attempts=attempts,
            msg_id=env.msg_id if env else None,
            conversation_id=env.conversation_id if env else None,
        )
        try:
            await self._publish_forever(topics.DLQ, key, record.model_dump_json().encode())
        except _UNPUBLISHABLE:
            # Too large even for the DLQ (the raw value grew by the wrapper or base64):
            # keep the story, drop the payload; its offset still finds the original.
            record = record.model_copy(update={"value": None, "value_b64": None})
            await self._publish_forever(topics.DLQ, key, record.model_dump_json().encode())

    async def _publish_forever(self, base_topic: str, key: bytes | None, value: bytes) -> None:
        """Publish, retrying transient Kafka errors for as long as it takes.

        The record stays unacknowledged meanwhile, so a crash loses nothing. An error
        that no retry can cure (a record too large for the topic) is raised.
        """
        attempt = 0
        while True:
            try:
                await self.outputs.publish(base_topic, key, value)
                return
            except KafkaError as exc:
                if isinstance(exc, _UNPUBLISHABLE):
                    raise
                attempt += 1
                log.error(
                    "cannot publish, retrying", extra={"topic": base_topic, "error": str(exc)}
                )
                await asyncio.sleep(_PUBLISH_BACKOFF.delay(attempt))


def _loggable(exc: BaseException) -> str:
    """What a log line may say about an error: a database error only by its type."""
    return exc.kind if isinstance(exc, StorageUnavailable) else str(exc)


def _kind(exc: BaseException) -> str:
    """An error's metric label: a database error by its driver-level class, as before."""
    return exc.kind if isinstance(exc, StorageUnavailable) else type(exc).__name__


async def _database_errors_ours(handled: Awaitable[_T]) -> _T:
    """A stage's result, with a database error that escaped ``storage`` untranslated
    (a stage's own query, a connection pool) made ours: ``StorageUnavailable`` is
    retried, ``StorageError`` goes to the DLQ (storage.errors.transient decides)."""
    try:
        return await handled
    except Exception as exc:
        ours = translated(exc)
        if ours is exc:
            raise
        raise ours from None


# Errors no retry of the same publish can cure (the record itself is the problem).
_UNPUBLISHABLE: tuple[type[KafkaError], ...] = (MessageSizeTooLargeError, RecordTooLargeError)
