"""Row counts for tests: what the database holds, read straight from its tables."""

from __future__ import annotations

from typing import TypedDict

from sqlalchemy import func, select

from imbot.storage import Database


class DeliveryTarget(TypedDict):
    """Where a reply goes, as the delivery ledger's calls take it: typed, so a test can spread
    one dict into ``claim_part``/``mark_sent``/``mark_failed`` and still have it checked."""

    parts: int
    target_kind: str
    target: str


async def count_rows(database: Database, table: type[object], **where: object) -> int:
    query = select(func.count()).select_from(table)
    for column, value in where.items():
        query = query.where(getattr(table, column) == value)
    async with database.engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())
