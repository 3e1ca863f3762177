"""The Faust application the stage agents run on, with the embedded-broker tweaks.

Values and keys are raw bytes (our code decodes them inside the error boundary,
never Faust's codec). With the embedded Tansu broker three workarounds apply:
producers send one record per batch, group timeouts are short, and the worker
consumer's fetch long-poll is 10 ms instead of the 1,500 ms Faust hard-codes
(Tansu does not wake a waiting fetch when data arrives, so one untuned hop costs
hundreds of milliseconds). ``tests/integration/test_lanes_commit.py`` checks the
value on the consumer Faust actually fetches with, so it fails if a Faust
upgrade stops this from taking effect.

What is committed comes from the app's ``CommitLedger`` (``streams.offsets``, which
says why Faust's acknowledgement bookkeeping is not used): ``StageConsumer`` tells
the ledger each assignment and commits the positions it gives.

Rebalances and stops are bounded (``StageConsumer``): Faust's own revocation
waits, with no limit, for every message that entered a stream to be
acknowledged (``stream_wait_empty``), and the whole consumer group waits for its
slowest member, so one slow model call held every replica of a stage. Here the
revoked partitions take no more records, the stages' lanes get
``stage_revoke_grace_s`` to finish, the rest is cut short and redelivered (see
``streams.lanes``), and the ledger's positions are committed before the assignment
ends.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import tempfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import faust
from aiokafka.errors import KafkaError
from aiokafka.protocol.group import JoinGroupRequest, LeaveGroupRequest
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP

from imbot.core.kafka import ssl_context
from imbot.core.settings import Settings
from imbot.streams.lanes import KeyedLanes
from imbot.streams.offsets import CommitLedger

log = logging.getLogger("imbot.rebalance")


def broker_credentials(settings: Settings) -> Any:
    """Faust's form of ``core.kafka.connection_kwargs``: SASL (over TLS or not) or TLS."""
    if settings.kafka_sasl:
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=settings.kafka_sasl_password.get_secret_value(),
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=ssl_context(settings) if settings.kafka_tls else None,
        )
    if settings.kafka_tls:
        return faust.SSLCredentials(ssl_context(settings))
    return None


class StageApp(faust.App):
    """A Faust app that knows the lanes of its agents, to release them on revocation,
    and the ledger of what they finished, which decides its commits."""

    revoke_grace_s: float = 0.25

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lanes: list[KeyedLanes] = []
        self.ledger: CommitLedger[TP] = CommitLedger()

    async def fail_fast(self, exc: BaseException) -> None:
        """A handler escaped its boundary (``streams.lanes``): commit what finished, then
        crash, so the worker exits non-zero and its supervisor restarts it; the record
        is redelivered to whoever owns its partition next."""
        consumer = self.consumer
        if isinstance(consumer, StageConsumer):
            try:
                await asyncio.wait_for(consumer.commit_now(), timeout=5.0)
            except Exception as error:  # crashing anyway: redone work is the cost
                log.warning("commit before crashing failed", extra={"error": repr(error)})
        await self.crash(exc)

    async def release_lanes(
        self, partitions: Collection[Any] | None, *, cancel: bool, grace: float | None = None
    ) -> int:
        """Release every agent's lanes, concurrently: the grace is shared, not summed."""
        wait = self.revoke_grace_s if grace is None else grace
        counts = await asyncio.gather(
            *(lanes.release(partitions, wait, cancel=cancel) for lanes in list(self.lanes))
        )
        return sum(counts)


class ShortFetchConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    fetch_max_wait_ms: int | None = None  # None: Faust's own (1,500 ms)
    leave_at_generation_zero = False  # embedded broker: see _leave_group

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        if self.fetch_max_wait_ms is not None:
            # aiokafka keeps the value here and hands it to its fetcher on start().
            consumer._fetch_max_wait_ms = self.fetch_max_wait_ms
        return consumer

    async def on_thread_stop(self) -> None:
        coordinator = getattr(self._consumer, "_coordinator", None)
        static = getattr(self._consumer, "_group_instance_id", None)  # never leaves on stop
        if self.leave_at_generation_zero and coordinator is not None and static is None:
            coordinator._maybe_leave_group = functools.partial(_leave_group, coordinator)
        await super().on_thread_stop()


async def _leave_group(coordinator: Any) -> None:
    """aiokafka's ``_maybe_leave_group`` without its ``generation > 0`` test.

    Tansu numbers generations from 0 (Kafka from 1), so aiokafka never sends
    LeaveGroup for a member of a first generation: a stopped worker's partitions
    then waited for its session to time out instead of moving at once.
    """
    joined = coordinator.generation >= 0
    if joined and coordinator.member_id != JoinGroupRequest.UNKNOWN_MEMBER_ID:
        try:
            await coordinator._send_req(
                LeaveGroupRequest(coordinator.group_id, coordinator.member_id)
            )
        except KafkaError as exc:
            log.warning("LeaveGroup failed", extra={"error": type(exc).__name__})
        else:
            log.info("left the group", extra={"group": coordinator.group_id})
    coordinator.reset_generation()


