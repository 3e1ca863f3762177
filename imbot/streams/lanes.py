"""Concurrency across conversations, order within one, and commits only past what finished.

A stage that calls a model spends seconds per message. ``KeyedLanes`` runs many
conversations at once while keeping each conversation's messages in order:
messages with the same key form a lane and run one after another; lanes run
concurrently, up to ``max_in_flight`` handlers at a time. A message waiting for
the one before it in its lane holds no handler slot, so a busy conversation
cannot starve the others. Back-pressure: the consumer stops reading when
``max_buffered`` messages (running or waiting) are unfinished.

What may be committed is the ``CommitLedger``'s (``streams.offsets``), not Faust's:
each record is entered there when it is taken from the stream, under the assignment
it was fetched in, and marked finished when its handler returns — its outputs or its
DLQ record published. The committed offset of a partition never passes a record that
was not finished by the assignment committing it, so a crash, a stop or a rebalance
redelivers it (at-least-once, never lost). A record of an assignment that has ended
is not handled at all.

A handler that raises has escaped the stage's error boundary (``streams.boundary``):
nothing more can be said about its record, and the partition's position stays behind
it for good. The lanes then fail fast, as arroyo's processor does: ``on_escape`` is
told (the worker crashes its Faust app, so the process exits and is restarted by its
supervisor), and no lane of the worker takes a further record (the ledger is closed). Its record is redelivered after the
restart, never skipped and never left to stall its partition in silence.

Stopping and rebalancing are bounded (``release``). When the group takes this
worker's partitions away (a replica joins or leaves) or the worker stops, the
work in flight on those partitions gets ``grace`` seconds to finish; whatever is
still running then is cancelled (a stop) or left to finish on its own (a
rebalance: cancelling a model call would count against the model's circuit breaker,
which outlives the rebalance; and when the partition comes back here, as most do,
its redelivered copy waits for that result instead of calling the model again).
Either way it is redelivered from the committed offset to whoever owns the
partition next. Waiting without a bound used to hold the whole group's rebalance,
and so every replica of the stage, for as long as the slowest buffered message
took (21 s measured with a 1 s model).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from imbot.streams.offsets import Assignment, CommitLedger

log = logging.getLogger("imbot.lanes")

# Handles one event for good (its outputs or its DLQ record published): the event is
# finished once it returns. What it returns is ignored; one that raises has escaped the
# stage's error boundary (see ``on_escape``).
Handler = Callable[[Any], Awaitable[object]]
# Told when a handler raised: the worker stops (and is restarted) instead of stalling.
EscapeHandler = Callable[[BaseException], object]


class _Pending:
    __slots__ = ("assignment", "event", "started", "task")

    def __init__(self, event: Any, assignment: Assignment) -> None:
        self.event = event
        self.assignment = assignment
        self.started = False  # its handler is running (not waiting for its lane or a slot)
        self.task: asyncio.Task[None] | None = None


class KeyedLanes:
    def __init__(
        self,
        handler: Handler,
        *,
        ledger: CommitLedger[Any],
        max_in_flight: int,
        max_buffered: int | None = None,
        grace: float = 30.0,
        on_escape: EscapeHandler | None = None,
    ) -> None:
        self.handler = handler
        self.ledger = ledger
        self.grace = grace  # how long stopping waits for work in flight (see ``release``)
        self.on_escape = on_escape
        self.escaped: BaseException | None = None
        self._running = asyncio.Semaphore(max_in_flight)
        self._buffered = asyncio.Semaphore(max_buffered or 4 * max_in_flight)
        self._lanes: dict[Any, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._partitions: dict[Any, dict[int, _Pending]] = {}
        # Work left running when its partition was revoked, by (partition, offset):
        # if the partition comes back here, the redelivered copy waits for it and is
        # finished by its result instead of being done twice.
        self._abandoned: dict[tuple[Any, int], asyncio.Task[None]] = {}
        self._consumer: asyncio.Task[Any] | None = None
        self._escape_task: asyncio.Future[Any] | None = None

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def consume(self, stream: Any) -> None:
        """Read ``stream`` (a Faust stream) until it ends, a handler escapes (then
        ``escaped`` holds its error), or this task is cancelled."""
        consumer = self._consumer = asyncio.current_task()
        quiet = stream.noack()  # the ledger decides what is committed, not Faust's acks
        try:
            async for event in quiet.events():
                await self._buffered.acquire()
                message = event.message
                tp, offset = message.tp, message.offset
                # Entered only now, after waiting for room: a rebalance meanwhile makes
                # it a record of an ended assignment, which is not handled.
                assignment = self.ledger.receive(tp, offset, getattr(message, "generation_id", 0))
                if assignment is None:
                    self._buffered.release()
                    continue
                pending = _Pending(event, assignment)
                self._partitions.setdefault(tp, {})[offset] = pending
                key = event.key
                earlier = self._abandoned.pop((tp, offset), None)
                task = asyncio.create_task(self._run(self._lanes.get(key), pending, earlier))
                pending.task = task
                self._lanes[key] = task
                self._tasks.add(task)
                task.add_done_callback(functools.partial(self._finished, key))
        except asyncio.CancelledError:
            if self.escaped is None:
                raise
            if consumer is not None:
                consumer.uncancel()  # cancelled by ``_escape``: say why instead
        finally:
            # Stopping: in-flight work counts only if it completes within the grace
            # period; anything cut short is redelivered.
            await self.release(None, self.grace)

    async def _run(
        self,
        previous: asyncio.Task[None] | None,
        pending: _Pending,
        earlier: asyncio.Task[None] | None = None,
    ) -> None:
        if previous is not None:
            # Waits for the one before in the lane whatever its outcome, while a
            # cancellation of this task (``release``) still ends it here.
            await asyncio.wait([previous])
        message = pending.event.message
        tp, offset = message.tp, message.offset
        if earlier is not None and not earlier.done():
            await asyncio.wait([earlier])
        # Unless this very record was finished here before its partition came back:
        if not self.ledger.finished_before(tp, offset):
            async with self._running:
                pending.started = True
                try:
                    await self.handler(pending.event)
                except Exception as exc:
                    self._escape(exc, pending)
                    return
        pending.assignment.finish(offset)
        queue = self._partitions.get(tp)
        if queue is not None and queue.get(offset) is pending:
            del queue[offset]

    def _escape(self, exc: BaseException, pending: _Pending) -> None:
        message = pending.event.message
        log.critical(
            "handler escaped the stage's boundary: stopping the worker",
            exc_info=exc,
            extra={"partition": str(message.tp), "offset": message.offset},
        )
        if self.escaped is not None:
            return  # the worker is already going down
        self.escaped = exc
        # No lane of this worker takes another record: the worker is going down, and a
        # later record of this conversation must not overtake this one.
        self.ledger.close()
        if self._consumer is not None:
            self._consumer.cancel()  # take no further record
        if self.on_escape is not None:
            result = self.on_escape(exc)
            if inspect.isawaitable(result):
                # Not awaited here: stopping the worker waits for this very task.
                self._escape_task = asyncio.ensure_future(result)

    async def release(
        self, partitions: Collection[Any] | None, grace: float, *, cancel: bool = True
    ) -> int:
        """Give up ``partitions`` (all when None): messages not started yet are
        dropped at once, running ones get up to ``grace`` seconds to finish. What
        is still running then is cancelled (``cancel``, when the worker stops) or
        left to finish on its own (a rebalance: see the module's note). Returns how
        many messages were cut short; none of them counts as finished for the
        partition's current assignment, so all are redelivered to whoever owns it
        next.
        """
        tps = list(self._partitions) if partitions is None else list(partitions)
        pendings = [p for tp in tps for p in self._partitions.get(tp, {}).values()]
        tasks = [(p.task, p.started) for p in pendings if p.task is not None]
        waiting = [task for task, started in tasks if not started]
        for task in waiting:  # no new work begins on a partition being given up
            task.cancel()
        running = {task for task, started in tasks if started and not task.done()}
        if partitions is None:
            # Stopping: work left running at an earlier revocation stops too, within the
            # same grace; it must not outlive the resources (a closed Easemob client, a
            # closed database) the worker closes next.
            running |= {t for t in self._abandoned.values() if not t.done()}
        cut_short = len(waiting)
        cancelled = set(waiting)
        try:
            if running and grace > 0:
                await asyncio.wait(running, timeout=grace)
        finally:  # also when the wait itself is cancelled (Faust stopping the agent)
            for tp in tps:
                # Left here at an earlier revocation, it did not come back then; it
                # never will.
                for stale in [k for k in self._abandoned if k[0] == tp]:
                    del self._abandoned[stale]
                for offset, pending in self._partitions.pop(tp, {}).items():
                    left = pending.task
                    if left is None or left.done() or not pending.started:
                        continue
                    cut_short += 1
                    if cancel:
                        left.cancel()
                        cancelled.add(left)
                    else:
                        self._abandoned[(tp, offset)] = left
            if partitions is None and cancel:
                for left in running:
                    if not left.done() and left not in cancelled:
                        left.cancel()
                        cancelled.add(left)
                self._abandoned.clear()
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
