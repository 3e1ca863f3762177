"""A streamed model call is paid for like any other: reserved before, settled with the
provider's real usage after; a stream that breaks half-way is settled with what it
produced (providers bill it), not at zero. A fake OpenAI-compatible server streams."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from imbot.adapters import build_catalog
from imbot.core.errors import RetryableError
from imbot.core.settings import Settings
from imbot.routing.budgets import Budgets
from imbot.storage import Storage
from imbot.streams.boundary import Emit
from tests.envelopes import direct_envelope
from tests.fakes.providers import FakeOpenAI
from tests.stages import default_policy, handled, model_stage, route_stage, settings_with

PRICE = 100.0  # CNY per million tokens


@pytest.fixture
def store(storage: Storage) -> Storage:
    return storage


def _settings(tmp_path: Path, base_url: str) -> Settings:
    policy = default_policy()
    policy["models"] = {
        "streamer": {
            "provider": "openai",
            "base_url": base_url,
            "model": "gpt-stream-test",
            "price": {"input": PRICE, "output": PRICE, "currency": "CNY"},
            "retry": {"max_attempts": 1},
        }
    }
    chain = ["streamer"]
    for tier in policy["routing"]["tiers"].values():
        tier["models"] = {level["name"]: chain for level in policy["routing"]["levels"]}
    policy["routes"]["default"]["stream"] = True
    return settings_with(tmp_path, policy)


async def _call(settings: Settings, store: Storage) -> tuple[str, Emit | Exception]:
    env = direct_envelope("你好，介绍一下你自己")
    [routed] = await route_stage(settings, store).handle(env, deadline=time.monotonic() + 10)
    assert routed.envelope.route is not None
    assert routed.envelope.route.stream
    catalog = build_catalog(settings.policy.models)
    stage = model_stage(settings, store, catalog)
    try:
        [out] = await handled(stage, routed.envelope)
        assert isinstance(out, Emit)
        return env.sender, out
    except RetryableError as exc:
        return env.sender, exc
    finally:
        await catalog.aclose()


async def test_a_stream_is_settled_with_the_provider_s_usage(
    store: Storage, tmp_path: Path
) -> None:
    async with FakeOpenAI() as provider:
        user, out = await _call(_settings(tmp_path, provider.base_url), store)
        assert isinstance(out, Emit)
        assert out.envelope.completion is not None
        assert out.envelope.completion.text == provider.reply_text
        assert provider.requests[0].json["stream"] is True
    [row] = await store.quota.spend(user_id=user)
    # 21 prompt + 9 completion tokens, at 100 per million: 3000 micro-CNY, not zero.
    assert (row.calls, row.tokens, row.micros) == (1, 30, 30 * int(PRICE))


async def test_a_stream_broken_half_way_is_settled_with_what_it_produced(
    store: Storage, tmp_path: Path
) -> None:
    async with FakeOpenAI() as provider:
        reply = provider.success(stream=True, model="gpt-stream-test")
        reply.drop_after = reply.first_frame_with(provider.reply_parts[0]) + 1
        provider.push(reply)
        user, out = await _call(_settings(tmp_path, provider.base_url), store)
        assert isinstance(out, RetryableError)  # the boundary retries the message
    [row] = await store.quota.spend(user_id=user)
    assert row.calls == 1
    assert row.tokens > 0
    assert row.micros > 0  # the partial stream was paid for
    [daily, *_] = await store.quota.states(
        Budgets.of(_settings(tmp_path, "http://unused")).scopes(direct_envelope(user=user), "free")
    )
    assert daily.reserved_micros == 0  # nothing is left held
