"""The moderation audit: which detector and rule decided what, per message and stage.

Never the text itself, nor a matched PII value: ``rule`` names the rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from imbot.storage.database import Database, sql
from imbot.storage.schema import utcnow


@dataclass(frozen=True, slots=True)
class AuditEntry:
    detector: str
    rule: str
    category: str
    action: str


_INSERT_AUDIT = sql(
    "INSERT INTO moderation_audit (msg_id, stage, detector, rule, category, action,"
    " created_at) VALUES (:msg_id, :stage, :detector, :rule, :category, :action, :now)"
    " ON CONFLICT (msg_id, stage, detector, rule) DO NOTHING"
)


class ModerationAudit:
    """Moderation decisions that were not a plain allow (idempotent per decision)."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def record_audit(self, msg_id: str, stage: str, entries: Iterable[AuditEntry]) -> None:
        now = utcnow()
        rows = [
            {
                "msg_id": msg_id,
                "stage": stage,
                "detector": e.detector,
                "rule": e.rule[:120],
                "category": e.category[:64],
                "action": e.action,
                "now": now,
            }
            for e in entries
        ]
        if not rows:
            return
        async with self._database.writing() as session:
            await session.execute(_INSERT_AUDIT, rows)
