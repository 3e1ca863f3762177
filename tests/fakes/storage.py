"""In-memory fakes of the storage protocols the stages use (storage.StageStorage).

Test doubles of our protocols, not patches of our code: they keep what a stage
wrote so a unit test can read it back in microseconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from imbot.core.envelope import Completion, Envelope, Turn
from imbot.core.errors import StorageUnavailable
from imbot.storage import AuditEntry


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
