"""Concurrency across conversations, order within one, and acks only when done.

A stage that calls a model spends seconds per message. ``KeyedLanes`` runs many
conversations at once while keeping each conversation's messages in order:
messages with the same key form a lane and run one after another; lanes run
concurrently, up to ``max_in_flight`` messages in all (back-pressure: the
consumer stops reading when the limit is reached).

Faust commits only the contiguous prefix of acknowledged offsets of a
partition, and a stream created with ``noack()`` acknowledges nothing by
itself. Each event is acknowledged through the stream (``stream.ack(event)``)
only after its handler finished — results published or the record sent to the
DLQ — so a crash before that leaves the offset uncommitted and the record is
redelivered: at-least-once, never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import Any, Protocol


class EventLike(Protocol):
    key: Any
    value: Any
    message: Any


class AckingStream(Protocol):
    def events(self) -> Any: ...

    async def ack(self, event: Any) -> bool: ...


Handler = Callable[[Any], Awaitable[bool]]  # returns False to leave the event unacknowledged


class KeyedLanes:
    def __init__(self, handler: Handler, *, max_in_flight: int) -> None:
        self.handler = handler
        self._slots = asyncio.Semaphore(max_in_flight)
        self._lanes: dict[Any, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def consume(self, stream: Any) -> None:
        """Read ``stream`` (a Faust stream) until it ends or this task is cancelled."""
        quiet = stream.noack()
        try:
            async for event in quiet.events():
                await self._slots.acquire()
                key = event.key
                task = asyncio.create_task(self._run(self._lanes.get(key), quiet, event))
                self._lanes[key] = task
                self._tasks.add(task)
                task.add_done_callback(functools.partial(self._finished, key))
        finally:
            # Stopping (shutdown or rebalance): in-flight work is not acknowledged
            # unless it completes, so anything cut short is redelivered.
            await self.drain()

    async def _run(self, previous: asyncio.Task[None] | None, stream: Any, event: Any) -> None:
        if previous is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(previous)
        if await self.handler(event):
            await stream.ack(event)

    def _finished(self, key: Any, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if self._lanes.get(key) is task:
            del self._lanes[key]

    async def drain(self, timeout: float = 30.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
