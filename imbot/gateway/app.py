"""The gateway: Easemob's before-send callback in, Kafka out, an answer within budget.

Per request it does only: size limit, parse, signature, "is this for the AI?",
publish (acks=all) with a deadline, answer. Anything slower belongs in a stage.

Optional fast path (``policy.callback.refuse_blocked_input``): the input check
of ``moderation`` (the same checker the moderate-in stage runs, so both give the
same verdict) runs here too, so a prohibited message is refused before Easemob
delivers it. It is imported only when the switch is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from imbot.core import topics
from imbot.core.kafka import new_producer
from imbot.core.limits import LOGGED_VALUE_MAX
from imbot.core.retry import Backoff
from imbot.core.settings import Settings
from imbot.gateway.callback import CallbackRejected, decide, verify
from imbot.gateway.metrics import (
    CALLBACK_SECONDS,
    CALLBACKS,
    LATE_ACKS,
    PUBLISH_FAILURES,
    REPLAY_STORE_FAILURES,
)
from imbot.gateway.replay import CallIds, MemoryCallIds, ReplayStoreUnavailable, new_call_ids

if TYPE_CHECKING:
    from imbot.moderation import Moderator

log = logging.getLogger("imbot.gateway")


SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
PUBLISHER: web.AppKey[Publisher] = web.AppKey("publisher")
CALL_IDS: web.AppKey[CallIds | None] = web.AppKey("call_ids")

_VALID = orjson.dumps({"valid": True})


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _answer(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")


def _short(value: object) -> str:
    """A value as it may appear in a log line: at most LOGGED_VALUE_MAX characters."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= LOGGED_VALUE_MAX:
        return text
    return f"{text[:LOGGED_VALUE_MAX]}…(+{len(text) - LOGGED_VALUE_MAX})"


class _BodyTimeout(Exception):
    pass


class _ShortHttpErrors(logging.Filter):
    """aiohttp's server log of a malformed or failed request, as one short line.

    aiohttp logs a malformed request at ERROR with a traceback whose exception
    quotes the raw request (the ``security`` field included). Keep the event, the
    peer and the exception's type; drop the traceback and anything quoted.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        try:
            message = record.getMessage()
        except Exception:
            message = str(record.msg)
        record.msg = "%s (%s)"
        record.args = (_short(message), type(exc).__name__ if exc is not None else "no exception")
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


# The server logger the gateway's connections use (aiohttp's ``aiohttp.server`` is
# left alone: other apps in the process keep their own behaviour).
HTTP_LOG = logging.getLogger("imbot.gateway.http")
HTTP_LOG.addFilter(_ShortHttpErrors())
# After an early answer (413, 408) aiohttp reads and drops the rest of the body for
# this long, so the client sees the answer; then the connection is closed.
_LINGER_S = 1.0


class _Publish:
    """One publish between ``send`` and its ack, with its deadline (see ``Publisher``)."""

    __slots__ = ("deadline", "expired", "msg_id", "on_late_ack", "task", "waiter")

    def __init__(
        self, deadline: float, msg_id: str, on_late_ack: Callable[[str], None] | None
    ) -> None:
        self.deadline = deadline
        self.expired = False
        self.msg_id = msg_id
        self.on_late_ack = on_late_ack
        self.task: asyncio.Task[Any] | None = None  # set while ``send`` itself is suspended
        self.waiter: asyncio.Future[str | None] | None = None  # set once the record is queued

    def expire(self) -> None:
        self.expired = True
        if self.task is not None:
            # Still inside ``producer.send`` (no metadata yet, or the partition's batch
            # is full): cancelling it there means the record is not queued at all.
            self.task.cancel(_DEADLINE)
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_result("timeout")

    def __call__(self, delivery: asyncio.Future[Any]) -> None:
        """Done-callback of aiokafka's delivery future."""
        if delivery.cancelled():
            failure: str | None = "kafka_error"
        elif (exc := delivery.exception()) is not None:
            log.warning("publish failed", extra={"msg_id": self.msg_id, "error": str(exc)})
            failure = "kafka_error"
        else:
            failure = None
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(failure)
        elif failure is None:
            # Acked after the deadline: Easemob was already answered by the fail policy,
            # but the record is on the topic and the pipeline will answer it. Remember
            # the id so a later duplicate callback is not published a second time.
            LATE_ACKS.inc()
            log.warning("record acked after the deadline", extra={"msg_id": self.msg_id})
            if self.on_late_ack is not None:
                self.on_late_ack(self.msg_id)


_DEADLINE = "imbot publish deadline"
_SWEEP_S = 0.005  # deadlines are enforced to within this
_CONNECT_BACKOFF = Backoff(base=0.2, cap=5.0)  # the broker down at start-up: keep trying


