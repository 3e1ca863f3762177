"""Row counts for tests: what the database holds, read straight from its tables."""

from __future__ import annotations

from sqlalchemy import func, select

from imbot.storage import Database


async def count_rows(database: Database, table: type[object], **where: object) -> int:
    query = select(func.count()).select_from(table)
    for column, value in where.items():
        query = query.where(getattr(table, column) == value)
    async with database.engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())
