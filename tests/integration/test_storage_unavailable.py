"""A PostgreSQL server that refuses new connections is trouble a retry can cure.

asyncpg raises ``TooManyConnectionsError`` (SQLSTATE 53300) through SQLAlchemy's pool
unwrapped. It used to leave storage as itself: the stage boundary took it for a bug and
sent the record to the DLQ (seen in the chaos test with ten replicas on one server:
replies lost to "unexpected error"). It is ``StorageUnavailable`` now, retried.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from imbot.core.errors import StorageUnavailable
from imbot.storage import open_storage
from imbot.storage.errors import translated

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
async def no_connections_role(pg_url: str) -> AsyncIterator[str]:
    """A role the server lets open no connection at all (CONNECTION LIMIT 0)."""
    role = f"imbot_full_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN CONNECTION LIMIT 0')
        yield role
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


async def test_a_server_with_no_connection_left_is_unavailable_not_a_bug(
    pg_url: str, no_connections_role: str
) -> None:
    database = pg_url.rsplit("/", 1)[1]
    url = f"postgresql+asyncpg://{no_connections_role}@127.0.0.1:5432/{database}"
    storage = await open_storage(url, check=False)
    try:
        with pytest.raises(StorageUnavailable) as raised:
            await storage.usage.answered("m1")
        assert "sqlstate=53300" in str(raised.value)
    finally:
        await storage.close()


def test_a_driver_error_of_another_kind_is_left_as_it_is() -> None:
    error = asyncpg.exceptions.UniqueViolationError("duplicate key")
    assert translated(error) is error
