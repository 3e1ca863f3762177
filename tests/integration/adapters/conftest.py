"""Fake providers on real sockets, and catalogs pointed at them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest

from imbot.adapters import ModelCatalog, build_catalog
from tests.fakes.providers import (
    FakeAnthropic,
    FakeDashScope,
    FakeErnie,
    FakeOllama,
    FakeOpenAI,
    FakeSpark,
)
from tests.integration.adapters.helpers import PRICE_CNY as PRICE_CNY
from tests.integration.adapters.helpers import PRICE_USD as PRICE_USD

ENV = {
    "OPENAI_API_KEY": "sk-test-0123456789abcdef",
    "ANTHROPIC_API_KEY": "sk-ant-test-0123456789",
    "QIANFAN_AK": "ak-test",
    "QIANFAN_SK": "sk-test",
    "DASHSCOPE_API_KEY": "sk-dash-0123456789",
    "SPARK_API_PASSWORD": "spark-password-0123",
}
# Fast retries so the suite stays quick; the behaviour is the same as in production.
FAST = {
    "retry": {"max_attempts": 3, "base_delay_s": 0.01, "max_delay_s": 0.05},
    "circuit": {"failure_threshold": 50, "cooldown_s": 30},
}

CatalogFactory = Callable[[Mapping[str, Mapping[str, Any]]], ModelCatalog]


@pytest.fixture
async def make_catalog() -> AsyncIterator[CatalogFactory]:
    catalogs: list[ModelCatalog] = []

    def make(models: Mapping[str, Mapping[str, Any]]) -> ModelCatalog:
        full = {k: {**FAST, **v} for k, v in models.items()}
        catalog = build_catalog(full, env=ENV, seed=7)
        catalogs.append(catalog)
        return catalog

    yield make
    for catalog in catalogs:
        await catalog.aclose()


@pytest.fixture
async def openai_fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
async def openai_fake2() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
async def anthropic_fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
async def ernie_fake() -> AsyncIterator[FakeErnie]:
    async with FakeErnie(api_key="ak-test", secret_key="sk-test") as fake:
        yield fake


@pytest.fixture
async def dashscope_fake() -> AsyncIterator[FakeDashScope]:
    async with FakeDashScope() as fake:
        yield fake


@pytest.fixture
async def spark_fake() -> AsyncIterator[FakeSpark]:
    async with FakeSpark() as fake:
        yield fake


@pytest.fixture
async def ollama_fake() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as fake:
        yield fake
