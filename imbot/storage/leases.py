"""Budget leases: a shared budget taken in slices, so no message waits on its row.

Every paid call counts against the tenant's budgets, so reserving each call in the
tenant's row (and settling it there) made that one row the whole app's queue. Instead
a model worker takes a *lease*: one transaction reserves a slice of every shared
scope of the call (``reserved += slice``, under the same conditional UPDATE as a
reservation, so the slices of all workers together never exceed what is left), and
writes a ``quota_leases`` row. The worker then holds its calls against the slice in
memory. Each call still writes its own reservation row (``lease_id`` set, the shared
keys left out of ``keys``) in the transaction that reserves its user's and group's
scopes, and settles it there: the shared row is not touched per call.

A lease takes new calls for ``window_s`` (10 s). It is *closed* once that has passed
and no call holds it, and in any case before ``expires_at``; closing is one
transaction on the shared rows:

* what the calls settled under it spent becomes ``spent`` (summed from their rows,
  so a worker's memory is never trusted with money);
* the slice leaves ``reserved``;
* a call still held under it becomes an ordinary reservation of the shared keys
  (``keys`` extended, ``reserved`` kept for it), which settles or expires as any other.

A worker that dies leaves its leases open; any model worker's sweep closes a lease
past ``expires_at`` (the window, the longest call and a margin) the same way. So a
dead worker's calls that settled are spent, its calls in flight expire like any
reservation, and the unused rest of its slice comes back.

Sizing. A slice is what this worker's calls asked for in the last window, times
1.5, and never less than the call at hand; and never more than a quarter of what is
left of the budget (``SHARE``), so near the limit the slices shrink to exactly one
call — the per-call reservation of before. Overspend beyond a limit is therefore
what it was: a call may settle for more than its worst case was reserved at (a
provider's usage above the estimate); slices add none, whatever the replicas and
slice size, because every slice is reserved in the shared row before any call is
held against it. What slices cost is the other way: money held in one worker's
unused slice cannot be used by another until it is closed — at most
``replicas × (what one window of demand asks) × 1.5``, and near the limit at most
``replicas × one call`` (docs/routing.md).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import bindparam, text

from imbot.core.routing import QuotaScope
from imbot.storage.counters import RESERVE
from imbot.storage.database import Database, sql
from imbot.storage.schema import utcnow

SHARE = 0.25  # a slice takes at most this share of what is left of a budget
GROWTH = 1.5  # a slice is the last window's demand times this
MARGIN_S = 60.0  # a lease's expiry is past its window and the longest call by this much

_READ = text(
    "SELECT key, spent_tokens + reserved_tokens, spent_micros + reserved_micros"
    " FROM quota_counters WHERE key IN :keys"
).bindparams(bindparam("keys", expanding=True))
_OPEN = sql(
    "INSERT INTO quota_leases (id, keys, tokens, micros, state, created_at, expires_at)"
    " VALUES (:id, :keys, :tokens, :micros, 'open', :now, :expires_at)",
    "expires_at",
)
_CLOSE = sql(
    "UPDATE quota_leases SET state = 'closed', closed_at = :now WHERE id = :id AND state = 'open'"
    " RETURNING keys, tokens, micros"
)
_SETTLED_UNDER = text(
    "SELECT COALESCE(SUM(spent_tokens), 0), COALESCE(SUM(spent_micros), 0)"
    " FROM quota_reservations WHERE lease_id = :id AND state = 'settled'"
)
_HELD_UNDER = text(
    "SELECT COALESCE(SUM(tokens), 0), COALESCE(SUM(micros), 0)"
    " FROM quota_reservations WHERE lease_id = :id AND state = 'held'"
)
# Calls still held under a closing lease become ordinary reservations of its keys.
_ADOPT = text(
    "UPDATE quota_reservations SET lease_id = NULL,"
    " keys = CASE WHEN keys = '' THEN :keys ELSE keys || :newline || :keys END"
    " WHERE lease_id = :id AND state = 'held'"
)
_SETTLE_LEASE = sql(
    "UPDATE quota_counters SET reserved_tokens = reserved_tokens - :slice_tokens + :held_tokens,"
    " reserved_micros = reserved_micros - :slice_micros + :held_micros,"
    " spent_tokens = spent_tokens + :spent_tokens,"
    " spent_micros = spent_micros + :spent_micros, updated_at = :now WHERE key = :key"
)
_RECORD_SPENT = text(
    "UPDATE quota_leases SET spent_tokens = :spent_tokens, spent_micros = :spent_micros"
    " WHERE id = :id"
)


@dataclass(slots=True)
class Lease:
    """A slice of the shared scopes ``keys`` (sorted), and what is left of it here."""

    id: str
    keys: tuple[str, ...]
    tokens: int
    micros: int
    open_until: float  # monotonic: takes new calls until then
    close_by: float  # monotonic: closed by then, calls in flight or not
    free_tokens: int = 0
    free_micros: int = 0
    holding: int = 0  # calls held against it now
    closing: bool = False

    def take(self, tokens: int, micros: int, now: float) -> bool:
        if self.closing or now >= self.open_until:
            return False
        if tokens > self.free_tokens or micros > self.free_micros:
            return False
        self.free_tokens -= tokens
        self.free_micros -= micros
        self.holding += 1
        return True


@dataclass(slots=True)
class _Demand:
    """What this worker's calls asked of one set of shared scopes, recently."""

    asks: deque[tuple[float, int, int]] = field(default_factory=deque)
    tokens: int = 0  # the sums of ``asks``, kept as they change (a call's hot path)
    micros: int = 0

    def add(self, now: float, tokens: int, micros: int, window_s: float) -> tuple[int, int]:
        self.asks.append((now, tokens, micros))
        self.tokens += tokens
        self.micros += micros
        while self.asks and self.asks[0][0] < now - window_s:
            _, old_tokens, old_micros = self.asks.popleft()
            self.tokens -= old_tokens
            self.micros -= old_micros
        return self.tokens, self.micros


