"""The quota ledger: money reserved before a model call and settled after it.

Every worker shares this database, so the budget is one number however many
replicas run. A reservation is one transaction: for each scope the call counts
against (the user's day and month, the group's), one conditional upsert
(``… DO UPDATE SET reserved = reserved + x WHERE spent + reserved + x <= limit``). The
check and the reservation are the same statement, so concurrent calls cannot all
pass the check: the row lock orders them, and PostgreSQL re-evaluates the condition
on the row as the previous transaction left it. Scopes are updated in key order, so
two reservations never deadlock. A scope that refuses rolls the whole reservation
back.

Settling replaces the reservation by the call's real usage (failed, retried and
fallback calls and streams included: the model stage reports what was spent), and
is idempotent: a reservation is settled once. A reservation whose worker died is
expired after its time to live: its amount goes back to the budget (``expire_stale``
runs before a refused reservation is final, and periodically). Periods are part of
the key (a new day is a new row), so a budget reset is never a write racing others.

A *shared* scope (the tenant's budgets: every message counts against them) is not
reserved per call in its row, which would make that row every message's queue: the
call is held against this worker's lease of it (``storage.leases``), and only the
call's own scopes (its user's, its group's) and its reservation row are written per
call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import DateTime, bindparam, text

from imbot.core.routing import QuotaScope
from imbot.storage.counters import RESERVE
from imbot.storage.database import Database, sql
from imbot.storage.leases import BudgetLeases, Lease, close_expired_leases
from imbot.storage.schema import utcnow

_HOLD = sql(
    "INSERT INTO quota_reservations (id, msg_id, user_id, tier, model, keys, tokens, micros,"
    " state, created_at, expires_at, lease_id) VALUES (:id, :msg_id, :user_id, :tier, :model,"
    " :keys, :tokens, :micros, 'held', :now, :expires_at, :lease_id)",
    "expires_at",
)
# The lease a call is held under must still be open when its row is written (PostgreSQL:
# a share lock, so a lease closing at that moment waits for the row and adopts it).
_LEASE_OPEN = {
    "postgresql": text("SELECT 1 FROM quota_leases WHERE id = :id AND state = 'open' FOR SHARE"),
    "sqlite": text("SELECT 1 FROM quota_leases WHERE id = :id AND state = 'open'"),
}
_CLOSE = sql(
    "UPDATE quota_reservations SET state = :state, spent_tokens = :spent_tokens,"
    " spent_micros = :spent_micros, settled_at = :now WHERE id = :id AND state = 'held'"
    " RETURNING keys, tokens, micros"
)
_ADD_SPENT = sql(
    "UPDATE quota_counters SET spent_tokens = spent_tokens + :spent_tokens,"
    " spent_micros = spent_micros + :spent_micros, updated_at = :now WHERE key = :key"
)
_MOVE = sql(
    "UPDATE quota_counters SET reserved_tokens = reserved_tokens - :tokens,"
    " reserved_micros = reserved_micros - :micros,"
    " spent_tokens = spent_tokens + :spent_tokens,"
    " spent_micros = spent_micros + :spent_micros, updated_at = :now WHERE key = :key"
)
_LATE = sql(
    "UPDATE quota_reservations SET spent_tokens = :spent_tokens, spent_micros = :spent_micros,"
    " settled_at = :now WHERE id = :id AND state = 'expired' AND settled_at IS NULL"
    " RETURNING keys"
)

# PostgreSQL: a reservation and a settlement in one round trip each (migration 0009).
_RESERVE_FN = sql(
    "SELECT imbot_quota_reserve(CAST(:keys AS TEXT[]), CAST(:limit_tokens AS BIGINT[]),"
    " CAST(:limit_micros AS BIGINT[]), :tokens, :micros, :now, :id, :msg_id, :user_id,"
    " :tier, :model, :expires_at, :lease_id)",
    "expires_at",
)
_SETTLE_FN = sql("SELECT imbot_quota_settle(:id, :spent_tokens, :spent_micros, :now)")


def _instant(moment: datetime) -> datetime:
    """``moment`` in UTC (naive: taken as UTC), as the ledger's timestamps are written.

    SQLite keeps timestamps as text without their zone, so a moment bound in another
    zone would be compared as its wall time there; PostgreSQL compares instants.
    """
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Reservation:
    id: str
    keys: tuple[str, ...]  # the scopes reserved in their rows (not the leased ones)
    tokens: int
    micros: int
    lease: Lease | None = None  # the lease its shared scopes are held under


@dataclass(frozen=True, slots=True)
class ScopeState:
    """Where one budget stands: spent (settled) and reserved (calls in flight)."""

    scope: QuotaScope
    spent_tokens: int = 0
    spent_micros: int = 0
    reserved_tokens: int = 0
    reserved_micros: int = 0

    @property
    def used_tokens(self) -> int:
        return self.spent_tokens + self.reserved_tokens

    @property
    def used_micros(self) -> int:
        return self.spent_micros + self.reserved_micros

    @property
    def share(self) -> float:
        """The largest share of a limit in use (0 when the scope has no limit)."""
        shares = [0.0]
        if self.scope.tokens is not None:
            shares.append(self.used_tokens / self.scope.tokens if self.scope.tokens else 1.0)
        if self.scope.micros is not None:
            shares.append(self.used_micros / self.scope.micros if self.scope.micros else 1.0)
        return max(shares)

    def fits(self, tokens: int, micros: int) -> bool:
        s = self.scope
        return (s.tokens is None or self.used_tokens + tokens <= s.tokens) and (
            s.micros is None or self.used_micros + micros <= s.micros
        )


class _Refused(Exception):
    def __init__(self, label: str) -> None:
        self.label = label


class _LeaseClosed(Exception):
    """The lease closed between holding the call and writing its row."""


class QuotaLedger:
    """Reserve, settle, expire; and read where each budget stands."""

    def __init__(self, database: Database, leases: BudgetLeases | None = None) -> None:
        self._database = database
        self.leases = leases or BudgetLeases(database)

    async def reserve(
        self,
        *,
        reservation_id: str,
        msg_id: str,
        user_id: str,
        tier: str,
        model: str | None,
        scopes: Sequence[QuotaScope],
        tokens: int,
        micros: int,
        ttl_s: float,
    ) -> Reservation | str:
        """Hold ``tokens`` and ``micros`` against every scope, or against none.

        Returns the reservation, or the label of the scope that refused it (after
        expiring reservations whose workers died and trying once more).
        """
        outcome = await self._try_reserve(
            reservation_id, msg_id, user_id, tier, model, scopes, tokens, micros, ttl_s
        )
        if isinstance(outcome, str) and await self.expire_stale():
            outcome = await self._try_reserve(
                reservation_id, msg_id, user_id, tier, model, scopes, tokens, micros, ttl_s
            )
        return outcome

    async def _try_reserve(
        self,
        reservation_id: str,
        msg_id: str,
        user_id: str,
        tier: str,
        model: str | None,
        scopes: Sequence[QuotaScope],
        tokens: int,
        micros: int,
        ttl_s: float,
    ) -> Reservation | str:
        shared = [s for s in scopes if s.shared]
        own = sorted({s.key: s for s in scopes if not s.shared}.values(), key=lambda s: s.key)
        for _ in range(2):  # a lease closed under this call: once more with a new one
            lease: Lease | None = None
            if shared:
                held = await self.leases.hold(shared, tokens, micros, longest_call_s=ttl_s)
                if isinstance(held, str):
                    return held
                lease = held
            try:
                await self._write_reservation(
                    reservation_id, msg_id, user_id, tier, model, own, tokens, micros, ttl_s, lease
                )
            except _Refused as refused:
                if lease is not None:
                    self.leases.give_back(lease, tokens, micros)
                return refused.label
            except _LeaseClosed:
                assert lease is not None
                self.leases.give_back(lease, tokens, micros)
                self.leases.forget(lease)
                continue
            except BaseException:
                if lease is not None:
                    self.leases.give_back(lease, tokens, micros)
                raise
            return Reservation(reservation_id, tuple(s.key for s in own), tokens, micros, lease)
        return shared[0].label  # two leases closed under it: the budget is being swept

    async def _write_reservation(
        self,
        reservation_id: str,
        msg_id: str,
        user_id: str,
        tier: str,
        model: str | None,
        own: Sequence[QuotaScope],
        tokens: int,
        micros: int,
        ttl_s: float,
        lease: Lease | None,
    ) -> None:
        now = utcnow()
        for s in own:
            if (s.tokens is not None and tokens > s.tokens) or (
                s.micros is not None and micros > s.micros
            ):
                raise _Refused(s.label)  # more than the whole budget
        # A lease is closed by someone else only past its expiry (its window, the longest
        # call and a margin, from when it was taken): checked only when this call was
        # held so late that it could be (a worker frozen for minutes).
        check_lease = lease is not None and time.monotonic() >= lease.close_by
        hold = {
            "id": reservation_id,
            "msg_id": msg_id,
            "user_id": user_id,
            "tier": tier,
            "model": model,
            "tokens": tokens,
            "micros": micros,
            "now": now,
            "expires_at": now + timedelta(seconds=ttl_s),
            "lease_id": lease.id if lease is not None else None,
        }
        if self._database.dialect == "postgresql" and not check_lease:
            # The same statements in one function call: one round trip (migration 0009).
            limits = {
                "keys": [s.key for s in own],
                "limit_tokens": [s.tokens for s in own],
                "limit_micros": [s.micros for s in own],
            }
            async with self._database.writing_one() as session:
                refused = (await session.execute(_RESERVE_FN, {**hold, **limits})).scalar_one()
            if refused:
                raise _Refused(own[refused - 1].label)
            return
        async with self._database.writing() as session:
            if check_lease:
                assert lease is not None
                check = _LEASE_OPEN.get(session.dialect.name, _LEASE_OPEN["sqlite"])
                if (await session.execute(check, {"id": lease.id})).first() is None:
                    raise _LeaseClosed
            for s in own:
                result = await session.execute(
                    RESERVE,
                    {
                        "key": s.key,
                        "tokens": tokens,
                        "micros": micros,
                        "limit_tokens": s.tokens,
                        "limit_micros": s.micros,
                        "now": now,
                    },
                )
                if result.rowcount != 1:
                    raise _Refused(s.label)
            await session.execute(_HOLD, {**hold, "keys": "\n".join(s.key for s in own)})

    async def settle(self, reservation: Reservation, *, tokens: int, micros: int) -> None:
        """Replace the reservation by what the call really spent (idempotent).

        A reservation already expired (its worker was thought dead) has had its amount
        returned; the spend is still added, once. The keys moved are the row's, not the
        caller's: a call held under a lease that closed meanwhile was adopted as an
        ordinary reservation of the lease's keys too.
        """
        now = utcnow()
        spent_tokens, spent_micros = max(0, tokens), max(0, micros)
        spent = {"spent_tokens": spent_tokens, "spent_micros": spent_micros, "now": now}
        if self._database.dialect == "postgresql":
            # The same statements in one function call: one round trip (migration 0009).
            async with self._database.writing_one() as session:
                await session.execute(_SETTLE_FN, {**spent, "id": reservation.id})
        else:
            await self._settle_in_transaction(reservation.id, spent)
        if reservation.lease is not None:
            self.leases.settled(
                reservation.lease,
                reservation.tokens,
                reservation.micros,
                spent_tokens,
                spent_micros,
            )

    async def _settle_in_transaction(self, reservation_id: str, spent: dict[str, object]) -> None:
        async with self._database.writing() as session:
            closed = (
                await session.execute(_CLOSE, {**spent, "id": reservation_id, "state": "settled"})
            ).first()
            if closed is not None:
                keys, held_tokens, held_micros = closed
                moves = [
                    {**spent, "key": key, "tokens": held_tokens, "micros": held_micros}
                    for key in sorted(_split(keys))
                ]
                if moves:
                    await session.execute(_MOVE, moves)
            else:
                late = (await session.execute(_LATE, {**spent, "id": reservation_id})).first()
                if late is not None and _split(late[0]):
                    await session.execute(
                        _ADD_SPENT, [{**spent, "key": k} for k in sorted(_split(late[0]))]
                    )

    async def close(self) -> None:
        """Return this worker's leases (it stops)."""
        await self.leases.close_all()

    async def expire_stale(self, *, now: datetime | None = None, limit: int = 200) -> int:
        """Return the amounts of reservations held past their time to live; how many.

        ``expires_at`` is a moment of the reserving worker's clock, ``now`` one of this
        worker's (never the database's): both are compared as instants, bound as the
        ledger's writes bind them.
        """
        now = _instant(now or utcnow())
        async with self._database.reading() as session:
            rows = (
                await session.execute(
                    text(
                        "SELECT id, keys, tokens, micros FROM quota_reservations"
                        " WHERE state = 'held' AND lease_id IS NULL AND expires_at < :now"
                        " ORDER BY expires_at LIMIT :n"
                    ).bindparams(bindparam("now", now, type_=DateTime(timezone=True)), n=limit)
                )
            ).all()
        expired = 0
        for row_id, keys, tokens, micros in rows:
            async with self._database.writing() as session:
                closed = await session.execute(
                    _CLOSE,
                    {
                        "id": row_id,
                        "state": "expired",
                        "spent_tokens": None,
                        "spent_micros": None,
                        "now": None,
                    },
                )
                if closed.first() is None:
                    continue  # settled meanwhile
                await session.execute(
                    _MOVE,
                    [
                        {
                            "key": key,
                            "tokens": tokens,
                            "micros": micros,
                            "spent_tokens": 0,
                            "spent_micros": 0,
                            "now": now,
                        }
                        for key in sorted(_split(keys))
                    ],
                )
                expired += 1
        # The leases of workers that died: their calls held become reservations (expired
        # here at their own time), what they settled is spent, the rest comes back.
        expired += await close_expired_leases(self._database)
        self.leases.tidy()
        return expired

    async def states(self, scopes: Sequence[QuotaScope]) -> list[ScopeState]:
        """Where each scope stands (a scope never charged reads as zero)."""
        if not scopes:
            return []
        async with self._database.reading() as session:
            rows = (
                await session.execute(
                    text(
                        "SELECT key, spent_tokens, spent_micros, reserved_tokens, reserved_micros"
                        " FROM quota_counters WHERE key IN :keys"
                    ).bindparams(bindparam("keys", expanding=True)),
                    {"keys": [s.key for s in scopes]},
                )
            ).all()
        found = {row[0]: row[1:] for row in rows}
        return [ScopeState(s, *found.get(s.key, (0, 0, 0, 0))) for s in scopes]

    async def spend(
        self, *, user_id: str | None = None, since: datetime | None = None
    ) -> list[SpendRow]:
        """Settled spend by user, tier and model (``imbot usage``), most expensive first."""
        clauses = ["state IN ('settled', 'expired')", "spent_tokens IS NOT NULL"]
        params: dict[str, object] = {}
        if user_id is not None:
            clauses.append("user_id = :user_id")
            params["user_id"] = user_id
        if since is not None:
            clauses.append("created_at >= :since")
            params["since"] = _instant(since)
        query = text(
            "SELECT user_id, tier, model, count(*), sum(spent_tokens), sum(spent_micros)"
            " FROM quota_reservations WHERE "
            + " AND ".join(clauses)
            + " GROUP BY user_id, tier, model ORDER BY sum(spent_micros) DESC, user_id"
        )
        if since is not None:
            query = query.bindparams(bindparam("since", type_=DateTime(timezone=True)))
        async with self._database.reading() as session:
            rows = (await session.execute(query, params)).all()
        return [
            SpendRow(u, t, m or "", int(n), int(tok or 0), int(mic or 0))
            for u, t, m, n, tok, mic in rows
        ]


def _split(keys: str | None) -> list[str]:
    return [k for k in (keys or "").split("\n") if k]


@dataclass(frozen=True, slots=True)
class SpendRow:
    user_id: str
    tier: str
    model: str
    calls: int
    tokens: int
    micros: int
