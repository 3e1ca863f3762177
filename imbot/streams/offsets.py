"""What a stage worker may commit: its own record of what it finished, per assignment.

Faust commits "the contiguous prefix of acknowledged offsets", and we used to feed it
acknowledgements. Its bookkeeping cannot be trusted across rebalances
(faust-streaming 0.15.3, ``faust/transport/consumer.py``):

* ``Consumer._new_offset``'s gap check is off by one (``min(acked) - committed > 1``:
  with 2 unacknowledged after a commit at 2, acknowledged 3 and 4 commit as 5), and is
  skipped entirely while the committed offset is unknown or 0 (``if committed_offset:``);
* its acknowledgement lists are dropped when a partition is revoked and begin again,
  empty and with no committed offset, before the new assignment has sought to its
  committed position; an acknowledgement that arrives in that window, from work of the
  previous assignment finishing late, enters the new assignment's list and can be
  committed past every record of that partition not yet redone;
* a commit asked for while another is in flight returns at once without committing.

So the stages keep their own ledger, and Faust's consumer commits what it says
(``faust_app.StageConsumer``). The ledger knows each partition's current *assignment*
(the consumer group generation that gave it to this worker): a record is counted only
by the assignment it was fetched in, and a partition's position is the lowest offset
this assignment received and has not finished, or one past the highest it received
when all are finished. So:

* nothing is committed past a record that is being worked on, waiting for its
  conversation's turn, or was cut short;
* work of an earlier assignment finishing late counts for nothing in a later one
  (its record is redone, or recognised as done: ``finished_before``);
* a record fetched in an earlier assignment and delivered late is refused (``receive``
  returns None), so it is not handled by an owner that will not commit it;
* a record received twice within one assignment (Faust seeks back to the committed
  offset when it fetches while paused) is handled once.

Within one assignment a partition's records arrive in offset order from the position
the consumer sought to (Kafka's order; aiokafka drops a fetch made for an earlier
assignment, ``FetchResult.check_assignment``), so every offset below a position was
received or does not exist. ``tests/unit/test_commit_ledger.py`` drives the lanes and
this ledger through random schedules of deliveries, completions, revocations,
re-assignments and stops, and checks every commit against what finished.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Mapping
from typing import Generic, TypeVar

TP = TypeVar("TP", bound=Hashable)  # a Faust TP in the worker; anything hashable in tests


class Assignment:
    """One partition, from the moment it is assigned to this worker until it is revoked."""

    __slots__ = ("base", "closed", "generation", "open", "top")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.closed = False  # being revoked: receives nothing more
        self.open: set[int] = set()  # received, not finished
        self.base: int | None = None  # the lowest offset received
        self.top: int | None = None  # the highest offset received

    def received(self, offset: int) -> bool:
        return self.base is not None and self.base <= offset <= (self.top or 0)

    def finished(self, offset: int) -> bool:
        return self.received(offset) and offset not in self.open

    def position(self) -> int | None:
        """The offset to commit: nothing below it is unfinished."""
        if self.open:
            return min(self.open)
        return None if self.top is None else self.top + 1

    def finish(self, offset: int) -> None:
        self.open.discard(offset)


class CommitLedger(Generic[TP]):
    """The assignments of one worker's partitions, and what each finished."""

    def __init__(self) -> None:
        self._current: dict[TP, Assignment] = {}
        self._former: dict[TP, Assignment] = {}  # the last revoked assignment of each

    def assign(self, tps: Iterable[TP], generation: int) -> None:
        """``tps`` are this worker's from ``generation`` on (the group's whole new
        assignment: a partition not in it is no longer ours)."""
        assigned = set(tps)
        for tp in list(self._current):
            if tp not in assigned:
                self.revoke([tp])
        for tp in assigned:
            current = self._current.get(tp)
            if current is None or current.generation != generation or current.closed:
                if current is not None:
                    self._former[tp] = current
                self._current[tp] = Assignment(generation)
        # What was done here for a partition that went elsewhere will not be asked again.
        for tp in [tp for tp in self._former if tp not in assigned]:
            del self._former[tp]

    def close(self, tps: Iterable[TP] | None = None) -> None:
        """Receive nothing more of ``tps`` (all when None): they are being revoked, or
        the worker stops. Their positions still count until ``revoke``."""
        for tp in self._current if tps is None else tps:
            if (assignment := self._current.get(tp)) is not None:
                assignment.closed = True

    def revoke(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            if (assignment := self._current.pop(tp, None)) is not None:
                self._former[tp] = assignment

    def receive(self, tp: TP, offset: int, generation: int) -> Assignment | None:
        """The assignment that is to handle this record, or None: the record belongs to
        no current assignment of this worker (a late delivery of an earlier one, or a
        partition being revoked), or this assignment received it already."""
        assignment = self._current.get(tp)
        if assignment is None or assignment.closed or assignment.generation != generation:
            return None
        if assignment.received(offset):
            return None
        if assignment.base is None or offset < assignment.base:
            assignment.base = offset
        if assignment.top is None or offset > assignment.top:
            assignment.top = offset
        assignment.open.add(offset)
        return assignment

    def finished_before(self, tp: TP, offset: int) -> bool:
        """Whether this worker finished ``offset`` in the partition's previous assignment
        (its outputs are published): a redelivered copy need not be handled again."""
        former = self._former.get(tp)
        return former is not None and former.finished(offset)

    def positions(self, tps: Collection[TP] | None = None) -> Mapping[TP, int]:
        """Each current partition's position (of ``tps`` only, when given)."""
        found: dict[TP, int] = {}
        for tp, assignment in self._current.items():
            if tps is not None and tp not in tps:
                continue
            position = assignment.position()
            if position is not None:
                found[tp] = position
        return found

    def assigned(self) -> list[TP]:
        return list(self._current)