class BudgetLeases:
    """This worker's leases of shared budgets (one open lease per set of shared keys)."""

    def __init__(
        self, database: Database, *, window_s: float = 10.0, margin_s: float = MARGIN_S
    ) -> None:
        self._database = database
        self.window_s = window_s
        self.margin_s = margin_s
        self._open: dict[tuple[str, ...], Lease] = {}
        self._draining: dict[str, Lease] = {}  # past their window, calls still held
        self._demand: dict[tuple[str, ...], _Demand] = {}
        self._locks: dict[tuple[str, ...], asyncio.Lock] = {}
        self._closing: set[asyncio.Task[None]] = set()

    async def hold(
        self, scopes: Sequence[QuotaScope], tokens: int, micros: int, *, longest_call_s: float
    ) -> Lease | str:
        """A lease holding ``tokens`` and ``micros`` of every scope of ``scopes`` (shared
        ones), or the label of the scope that has not that much left."""
        ordered = sorted({s.key: s for s in scopes}.values(), key=lambda s: s.key)
        keys = tuple(s.key for s in ordered)
        now = time.monotonic()
        asked = self._demand.setdefault(keys, _Demand()).add(now, tokens, micros, self.window_s)
        lease = self._open.get(keys)
        if lease is not None and lease.take(tokens, micros, now):
            return lease
        lock = self._locks.setdefault(keys, asyncio.Lock())
        async with lock:  # one new lease at a time per set of keys, not one per call
            now = time.monotonic()
            lease = self._open.get(keys)
            if lease is not None and lease.take(tokens, micros, now):
                return lease
            if lease is not None:
                self._retire(lease)
            try:
                taken = await self._take(ordered, asked, tokens, micros, longest_call_s)
            except _Lost:  # raced another worker's lease: ask for this call only
                try:
                    taken = await self._take(ordered, (0, 0), tokens, micros, longest_call_s)
                except _Lost as lost:
                    return lost.label
            if isinstance(taken, str):
                return taken
            self._open[keys] = taken
            # Closed soon after its window even if no call comes to notice.
            asyncio.get_running_loop().call_later(self.window_s + 0.1, self._due, taken)
            if not taken.take(tokens, micros, time.monotonic()):  # sized for it: cannot fail
                raise AssertionError("a new lease cannot hold the call it was taken for")
            return taken

    def give_back(self, lease: Lease, tokens: int, micros: int) -> None:
        """A call held against ``lease`` that was not made (refused elsewhere)."""
        self.settled(lease, tokens, micros, 0, 0)

    def settled(
        self, lease: Lease, held_tokens: int, held_micros: int, spent_tokens: int, spent_micros: int
    ) -> None:
        """A call held against ``lease`` settled (its row says so in the database)."""
        lease.free_tokens += held_tokens - spent_tokens
        lease.free_micros += held_micros - spent_micros
        lease.holding -= 1
        if lease.holding <= 0 and (lease.closing or time.monotonic() >= lease.open_until):
            self._retire(lease)

    def _due(self, lease: Lease) -> None:
        if not lease.closing and lease.holding <= 0:
            self._retire(lease)

    def forget(self, lease: Lease) -> None:
        """``lease`` was closed by someone else (the sweep): never use it again."""
        lease.closing = True
        if self._open.get(lease.keys) is lease:
            del self._open[lease.keys]
        self._draining.pop(lease.id, None)

    def _retire(self, lease: Lease) -> None:
        """No new calls on ``lease``; closed once none holds it (or by its deadline)."""
        if self._open.get(lease.keys) is lease:
            del self._open[lease.keys]
        lease.closing = True
        if lease.holding > 0:
            self._draining[lease.id] = lease
            return
        self._draining.pop(lease.id, None)
        task = asyncio.ensure_future(self._close_quietly(lease))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_quietly(self, lease: Lease) -> None:
        try:
            await close_lease(self._database, lease.id)
        except Exception:
            # Left open: the sweep closes it after its expiry (no money is lost, the
            # slice is only unavailable until then).
            return

    def tidy(self) -> None:
        """Close what is due: leases past their window that nothing holds, and leases
        at their deadline whatever holds them (those calls become reservations)."""
        now = time.monotonic()
        for lease in list(self._open.values()):
            if now >= lease.open_until and lease.holding <= 0:
                self._retire(lease)
        for lease in list(self._draining.values()):
            if now >= lease.close_by:
                lease.holding = 0
                self._retire(lease)

    async def close_all(self) -> None:
        """The worker stops: every lease closes now (calls still held become ordinary
        reservations, which expire if this worker never settles them)."""
        for lease in [*self._open.values(), *self._draining.values()]:
            lease.holding = 0
            self._retire(lease)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=10.0)

    async def _take(
        self,
        ordered: Sequence[QuotaScope],
        asked: tuple[int, int],
        tokens: int,
        micros: int,
        longest_call_s: float,
    ) -> Lease | str:
        now = utcnow()
        keys = [s.key for s in ordered]
        async with self._database.writing() as session:
            used = {
                row[0]: (int(row[1]), int(row[2]))
                for row in (await session.execute(_READ, {"keys": keys})).all()
            }
            slice_tokens = max(tokens, int(asked[0] * GROWTH))
            slice_micros = max(micros, int(asked[1] * GROWTH))
            for s in ordered:
                used_tokens, used_micros = used.get(s.key, (0, 0))  # no row yet: nothing used
                if s.tokens is not None:
                    left = s.tokens - used_tokens
                    if left < tokens:
                        return s.label
                    slice_tokens = min(slice_tokens, max(tokens, int(left * SHARE)))
                if s.micros is not None:
                    left = s.micros - used_micros
                    if left < micros:
                        return s.label
                    slice_micros = min(slice_micros, max(micros, int(left * SHARE)))
            for s in ordered:
                result = await session.execute(
                    RESERVE,
                    {
                        "key": s.key,
                        "tokens": slice_tokens,
                        "micros": slice_micros,
                        "limit_tokens": s.tokens,
                        "limit_micros": s.micros,
                        "now": now,
                    },
                )
                if result.rowcount != 1:  # another worker took it meanwhile
                    raise _Lost(s.label)
            lease_id = uuid.uuid4().hex
            expires_in = self.window_s + longest_call_s + self.margin_s
            await session.execute(
                _OPEN,
                {
                    "id": lease_id,
                    "keys": "\n".join(keys),
                    "tokens": slice_tokens,
                    "micros": slice_micros,
                    "now": now,
                    "expires_at": now + timedelta(seconds=expires_in),
                },
            )
        started = time.monotonic()
        return Lease(
            id=lease_id,
            keys=tuple(keys),
            tokens=slice_tokens,
            micros=slice_micros,
            open_until=started + self.window_s,
            close_by=started + self.window_s + longest_call_s,
            free_tokens=slice_tokens,
            free_micros=slice_micros,
        )


