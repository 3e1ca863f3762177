"""Model health shared by every worker: which models' circuits are open.

Written by the model stage when a circuit breaker changes state (rare: a handful of
rows, one per model), read by the route stage at most every few seconds per process.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, bindparam, text

from imbot.storage.database import Database, sql
from imbot.storage.schema import utcnow

_SET = sql(
    "INSERT INTO model_health (model, open_until, updated_at) VALUES (:model, :open_until, :now)"
    " ON CONFLICT (model) DO UPDATE SET open_until = excluded.open_until,"
    " updated_at = excluded.updated_at",
    "open_until",
)
_OPEN = text("SELECT model FROM model_health WHERE open_until > :now").bindparams(
    bindparam("now", type_=DateTime(timezone=True))
)


class ModelHealth:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def set_open_until(self, model: str, until: datetime) -> None:
        """Record that ``model``'s circuit is open until ``until`` (now or earlier: closed)."""
        async with self._database.writing_one() as session:
            await session.execute(
                _SET, {"model": model[:128], "open_until": until, "now": utcnow()}
            )

    async def open_models(self) -> frozenset[str]:
        async with self._database.reading() as session:
            rows = (await session.execute(_OPEN, {"now": utcnow()})).all()
        return frozenset(str(r[0]) for r in rows)
