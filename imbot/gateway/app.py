"""The gateway: Easemob's before-send callback in, Kafka out, an answer within budget.

Per request it does only: size limit, parse, signature, "is this a rating?" (see
``gateway.feedback``), "is this for the AI?", publish (acks=all) with a deadline
(``gateway.publisher``), answer. Anything slower belongs in a stage.

Optional fast path (``policy.callback.refuse_blocked_input``): the input check
of ``moderation`` (the same checker the moderate-in stage runs, so both give the
same verdict) runs here too, so a prohibited message is refused before Easemob
delivers it. It is imported only when the switch is on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from imbot.core import topics
from imbot.core.limits import LOGGED_VALUE_MAX
from imbot.core.settings import Settings
from imbot.gateway.callback import CallbackRejected, decide, verify
from imbot.gateway.feedback import FeedbackMessage, read_feedback
from imbot.gateway.metrics import (
    CALLBACK_SECONDS,
    CALLBACKS,
    FEEDBACK,
    PUBLISH_FAILURES,
    REPLAY_STORE_FAILURES,
)
from imbot.gateway.publisher import Publisher, PublishOnce
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
# The status of an answer to a client that closed its request before it was read (nginx's
# 499): never sent, it only tells the outcome apart from our own errors.
_CLIENT_CLOSED_REQUEST = 499


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
        self.once = PublishOnce(
            publisher,
            window=settings.dedupe_window,
            timeout=settings.publish_timeout_ms / 1000.0,
        )
        self.feedback_topic = settings.topic(topics.FEEDBACK)
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
        except ConnectionError as exc:
            # The client closed or reset the connection before its body was whole
            # (aiohttp's ClientConnectionResetError is a ConnectionResetError): its doing,
            # not a fault of ours. Nobody is left to read the answer.
            log.info(
                "client went away before its body arrived",
                extra={"error": type(exc).__name__, "content_length": request.content_length},
            )
            return "client_gone", _json({"error": "client_gone"}, _CLIENT_CLOSED_REQUEST)
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
            # A rating is recognised first: it is never a question for the AI.
            feedback = read_feedback(data, self.policy)
            if feedback is not None:
                return await self._feedback(feedback)
            decision = decide(data, self.policy)
        except CallbackRejected as exc:
            return exc.error, self._reject(exc, data)
        message = decision.message
        if message is None:
            if self.call_ids is not None:
                # Its signature must not carry another message later (see gateway.replay).
                call_id = data["callId"]
                self.call_ids.remember(
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
        if msg_id in self.once:
            return "duplicate", _answer(self.accepted)
        if message.call_id is not None:
            assert message.easemob_timestamp is not None  # verify() required it
            refused = await self._first_use(
                msg_id, message.call_id, message.easemob_timestamp, message.conversation_id
            )
            if refused is not None:
                return refused, _answer(
                    self.on_failure if refused == "replay_store_failed" else self.accepted
                )
        published, failure = await self.once.publish(
            msg_id, message.conversation_id.encode(), message.encode()
        )
        if failure is not None:
            # After a "timeout" the record may still reach the topic (it was already
            # queued; the publisher then remembers the id). So with kafka_failure=block
            # the sender may be told "blocked" and still get the AI's reply; with pass,
            # the reply just arrives. Easemob never retries, and the pipeline's delivery
            # ledger keeps any repeat from being answered twice.
            return self._publish_failed(published, failure, msg_id, message.conversation_id)
        if published == "duplicate":
            # The same callback was being published (Easemob sent it twice, e.g. two
            # matching rules): answered as that publish was.
            return "duplicate", _answer(self.accepted)
        return "published", _answer(self.accepted)

    async def _feedback(self, feedback: FeedbackMessage) -> tuple[str, web.Response]:
        """A rating: published to ``imbot.feedback`` (never to the pipeline, so the bot
        never answers it) under the AI messages' deadline and fail policy. The message
        itself passes to its recipients as usual: ``{"valid": true}``."""
        msg_id = feedback.msg_id
        if msg_id in self.once:
            return "duplicate", _answer(_VALID)
        refused = await self._first_use(
            msg_id, feedback.call_id, feedback.easemob_timestamp, feedback.conversation_id
        )
        if refused is not None:
            return refused, _answer(self.on_failure if refused == "replay_store_failed" else _VALID)
        published, failure = await self.once.publish(
            msg_id,
            feedback.conversation_id.encode(),
            feedback.encode(),
            topic=self.feedback_topic,
        )
        if failure is not None:
            return self._publish_failed(published, failure, msg_id, feedback.conversation_id)
        if published == "duplicate":
            return "duplicate", _answer(_VALID)
        FEEDBACK.labels(feedback.rating).inc()
        log.info(
            "feedback published",
            extra={
                "msg_id": msg_id,
                "conversation": feedback.conversation_id,
                "reply_msg_id": feedback.reply_msg_id,
                "rating": feedback.rating,
            },
        )
        return "feedback", _answer(_VALID)

    async def _first_use(
        self, msg_id: str, call_id: str, timestamp: int, conversation: str
    ) -> str | None:
        """None when ``call_id`` is new (now remembered); else the outcome: "replayed"
        (never published; answered as a duplicate is, since nothing here tells the
        sender whether it was) or "replay_store_failed" (answered by the fail policy)."""
        call_ids = self.call_ids
        if call_ids is None:
            return None
        expires_at_ms = timestamp + self.window_ms
        try:
            if isinstance(call_ids, MemoryCallIds):
                # Nothing to wait for: no timer armed per request.
                new_call_id = call_ids.record(call_id, expires_at_ms)
            else:
                async with asyncio.timeout(self.replay_timeout):
                    new_call_id = await call_ids.first_use(call_id, expires_at_ms)
        except (ReplayStoreUnavailable, TimeoutError) as exc:
            why = exc.why if isinstance(exc, ReplayStoreUnavailable) else "timeout"
            REPLAY_STORE_FAILURES.labels(why).inc()
            log.error(
                "callId store did not answer, answering by the fail policy",
                extra={"msg_id": msg_id, "conversation": conversation, "why": why},
            )
            return "replay_store_failed"
        if new_call_id:
            return None
        log.warning("replayed callId refused", extra={"msg_id": msg_id, "callId": _short(call_id)})
        return "replayed"

    def _publish_failed(
        self, published: str, failure: str, msg_id: str, conversation: str
    ) -> tuple[str, web.Response]:
        """Answered by the fail policy; counted and logged once, by the first publish."""
        if published == "published":
            PUBLISH_FAILURES.labels(failure).inc()
            log.error(
                "publish failed, answering by the fail policy",
                extra={"msg_id": msg_id, "conversation": conversation, "why": failure},
            )
        return "publish_failed", _answer(self.on_failure)

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
    """200 once a publish needs nothing but its produce request (``Publisher.ready``)."""
    if await request.app[PUBLISHER].ready():
        return _json({"status": "ready"})
    return _json({"status": "kafka not ready"}, 503)


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
        # How long requests in flight get once SIGTERM arrives: a body may take this
        # long to arrive, then the answer. aiohttp's default (60 s) outlasts the pod's
        # 30 s grace, so Kubernetes would kill it mid-answer.
        shutdown_timeout=settings.gateway_body_timeout_s + 1,
    )