class _Lost(Exception):
    """The conditional UPDATE refused after the read said it fits (a race)."""

    def __init__(self, label: str) -> None:
        self.label = label


async def close_lease(database: Database, lease_id: str) -> bool:
    """Close ``lease_id`` (see the module's note); False when it was closed already."""
    now = utcnow()
    async with database.writing() as session:
        row = (await session.execute(_CLOSE, {"id": lease_id, "now": now})).first()
        if row is None:
            return False  # closed already (by its worker or another sweep)
        keys, slice_tokens, slice_micros = row
        spent = (await session.execute(_SETTLED_UNDER, {"id": lease_id})).one()
        held = (await session.execute(_HELD_UNDER, {"id": lease_id})).one()
        await session.execute(_ADOPT, {"id": lease_id, "keys": keys, "newline": "\n"})
        await session.execute(
            _SETTLE_LEASE,
            [
                {
                    "key": key,
                    "slice_tokens": slice_tokens,
                    "slice_micros": slice_micros,
                    "held_tokens": int(held[0]),
                    "held_micros": int(held[1]),
                    "spent_tokens": int(spent[0]),
                    "spent_micros": int(spent[1]),
                    "now": now,
                }
                for key in sorted(keys.split("\n"))
            ],
        )
        await session.execute(
            _RECORD_SPENT,
            {"id": lease_id, "spent_tokens": int(spent[0]), "spent_micros": int(spent[1])},
        )
    return True


async def close_expired_leases(database: Database, *, limit: int = 50) -> int:
    """Close the leases of workers that died (open past their expiry); how many."""
    now = utcnow()
    async with database.reading() as session:
        rows = (
            await session.execute(
                sql(
                    "SELECT id FROM quota_leases WHERE state = 'open' AND expires_at < :now"
                    " ORDER BY expires_at LIMIT :n"
                ),
                {"now": now, "n": limit},
            )
        ).all()
    closed = 0
    for (lease_id,) in rows:
        if await close_lease(database, lease_id):
            closed += 1
    return closed