class Publisher:
    """A Kafka producer that starts in the background and never blocks a request.

    If the broker is down at start-up the gateway still answers callbacks (by the
    fail policy) and keeps trying to connect.

    Deadlines: every publish gets the same timeout, so pending publishes expire in
    the order they started. One timer walks a FIFO of them instead of arming an
    ``asyncio.timeout`` per request (a timer handle, heap push and cancel each time,
    measurably slower at thousands of requests per second), and the deadline never
    cancels aiokafka's delivery future, so a late ack is still seen.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic(topics.INBOUND)
        self.producer: AIOKafkaProducer | None = None
        self.on_late_ack: Callable[[str], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pending: deque[_Publish] = deque()
        self._timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        attempt = 0
        while True:
            producer = new_producer(self.settings)
            try:
                await producer.start()
            except (KafkaError, OSError) as exc:
                log.warning("kafka not reachable, retrying", extra={"error": str(exc)})
                with contextlib.suppress(Exception):
                    await producer.stop()
                attempt += 1
                await asyncio.sleep(_CONNECT_BACKOFF.delay(attempt))
                continue
            self.producer = producer
            log.info("kafka producer ready", extra={"bootstrap": self.settings.kafka_bootstrap})
            return

    async def publish(self, key: bytes, value: bytes, msg_id: str, timeout: float) -> str | None:
        """Publish and wait for the ack (acks=all); returns None on success or why it failed.

        "timeout" does not always mean "not published": a record already handed to
        the producer when the deadline passes is still sent, and may be acked later
        (see ``_Publish.__call__``). Easemob is answered by the fail policy either way.
        """
        producer = self.producer
        if producer is None:
            return "not_connected"
        loop = asyncio.get_running_loop()
        entry = _Publish(loop.time() + timeout, msg_id, self.on_late_ack)
        self._pending.append(entry)
        if self._timer is None:
            self._timer = loop.call_at(entry.deadline, self._sweep)
        entry.task = task = asyncio.current_task()
        try:
            delivery = await producer.send(self.topic, value, key=key)
        except asyncio.CancelledError:
            if entry.expired and task is not None and task.uncancel() == 0:
                return "timeout"  # our deadline, while the record was not yet queued
            raise
        except KafkaError as exc:
            log.warning("publish failed", extra={"msg_id": msg_id, "error": str(exc)})
            return "kafka_error"
        finally:
            entry.task = None
        waiter: asyncio.Future[str | None] = loop.create_future()
        entry.waiter = waiter
        delivery.add_done_callback(entry)
        return await waiter

    def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        pending = self._pending
        while pending and pending[0].deadline <= now:
            pending.popleft().expire()
        self._timer = (
            loop.call_at(max(pending[0].deadline, now + _SWEEP_S), self._sweep) if pending else None
        )

    async def ready(self) -> bool:
        producer = self.producer
        if producer is None:
            return False
        try:
            await asyncio.wait_for(producer.client.fetch_all_metadata(), 2.0)
        except (KafkaError, OSError, TimeoutError):
            return False
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.producer is not None:
            await self.producer.stop()


class RecentIds:
    """Bounded memory of msg_ids already published (duplicate callbacks)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, msg_id: str) -> bool:
        return msg_id in self._ids

    def add(self, msg_id: str) -> None:
        self._ids[msg_id] = None
        if len(self._ids) > self.size:
            self._ids.popitem(last=False)


