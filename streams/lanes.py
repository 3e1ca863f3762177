"""Concurrency across conversations, order within one, and acks only when done.

A stage that calls a model spends seconds per message. ``KeyedLanes`` runs many
conversations at once while keeping each conversation's messages in order:
messages with the same key form a lane and run one after another; lanes run
concurrently, up to ``max_in_flight`` handlers at a time. A message waiting for
the one before it in its lane holds no handler slot, so a busy conversation
cannot starve the others. Back-pressure: the consumer stops reading when
``max_buffered`` messages (running or waiting) are unfinished.

Acknowledgement is where this can lose messages, so it is done carefully. The
stream is read with ``noack()`` and each event is acknowledged through the
stream (``stream.ack(event)``) only after its handler finished — results
published or the record sent to the DLQ. And events are acknowledged **in
offset order per partition**: an event that finishes early waits until every
earlier event of its partition has finished too. Faust commits "the contiguous
prefix of acknowledged offsets", but its gap check is off by one (faust-streaming
0.15.3, ``faust/transport/consumer.py`` ``Consumer._new_offset``: it refuses to
commit only when ``min(acked) - committed > 1``, so with offset 2 unacknowledged
after a commit at 2, acknowledged 3 and 4 are committed as 5, skipping 2; and
with nothing committed yet, ``if committed_offset:`` skips the check entirely).
``tests/integration/test_lanes_commit.py`` shows the committed offset stopping
at an unfinished message and advancing once it is done. Acknowledging in order never gives
Faust a gap to get wrong, and the committed offset never passes a message that
is still being worked on: a crash redelivers it (at-least-once, never lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

Handler = Callable[[Any], Awaitable[bool]]  # returns False to leave the event unacknowledged


class _Pending:
    __slots__ = ("done", "event")

    def __init__(self, event: Any) -> None:
        self.event = event
        self.done = False


class KeyedLanes:
    def __init__(
        self, handler: Handler, *, max_in_flight: int, max_buffered: int | None = None
    ) -> None:
        self.handler = handler
        self._running = asyncio.Semaphore(max_in_flight)
        self._buffered = asyncio.Semaphore(max_buffered or 4 * max_in_flight)
        self._lanes: dict[Any, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._partitions: dict[Any, deque[_Pending]] = {}

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def consume(self, stream: Any) -> None:
        """Read ``stream`` (a Faust stream) until it ends or this task is cancelled."""
        quiet = stream.noack()
        try:
            async for event in quiet.events():
                await self._buffered.acquire()
                pending = _Pending(event)
                self._partitions.setdefault(event.message.tp, deque()).append(pending)
                key = event.key
                task = asyncio.create_task(self._run(self._lanes.get(key), quiet, pending))
                self._lanes[key] = task
                self._tasks.add(task)
                task.add_done_callback(functools.partial(self._finished, key))
        finally:
            # Stopping (shutdown or rebalance): in-flight work is acknowledged only
            # if it completes, so anything cut short is redelivered.
            await self.drain()

    async def _run(
        self, previous: asyncio.Task[None] | None, stream: Any, pending: _Pending
    ) -> None:
        if previous is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(previous)
        async with self._running:
            handled = await self.handler(pending.event)
        if handled:
            pending.done = True
            await self._ack_ready(stream, pending.event.message.tp)

    async def _ack_ready(self, stream: Any, tp: Any) -> None:
        queue = self._partitions.get(tp)
        while queue and queue[0].done:
            await stream.ack(queue.popleft().event)

    def _finished(self, key: Any, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._buffered.release()
        if self._lanes.get(key) is task:
            del self._lanes[key]

    async def drain(self, timeout: float = 30.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)
