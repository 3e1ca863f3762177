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

Stopping and rebalancing are bounded (``release``). When the group takes this
worker's partitions away (a replica joins or leaves) or the worker stops, the
work in flight on those partitions gets ``grace`` seconds to finish and be
acknowledged; whatever is still running then is cancelled and forgotten — never
acknowledged, so it is redelivered from the committed offset to whoever owns the
partition next (safe: every stage's effects are idempotent per msg_id); on a
rebalance it is left running rather than cancelled, and if the partition comes
back to this worker the redelivered copy is acknowledged on its result. Waiting
without a bound used to hold the whole group's rebalance, and so every
replica of the stage, for as long as the slowest buffered message took (21 s
measured with a 1 s model).
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import Any

# Handles one event for good (its outputs or its DLQ record published): the event is
# acknowledged once it returns. One that raises stays unacknowledged (and holds back
# the acknowledgements of its partition), so it is redelivered after a restart. What
# it returns is ignored.
Handler = Callable[[Any], Awaitable[object]]


class _Pending:
    __slots__ = ("done", "event", "started", "task")

    def __init__(self, event: Any) -> None:
        self.event = event
        self.started = False  # its handler is running (not waiting for its lane or a slot)
        self.done = False
        self.task: asyncio.Task[None] | None = None


class KeyedLanes:
    def __init__(
        self,
        handler: Handler,
        *,
        max_in_flight: int,
        max_buffered: int | None = None,
        grace: float = 30.0,
    ) -> None:
        self.handler = handler
        self.grace = grace  # how long stopping waits for work in flight (see ``release``)
        self._running = asyncio.Semaphore(max_in_flight)
        self._buffered = asyncio.Semaphore(max_buffered or 4 * max_in_flight)
        self._lanes: dict[Any, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._partitions: dict[Any, deque[_Pending]] = {}
        # Work left running when its partition was revoked, by (partition, offset):
        # if the partition comes back here, the redelivered copy waits for it and is
        # acknowledged on its result instead of being done twice.
        self._abandoned: dict[tuple[Any, int], _Pending] = {}

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
                earlier = self._abandoned.pop((event.message.tp, event.message.offset), None)
                task = asyncio.create_task(self._run(self._lanes.get(key), quiet, pending, earlier))
                pending.task = task
                self._lanes[key] = task
                self._tasks.add(task)
                task.add_done_callback(functools.partial(self._finished, key))
        finally:
            # Stopping: in-flight work is acknowledged only if it completes within
            # the grace period; anything cut short is redelivered.
            await self.release(None, self.grace)

    async def _run(
        self,
        previous: asyncio.Task[None] | None,
        stream: Any,
        pending: _Pending,
        earlier: _Pending | None = None,
    ) -> None:
        if previous is not None:
            # Waits for the one before in the lane whatever its outcome, while a
            # cancellation of this task (``release``) still ends it here.
            await asyncio.wait([previous])
        if earlier is not None and earlier.task is not None and not earlier.task.done():
            await asyncio.wait([earlier.task])
        # Unless this very record was handled before its partition came back:
        if earlier is None or not earlier.done:
            async with self._running:
                pending.started = True
                await self.handler(pending.event)
        pending.done = True
        # Released meanwhile: it is no longer queued, so it is never acknowledged.
        await self._ack_ready(stream, pending.event.message.tp)

    async def _ack_ready(self, stream: Any, tp: Any) -> None:
        queue = self._partitions.get(tp)
        while queue and queue[0].done:
            pending = queue.popleft()
            if not queue:
                self._partitions.pop(tp, None)
            await stream.ack(pending.event)

    async def release(
        self, partitions: Collection[Any] | None, grace: float, *, cancel: bool = True
    ) -> int:
        """Give up ``partitions`` (all when None): messages not started yet are
        dropped at once, running ones get up to ``grace`` seconds to finish. What
        is still running then is cancelled (``cancel``, when the worker stops) or
        left to finish on its own (a rebalance: cancelling a model call would count
        against the model's circuit breaker, which outlives the rebalance; and when
        the partition comes back here, as most do, its redelivered copy just waits
        for that result instead of calling the model again). Returns how many
        messages were cut short; none of them is acknowledged through the released
        partition, so all are redelivered to whoever owns it next.
        """
        tps = list(self._partitions) if partitions is None else list(partitions)
        queues = [q for tp in tps if (q := self._partitions.get(tp))]
        waiting = [p.task for q in queues for p in q if p.task is not None and not p.started]
        for task in waiting:  # no new work begins on a partition being given up
            task.cancel()
        running = {p.task for q in queues for p in q if p.started and p.task is not None}
        running = {t for t in running if not t.done()}
        cut_short = len(waiting)
        cancelled = set(waiting)
        try:
            if running and grace > 0:
                await asyncio.wait(running, timeout=grace)
        finally:  # also when the wait itself is cancelled (Faust stopping the agent)
            # Forget the partitions: nothing of theirs still pending is acknowledged
            # later, not even a message that finishes after this.
            for tp in tps:
                # What was left here at an earlier revocation did not come back with
                # the partition then; it never will.
                for stale in [k for k in self._abandoned if k[0] == tp]:
                    del self._abandoned[stale]
                for pending in self._partitions.pop(tp, ()):
                    unfinished = pending.task is not None and not pending.task.done()
                    if pending.started and unfinished:
                        cut_short += 1
                        if cancel:
                            assert pending.task is not None
                            pending.task.cancel()
                            cancelled.add(pending.task)
                    if not cancel and (pending.done or (pending.started and unfinished)):
                        message = pending.event.message
                        self._abandoned[(message.tp, message.offset)] = pending
        if cancelled:  # let them unwind (close what they opened) before the caller goes on
            await asyncio.wait(cancelled, timeout=1.0)
        return cut_short

    def _finished(self, key: Any, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._buffered.release()
        if self._lanes.get(key) is task:
            del self._lanes[key]

    async def drain(self, timeout: float = 30.0) -> int:
        """Stop everything: ``release`` of every partition."""
        return await self.release(None, timeout)
