"""EasemobClient against the Easemob simulator over real HTTP: every response class."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from imbot.core.errors import ConfigurationError, FatalError, RetryableError
from imbot.sender.easemob import EasemobClient, MessageTooLarge
from imbot.sender.pacing import Pacer
from imbot.simulator.app import SimulatorConfig, serve
from tests.integration.conftest import new_easemob_client

CLIENT_SECRET = "very-secret-client-secret"


@pytest.fixture
async def simulator() -> AsyncIterator[str]:
    config = SimulatorConfig(port=0, client_secret=CLIENT_SECRET)
    runner: web.AppRunner = await serve(config)
    yield f"http://127.0.0.1:{config.port}"
    await runner.cleanup()


def _client(base_url: str, **kw: Any) -> EasemobClient:
    return new_easemob_client(base_url, **{"client_secret": CLIENT_SECRET, **kw})


@pytest.fixture
async def client(simulator: str) -> AsyncIterator[EasemobClient]:
    async with _client(simulator) as c:
        yield c


@pytest.fixture
async def admin(simulator: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=simulator) as http:
        yield http


async def _inject(admin: httpx.AsyncClient, **body: Any) -> None:
    (await admin.post("/_sim/inject", json=body)).raise_for_status()


async def _stats(admin: httpx.AsyncClient) -> dict[str, Any]:
    stats: dict[str, Any] = (await admin.get("/_sim/stats")).json()
    return stats


async def _delivered(admin: httpx.AsyncClient, to: str) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = (await admin.get("/_sim/messages", params={"to": to})).json()[
        "messages"
    ]
    return messages


async def _send(client: EasemobClient, to: str = "alice", **kw: Any) -> str:
    return await client.send_text(kw.pop("kind", "users"), sender="ai_bot", to=to, text="hi", **kw)


# -- success ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["users", "chatgroups", "chatrooms"])
async def test_send_text_delivers_and_returns_easemob_message_id(
    client: EasemobClient, admin: httpx.AsyncClient, kind: Any
) -> None:
    msg_id = await client.send_text(
        kind, sender="ai_bot", to="t1", text="你好，世界", ext={"imbot_reply_to": "123"}
    )
    [message] = await _delivered(admin, "t1")
    assert msg_id == message["id"]
    assert msg_id.isdigit()
    assert (message["kind"], message["from"], message["to"], message["type"]) == (
        kind,
        "ai_bot",
        ["t1"],
        "txt",
    )
    assert message["body"] == {"msg": "你好，世界"}
    assert message["ext"] == {"imbot_reply_to": "123"}


async def test_token_is_cached_across_sends(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    for i in range(3):
        await _send(client, f"u{i}")
    assert (await _stats(admin))["token_requests"] == 1


async def test_fifty_concurrent_sends_share_one_token_request(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    ids = await asyncio.gather(*(_send(client, f"u{i}") for i in range(50)))
    assert len(set(ids)) == 50
    assert (await _stats(admin))["token_requests"] == 1


async def test_token_is_replaced_shortly_before_it_expires(
    simulator: str, admin: httpx.AsyncClient
) -> None:
    await _inject(admin, token_ttl_s=1)
    async with _client(simulator, token_margin_s=0.8) as client:  # reuse for 0.5 s at least
        await _send(client)
        await _send(client)
        assert (await _stats(admin))["token_requests"] == 1
        await asyncio.sleep(0.6)
        await _send(client)
    stats = await _stats(admin)
    assert stats["token_requests"] == 2
    assert "users 401" not in stats["answers"]  # replaced before Easemob refused it


# -- 401 ------------------------------------------------------------------------


async def test_expired_token_is_refreshed_once_and_the_send_repeated(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await _send(client)
    await _inject(admin, expire_tokens=True)
    await _send(client)
    assert len(await _delivered(admin, "alice")) == 2
    stats = await _stats(admin)
    assert stats["token_requests"] == 2
    assert stats["answers"]["users 401"] == 1


async def test_concurrent_sends_with_an_expired_token_refresh_it_once(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await _send(client)
    await _inject(admin, expire_tokens=True)
    await asyncio.gather(*(_send(client, f"u{i}") for i in range(50)))
    assert (await _stats(admin))["token_requests"] == 2


async def test_a_second_401_after_the_refresh_is_a_configuration_error(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await _inject(admin, status=401, count=2)
    with pytest.raises(ConfigurationError) as raised:
        await _send(client)
    assert raised.value.status == 401
    stats = await _stats(admin)
    assert (stats["token_requests"], stats["send_requests"]) == (2, 2)  # one refresh, one retry


async def test_wrong_client_secret_is_a_configuration_error_without_the_secret(
    simulator: str,
) -> None:
    async with _client(simulator, client_secret="wrong-secret-value") as bad:
        with pytest.raises(ConfigurationError) as raised:
            await _send(bad)
    assert raised.value.status == 400
    assert "wrong-secret-value" not in str(raised.value)
    assert "wrong-secret-value" not in repr(raised.value.args)


async def test_wrong_app_is_a_configuration_error(simulator: str) -> None:
    async with _client(simulator, app="other-app") as bad:
        with pytest.raises(ConfigurationError) as raised:
            await _send(bad)
    assert raised.value.status == 404


async def test_token_endpoint_outage_is_retryable_and_not_cached(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await _inject(admin, status=503, endpoint="token")
    with pytest.raises(RetryableError):
        await _send(client)
    await _send(client)  # the next send fetches a token again
    assert (await _stats(admin))["token_requests"] == 2


# -- rate limits and quotas --------------------------------------------------


async def test_429_is_retryable(client: EasemobClient, admin: httpx.AsyncClient) -> None:
    await _inject(admin, status=429)
    with pytest.raises(RetryableError) as raised:
        await _send(client)
    assert (raised.value.status, raised.value.code) == (429, "reach_limit")
    assert raised.value.retry_after is None  # Easemob documents no Retry-After
    await _send(client)  # the next call goes through


async def test_429_with_retry_after_header_carries_it(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await _inject(admin, status=429, retry_after="2.5")
    with pytest.raises(RetryableError) as raised:
        await _send(client)
    assert raised.value.retry_after == 2.5


async def test_calls_above_the_simulated_rate_limit_get_429(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await _inject(admin, rate_limit=5)
    results = await asyncio.gather(
        *(_send(client, f"u{i}") for i in range(8)), return_exceptions=True
    )
    refused = [r for r in results if isinstance(r, RetryableError)]
    assert len(refused) == 3
    assert all(r.status == 429 for r in refused)


async def test_pacer_keeps_the_client_under_the_rate_limit(
    simulator: str, admin: httpx.AsyncClient
) -> None:
    await _inject(admin, rate_limit=20)
    loop = asyncio.get_running_loop()
    async with _client(simulator, pacer=Pacer(rate=20, burst=1)) as client:
        start = loop.time()
        await asyncio.gather(*(_send(client, f"u{i}") for i in range(11)))
        elapsed = loop.time() - start
    assert elapsed >= 10 / 20 * 0.95
    assert "users 429" not in (await _stats(admin))["answers"]


@pytest.mark.parametrize(("kind", "window"), [("users", 10.0), ("chatgroups", 1.0)])
async def test_message_quota_403_is_retryable_after_the_quota_window(
    client: EasemobClient, admin: httpx.AsyncClient, kind: str, window: float
) -> None:
    await _inject(admin, status=403, description="message send reach limit")
    with pytest.raises(RetryableError) as raised:
        await _send(client, kind=kind)
    assert raised.value.status == 403
    assert raised.value.retry_after == window


async def test_simulated_message_quota_gives_403_then_recovers(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await _inject(admin, quota={"messages": 2, "window_s": 0.3})
    await _send(client, "a")
    await _send(client, "b")
    with pytest.raises(RetryableError) as raised:
        await _send(client, "c")
    assert raised.value.status == 403
    await asyncio.sleep(0.35)
    await _send(client, "c")


async def test_other_403_is_fatal(client: EasemobClient, admin: httpx.AsyncClient) -> None:
    await _inject(
        admin, status=403, error="forbidden_op", description="Service operation not allowed"
    )
    with pytest.raises(FatalError) as raised:
        await _send(client)
    assert "Service operation not allowed" in str(raised.value)


async def test_free_edition_429_is_fatal_quota(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await _inject(admin, status=429, error="resource_limited", description="upgrade")
    with pytest.raises(FatalError) as raised:
        await _send(client)
    assert raised.value.reason == "quota_exhausted"


# -- size ---------------------------------------------------------------------


async def test_injected_413_is_message_too_large(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await _inject(admin, status=413)
    with pytest.raises(MessageTooLarge) as raised:
        await _send(client)
    assert raised.value.status == 413


async def test_body_and_ext_above_five_kb_is_message_too_large_14007(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    with pytest.raises(MessageTooLarge) as raised:
        await client.send_text("users", sender="ai_bot", to="alice", text="长" * 1800)  # 5.4 KB
    assert (raised.value.status, raised.value.code) == (400, "14007")
    assert await _delivered(admin, "alice") == []
    await client.send_text("users", sender="ai_bot", to="alice", text="长" * 1000)  # 3 KB fits


async def test_size_limit_answered_with_413_like_older_clusters(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await _inject(admin, max_message_bytes=100, oversize_status=413)
    with pytest.raises(MessageTooLarge) as raised:
        await client.send_text("users", sender="ai_bot", to="alice", text="x" * 200)
    assert raised.value.status == 413


# -- server errors, timeouts ----------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
async def test_server_errors_are_retryable(
    client: EasemobClient, admin: httpx.AsyncClient, status: int
) -> None:
    await _inject(admin, status=status)
    with pytest.raises(RetryableError) as raised:
        await _send(client)
    assert raised.value.status == status


async def test_slow_answer_past_the_client_timeout_is_retryable(
    simulator: str, admin: httpx.AsyncClient
) -> None:
    async with _client(simulator, timeout=0.2) as client:
        await _send(client)  # token first, quickly
        await _inject(admin, delay_ms=500)
        started = time.monotonic()
        with pytest.raises(RetryableError, match="timed out"):
            await _send(client)
        assert time.monotonic() - started < 0.45


async def test_unreachable_easemob_is_retryable() -> None:
    async with _client("http://127.0.0.1:9") as client:
        with pytest.raises(RetryableError):
            await _send(client)


# -- bad requests -----------------------------------------------------------------


async def test_400_is_fatal_bad_request_with_easemobs_reason(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await _inject(
        admin, status=400, error="message_send_error", description="param to can't be empty"
    )
    with pytest.raises(FatalError) as raised:
        await _send(client)
    assert not isinstance(raised.value, MessageTooLarge)
    assert raised.value.reason == "bad_request"
    assert "param to can't be empty" in str(raised.value)


async def test_a_real_validation_error_is_fatal(client: EasemobClient) -> None:
    with pytest.raises(FatalError) as raised:
        await client.send_text("users", sender="", to="alice", text="hi")
    assert raised.value.reason == "bad_request"
    assert "param from can't be empty" in str(raised.value)


async def test_404_is_fatal_not_found(client: EasemobClient, admin: httpx.AsyncClient) -> None:
    await _inject(admin, status=404)
    with pytest.raises(FatalError) as raised:
        await _send(client)
    assert raised.value.reason == "not_found"
    assert "Service resource not found" in str(raised.value)


async def test_no_error_carries_the_token_or_the_secret(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    token = await client.token()
    errors: list[Exception] = []
    for status in (400, 401, 403, 404, 413, 429, 500):
        await _inject(admin, status=status, count=2)
        with pytest.raises(Exception) as raised:  # noqa: PT011 - every class, checked below
            await _send(client)
        errors.append(raised.value)
    await _inject(admin, delay_ms=0)
    for error in errors:
        text = f"{error} {error!r} {getattr(error, 'raw', '')}"
        assert token not in text
        assert CLIENT_SECRET not in text
