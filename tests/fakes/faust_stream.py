"""The part of a Faust stream that ``KeyedLanes`` uses (noack, events, ack), in memory.

A test double of Faust's interface, not of our code: unit tests of the lanes' ordering,
concurrency and acknowledgement rules run in milliseconds without a broker, beside
the broker tests in tests/integration/test_lanes_commit.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class FakeMessage:
    def __init__(self, tp: str, offset: int) -> None:
        self.tp, self.offset = tp, offset


class FakeEvent:
    def __init__(self, key: bytes, tp: str, offset: int) -> None:
        self.key, self.value, self.message = key, key, FakeMessage(tp, offset)


class FakeStream:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[FakeEvent] = asyncio.Queue()
        self.acked: list[tuple[str, int]] = []
        self.first_ack = asyncio.Event()

    def noack(self) -> FakeStream:
        return self

    async def events(self) -> AsyncIterator[FakeEvent]:
        while True:
            yield await self.queue.get()

    async def ack(self, event: FakeEvent) -> bool:
        self.acked.append((event.message.tp, event.message.offset))
        self.first_ack.set()
        return True
