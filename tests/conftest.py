"""Shared fixtures: one real embedded Kafka broker and one real PostgreSQL database per session."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from imbot.core.settings import Settings, load_settings
from imbot.devtools.broker import EmbeddedBroker
from imbot.storage import upgrade

PG_ADMIN_DSN = os.environ.get("IMBOT_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def topic_prefix() -> str:
    """Unique topic names per test: tests share one broker without seeing each other."""
    return f"t{uuid.uuid4().hex[:8]}."


@pytest.fixture
def make_settings(
    broker: EmbeddedBroker, topic_prefix: str, tmp_path: Path
) -> Callable[..., Settings]:
    def make(**overrides: object) -> Settings:
        base: dict[str, object] = {
            "kafka_bootstrap": broker.bootstrap,
            "kafka_embedded": True,
            "topic_prefix": topic_prefix,
            "topic_partitions": 3,
            "callback_secrets": "test-secret,old-secret",
            "database_url": f"sqlite+aiosqlite:///{tmp_path}/imbot.db",
            "log_json": False,
        }
        base.update(overrides)
        return load_settings(**base)

    return make


async def _create_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def _run(coro: Any) -> None:
    """Run a coroutine from a sync fixture without touching the current event loop
    (``asyncio.run`` would unset it under pytest-asyncio)."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(coro)
    finally:
        loop.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session (dropped afterwards)."""
    name = f"imbot_test_{uuid.uuid4().hex[:10]}"
    _run(_create_database(name))
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    upgrade(url)
    try:
        yield url
    finally:
        _run(_drop_database(name))


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path}/imbot.db"
    upgrade(url)
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Run a test against both supported databases."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("pg_url"))
