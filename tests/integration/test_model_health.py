"""Model health across workers, on real SQLite and PostgreSQL: a model worker whose
circuit opens says so in the shared table, a route stage elsewhere leaves that model out
of its chains, and the closed circuit is shared again."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from imbot.adapters import build_catalog
from imbot.core.errors import RetryableError
from imbot.core.settings import Settings
from imbot.storage import Storage
from imbot.streams.stages import Route
from tests.envelopes import direct_envelope
from tests.fakes.providers import FakeOpenAI, openai_error
from tests.stages import default_policy, model_stage, route_stage, settings_with


@pytest.fixture
def store(storage: Storage) -> Storage:
    return storage


def _settings(tmp_path: Path, base_url: str) -> Settings:
    policy = default_policy()
    policy["models"]["flaky"] = {
        "provider": "openai",
        "base_url": base_url,
        "model": "gpt-flaky",
        "price": {"input": 1, "output": 1, "currency": "CNY"},
        "retry": {"max_attempts": 1},
        "circuit": {"failure_threshold": 1, "cooldown_s": 60},
    }
    for tier in policy["routing"]["tiers"].values():
        tier["models"]["strong"] = ["flaky", "demo-plus"]
    return settings_with(tmp_path, policy)


def _route(settings: Settings, store: Storage) -> Route:
    return route_stage(settings, store, circuits_ttl_s=0)


HARD = "Prove that the square root of 2 is irrational, step by step."


async def test_an_open_circuit_is_shared_and_the_route_skips_the_model(
    store: Storage, tmp_path: Path
) -> None:
    async with FakeOpenAI() as provider:
        for _ in range(3):
            provider.push(openai_error(500, "upstream overloaded", "server_error"))
        settings = _settings(tmp_path, provider.base_url)
        route = _route(settings, store)
        [routed] = await route.handle(direct_envelope(HARD), deadline=time.monotonic() + 5)
        assert routed.envelope.route is not None
        assert routed.envelope.route.models == ("flaky", "demo-plus")  # all healthy so far
        catalog = build_catalog(settings.policy.models)
        stage = model_stage(settings, store, catalog, health=True)
        try:
            # flaky fails (its circuit opens at the first failure), demo-plus answers.
            await stage.handle(routed.envelope, deadline=time.monotonic() + 10)
        except RetryableError:
            pass
        finally:
            await catalog.aclose()
        assert await store.health.open_models() == frozenset({"flaky"})
        # Another worker's route stage leaves it out, and says so.
        [again] = await _route(settings, store).handle(
            direct_envelope(HARD), deadline=time.monotonic() + 5
        )
        assert again.envelope.route is not None
        assert again.envelope.route.models == ("demo-plus",)
        assert again.envelope.route.skipped == ("flaky",)


async def test_a_closed_circuit_is_shared_too(store: Storage) -> None:
    from datetime import UTC, datetime, timedelta

    await store.health.set_open_until("m1", datetime.now(UTC) + timedelta(seconds=60))
    await store.health.set_open_until("m2", datetime.now(UTC) + timedelta(seconds=60))
    assert await store.health.open_models() >= {"m1", "m2"}
    await store.health.set_open_until("m1", datetime.now(UTC))  # closed again
    open_now = await store.health.open_models()
    assert "m1" not in open_now
    assert "m2" in open_now
