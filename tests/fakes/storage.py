"""In-memory fakes of the storage protocols the stages use (storage.StageStorage).

Test doubles of our protocols, not patches of our code: they keep what a stage
wrote so a unit test can read it back in microseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from imbot.core.envelope import Completion, Envelope, Turn
from imbot.core.errors import StorageUnavailable
from imbot.core.routing import QuotaScope
from imbot.storage import AuditEntry, Reservation, ScopeState


@dataclass
class FakeAudit:
    entries: list[tuple[str, str, AuditEntry]] = field(default_factory=list)
    failures: int = 0  # the next this many writes find the database unavailable

    async def record_audit(self, msg_id: str, stage: str, entries: Iterable[AuditEntry]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StorageUnavailable("database unavailable", error_class="OperationalError")
        self.entries.extend((msg_id, stage, e) for e in entries)


@dataclass
class FakeUsage:
    rows: dict[str, Completion] = field(default_factory=dict)
    failures: int = 0  # the next this many writes find the database unavailable

    async def record_usage(self, env: Envelope, c: Completion) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StorageUnavailable("database unavailable", error_class="OperationalError")
        self.rows.setdefault(env.msg_id, c)

    async def answered(self, msg_id: str) -> bool:
        return msg_id in self.rows


@dataclass
class FakeHistory:
    windows: dict[str, tuple[Turn, ...]] = field(default_factory=dict)
    cleared: list[str] = field(default_factory=list)
    asked: list[tuple[str, int, int, str | None]] = field(default_factory=list)

    async def history_window(
        self,
        conversation_id: str,
        *,
        turns: int,
        token_budget: int,
        before_msg_id: str | None = None,
        skip_providers: frozenset[str] = frozenset(),
    ) -> tuple[Turn, ...]:
        self.asked.append((conversation_id, turns, token_budget, before_msg_id))
        return self.windows.get(conversation_id, ())[-turns:] if turns > 0 else ()

    async def clear_history(self, conversation_id: str) -> None:
        self.cleared.append(conversation_id)
        self.windows.pop(conversation_id, None)


@dataclass
class FakeStorage:
    audit: FakeAudit = field(default_factory=FakeAudit)
    usage: FakeUsage = field(default_factory=FakeUsage)
    history: FakeHistory = field(default_factory=FakeHistory)
    quota: FakeQuota = field(default_factory=lambda: FakeQuota())
    tiers: FakeTiers = field(default_factory=lambda: FakeTiers())
    health: FakeHealth = field(default_factory=lambda: FakeHealth())


@dataclass
class FakeQuota:
    """The quota ledger's arithmetic in memory (the real one is tested on PostgreSQL
    and SQLite in tests/integration/test_quota_ledger.py)."""

    counters: dict[str, list[int]] = field(default_factory=dict)  # key → [t, µ, rt, rµ]
    held: dict[str, Reservation] = field(default_factory=dict)
    settled: dict[str, tuple[int, int]] = field(default_factory=dict)

    def _row(self, key: str) -> list[int]:
        return self.counters.setdefault(key, [0, 0, 0, 0])

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
        for s in scopes:
            spent_t, spent_m, res_t, res_m = self._row(s.key)
            if s.tokens is not None and spent_t + res_t + tokens > s.tokens:
                return s.label
            if s.micros is not None and spent_m + res_m + micros > s.micros:
                return s.label
        for s in scopes:
            row = self._row(s.key)
            row[2] += tokens
            row[3] += micros
        held = Reservation(reservation_id, tuple(s.key for s in scopes), tokens, micros)
        self.held[reservation_id] = held
        return held

    async def settle(self, reservation: Reservation, *, tokens: int, micros: int) -> None:
        if self.held.pop(reservation.id, None) is None:
            return
        for key in reservation.keys:
            row = self._row(key)
            row[0] += tokens
            row[1] += micros
            row[2] -= reservation.tokens
            row[3] -= reservation.micros
        self.settled[reservation.id] = (tokens, micros)

    async def states(self, scopes: Sequence[QuotaScope]) -> list[ScopeState]:
        return [ScopeState(s, *self._row(s.key)) for s in scopes]

    async def expire_stale(self) -> int:
        return 0  # nothing dies in memory


@dataclass
class FakeTiers:
    tiers: dict[str, str] = field(default_factory=dict)

    async def tier_of(self, user_id: str) -> str | None:
        return self.tiers.get(user_id)


@dataclass
class FakeHealth:
    open_until: dict[str, datetime] = field(default_factory=dict)

    async def set_open_until(self, model: str, until: datetime) -> None:
        self.open_until[model] = until

    async def open_models(self) -> frozenset[str]:
        now = datetime.now(UTC)
        return frozenset(m for m, until in self.open_until.items() if until > now)
