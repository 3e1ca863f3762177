"""Fixtures of the integration tests: a local Easemob simulator, clients, a ready gateway."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imbot.core.kafka import ensure_topics
from imbot.core.settings import Settings
from imbot.gateway.app import create_app
from imbot.sender.easemob import EasemobClient
from imbot.simulator.app import SimulatorConfig, serve
from imbot.storage import Storage, open_storage

SIMULATOR_CLIENT_SECRET = SimulatorConfig.client_secret
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def simulator() -> AsyncIterator[str]:
    """A local Easemob (real HTTP) on a free port; its base URL."""
    config = SimulatorConfig(port=0)
    runner: web.AppRunner = await serve(config)
    yield f"http://127.0.0.1:{config.port}"
    await runner.cleanup()


@pytest.fixture
async def storage(db_url: str) -> AsyncIterator[Storage]:
    """The repositories over a migrated database: SQLite and PostgreSQL in turn."""
    opened = await open_storage(db_url)
    yield opened
    await opened.close()


def run_imbot(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m imbot ARGS`` as an operator runs it, on ``settings``' broker and topics."""
    env = {
        **os.environ,
        "IMBOT_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "IMBOT_KAFKA_EMBEDDED": "true",
        "IMBOT_TOPIC_PREFIX": settings.topic_prefix,
        "IMBOT_LOG_JSON": "false",
    }
    return subprocess.run(
        [sys.executable, "-m", "imbot", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# An Easemob address nothing listens on: for a stage that must have a client (its row
# needs one) in a test that never makes it send or download anything.
UNUSED = "http://127.0.0.1:9"


def new_easemob_client(base_url: str, **options: Any) -> EasemobClient:
    """An Easemob REST client with the simulator's credentials (override any of them)."""
    kwargs: dict[str, Any] = {
        "org": "demo-org",
        "app": "demo-app",
        "client_id": "dev-client",
        "client_secret": SIMULATOR_CLIENT_SECRET,
        **options,
    }
    return EasemobClient(base_url=base_url, **kwargs)


@pytest.fixture
async def client(simulator: str) -> AsyncIterator[EasemobClient]:
    async with new_easemob_client(simulator) as c:
        yield c


GatewayClient = TestClient[web.Request, web.Application]
"""A test client of the gateway app (aiohttp's ``TestClient`` is generic in both)."""


async def start_gateway(settings: Settings) -> GatewayClient:
    """The gateway app on a real port, once its producer is connected (``/readyz``)."""
    await ensure_topics(settings)
    client: GatewayClient = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    for _ in range(100):
        if (await client.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.05)
    return client
