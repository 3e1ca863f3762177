"""The worker's HTTP side on the real broker: consumer lag per partition from the group's
committed offsets, and the health, readiness and metrics endpoints."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from imbot.core import topics
from imbot.core.kafka import ensure_topics, new_producer
from imbot.core.settings import Settings
from imbot.devtools.broker import EmbeddedBroker
from imbot.devtools.processes import free_port
from imbot.streams.health import LagReporter, serve
from imbot.streams.metrics import CONSUMER_LAG


async def _settings(make_settings: Callable[..., Settings]) -> Settings:
    settings = make_settings(topic_partitions=2)
    await ensure_topics(settings, [topics.MODERATED])
    return settings


async def test_lag_is_the_end_offset_minus_the_group_s_committed_offset(
    broker: EmbeddedBroker, make_settings: Callable[..., Settings]
) -> None:
    settings = await _settings(make_settings)
    topic = settings.topic(topics.MODERATED)
    producer = new_producer(settings)
    await producer.start()
    try:
        for n in range(5):
            await producer.send_and_wait(topic, b"x", partition=0, key=f"k{n}".encode())
    finally:
        await producer.stop()
    group = f"g{uuid.uuid4().hex[:8]}"
    committer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=group)
    await committer.start()
    try:
        tp = TopicPartition(topic, 0)
        committer.assign([tp])
        await committer.commit({tp: OffsetAndMetadata(2, "")})
    finally:
        await committer.stop()
    reporter = LagReporter(settings, group, [("route", topic)])
    try:
        await reporter.report()
        await reporter.report()  # the first read may only have fetched the metadata
    finally:
        await reporter.close()
    assert CONSUMER_LAG.labels("route", "0")._value.get() == 3
    assert CONSUMER_LAG.labels("route", "1")._value.get() == 0


async def test_health_ready_and_metrics_endpoints(make_settings: Callable[..., Settings]) -> None:
    port = free_port()
    settings = make_settings(worker_metrics_port=port)
    ready = False
    runner = await serve(settings, lambda: ready)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/healthz")).status_code == 200
            assert (await http.get("/readyz")).status_code == 503
            ready = True
            assert (await http.get("/readyz")).status_code == 200
            metrics = await http.get("/metrics")
            assert "imbot_stage_messages_total" in metrics.text
    finally:
        await runner.cleanup()
