"""Kafka out of the gateway: a publisher that never blocks a request, and each msg_id once.

``Publisher`` owns the producer (started in the background, so the gateway answers by
the fail policy while the broker is down), its readiness (the metadata of the topics it
publishes to and a connection to their partitions' leaders, so the first publish after
``/readyz`` says ready is as fast as any other) and the publish deadline (one sweeper over
a FIFO of pending publishes instead of a timer per request). ``PublishOnce`` sits in
front of it: a msg_id published recently, or being published right now, is not
published again (Easemob may call twice for one message: two matching rules, an edit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any, Literal

from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.protocol.metadata import MetadataRequest

from imbot.core import topics
from imbot.core.kafka import new_producer
from imbot.core.retry import Backoff
from imbot.core.settings import Settings
from imbot.gateway.metrics import LATE_ACKS

log = logging.getLogger("imbot.gateway")

_DEADLINE = "imbot publish deadline"
_SWEEP_S = 0.005  # deadlines are enforced to within this
_CONNECT_BACKOFF = Backoff(base=0.2, cap=5.0)  # the broker down at start-up: keep trying
# One attempt to get ready (metadata, leader connections) in the background; longer than
# a readiness probe may wait, as a slow cluster still gets there.
_WARM_TIMEOUT_S = 5.0
# ``/readyz`` answers within this (the gateway's readinessProbe waits 3 s).
_READY_TIMEOUT_S = 2.0


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


class Publisher:
    """A Kafka producer that starts in the background and never blocks a request.

    If the broker is down at start-up the gateway still answers callbacks (by the
    fail policy) and keeps trying to connect.

    Ready (``ready``) means a publish now needs one produce round trip and nothing
    else: the producer has the metadata of every topic the gateway publishes to (see
    ``_prepare`` for a missing one) and a connection to each of their partitions'
    leaders, and those leaders answer. Before, a broker that merely answered made the
    gateway ready while its first publish still had to fetch the topic's metadata and
    connect to the leader (TCP, TLS, SASL), and missed its deadline. Getting there is
    retried in the background after the producer starts; a missing inbound topic keeps
    the gateway not ready (asking never creates it with the broker's defaults).

    Deadlines: every publish gets the same timeout, so pending publishes expire in
    the order they started. One timer walks a FIFO of them instead of arming an
    ``asyncio.timeout`` per request (a timer handle, heap push and cancel each time,
    measurably slower at thousands of requests per second), and the deadline never
    cancels aiokafka's delivery future, so a late ack is still seen.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = settings.topic(topics.INBOUND)
        # Every topic it publishes to: the inbound one, and the side topic of ratings.
        self.topics: tuple[str, ...] = (self.topic,)
        if settings.policy.feedback.enabled:
            self.topics += (settings.topic(topics.FEEDBACK),)
        self._prepared = False  # the background preparation has succeeded once
        self._missing_reported: frozenset[str] = frozenset()
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
            except BaseException:
                # Stopped while connecting (the gateway shuts down): close what was opened.
                with contextlib.suppress(Exception):
                    await asyncio.shield(producer.stop())
                raise
            break
        # Publishing may start now (a publish pays for what is still missing); ready waits.
        self.producer = producer
        attempt = 0
        while (why := await self._prepare(producer, _WARM_TIMEOUT_S)) is not None:
            attempt += 1
            log.warning(
                "kafka producer not ready to publish yet, retrying",
                extra={"why": why, "attempt": attempt},
            )
            await asyncio.sleep(_CONNECT_BACKOFF.delay(attempt))
        self._prepared = True
        log.info(
            "kafka producer ready",
            extra={"bootstrap": self.settings.kafka_bootstrap, "topics": list(self.topics)},
        )

    async def _prepare(self, producer: AIOKafkaProducer, timeout: float) -> str | None:
        """Make a publish to any partition of ``self.topics`` need nothing but its produce
        request, within ``timeout`` seconds; None when done, else why not (no data).

        The inbound topic must exist. A missing side topic (``imbot.feedback``) is
        logged and left out: ratings then get the fail policy, but taking the gateway
        out of service for it would refuse every AI message too."""
        client = producer.client
        try:
            async with asyncio.timeout(timeout):
                # Which topics exist? Asked without creating any: the metadata requests of
                # aiokafka's own refresh would create a missing topic on a broker that
                # auto-creates, with the broker's default partitions.
                node = client.get_random_node()
                if node is None:
                    return "no broker known"
                missing = await self._missing(client, node)
                if self.topic in missing:
                    return f"no such topic: {self.topic}"
                self._report_missing(missing)
                present = [topic for topic in self.topics if topic not in missing]
                # Tracked from now on (refreshed with the cluster's metadata); the first
                # time, this waits for their metadata.
                await asyncio.gather(*(client.add_topic(topic) for topic in present))
                leaders: set[int] = set()
                for topic in present:
                    partitions = client.cluster.partitions_for_topic(topic)
                    if not partitions:
                        client.force_metadata_update()  # for the next attempt
                        return f"no metadata for {topic}"
                    for partition in partitions:
                        leader = client.cluster.leader_for_partition(
                            TopicPartition(topic, partition)
                        )
                        if leader is None or leader < 0:
                            client.force_metadata_update()
                            return f"no leader for {topic}[{partition}]"
                        leaders.add(leader)
                for leader in sorted(leaders):
                    if not await client.ready(leader):
                        return f"leader {leader} not reachable"
                # Each leader answers on the connection a publish will use (a broker
                # whose sockets are open but that answers nothing is not ready).
                for leader in sorted(leaders):
                    if self.topic in await self._missing(client, leader):
                        return f"no such topic on leader {leader}: {self.topic}"
        except TimeoutError:
            return f"not within {timeout:g}s"
        except (KafkaError, OSError) as exc:
            return type(exc).__name__
        return None

    async def _missing(self, client: Any, node_id: int) -> list[str]:
        """The topics of ``self.topics`` that broker ``node_id`` does not know (or cannot
        serve), asked without creating any."""
        response = await client.send(
            node_id, MetadataRequest(list(self.topics), allow_auto_topic_creation=False)
        )
        known = {entry[1] for entry in response.topics if entry[0] == 0}
        return [topic for topic in self.topics if topic not in known]

    def _report_missing(self, missing: list[str]) -> None:
        """Log a side topic that is missing (or back) once, not on every readiness probe."""
        now = frozenset(missing)
        if now != self._missing_reported:
            if now:
                log.warning(
                    "topic missing, its records get the fail policy",
                    extra={"topics": sorted(now)},
                )
            self._missing_reported = now

    async def publish(
        self, key: bytes, value: bytes, msg_id: str, timeout: float, *, topic: str | None = None
    ) -> str | None:
        """Publish to ``topic`` (full name; the inbound topic by default) and wait for the
        ack (acks=all); returns None on success or why it failed.

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
            delivery = await producer.send(topic or self.topic, value, key=key)
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
        """Ready to publish at once (see the class): answered within 2 s. Not before the
        background preparation is done, so its requests are not still ahead of the
        first publish on a leader's connection."""
        producer = self.producer
        if producer is None or not self._prepared:
            return False
        return await self._prepare(producer, _READY_TIMEOUT_S) is None

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


Published = Literal["published", "duplicate"]


class PublishOnce:
    """Each msg_id published at most once by this gateway: the ``dedupe_window`` last
    published ones (and those acked after their deadline) are remembered, and a
    duplicate that arrives while the first is being published waits for its outcome."""

    def __init__(self, publisher: Publisher, *, window: int, timeout: float) -> None:
        self.publisher = publisher
        self.timeout = timeout
        self.recent = RecentIds(window)
        publisher.on_late_ack = self.recent.add
        # msg_id -> the outcome of its publish in progress; the future is created only
        # when a concurrent duplicate arrives and waits for it.
        self.in_flight: dict[str, asyncio.Future[str | None] | None] = {}

    def __contains__(self, msg_id: str) -> bool:
        """Published already (a duplicate callback is answered without publishing)."""
        return msg_id in self.recent

    async def publish(
        self, msg_id: str, key: bytes, value: bytes, *, topic: str | None = None
    ) -> tuple[Published, str | None]:
        """Publish unless the same msg_id is in flight; which it was, and why it failed
        (None: on the topic). A duplicate gets the first publish's failure."""
        in_flight = self.in_flight
        if msg_id in in_flight:
            first = in_flight[msg_id]
            if first is None:
                first = in_flight[msg_id] = asyncio.get_running_loop().create_future()
            return "duplicate", await asyncio.shield(first)
        in_flight[msg_id] = None
        failure: str | None = "cancelled"
        try:
            failure = await self.publisher.publish(key, value, msg_id, self.timeout, topic=topic)
        finally:
            waiting = in_flight.pop(msg_id)
            if waiting is not None and not waiting.done():
                waiting.set_result(failure)
        if failure is None:
            self.recent.add(msg_id)
        return "published", failure
