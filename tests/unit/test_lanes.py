"""KeyedLanes without a broker: order within a conversation, concurrency across them,
commit positions that never pass unfinished work, the handler-slot bound, and failing
fast when a handler escapes the boundary."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from imbot.streams.lanes import KeyedLanes
from imbot.streams.offsets import CommitLedger
from tests.fakes.faust_stream import FakeEvent, FakeStream

Handler = Callable[[Any], Awaitable[bool]]


@contextlib.asynccontextmanager
async def running(handler: Handler, **kwargs: Any) -> AsyncIterator[tuple[KeyedLanes, FakeStream]]:
    stream = FakeStream()
    ledger: CommitLedger[str] = CommitLedger()
    ledger.assign({"p0", "p1"}, generation=0)
    lanes = KeyedLanes(handler, ledger=ledger, grace=0, **kwargs)
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
    async with running(handler, max_in_flight=8) as (lanes, stream):
        for offset in range(3):
            await stream.queue.put(FakeEvent(b"chat:a", "p0", offset))
        await until(lambda: handler.started == [("p0", 0)])
        await asyncio.sleep(0.01)
        assert handler.started == [("p0", 0)]  # the next waits for the one before it
        for offset in (2, 1, 0):  # opened in reverse: order still holds
            handler.gate("p0", offset).set()
        await until(lambda: lanes.ledger.positions() == {"p0": 3})
    assert handler.finished == [("p0", 0), ("p0", 1), ("p0", 2)]


async def test_a_slow_conversation_does_not_block_others_on_its_partition() -> None:
    handler = Gates()
    async with running(handler, max_in_flight=8) as (lanes, stream):
        await stream.queue.put(FakeEvent(b"chat:slow", "p0", 0))
        await stream.queue.put(FakeEvent(b"chat:quick", "p0", 1))
        await stream.queue.put(FakeEvent(b"chat:other", "p1", 0))
        handler.gate("p0", 1).set()
        handler.gate("p1", 0).set()
        await until(lambda: len(handler.finished) == 2)
        # Both were handled while the slow one runs (no head-of-line blocking) ...
        assert sorted(handler.finished) == [("p0", 1), ("p1", 0)]
        # ... but p0's position stays at offset 0: the committed offset never passes
        # a message still being worked on.
        assert lanes.ledger.positions() == {"p0": 0, "p1": 1}
        handler.gate("p0", 0).set()
        await until(lambda: lanes.ledger.positions() == {"p0": 2, "p1": 1})


@pytest.mark.parametrize("max_in_flight", [1, 3])
async def test_handlers_running_at_once_never_exceed_max_in_flight(max_in_flight: int) -> None:
    handler = Gates()
    async with running(handler, max_in_flight=max_in_flight) as (lanes, stream):
        for i in range(6):
            await stream.queue.put(FakeEvent(f"chat:{i}".encode(), f"p{i % 2}", i // 2))
        await until(lambda: handler.running == max_in_flight)
        await asyncio.sleep(0.01)
        assert handler.running == max_in_flight
        for gate in [handler.gate(f"p{i % 2}", i // 2) for i in range(6)]:
            gate.set()
        await until(lambda: lanes.ledger.positions() == {"p0": 3, "p1": 3})
    assert handler.most_running == max_in_flight


async def test_waiting_behind_its_lane_holds_no_handler_slot() -> None:
    """With one slot, a message queued behind a slow one of its own conversation
    must not take the slot another conversation needs."""
    handler = Gates()
    async with running(handler, max_in_flight=1) as (lanes, stream):
        await stream.queue.put(FakeEvent(b"chat:busy", "p0", 0))
        await until(lambda: handler.running == 1)
        await stream.queue.put(FakeEvent(b"chat:busy", "p0", 1))  # waits for offset 0
        await stream.queue.put(FakeEvent(b"chat:free", "p1", 0))
        handler.gate("p1", 0).set()
        handler.gate("p0", 0).set()
        await until(lambda: ("p1", 0) in handler.finished)
        handler.gate("p0", 1).set()
        await until(lambda: lanes.ledger.positions() == {"p0": 2, "p1": 1})
    assert handler.started.index(("p1", 0)) < handler.started.index(("p0", 1))


async def test_a_record_of_an_ended_assignment_is_not_handled() -> None:
    """A record fetched before a rebalance but taken from the stream after it belongs
    to no current assignment: handling it would be work nobody commits."""
    handler = Gates()
    async with running(handler, max_in_flight=4) as (lanes, stream):
        lanes.ledger.assign({"p0", "p1"}, generation=1)
        await stream.queue.put(FakeEvent(b"chat:a", "p0", 5, generation_id=0))  # stale
        await stream.queue.put(FakeEvent(b"chat:a", "p0", 3, generation_id=1))
        handler.gate("p0", 3).set()
        await until(lambda: lanes.ledger.positions() == {"p0": 4})
    assert handler.started == [("p0", 3)]


async def test_a_record_received_twice_in_one_assignment_is_handled_once() -> None:
    """Faust seeks back to the committed offset when it fetches while paused: the
    repeated records are neither handled again nor counted twice."""
    handler = Gates()
    async with running(handler, max_in_flight=4) as (lanes, stream):
        for offset in (0, 1, 0, 1, 2):
            await stream.queue.put(FakeEvent(f"chat:{offset}".encode(), "p0", offset))
        for offset in (0, 1, 2):
            handler.gate("p0", offset).set()
        await until(lambda: lanes.ledger.positions() == {"p0": 3})
    assert sorted(handler.started) == [("p0", 0), ("p0", 1), ("p0", 2)]


async def test_a_handler_that_raises_stops_the_lanes_and_holds_its_partition() -> None:
    """Outside the boundary nothing can be said of the record: the lanes take no
    further record, say so (the worker exits and is restarted), and never commit past
    it, so the restarted worker redoes it."""
    escapes: list[BaseException] = []
    handled: list[int] = []

    async def handler(event: Any) -> bool:
        if event.message.offset == 1:
            raise RuntimeError("a write after publishing failed")
        handled.append(event.message.offset)
        return True

    stream = FakeStream()
    ledger: CommitLedger[str] = CommitLedger()
    ledger.assign({"p0"}, generation=0)
    lanes = KeyedLanes(handler, ledger=ledger, max_in_flight=1, grace=0, on_escape=escapes.append)
    for offset in range(3):
        await stream.queue.put(FakeEvent(b"chat:a", "p0", offset))
    async with asyncio.timeout(5):
        await lanes.consume(stream)  # returns: it takes no further record
    assert [type(e) for e in escapes] == [RuntimeError]
    assert isinstance(lanes.escaped, RuntimeError)
    assert handled == [0]  # offset 2, same conversation, never ran after the escape
    assert ledger.positions() == {"p0": 1}


async def test_stopping_also_stops_work_left_running_at_an_earlier_revocation() -> None:
    """Work a rebalance left running must not outlive the worker's stop: the worker closes
    its Easemob client and database next, and a handler still using them would fail and
    send its record to the DLQ (found by the chaos test)."""
    handler = Gates()
    stream = FakeStream()
    ledger: CommitLedger[str] = CommitLedger()
    ledger.assign({"p0"}, generation=0)
    lanes = KeyedLanes(handler, ledger=ledger, max_in_flight=4, grace=0)
    consumer = asyncio.create_task(lanes.consume(stream))
    await stream.queue.put(FakeEvent(b"chat:a", "p0", 0))
    await until(lambda: handler.running == 1)
    ledger.close({"p0"})
    assert await lanes.release({"p0"}, grace=0, cancel=False) == 1  # left running
    ledger.revoke({"p0"})
    assert handler.running == 1
    consumer.cancel()  # the worker stops
    with contextlib.suppress(asyncio.CancelledError):
        await consumer
    assert handler.running == 0  # cancelled, not left to finish after the stop
    assert handler.finished == []
