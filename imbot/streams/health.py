"""A worker's HTTP side: ``/metrics`` for Prometheus, ``/healthz`` and ``/readyz`` for the
orchestrator, and the consumer-lag figures behind ``imbot_consumer_lag``.

Served by aiohttp in the worker's own event loop, so a liveness answer proves the loop
that runs the stages is turning (a thread would answer while the loop hangs).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from imbot.core.kafka import consumer_kwargs
from imbot.core.settings import Settings
from imbot.streams.metrics import CONSUMER_LAG

log = logging.getLogger("imbot.worker")


def health_app(ready: Callable[[], bool]) -> web.Application:
    """``/metrics``, ``/healthz`` (the loop answers) and ``/readyz`` (``ready()``)."""

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if ready():
            return web.json_response({"status": "ready"})
        return web.json_response({"status": "starting"}, status=503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def serve(settings: Settings, ready: Callable[[], bool]) -> web.AppRunner:
    """Start the worker's HTTP server on ``IMBOT_WORKER_METRICS_PORT``."""
    runner = web.AppRunner(health_app(ready), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.worker_metrics_host, settings.worker_metrics_port)
    await site.start()
    return runner


class LagReporter:
    """Records behind the end of each stage's input topic, per partition, for the
    worker's consumer group: end offset minus the group's committed offset.

    Every replica of a stage reports the same figures (the group's, not its own
    partitions'), so dashboards take ``max by (stage, partition)``. On the embedded
    broker the end offset is only right because our producers send one record per batch
    there (../shared/reference/embedded-kafka.md, defect 2; ``kafka_single_record_batches``).
    """

    def __init__(self, settings: Settings, group: str, stages: Sequence[tuple[str, str]]) -> None:
        self.settings = settings
        self.group = group
        self.stages = tuple(stages)  # (stage name, full input topic name)
        self._consumer: AIOKafkaConsumer | None = None

    async def _client(self) -> AIOKafkaConsumer:
        """A consumer in the worker's group that never subscribes (so never joins it):
        it only reads the group's committed offsets (OffsetFetch through the group's
        coordinator; the admin client's variant of it breaks Tansu's connection)."""
        if self._consumer is None:
            self._consumer = AIOKafkaConsumer(
                **consumer_kwargs(self.settings), group_id=self.group, enable_auto_commit=False
            )
            await self._consumer.start()
        return self._consumer

    async def report(self) -> None:
        try:
            async with asyncio.timeout(10):
                consumer = await self._client()
                for stage, topic in self.stages:
                    parts = consumer.partitions_for_topic(topic) or set()
                    if not parts:
                        await consumer.topics()  # refresh the metadata, read next time
                        continue
                    tps = [TopicPartition(topic, p) for p in sorted(parts)]
                    ends = await consumer.end_offsets(tps)
                    for tp in tps:
                        done = await consumer.committed(tp) or 0
                        lag = max(0, ends[tp] - done)
                        CONSUMER_LAG.labels(stage, str(tp.partition)).set(lag)
        except Exception as exc:  # a figure missed is not a worker failure
            log.warning("consumer lag not read", extra={"error": type(exc).__name__})

    async def close(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        self._consumer = None
