"""Storage in its own room: every SQL statement of the pipeline, behind named repositories.

- ``DeliveryLedger`` (``storage.deliveries``): reply parts claimed, sent, failed; and
  the history written once a reply is delivered.
- ``UsageLedger`` (``storage.usage``): tokens and cost of each model call.
- ``ModerationAudit`` (``storage.audit``): moderation decisions that were not an allow.
- ``HistoryWindow`` (``storage.history``): the earlier turns a model is shown.
- ``QuotaLedger`` (``storage.quota``): money reserved before a model call, settled
  after it, expired when its worker died; where each budget stands.
- ``UserTiers`` (``storage.tiers``): tiers the operator set (``imbot users set-tier``).
- ``ModelHealth`` (``storage.health``): models whose circuit is open, for the route stage.
- ``FeedbackLog`` (``storage.feedback``): users' ratings of replies, and the satisfaction
  report that joins them to the answering model and the user's tier.

They share one ``Database`` (engine, SQLite's write lock, group commit;
``storage.database``), opened by ``open_database`` / ``open_storage``, which refuse
a database whose migrations are behind. SQLAlchemy's errors never leave this
package: they become ``core.errors.StorageUnavailable`` (retryable) or
``StorageError`` (fatal), carrying a description free of user data.

The stages depend on the small protocols below, not on these classes, so they can be
tested with in-memory fakes (tests/fakes/storage.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from imbot.core.envelope import Completion, Envelope, Turn
from imbot.core.routing import QuotaScope
from imbot.storage.audit import AuditEntry, ModerationAudit
from imbot.storage.database import Database, open_database, upgrade
from imbot.storage.deliveries import (
    UNCERTAIN_ANSWER,
    UNCERTAIN_CLAIM,
    Claim,
    DeliveryLedger,
    LedgerRow,
    storable_text,
    unstorable,
)
from imbot.storage.errors import describe_db_error, translated
from imbot.storage.feedback import FeedbackLog, FeedbackReport, Satisfaction
from imbot.storage.health import ModelHealth
from imbot.storage.history import HistoryWindow
from imbot.storage.quota import QuotaLedger, Reservation, ScopeState, SpendRow
from imbot.storage.tiers import UserTiers
from imbot.storage.usage import UsageLedger


class AuditLog(Protocol):
    """Where a stage records moderation decisions (``ModerationAudit``)."""

    async def record_audit(
        self, msg_id: str, stage: str, entries: Iterable[AuditEntry]
    ) -> None: ...


class UsageRecords(Protocol):
    """Where the model stage accounts for a paid call (``UsageLedger``)."""

    async def record_usage(self, env: Envelope, c: Completion) -> None: ...

    async def answered(self, msg_id: str) -> bool: ...


class History(Protocol):
    """The history a route reads and a provider may ask to clear (``HistoryWindow``)."""

    async def history_window(
        self,
        conversation_id: str,
        *,
        turns: int,
        token_budget: int,
        before_msg_id: str | None = None,
        skip_providers: frozenset[str] = frozenset(),
    ) -> tuple[Turn, ...]: ...

    async def clear_history(self, conversation_id: str) -> None: ...


class QuotaStates(Protocol):
    """Where budgets stand (``QuotaLedger.states``): what the route stage reads."""

    async def states(self, scopes: Sequence[QuotaScope]) -> list[ScopeState]: ...


class Quotas(QuotaStates, Protocol):
    """The budgets a call is reserved against and settled in (``QuotaLedger``)."""

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
    ) -> Reservation | str: ...

    async def settle(self, reservation: Reservation, *, tokens: int, micros: int) -> None: ...

    async def expire_stale(self) -> int: ...


class Tiers(Protocol):
    """Tiers set by the operator (``UserTiers``)."""

    async def tier_of(self, user_id: str) -> str | None: ...


class Health(Protocol):
    """Models whose circuit is open, shared by every worker (``ModelHealth``)."""

    async def set_open_until(self, model: str, until: datetime) -> None: ...

    async def open_models(self) -> frozenset[str]: ...


class StageStorage(Protocol):
    """What the stages before the sender use of storage."""

    @property
    def health(self) -> Health: ...

    @property
    def quota(self) -> Quotas: ...

    @property
    def tiers(self) -> Tiers: ...

    @property
    def audit(self) -> AuditLog: ...

    @property
    def usage(self) -> UsageRecords: ...

    @property
    def history(self) -> History: ...


@dataclass(frozen=True, slots=True)
class Storage:
    """The repositories of one process over one ``Database``."""

    database: Database
    deliveries: DeliveryLedger
    usage: UsageLedger
    audit: ModerationAudit
    history: HistoryWindow
    quota: QuotaLedger
    tiers: UserTiers
    feedback: FeedbackLog
    health: ModelHealth

    @classmethod
    def over(cls, database: Database) -> Storage:
        return cls(
            database=database,
            deliveries=DeliveryLedger(database),
            usage=UsageLedger(database),
            audit=ModerationAudit(database),
            history=HistoryWindow(database),
            quota=QuotaLedger(database),
            tiers=UserTiers(database),
            feedback=FeedbackLog(database),
            health=ModelHealth(database),
        )

    async def close(self) -> None:
        await self.quota.close()  # this worker's budget leases go back first
        await self.database.close()


async def open_storage(url: str, *, check: bool = True) -> Storage:
    """The repositories over the database at ``url`` (see ``open_database``)."""
    return Storage.over(await open_database(url, check=check))


__all__ = [
    "UNCERTAIN_ANSWER",
    "UNCERTAIN_CLAIM",
    "AuditEntry",
    "AuditLog",
    "Claim",
    "Database",
    "DeliveryLedger",
    "FeedbackLog",
    "FeedbackReport",
    "Health",
    "History",
    "HistoryWindow",
    "LedgerRow",
    "ModelHealth",
    "ModerationAudit",
    "QuotaLedger",
    "QuotaStates",
    "Quotas",
    "Reservation",
    "Satisfaction",
    "ScopeState",
    "SpendRow",
    "StageStorage",
    "Storage",
    "Tiers",
    "UsageLedger",
    "UsageRecords",
    "UserTiers",
    "describe_db_error",
    "open_database",
    "open_storage",
    "storable_text",
    "translated",
    "unstorable",
    "upgrade",
]
