"""ReplySender against the Easemob simulator over real HTTP, with the real ledger."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from core.envelope import ChatType, Content, Envelope, Reply
from core.errors import ConfigurationError, FatalError, RetryableError
from core.kafka import free_port
from sender.easemob import EasemobClient, MessageTooLarge
from sender.service import ReplySender
from sender.split import split_reply
from sender.store import Store
from simulator.app import SimulatorConfig, serve


@pytest.fixture
async def simulator() -> AsyncIterator[str]:
    config = SimulatorConfig(port=free_port())
    runner: web.AppRunner = await serve(config)
    yield f"http://127.0.0.1:{config.port}"
    await runner.cleanup()


@pytest.fixture
async def client(simulator: str) -> AsyncIterator[EasemobClient]:
    c = EasemobClient(
        base_url=simulator,
        org="demo-org",
        app="demo-app",
        client_id="dev-client",
        client_secret="dev-client-secret",
    )
    yield c
    await c.aclose()


async def _inject(simulator: str, **body: Any) -> None:
    async with httpx.AsyncClient() as http:
        (await http.post(f"{simulator}/_sim/inject", json=body)).raise_for_status()


async def _delivered(simulator: str, to: str | None = None) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        params = {"to": to} if to else {}
        return list(
            (await http.get(f"{simulator}/_sim/messages", params=params)).json()["messages"]
        )


def _env(
    reply: str, *, chat_type: ChatType = ChatType.direct, msg_id: str | None = None
) -> Envelope:
    group = chat_type is not ChatType.direct
    return Envelope(
        msg_id=msg_id or uuid.uuid4().hex,
        conversation_id="group:g1" if group else "chat:ai_bot:alice",
        chat_type=chat_type,
        sender="alice",
        to="g1" if group else "ai_bot",
        bot="ai_bot",
        content=Content(type="txt", text="问题"),
        reply=Reply(text=reply),
    )


async def test_send_text_returns_the_new_message_id(client: EasemobClient, simulator: str) -> None:
    msg_id = await client.send_text("users", sender="ai_bot", to="alice", text="你好", ext={"k": 1})
    [message] = await _delivered(simulator, "alice")
    assert message["id"] == msg_id
    assert (message["from"], message["body"], message["ext"]) == (
        "ai_bot",
        {"msg": "你好"},
        {"k": 1},
    )


async def test_token_is_fetched_once_for_concurrent_sends(
    client: EasemobClient, simulator: str
) -> None:
    import asyncio

    await asyncio.gather(
        *(client.send_text("users", sender="ai_bot", to=f"u{i}", text="hi") for i in range(50))
    )
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{simulator}/_sim/messages")).json()["token_requests"] == 1


async def test_expired_token_is_refreshed_once(client: EasemobClient, simulator: str) -> None:
    await client.send_text("users", sender="ai_bot", to="alice", text="one")
    await _inject(simulator, expire_tokens=True)
    await client.send_text("users", sender="ai_bot", to="alice", text="two")
    assert len(await _delivered(simulator, "alice")) == 2


@pytest.mark.parametrize(
    ("status", "description", "error"),
    [
        (429, None, RetryableError),
        (503, None, RetryableError),
        (403, "message send reach limit", RetryableError),
        (413, None, MessageTooLarge),
        (400, "message is too large", MessageTooLarge),
        (400, "param to can't be empty", FatalError),
        (404, None, FatalError),
        (403, "Service operation not allowed", FatalError),
    ],
)
async def test_each_response_class_maps_to_its_error(
    client: EasemobClient,
    simulator: str,
    status: int,
    description: str | None,
    error: type[Exception],
) -> None:
    await _inject(simulator, status=status, description=description)
    with pytest.raises(error) as raised:
        await client.send_text("users", sender="ai_bot", to="alice", text="hi")
    if status == 403 and description == "message send reach limit":
        assert isinstance(raised.value, RetryableError)
        assert (raised.value.retry_after or 0) >= 1
    if error is FatalError:
        assert not isinstance(raised.value, MessageTooLarge)


async def test_bad_credentials_are_a_configuration_error(simulator: str) -> None:
    bad = EasemobClient(
        base_url=simulator, org="demo-org", app="demo-app", client_id="x", client_secret="nope"
    )
    try:
        with pytest.raises(ConfigurationError) as raised:
            await bad.send_text("users", sender="ai_bot", to="alice", text="hi")
        assert "nope" not in str(raised.value)
    finally:
        await bad.aclose()


async def test_reply_is_delivered_once_even_when_the_record_repeats(
    client: EasemobClient, simulator: str, db_url: str
) -> None:
    store = await Store.open(db_url)
    sender = ReplySender(client, store)
    try:
        env = _env("这是回答")
        first = await sender.deliver(env, deadline=time.monotonic() + 10)
        again = await sender.deliver(env, deadline=time.monotonic() + 10)
        assert (first.parts, first.duplicate, again.duplicate) == (1, False, True)
        assert first.easemob_msg_ids == again.easemob_msg_ids
        assert len(await _delivered(simulator, "alice")) == 1
    finally:
        await store.close()


async def test_group_reply_mentions_the_asker(
    client: EasemobClient, simulator: str, sqlite_url: str
) -> None:
    store = await Store.open(sqlite_url)
    try:
        await ReplySender(client, store).deliver(
            _env("总结", chat_type=ChatType.group), deadline=time.monotonic() + 10
        )
        [message] = await _delivered(simulator, "g1")
        assert message["kind"] == "chatgroups"
        assert message["ext"]["em_at_list"] == ["alice"]
    finally:
        await store.close()


async def test_long_reply_is_split_sent_in_order_and_resumed_after_a_failure(
    client: EasemobClient, simulator: str, sqlite_url: str
) -> None:
    store = await Store.open(sqlite_url)
    sender = ReplySender(client, store)
    text = "".join(f"第{i}句话，内容比较长一些。" for i in range(700))  # ~10,000 characters
    env = _env(text)
    try:
        parts = split_reply(text, 3000)
        assert len(parts) > 3
        # The third part fails with a server error: the first two are sent and recorded...
        await _inject(simulator, status=500, after=2)
        with pytest.raises(RetryableError):
            await sender.deliver(env, deadline=time.monotonic() + 10)
        assert len(await _delivered(simulator, "alice")) == 2
        # ...and the retry resumes from the first unsent part.
        result = await sender.deliver(env, deadline=time.monotonic() + 10)
        delivered = await _delivered(simulator, "alice")
        assert result.parts == len(parts)
        assert [m["ext"]["imbot_part"] for m in delivered] == list(range(len(parts)))
        assert "".join(m["body"]["msg"] for m in delivered) == text
    finally:
        await store.close()
