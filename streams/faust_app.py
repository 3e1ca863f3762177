"""The Faust application the stage agents run on, with the embedded-broker tweaks.

Values and keys are raw bytes (our code decodes them inside the error boundary,
never Faust's codec). With the embedded Tansu broker three workarounds apply:
producers send one record per batch, group timeouts are short, and the worker
consumer's fetch long-poll is 10 ms instead of the 1,500 ms Faust hard-codes
(Tansu does not wake a waiting fetch when data arrives, so one untuned hop costs
hundreds of milliseconds). ``tests/integration/test_lanes_commit.py`` checks the
value on the consumer Faust actually fetches with, so it fails if a Faust
upgrade stops this from taking effect.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from core.settings import Settings


class ShortFetchConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    fetch_max_wait_ms = 10

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka keeps the value here and hands it to its fetcher on start().
        consumer._fetch_max_wait_ms = self.fetch_max_wait_ms
        return consumer


class ShortFetchConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> ShortFetchConsumerThread:
        return ShortFetchConsumerThread(self, loop=self.loop, beacon=self.beacon)


class ShortFetchTransport(faust_aiokafka.Transport):
    Consumer = ShortFetchConsumer


def create_app(settings: Settings, group: str, **extra: Any) -> faust.App:
    broker = ";".join(f"kafka://{host}" for host in settings.kafka_bootstrap.split(","))
    conf: dict[str, Any] = {
        "broker": broker,
        "key_serializer": "raw",
        "value_serializer": "raw",
        "topic_partitions": settings.topic_partitions,
        "topic_replication_factor": settings.topic_replication,
        "topic_disable_leader": True,
        "web_enabled": False,
        "store": "memory://",
        # Faust wants a data directory even without tables; keep it out of the CWD.
        "datadir": str(Path(tempfile.gettempdir()) / "imbot-faust"),
        "consumer_auto_offset_reset": "earliest",
        "broker_commit_interval": 0.5,
        "producer_acks": -1,
        "stream_wait_empty": True,
        "processing_guarantee": "at_least_once",
    }
    if settings.single_record_batches:
        conf["producer_max_batch_size"] = 1
    if settings.kafka_embedded:
        conf.update(
            broker_session_timeout=6.0,
            broker_rebalance_timeout=3.0,
            broker_heartbeat_interval=1.0,
            broker_request_timeout=30.0,
        )
    conf.update(extra)
    app = faust.App(group, **conf)
    if settings.kafka_embedded:
        ShortFetchConsumerThread.fetch_max_wait_ms = settings.consumer_fetch_max_wait_ms
        app.transport = ShortFetchTransport(app.conf.broker_consumer, app)
    return app
