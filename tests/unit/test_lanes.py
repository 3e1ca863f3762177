"""KeyedLanes without a broker: order within a conversation, concurrency across them,
acknowledgements in offset order per partition, and the handler-slot bound."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from imbot.streams.lanes import KeyedLanes
from tests.fakes.faust_stream import FakeEvent, FakeStream

Handler = Callable[[Any], Awaitable[bool]]


@contextlib.asynccontextmanager
async def running(handler: Handler, **kwargs: Any) -> AsyncIterator[tuple[KeyedLanes, FakeStream]]:
    stream = FakeStream()
    lanes = KeyedLanes(handler, grace=0, **kwargs)
    consumer = asyncio.create_task(lanes.consume(stream))
    try:
        yield lanes, stream
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer


async def until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not predicate():  # noqa: ASYNC110 - polling a condition of the code under test
            await asyncio.sleep(0.001)


class Gates:
    """A handler whose calls block until their message's gate is opened."""

    def __init__(self) -> None:
        self.gates: dict[tuple[str, int], asyncio.Event] = {}
        self.started: list[tuple[str, int]] = []
        self.finished: list[tuple[str, int]] = []
        self.running = 0
        self.most_running = 0

    def gate(self, tp: str, offset: int) -> asyncio.Event:
        return self.gates.setdefault((tp, offset), asyncio.Event())

    async def __call__(self, event: Any) -> bool:
        where = (event.message.tp, event.message.offset)
        self.started.append(where)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await self.gate(*where).wait()
        finally:
            self.running -= 1
        self.finished.append(where)
        return True


async def test_one_conversation_is_handled_in_order_even_when_the_first_is_slow() -> None:
    handler = Gates()
    async with running(handler, max_in_flight=8) as (_, stream):
        for offset in range(3):
            await stream.queue.put(FakeEvent(b"chat:a", "p0", offset))
        await until(lambda: handler.started == [("p0", 0)])
        await asyncio.sleep(0.01)
        assert handler.started == [("p0", 0)]  # the next waits for the one before it
        for offset in (2, 1, 0):  # opened in reverse: order still holds
            handler.gate("p0", offset).set()
        await until(lambda: len(stream.acked) == 3)
    assert handler.finished == [("p0", 0), ("p0", 1), ("p0", 2)]
    assert stream.acked == [("p0", 0), ("p0", 1), ("p0", 2)]


async def test_a_slow_conversation_does_not_block_others_on_its_partition() -> None:
    handler = Gates()
    async with running(handler, max_in_flight=8) as (_, stream):
        await stream.queue.put(FakeEvent(b"chat:slow", "p0", 0))
        await stream.queue.put(FakeEvent(b"chat:quick", "p0", 1))
        await stream.queue.put(FakeEvent(b"chat:other", "p1", 0))
        handler.gate("p0", 1).set()
        handler.gate("p1", 0).set()
        await until(lambda: len(handler.finished) == 2)
        # Both were handled while the slow one runs (no head-of-line blocking) ...
        assert sorted(handler.finished) == [("p0", 1), ("p1", 0)]
        await until(lambda: stream.acked == [("p1", 0)])
        await asyncio.sleep(0.01)
        # ... but p0's acknowledgement waits for offset 0: the committed offset
        # never passes a message still being worked on.
        assert stream.acked == [("p1", 0)]
        handler.gate("p0", 0).set()
        await until(lambda: len(stream.acked) == 3)
    assert stream.acked == [("p1", 0), ("p0", 0), ("p0", 1)]


@pytest.mark.parametrize("max_in_flight", [1, 3])
async def test_handlers_running_at_once_never_exceed_max_in_flight(max_in_flight: int) -> None:
    handler = Gates()
    async with running(handler, max_in_flight=max_in_flight) as (_, stream):
        for i in range(6):
            await stream.queue.put(FakeEvent(f"chat:{i}".encode(), f"p{i % 2}", i // 2))
        await until(lambda: handler.running == max_in_flight)
        await asyncio.sleep(0.01)
        assert handler.running == max_in_flight
        for gate in [handler.gate(f"p{i % 2}", i // 2) for i in range(6)]:
            gate.set()
        await until(lambda: len(stream.acked) == 6)
    assert handler.most_running == max_in_flight


async def test_waiting_behind_its_lane_holds_no_handler_slot() -> None:
    """With one slot, a message queued behind a slow one of its own conversation
    must not take the slot another conversation needs."""
    handler = Gates()
    async with running(handler, max_in_flight=1) as (_, stream):
        await stream.queue.put(FakeEvent(b"chat:busy", "p0", 0))
        await until(lambda: handler.running == 1)
        await stream.queue.put(FakeEvent(b"chat:busy", "p0", 1))  # waits for offset 0
        await stream.queue.put(FakeEvent(b"chat:free", "p1", 0))
        handler.gate("p1", 0).set()
        handler.gate("p0", 0).set()
        await until(lambda: ("p1", 0) in handler.finished)
        handler.gate("p0", 1).set()
        await until(lambda: len(stream.acked) == 3)
    assert handler.started.index(("p1", 0)) < handler.started.index(("p0", 1))