class StageConsumer(faust_aiokafka.Consumer):
    """Faust's consumer, committing the ledger's positions instead of its own acks."""

    def _new_consumer_thread(self) -> ShortFetchConsumerThread:
        return ShortFetchConsumerThread(self, loop=self.loop, beacon=self.beacon)

    @property
    def ledger(self) -> CommitLedger[TP] | None:
        app = self.app
        return app.ledger if isinstance(app, StageApp) else None

    def _filter_tps_with_pending_acks(self, topics: Any = None) -> Any:
        ledger = self.ledger
        if ledger is None:
            return super()._filter_tps_with_pending_acks(topics)
        return (
            tp for tp in ledger.assigned() if topics is None or tp in topics or tp.topic in topics
        )

    def _filter_committable_offsets(self, tps: Any) -> dict[Any, int]:
        ledger = self.ledger
        if ledger is None:
            return dict(super()._filter_committable_offsets(tps))
        return {
            tp: offset
            for tp, offset in ledger.positions(set(tps)).items()
            if self._should_commit(tp, offset)
        }

    async def commit_now(self, topics: Any = None) -> bool:
        """Commit, even while a periodic commit is in flight (Faust's ``commit`` then
        waits for that one and returns without committing what finished since)."""
        await self.maybe_wait_for_commit_to_finish()
        return bool(await self.commit(topics))

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        app = self.app
        if isinstance(app, StageApp) and revoked:
            app.ledger.close(revoked)  # nothing more of them is taken from the stream
            if not app.should_stop:
                started = time.monotonic()
                cut_short = await app.release_lanes(revoked, cancel=False)
                # Commit what finished while the partitions are still ours.
                committed = await self.commit_now(revoked)
                log.info(
                    "partitions revoked",
                    extra={
                        "partitions": len(revoked),
                        "cut_short": cut_short,
                        "committed": committed,
                        "took_s": round(time.monotonic() - started, 3),
                    },
                )
            app.ledger.revoke(revoked)
        await super().on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[Any], generation_id: int = 0) -> None:
        app = self.app
        if isinstance(app, StageApp):
            # Before Faust resumes fetching: a record is counted by the assignment it
            # was fetched in (the message's generation), and only by that one.
            app.ledger.assign(assigned, generation_id)
        await super().on_partitions_assigned(assigned, generation_id)
        log.info(
            "partitions assigned",
            extra={
                "generation": generation_id,
                "partitions": sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
            },
        )


class StageTransport(faust_aiokafka.Transport):
    Consumer = StageConsumer


def create_app(settings: Settings, group: str, **extra: Any) -> StageApp:
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
        # Never wait without a bound for streams to empty (rebalance, stop): the
        # lanes do it, bounded (StageConsumer, KeyedLanes.release).
        "stream_wait_empty": False,
        "processing_guarantee": "at_least_once",
    }
    if settings.single_record_batches:
        conf["producer_max_batch_size"] = 1
    # Measured in bench/restarts.py ("Restarts" in docs/benchmarks.md). Tansu holds each
    # rebalance's join phase for longer the longer the session, so the embedded broker
    # gets a short one; a real cluster gets Kafka's former client default (its brokers
    # refuse less than 6 s by default) for margin against GC pauses and network blips.
    session, rebalance, heartbeat = (
        (3.0, 3.0, 0.5) if settings.kafka_embedded else (10.0, 10.0, 1.0)
    )
    conf.update(
        broker_session_timeout=settings.kafka_session_timeout_s or session,
        broker_rebalance_timeout=settings.kafka_rebalance_timeout_s or rebalance,
        broker_heartbeat_interval=settings.kafka_heartbeat_interval_s or heartbeat,
    )
    conf["broker_request_timeout"] = max(30.0, conf["broker_session_timeout"] + 5.0)
    credentials = broker_credentials(settings)
    if credentials is not None:
        conf["broker_credentials"] = credentials
    conf.update(extra)
    app = StageApp(group, **conf)
    app.revoke_grace_s = settings.stage_revoke_grace_s
    ShortFetchConsumerThread.fetch_max_wait_ms = (
        settings.consumer_fetch_max_wait_ms if settings.kafka_embedded else None
    )
    ShortFetchConsumerThread.leave_at_generation_zero = settings.kafka_embedded
    app.transport = StageTransport(app.conf.broker_consumer, app)
    return app
