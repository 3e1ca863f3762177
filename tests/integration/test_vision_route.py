"""An image message, end to end through the route and model stages: the route picks the
vision chain, the model stage downloads the file from the Easemob simulator (app token and
share-secret, bounded) and sends it inline to a fake OpenAI-compatible vision model; a file
that is gone gets the configured reply and calls no model."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from imbot.adapters import build_catalog
from imbot.core import topics
from imbot.core.envelope import Content
from imbot.core.settings import Settings
from imbot.sender.easemob import EasemobClient
from imbot.storage import Storage, open_storage
from imbot.streams.boundary import Emit
from tests.envelopes import direct_envelope
from tests.fakes.providers import FakeOpenAI
from tests.integration.conftest import new_easemob_client
from tests.stages import default_policy, handled, model_stage, route_stage, settings_with

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 2048


@pytest.fixture
async def store(sqlite_url: str) -> AsyncIterator[Storage]:
    s = await open_storage(sqlite_url)
    yield s
    await s.close()


def _settings(tmp_path: Path, vision_url: str) -> Settings:
    policy = default_policy()
    policy["models"]["eyes"] = {
        "provider": "openai",
        "base_url": vision_url,
        "model": "gpt-vision-test",
        "vision": True,
        "price": {"input": 3, "output": 9, "currency": "CNY"},
    }
    policy["routing"]["vision_models"] = ["eyes"]
    return settings_with(tmp_path, policy)


async def _upload(simulator: str, client: EasemobClient) -> dict[str, str]:
    async with httpx.AsyncClient(base_url=simulator) as http:
        response = await http.post(
            "/demo-org/demo-app/chatfiles",
            files={"file": ("p.png", PNG, "image/png")},
            headers={"Authorization": f"Bearer {await client.token()}", "restrict-access": "true"},
        )
        response.raise_for_status()
        entity: dict[str, str] = response.json()["entities"][0]
        return entity


async def _through(
    settings: Settings, store: Storage, client: EasemobClient, body: dict[str, str]
) -> Emit:
    env = direct_envelope(content=Content(type="img", body=body))
    [routed] = await route_stage(settings, store).handle(env, deadline=time.monotonic() + 10)
    assert routed.topic == topics.ROUTED
    catalog = build_catalog(settings.policy.models)
    try:
        stage = model_stage(settings, store, catalog, files=client)
        [out] = await handled(stage, routed.envelope)
    finally:
        await catalog.aclose()
    assert isinstance(out, Emit)
    return out


async def test_an_image_reaches_the_vision_model_inline_and_is_paid_for(
    simulator: str, store: Storage, tmp_path: Path
) -> None:
    async with FakeOpenAI() as vision, new_easemob_client(simulator) as client:
        settings = _settings(tmp_path, vision.base_url)
        entity = await _upload(simulator, client)
        body = {
            "url": f"https://a1.easemob.com/demo-org/demo-app/chatfiles/{entity['uuid']}",
            "secret": entity["share-secret"],
            "filename": "p.png",
        }
        out = await _through(settings, store, client, body)
        assert out.topic == topics.COMPLETED
        assert vision.images == [("image/png", PNG)]  # the bytes, inline, never the URL
        route = out.envelope.route
        assert route is not None
        assert route.rule == "vision"
        assert route.quota.reservation is not None  # reserved before, settled after
        [row] = await store.quota.spend(user_id=out.envelope.sender)
        assert row.calls == 1
        assert row.micros > 0


async def test_a_file_that_is_gone_gets_the_reply_and_no_model_call(
    simulator: str, store: Storage, tmp_path: Path
) -> None:
    async with FakeOpenAI() as vision, new_easemob_client(simulator) as client:
        settings = _settings(tmp_path, vision.base_url)
        body = {
            "url": "https://a1.easemob.com/demo-org/demo-app/chatfiles/no-such-file",
            "secret": "x",
        }
        out = await _through(settings, store, client, body)
        assert out.topic == topics.OUTBOUND
        assert out.envelope.reply is not None
        assert out.envelope.reply.kind == "unsupported"
        assert vision.requests == []
