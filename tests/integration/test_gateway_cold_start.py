"""A freshly started gateway that says it is ready publishes its first message in time.

Real parts only: the embedded broker (directly, or behind a proxy that makes each of
its answers late), fresh topics (a topic prefix no client has seen), the gateway on a
real port. The fail policy is ``block``, so a publish that misses its deadline shows
in the answer Easemob gets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import REGISTRY

from imbot.core import topics
from imbot.core.envelope import decode_envelope
from imbot.core.kafka import ensure_topics
from imbot.core.settings import Settings
from imbot.devtools.broker import EmbeddedBroker, consume_all
from imbot.devtools.processes import free_port
from imbot.gateway.app import PUBLISHER, create_app
from tests.integration.test_slow_kafka import DelayProxy
from tests.payloads import callback

Client = TestClient[web.Request, web.Application]

_BLOCK_ON_FAILURE = (
    "callback: {kafka_failure: block, kafka_failure_code: DOWN}\n"
    "models: {demo: {provider: demo}}\nroutes: {default: {models: [demo]}}\n"
)


_RATING = {"msg_id": "1290099999999999999", "rating": "👍"}


def _callbacks(outcome: str) -> float:
    return REGISTRY.get_sample_value("imbot_gateway_callbacks_total", {"outcome": outcome}) or 0.0


async def _started(settings: Settings) -> Client:
    client: Client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    return client


async def _ready_within(client: Client, seconds: float) -> None:
    """Wait for ``/readyz`` to answer 200 (polled every 10 ms, as eagerly as a client can)."""
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        if (await client.get("/readyz")).status == 200:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"/readyz not 200 within {seconds}s")


async def _first_callback_is_published(client: Client, settings: Settings, text: str) -> None:
    """Right after ``/readyz`` said 200: one AI message, answered as accepted (not by the
    fail policy), counted ``published``, and on the topic."""
    await _ready_within(client, 15.0)
    published, failed = _callbacks("published"), _callbacks("publish_failed")
    data = callback(text)
    resp = await client.post("/easemob/callback", data=orjson.dumps(data))
    assert (resp.status, await resp.json()) == (200, {"valid": True})
    assert (_callbacks("published"), _callbacks("publish_failed")) == (published + 1, failed)
    records = await consume_all(
        settings.kafka_bootstrap, settings.topic(topics.INBOUND), 1, timeout=5.0
    )
    assert [decode_envelope(v).msg_id for _, v in records] == [data["msg_id"]]


async def _existing(settings: Settings) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        return {t for t in await admin.list_topics() if t.startswith(settings.topic_prefix)}
    finally:
        await admin.close()


async def test_first_callback_after_readyz_is_published(
    make_settings: Callable[..., Settings], tmp_path: Any, topic_prefix: str
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(_BLOCK_ON_FAILURE)
    # A few cold starts in a row, each on topics of its own.
    for round_ in range(3):
        settings = make_settings(policy_file=policy, topic_prefix=f"{topic_prefix}cold{round_}.")
        await ensure_topics(settings)
        client = await _started(settings)
        try:
            await _first_callback_is_published(client, settings, f"冷启动 {round_}")
        finally:
            await client.close()


# One broker answer fits in the publish deadline with room to spare; two do not.
_LATE_S = 0.25
_DEADLINE_MS = 400


@pytest.fixture
async def late_broker() -> AsyncIterator[EmbeddedBroker]:
    """A broker whose every answer to a client that learnt its address from metadata
    arrives ``_LATE_S`` late (a loaded or distant cluster): whatever the first publish
    still has to fetch then shows in its time."""
    broker_port = free_port()
    proxy = DelayProxy(broker_port)
    await proxy.start()
    broker = EmbeddedBroker(broker_port, advertised_port=proxy.port)
    await asyncio.to_thread(broker.start)
    proxy.delay = _LATE_S
    try:
        yield broker
    finally:
        await proxy.stop()
        broker.stop()


async def test_a_gateway_started_before_its_topics_publishes_its_first_message_in_time(
    late_broker: EmbeddedBroker, make_settings: Callable[..., Settings], tmp_path: Any
) -> None:
    """The producer bootstrapped while the topics did not exist yet (as on a Kafka
    cluster, whose bootstrap answer names no topic): the topic's metadata must be
    fetched before ``/readyz`` says ready, not by the first publish."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(_BLOCK_ON_FAILURE)
    settings = make_settings(
        kafka_bootstrap=late_broker.bootstrap, publish_timeout_ms=_DEADLINE_MS, policy_file=policy
    )
    client = await _started(settings)
    try:
        for _ in range(500):
            if client.app[PUBLISHER].producer is not None:
                break
            await asyncio.sleep(0.01)
        await ensure_topics(settings)
        await _first_callback_is_published(client, settings, "先启动的网关")
        # A user's rating goes to the feedback topic, made ready with the inbound one.
        rated = callback(body={"type": "cmd", "action": "imbot_feedback"}, ext=_RATING)
        feedback = _callbacks("feedback")
        resp = await client.post("/easemob/callback", data=orjson.dumps(rated))
        assert (resp.status, await resp.json()) == (200, {"valid": True})
        assert _callbacks("feedback") == feedback + 1
        records = await consume_all(
            settings.kafka_bootstrap, settings.topic(topics.FEEDBACK), 1, timeout=5.0
        )
        assert [decode_envelope(v).msg_id for _, v in records] == [rated["msg_id"]]
    finally:
        await client.close()


async def test_a_gateway_whose_topic_is_missing_is_not_ready_and_does_not_create_it(
    make_settings: Callable[..., Settings], tmp_path: Any
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(_BLOCK_ON_FAILURE)
    settings = make_settings(policy_file=policy)
    client = await _started(settings)
    try:
        for _ in range(10):
            assert (await client.get("/readyz")).status == 503
            await asyncio.sleep(0.1)
        # Asking for readiness did not create the topic with the broker's defaults.
        assert await _existing(settings) == set()
        await ensure_topics(settings)
        await _first_callback_is_published(client, settings, "话题来了")
    finally:
        await client.close()


async def test_a_missing_feedback_topic_does_not_keep_ai_messages_out(
    make_settings: Callable[..., Settings], tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Ratings need ``imbot.feedback``; without it they get the fail policy, but the
    gateway stays in service for the AI messages."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(_BLOCK_ON_FAILURE)
    settings = make_settings(policy_file=policy)
    await ensure_topics(settings, [topics.INBOUND])
    client = await _started(settings)
    try:
        await _first_callback_is_published(client, settings, "没有反馈话题")
        assert "topic missing, its records get the fail policy" in caplog.text
        assert await _existing(settings) == {settings.topic(topics.INBOUND)}
    finally:
        await client.close()


async def test_unreachable_broker_answers_by_the_fail_policy_and_stays_not_ready(
    make_settings: Callable[..., Settings], tmp_path: Any
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(_BLOCK_ON_FAILURE)
    settings = make_settings(policy_file=policy, kafka_bootstrap=f"127.0.0.1:{free_port()}")
    started = time.perf_counter()
    client = await _started(settings)
    try:
        assert time.perf_counter() - started < 2.0  # the app starts without the broker
        resp = await client.post("/easemob/callback", data=orjson.dumps(callback()))
        assert (resp.status, await resp.json()) == (200, {"valid": False, "code": "DOWN"})
        for _ in range(5):
            assert (await client.get("/readyz")).status == 503
            await asyncio.sleep(0.1)
    finally:
        await client.close()