class CallbackHandler:
    def __init__(
        self, settings: Settings, publisher: Publisher, call_ids: CallIds | None = None
    ) -> None:
        self.settings = settings
        self.policy = settings.policy
        self.publisher = publisher
        self.call_ids = call_ids
        self.secrets = settings.secret_values()
        self.max_body = settings.callback_max_body_bytes
        self.window_s = settings.callback_timestamp_window_s
        self.window_ms = int(settings.callback_timestamp_window_s * 1000)
        self.replay_timeout = settings.callback_replay_timeout_ms / 1000.0
        self.body_timeout = settings.gateway_body_timeout_s
        self.timeout = settings.publish_timeout_ms / 1000.0
        self.recent = RecentIds(settings.dedupe_window)
        publisher.on_late_ack = self.recent.add
        # msg_id -> the outcome of its publish in progress; the future is created only
        # when a concurrent duplicate arrives and waits for it.
        self.in_flight: dict[str, asyncio.Future[str | None] | None] = {}
        self._metrics: dict[str, tuple[Counter, Histogram]] = {}
        cb = self.policy.callback
        self.accepted = orjson.dumps(
            {"valid": True}
            if cb.ai_message == "pass"
            else {"valid": False, "code": cb.intercept_code}
        )
        self.on_failure = orjson.dumps(
            {"valid": True}
            if cb.kafka_failure == "pass"
            else {"valid": False, "code": cb.kafka_failure_code}
        )
        self.refused = orjson.dumps({"valid": False, "code": cb.blocked_input_code})
        self.moderator: Moderator | None = None
        if cb.refuse_blocked_input:
            # The fast path. Imported here so a gateway without it does not build
            # the automaton.
            from imbot.moderation import Moderator

            self.moderator = Moderator.from_config(
                self.policy.moderation, base_dir=settings.policy_file.parent
            )

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            outcome, response = await self._handle(request)
        except Exception as exc:
            # The last line of defence: never a 500. Answered like a publish failure;
            # logged by type only (a traceback or message could quote the body).
            log.error(
                "callback failed unexpectedly, answering by the fail policy",
                extra={"error": type(exc).__name__, "where": _where(exc)},
            )
            outcome, response = "internal_error", _answer(self.on_failure)
        metrics = self._metrics.get(outcome)
        if metrics is None:
            metrics = self._metrics[outcome] = (
                CALLBACKS.labels(outcome),
                CALLBACK_SECONDS.labels(outcome),
            )
        metrics[0].inc()
        metrics[1].observe(time.perf_counter() - started)
        return response

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The whole body, or None when it exceeds the limit; ``_BodyTimeout`` when it
        does not arrive within ``gateway_body_timeout_s``.

        ``content.read(n)`` would return only what has arrived so far: a body split
        across TCP segments (ordinary over the Internet) would then fail to parse.
        Usually the body came with the head: then no timer is armed at all.
        """
        length = request.content_length
        if length is not None and length > self.max_body:
            return None
        content = request.content
        raw = content.read_nowait()
        if not content.at_eof():
            chunks, size = [raw], len(raw)
            try:
                async with asyncio.timeout(self.body_timeout):
                    while chunk := await content.readany():
                        size += len(chunk)
                        if size > self.max_body:
                            return None
                        chunks.append(chunk)
            except TimeoutError:
                raise _BodyTimeout from None
            raw = b"".join(chunks)
        return raw if len(raw) <= self.max_body else None

    async def _handle(self, request: web.Request) -> tuple[str, web.Response]:
        try:
            raw = await self._read_body(request)
        except _BodyTimeout:
            request.protocol.close()  # do not wait for the rest of a slow body
            return "body_timeout", self._reject(
                CallbackRejected(
                    408, "body_timeout", f"body not received within {self.body_timeout:g}s"
                )
            )
        except web.RequestPayloadError:
            return "bad_body", self._reject(
                CallbackRejected(400, "bad_body", "request body could not be read")
            )
        if raw is None:
            return "too_large", self._reject(
                CallbackRejected(413, "body_too_large", f"body exceeds {self.max_body} bytes")
            )
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return "bad_json", self._reject(CallbackRejected(400, "bad_json", "body is not JSON"))
        try:
            verify(data, self.secrets, window_s=self.window_s)
            decision = decide(data, self.policy)
        except CallbackRejected as exc:
            return exc.error, self._reject(exc, data)
        message = decision.message
        call_ids = self.call_ids
        if message is None:
            if call_ids is not None:
                # Its signature must not carry another message later (see gateway.replay).
                call_id = data["callId"]
                call_ids.remember(
                    call_id if isinstance(call_id, str) else str(call_id),
                    data["timestamp"] + self.window_ms,
                )
            return "not_ai", _answer(_VALID)
        if self.moderator is not None and message.body.type == "txt" and message.body.text:
            verdict = self.moderator.check_input(message.body.text)
            if verdict.action == "block":
                # Refused before Easemob delivers it; the text is never logged.
                log.info(
                    "input refused by moderation",
                    extra={
                        "msg_id": message.msg_id,
                        "conversation": message.conversation_id,
                        "categories": list(verdict.categories()),
                    },
                )
                return "blocked", _answer(self.refused)
        msg_id = message.msg_id
        if msg_id in self.recent:
            return "duplicate", _answer(self.accepted)
        if call_ids is not None and message.call_id is not None:
            assert message.easemob_timestamp is not None  # verify() required it
            expires_at_ms = message.easemob_timestamp + self.window_ms
            try:
                if isinstance(call_ids, MemoryCallIds):
                    # Nothing to wait for: no coroutine, no timer armed per request.
                    new_call_id = call_ids.record(message.call_id, expires_at_ms)
                else:
                    async with asyncio.timeout(self.replay_timeout):
                        new_call_id = await call_ids.first_use(message.call_id, expires_at_ms)
            except (ReplayStoreUnavailable, TimeoutError) as exc:
                why = exc.why if isinstance(exc, ReplayStoreUnavailable) else "timeout"
                REPLAY_STORE_FAILURES.labels(why).inc()
                log.error(
                    "callId store did not answer, answering by the fail policy",
                    extra={"msg_id": msg_id, "conversation": message.conversation_id, "why": why},
                )
                return "replay_store_failed", _answer(self.on_failure)
            if not new_call_id:
                # A replay: never published. Answered as a duplicate is (nothing here
                # tells the sender whether it was); a genuine repeat gets the same answer.
                log.warning(
                    "replayed callId refused",
                    extra={"msg_id": msg_id, "callId": _short(message.call_id)},
                )
                return "replayed", _answer(self.accepted)
        in_flight = self.in_flight
        if msg_id in in_flight:
            # The same callback is being published right now (Easemob sent it twice,
            # e.g. two matching rules): wait for that publish and answer as it does.
            first = in_flight[msg_id]
            if first is None:
                first = in_flight[msg_id] = asyncio.get_running_loop().create_future()
            failure = await asyncio.shield(first)
            if failure is None:
                return "duplicate", _answer(self.accepted)
            return "publish_failed", _answer(self.on_failure)
        in_flight[msg_id] = None
        failure = "cancelled"
        try:
            failure = await self.publisher.publish(
                message.conversation_id.encode(), message.encode(), msg_id, self.timeout
            )
        finally:
            waiting = in_flight.pop(msg_id)
            if waiting is not None and not waiting.done():
                waiting.set_result(failure)
        if failure is not None:
            # After a "timeout" the record may still reach the topic (it was already
            # queued; ``_Publish.__call__`` then remembers the id). So with
            # kafka_failure=block the sender may be told "blocked" and still get the
            # AI's reply; with pass, the reply just arrives. Easemob never retries, and
            # the pipeline's delivery ledger keeps any repeat from being answered twice.
            PUBLISH_FAILURES.labels(failure).inc()
            log.error(
                "publish failed, answering by the fail policy",
                extra={"msg_id": msg_id, "conversation": message.conversation_id, "why": failure},
            )
            return "publish_failed", _answer(self.on_failure)
        self.recent.add(msg_id)
        return "published", _answer(self.accepted)

    @staticmethod
    def _reject(exc: CallbackRejected, data: Any = None) -> web.Response:
        # Before authentication anything can be in these: each value is cut short.
        fields: dict[str, Any] = {
            "status": exc.status,
            "error": exc.error,
            "detail": _short(exc.detail),
        }
        if isinstance(data, dict):
            for key in ("callId", "msg_id"):
                if isinstance(data.get(key), str | int):
                    fields[key] = _short(data[key])
        log.warning("callback rejected", extra=fields)
        return _json(exc.body(), exc.status)


async def healthz(_: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if await request.app[PUBLISHER].ready():
        return _json({"status": "ready"})
    return _json({"status": "kafka unreachable"}, 503)


async def metrics(_: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def _where(exc: BaseException) -> str:
    """``module:line`` of the innermost frame of ``exc``: enough to find a bug, no data."""
    tb = exc.__traceback__
    if tb is None:
        return "?"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{tb.tb_frame.f_globals.get('__name__', '?')}:{tb.tb_lineno}"


async def _kafka_ctx(app: web.Application) -> AsyncIterator[None]:
    publisher = app[PUBLISHER]
    await publisher.start()
    yield
    await publisher.stop()


async def _call_ids_ctx(app: web.Application) -> AsyncIterator[None]:
    call_ids = app[CALL_IDS]
    if call_ids is not None:
        await call_ids.start()
    yield
    if call_ids is not None:
        await call_ids.stop()


def create_app(settings: Settings, *, publisher: Publisher | None = None) -> web.Application:
    """The gateway app. ``publisher``: the seam for a different Kafka publisher."""
    # client_max_size bounds any other route; the callback reads its body itself.
    app = web.Application(
        client_max_size=settings.callback_max_body_bytes + 1,
        handler_args={
            "keepalive_timeout": settings.gateway_keepalive_timeout_s,
            "lingering_time": _LINGER_S,
            "logger": HTTP_LOG,
        },
    )
    publisher = publisher if publisher is not None else Publisher(settings)
    call_ids = new_call_ids(settings)
    app[SETTINGS] = settings
    app[PUBLISHER] = publisher
    app[CALL_IDS] = call_ids
    app.cleanup_ctx.append(_kafka_ctx)
    app.cleanup_ctx.append(_call_ids_ctx)
    app.router.add_post(
        settings.callback_path, CallbackHandler(settings, publisher, call_ids).handle
    )
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


def main(settings: Settings) -> None:
    log.info(
        "gateway listening",
        extra={
            "url": f"http://{settings.gateway_host}:{settings.gateway_port}{settings.callback_path}"
        },
    )
    web.run_app(
        create_app(settings),
        host=settings.gateway_host,
        port=settings.gateway_port,
        access_log=None,
        print=None,
        handle_signals=True,
    )
