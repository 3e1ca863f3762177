"""The gateway: Easemob's before-send callback in, Kafka out, an answer within budget.

Per request it does only: size limit, parse, signature, "is this for the AI?",
publish (acks=all) with a deadline, answer. Anything slower belongs in a stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from core import topics
from core.envelope import encode_envelope
from core.kafka import new_producer
from core.settings import Settings
from gateway.callback import CallbackRejected, decide, verify

log = logging.getLogger("imbot.gateway")

CALLBACKS = Counter(
    "imbot_gateway_callbacks_total", "Before-send callbacks by outcome", ["outcome"]
)
LATENCY = Histogram(
    "imbot_gateway_callback_seconds",
    "Time to answer a callback, by outcome",
    ["outcome"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)
PUBLISH_FAILURES = Counter(
    "imbot_gateway_publish_failures_total", "Publishes that missed the deadline or failed", ["why"]
)

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
PUBLISHER: web.AppKey[Publisher] = web.AppKey("publisher")

_VALID = orjson.dumps({"valid": True})


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


class Publisher:
    """A Kafka producer that starts in the background and never blocks a request.

    If the broker is down at start-up the gateway still answers callbacks (by the
    fail policy) and keeps trying to connect.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic(topics.INBOUND)
        self.producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        delay = 0.2
        while True:
            producer = new_producer(self.settings)
            try:
                await producer.start()
            except (KafkaError, OSError) as exc:
                log.warning("kafka not reachable, retrying", extra={"error": str(exc)})
                with contextlib.suppress(Exception):
                    await producer.stop()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.producer = producer
            log.info("kafka producer ready", extra={"bootstrap": self.settings.kafka_bootstrap})
            return

    async def publish(self, key: bytes, value: bytes, timeout: float) -> str | None:
        """Publish and wait for the ack; returns None on success or why it failed."""
        producer = self.producer
        if producer is None:
            return "not_connected"
        try:
            async with asyncio.timeout(timeout):
                await producer.send_and_wait(self.topic, value, key=key)
        except TimeoutError:
            return "timeout"
        except KafkaError as exc:
            log.warning("publish failed", extra={"error": str(exc)})
            return "kafka_error"
        return None

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
    def __init__(self, settings: Settings, publisher: Publisher) -> None:
        self.settings = settings
        self.policy = settings.policy
        self.publisher = publisher
        self.secrets = settings.secret_values()
        self.max_body = settings.callback_max_body_bytes
        self.timeout = settings.publish_timeout_ms / 1000.0
        self.recent = RecentIds(settings.dedupe_window)
        self._metrics: dict[str, tuple[Counter, Histogram]] = {}
        cb = self.policy.callback
        self.accepted = (
            _VALID
            if cb.ai_message == "pass"
            else orjson.dumps({"valid": False, "code": cb.intercept_code})
        )
        self.on_failure = (
            _VALID
            if cb.kafka_failure == "pass"
            else orjson.dumps({"valid": False, "code": cb.kafka_failure_code})
        )

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        outcome, response = await self._handle(request)
        metrics = self._metrics.get(outcome)
        if metrics is None:
            metrics = self._metrics[outcome] = (CALLBACKS.labels(outcome), LATENCY.labels(outcome))
        metrics[0].inc()
        metrics[1].observe(time.perf_counter() - started)
        return response

    async def _handle(self, request: web.Request) -> tuple[str, web.Response]:
        length = request.content_length
        if length is not None and length > self.max_body:
            return "too_large", self._reject(
                CallbackRejected(413, "body_too_large", f"body exceeds {self.max_body} bytes")
            )
        raw = await request.content.read(self.max_body + 1)
        if len(raw) > self.max_body:
            return "too_large", self._reject(
                CallbackRejected(413, "body_too_large", f"body exceeds {self.max_body} bytes")
            )
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return "bad_json", self._reject(CallbackRejected(400, "bad_json", "body is not JSON"))
        try:
            verify(data, self.secrets, window_s=self.settings.callback_timestamp_window_s)
            decision = decide(data, self.policy)
        except CallbackRejected as exc:
            return exc.error, self._reject(exc, data)
        env = decision.envelope
        if env is None:
            return "not_ai", web.Response(body=_VALID, content_type="application/json")
        if env.msg_id in self.recent:
            return "duplicate", web.Response(body=self.accepted, content_type="application/json")
        failure = await self.publisher.publish(
            env.conversation_id.encode(), encode_envelope(env), self.timeout
        )
        if failure is not None:
            PUBLISH_FAILURES.labels(failure).inc()
            log.error(
                "publish failed, answering by the fail policy",
                extra={"msg_id": env.msg_id, "conversation": env.conversation_id, "why": failure},
            )
            return "publish_failed", web.Response(
                body=self.on_failure, content_type="application/json"
            )
        self.recent.add(env.msg_id)
        return "published", web.Response(body=self.accepted, content_type="application/json")

    @staticmethod
    def _reject(exc: CallbackRejected, data: Any = None) -> web.Response:
        fields: dict[str, Any] = {"status": exc.status, "error": exc.error, "detail": exc.detail}
        if isinstance(data, dict):
            for key in ("callId", "msg_id"):
                if isinstance(data.get(key), str | int):
                    fields[key] = data[key]
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


async def _kafka_ctx(app: web.Application) -> AsyncIterator[None]:
    publisher = app[PUBLISHER]
    await publisher.start()
    yield
    await publisher.stop()


def create_app(settings: Settings) -> web.Application:
    # client_max_size bounds any other route; the callback reads its body itself.
    app = web.Application(client_max_size=settings.callback_max_body_bytes + 1)
    publisher = Publisher(settings)
    app[SETTINGS] = settings
    app[PUBLISHER] = publisher
    app.cleanup_ctx.append(_kafka_ctx)
    app.router.add_post(settings.callback_path, CallbackHandler(settings, publisher).handle)
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
