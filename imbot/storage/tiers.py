"""User tiers set by the operator (``imbot users set-tier``): a server-side source the
client cannot influence (never the message's ``ext``)."""

from __future__ import annotations

from sqlalchemy import text

from imbot.storage.database import Database, sql
from imbot.storage.schema import utcnow

_SET = sql(
    "INSERT INTO user_tiers (user_id, tier, updated_at) VALUES (:user_id, :tier, :now)"
    " ON CONFLICT (user_id) DO UPDATE SET tier = excluded.tier, updated_at = excluded.updated_at"
)
_CLEAR = text("DELETE FROM user_tiers WHERE user_id = :user_id")


class UserTiers:
    def __init__(self, database: Database) -> None:
        self._database = database

    async def tier_of(self, user_id: str) -> str | None:
        async with self._database.reading() as session:
            row = (
                await session.execute(
                    text("SELECT tier FROM user_tiers WHERE user_id = :u"), {"u": user_id}
                )
            ).first()
        return None if row is None else str(row[0])

    async def set_tier(self, user_id: str, tier: str | None) -> None:
        """Set (or, with None, remove) a user's tier."""
        async with self._database.writing_one() as session:
            if tier is None:
                await session.execute(_CLEAR, {"user_id": user_id})
            else:
                await session.execute(_SET, {"user_id": user_id, "tier": tier, "now": utcnow()})

    async def all_tiers(self) -> dict[str, str]:
        async with self._database.reading() as session:
            rows = (await session.execute(text("SELECT user_id, tier FROM user_tiers"))).all()
        return {str(u): str(t) for u, t in rows}
