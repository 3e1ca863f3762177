"""Faust on the embedded broker: commits never pass unfinished work; fetch waits are short.

These run a real Faust app in-process against the real Tansu broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from imbot.core.kafka import ensure_topics, new_producer
from imbot.core.settings import Settings
from imbot.streams.faust_app import StageApp, create_app
from imbot.streams.lanes import KeyedLanes


async def _committed(bootstrap: str, group: str, topic: str) -> int | None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        offset: int | None = await consumer.committed(TopicPartition(topic, 0))  # untyped aiokafka
        return offset
    finally:
        await consumer.stop()


async def _wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


@contextlib.asynccontextmanager
async def _lanes_on_faust(
    settings: Settings,
    name: str,
    handler: Callable[[Any], Awaitable[bool]],
    max_in_flight: int,
    grace: float = 30.0,
) -> AsyncIterator[tuple[StageApp, AIOKafkaProducer]]:
    """A real Faust agent reading topic ``name`` through ``KeyedLanes``, and a producer."""
    await ensure_topics(settings, [name])
    app = create_app(settings, f"{settings.topic_prefix}{name}")
    topic = app.topic(settings.topic(name), key_type=bytes, value_type=bytes)

    async def agent(stream: Any) -> None:
        lanes = KeyedLanes(
            handler,
            ledger=app.ledger,
            max_in_flight=max_in_flight,
            grace=grace,
            on_escape=app.fail_fast,  # as the worker does
        )
        await lanes.consume(stream)

    app.agent(topic, name=name)(agent)
    await app.start()
    producer = new_producer(settings)
    await producer.start()
    try:
        yield app, producer
    finally:
        await producer.stop()
        await app.stop()


async def test_commit_waits_for_slow_event_then_advances(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(topic_partitions=1)
    topic_name = settings.topic("lanes")
    group = f"{settings.topic_prefix}lanes"
    release = asyncio.Event()
    handled: list[bytes] = []

    async def handler(event: Any) -> bool:
        if event.value == b"2":
            await release.wait()  # a slow model call on one conversation
        handled.append(event.value)
        return True

    async with _lanes_on_faust(settings, "lanes", handler, 16) as (app, producer):
        # The embedded-broker fix is in effect on the consumer Faust actually uses.
        # Faust's ConsumerT does not declare the aiokafka thread it runs (private, untyped).
        fetcher = cast(Any, app.consumer)._thread._ensure_consumer()._fetcher
        assert fetcher._fetch_max_wait_ms == settings.consumer_fetch_max_wait_ms

        for i in range(5):  # five conversations on one partition
            await producer.send_and_wait(topic_name, str(i).encode(), key=f"conv{i}".encode())

        async def others_done() -> bool:
            return sorted(handled) == [b"0", b"1", b"3", b"4"]

        await _wait_for(others_done)
        # Other conversations were not blocked by the slow one...
        await asyncio.sleep(1.5)  # several commit intervals
        # ...but the committed offset stops at the unfinished message.
        assert await _committed(settings.kafka_bootstrap, group, topic_name) == 2

        release.set()

        async def advanced() -> bool:
            return await _committed(settings.kafka_bootstrap, group, topic_name) == 5

        await _wait_for(advanced)
        assert sorted(handled) == [b"0", b"1", b"2", b"3", b"4"]


async def test_a_busy_conversation_does_not_hold_the_slots_of_others(
    make_settings: Callable[..., Settings],
) -> None:
    """Messages queued behind a slow one in their lane wait without a handler slot."""
    settings = make_settings(topic_partitions=1)
    topic_name = settings.topic("lanes-hol")
    release = asyncio.Event()
    handled: list[bytes] = []

    async def handler(event: Any) -> bool:
        if event.key == b"busy":
            await release.wait()
        handled.append(event.value)
        return True

    async with _lanes_on_faust(settings, "lanes-hol", handler, 2) as (_, producer):
        try:
            for i in range(5):  # more queued messages of one conversation than slots
                await producer.send_and_wait(topic_name, f"busy{i}".encode(), key=b"busy")
            await producer.send_and_wait(topic_name, b"other", key=b"other")

            async def other_done() -> bool:
                return b"other" in handled

            await _wait_for(other_done)
            assert handled == [b"other"]
            release.set()

            async def all_done() -> bool:
                return len(handled) == 6

            await _wait_for(all_done)
            assert handled[1:] == [f"busy{i}".encode() for i in range(5)]  # in order
        finally:
            release.set()  # never stop the app with the agent blocked (a failed assertion)


async def test_stopping_cuts_a_stuck_message_short_and_never_commits_past_it(
    make_settings: Callable[..., Settings],
) -> None:
    """A worker stopping (a rolling deploy) waits for work in flight only for the grace
    period: a message stuck in a model call is cancelled, not acknowledged, and the
    committed offset stays at it, so the next owner of the partition redoes it."""
    settings = make_settings(topic_partitions=1)
    topic_name = settings.topic("lanes-stop")
    group = f"{settings.topic_prefix}lanes-stop"
    handled: list[bytes] = []
    cancelled: list[bytes] = []

    async def handler(event: Any) -> bool:
        if event.value == b"2":
            try:
                await asyncio.Event().wait()  # never answers
            except asyncio.CancelledError:
                cancelled.append(event.value)
                raise
        handled.append(event.value)
        return True

    async with _lanes_on_faust(settings, "lanes-stop", handler, 16, grace=0.2) as (_, producer):
        for i in range(5):
            await producer.send_and_wait(topic_name, str(i).encode(), key=f"conv{i}".encode())

        async def others_done() -> bool:
            return sorted(handled) == [b"0", b"1", b"3", b"4"]

        await _wait_for(others_done)
    # Leaving the block stopped the app: before the grace period existed, stopping
    # waited for the stuck message without end (and this test hung).
    assert cancelled == [b"2"]
    assert await _committed(settings.kafka_bootstrap, group, topic_name) == 2


async def test_a_handler_that_raises_crashes_the_worker_and_its_record_is_redone(
    make_settings: Callable[..., Settings],
) -> None:
    """A handler that raises has escaped the stage's boundary (a write after publishing
    failed, say). The app crashes (the worker process exits and is restarted) instead
    of leaving the partition's commits stalled in silence, nothing is committed past
    the record, and the next worker on the group does it."""
    settings = make_settings(topic_partitions=1)
    topic_name = settings.topic("lanes-escape")
    group = f"{settings.topic_prefix}lanes-escape"
    handled: list[bytes] = []
    broken = True

    async def handler(event: Any) -> bool:
        if event.value == b"2" and broken:
            raise RuntimeError("the usage row could not be written")
        handled.append(event.value)
        return True

    async with _lanes_on_faust(settings, "lanes-escape", handler, 1) as (app, producer):
        for i in range(5):  # one conversation: in order, one at a time
            await producer.send_and_wait(topic_name, str(i).encode(), key=b"conv")

        async def crashed() -> bool:
            return app.crash_reason is not None

        await _wait_for(crashed)
        assert isinstance(app.crash_reason, RuntimeError)
    assert handled == [b"0", b"1"]
    assert await _committed(settings.kafka_bootstrap, group, topic_name) == 2

    broken = False  # the restarted worker's database is back
    async with _lanes_on_faust(settings, "lanes-escape", handler, 1):

        async def redone() -> bool:
            return await _committed(settings.kafka_bootstrap, group, topic_name) == 5

        await _wait_for(redone, timeout=30)
    assert handled == [b"0", b"1", b"2", b"3", b"4"]
