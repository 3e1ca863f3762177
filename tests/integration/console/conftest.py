"""The console over a real database and the real embedded broker, through real HTTP."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imbot.console.app import create_app
from imbot.core.settings import Settings
from imbot.storage import Storage, open_storage
from imbot.storage.database import upgrade
from tests.conftest import _create_database, _drop_database, _run

OPERATOR_TOKEN = "operator-token-0123456789"
VIEWER_TOKEN = "viewer-token-0123456789ab"
TOKENS = f"olga:operator:{OPERATOR_TOKEN},victor:viewer:{VIEWER_TOKEN}"
PAGE = {"Accept": "text/html"}

Client = TestClient[web.Request, web.Application]


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A database of this test's own, SQLite and PostgreSQL in turn: the console's pages
    count and list everything in it (the session's shared PostgreSQL database holds what
    other tests wrote, the e2e stacks' included)."""
    if request.param == "sqlite":
        yield str(request.getfixturevalue("sqlite_url"))
        return
    name = f"imbot_console_{uuid.uuid4().hex[:10]}"
    _run(_create_database(name))
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        _run(_drop_database(name))


@pytest.fixture
def console_settings(make_settings: Callable[..., Settings], db_url: str) -> Settings:
    return make_settings(database_url=db_url, console_tokens=TOKENS)


@pytest.fixture
async def console(console_settings: Settings) -> AsyncIterator[Client]:
    client = TestClient(TestServer(create_app(console_settings)))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def store(console_settings: Settings) -> AsyncIterator[Storage]:
    opened = await open_storage(console_settings.database_url)
    yield opened
    await opened.close()


async def log_in(client: Client, token: str) -> str:
    """Log in (replacing any session) and return the CSRF token the pages' forms carry."""
    client.session.cookie_jar.clear()
    response = await client.post("/login", data={"token": token}, allow_redirects=False)
    assert response.status == 303, await response.text()
    page = await (await client.get("/audit", headers=PAGE)).text()
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found is not None
    return found.group(1)
