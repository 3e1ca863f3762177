"""The part of a Faust stream that ``KeyedLanes`` uses (noack, events), in memory.

A test double of Faust's interface, not of our code: unit tests of the lanes' ordering,
concurrency and acknowledgement rules run in milliseconds without a broker, beside
the broker tests in tests/integration/test_lanes_commit.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class FakeMessage:
    def __init__(self, tp: str, offset: int, generation_id: int = 0) -> None:
        self.tp, self.offset, self.generation_id = tp, offset, generation_id


class FakeEvent:
    def __init__(self, key: bytes, tp: str, offset: int, generation_id: int = 0) -> None:
        self.key, self.value = key, key
        self.message = FakeMessage(tp, offset, generation_id)


class FakeStream:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[FakeEvent] = asyncio.Queue()

    def noack(self) -> FakeStream:
        return self

    async def events(self) -> AsyncIterator[FakeEvent]:
        while True:
            yield await self.queue.get()
