"""ReplySender against the Easemob simulator over real HTTP, with the real ledger."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from imbot.core.envelope import ChatType, Content, Envelope, Reply, ReplyKind
from imbot.core.errors import ConfigurationError, FatalError, RetryableError
from imbot.sender.easemob import EasemobClient, MessageTooLarge
from imbot.sender.service import ReplySender
from imbot.sender.split import split_reply
from imbot.sender.targets import reply_digest
from imbot.storage import Storage, open_storage
from tests.integration.conftest import new_easemob_client
from tests.rows import count_rows


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Storage]:
    s = await open_storage(db_url)
    yield s
    await s.close()


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
    async with new_easemob_client(simulator, client_id="x", client_secret="nope") as bad:
        with pytest.raises(ConfigurationError) as raised:
            await bad.send_text("users", sender="ai_bot", to="alice", text="hi")
    assert "nope" not in str(raised.value)


async def test_reply_is_delivered_once_even_when_the_record_repeats(
    client: EasemobClient, simulator: str, store: Storage
) -> None:
    sender = ReplySender(client, store.deliveries)
    env = _env("这是回答")
    first = await sender.deliver(env, deadline=time.monotonic() + 10)
    again = await sender.deliver(env, deadline=time.monotonic() + 10)
    assert (first.parts, first.duplicate, again.duplicate) == (1, False, True)
    assert first.easemob_msg_ids == again.easemob_msg_ids
    assert len(await _delivered(simulator, "alice")) == 1


async def test_group_reply_mentions_the_asker(
    client: EasemobClient, simulator: str, store: Storage
) -> None:
    await ReplySender(client, store.deliveries).deliver(
        _env("总结", chat_type=ChatType.group), deadline=time.monotonic() + 10
    )
    [message] = await _delivered(simulator, "g1")
    assert message["kind"] == "chatgroups"
    assert message["ext"]["em_at_list"] == ["alice"]


async def test_long_reply_is_split_sent_in_order_and_resumed_after_a_failure(
    client: EasemobClient, simulator: str, store: Storage
) -> None:
    sender = ReplySender(client, store.deliveries)
    text = "".join(f"第{i}句话，内容比较长一些。" for i in range(700))  # ~10,000 characters
    env = _env(text)
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


async def test_a_part_refused_as_too_large_is_split_further(
    client: EasemobClient, simulator: str, store: Storage
) -> None:
    """Easemob's limit is lower than ours: the refused part goes out as smaller pieces."""
    sender = ReplySender(client, store.deliveries, max_part_bytes=3000)
    text = "".join(f"第{i}句话，内容比较长一些。" for i in range(300))
    env = _env(text)
    await _inject(simulator, max_message_bytes=1800, oversize_status=413)
    result = await sender.deliver(env, deadline=time.monotonic() + 10)
    delivered = await _delivered(simulator, "alice")
    assert "".join(m["body"]["msg"] for m in delivered) == text  # nothing lost, in order
    assert all(len(m["body"]["msg"].encode()) <= 1500 for m in delivered)
    assert [m["ext"]["imbot_part"] for m in delivered] == list(range(len(delivered)))
    assert result.parts == len(delivered)
    # A replay of the record sends nothing more.
    again = await sender.deliver(env, deadline=time.monotonic() + 10)
    assert again.duplicate
    assert len(await _delivered(simulator, "alice")) == len(delivered)


async def test_a_different_reply_to_an_answered_message_is_not_sent(
    client: EasemobClient, simulator: str, store: Storage
) -> None:
    """A replay through the model stage answers again: the user already has an answer."""
    sender = ReplySender(client, store.deliveries)
    msg_id = uuid.uuid4().hex
    await sender.deliver(_env("第一次的回答", msg_id=msg_id), deadline=time.monotonic() + 10)
    second = await sender.deliver(_env("另一个回答", msg_id=msg_id), deadline=time.monotonic() + 10)
    assert second.duplicate
    assert [m["body"]["msg"] for m in await _delivered(simulator, "alice")] == ["第一次的回答"]


async def test_history_is_written_even_when_only_the_retry_gets_there(
    client: EasemobClient, simulator: str, store: Storage
) -> None:
    """Every part was sent before (the history write failed then): the retry completes it."""
    from imbot.storage.schema import MessageRow

    sender = ReplySender(client, store.deliveries)
    env = _env("回答")
    easemob_id = await client.send_text("users", sender="ai_bot", to="alice", text="回答")
    await store.deliveries.mark_sent(
        env.msg_id,
        0,
        easemob_id,
        end_offset=2,
        reply_digest=reply_digest("回答"),
        parts=1,
        target_kind="users",
        target="alice",
    )
    result = await sender.deliver(env, deadline=time.monotonic() + 10)
    assert result.duplicate
    assert len(await _delivered(simulator, "alice")) == 1
    assert await count_rows(store.database, MessageRow, msg_id=env.msg_id) == 1
    assert await count_rows(store.database, MessageRow, msg_id=f"{env.msg_id}:reply") == 1


async def test_a_bad_request_is_fatal_and_recorded_in_the_ledger(
    client: EasemobClient, simulator: str, store: Storage
) -> None:
    sender = ReplySender(client, store.deliveries)
    env = _env("回答")
    await _inject(simulator, status=400, description="param to can't be empty")
    with pytest.raises(FatalError):
        await sender.deliver(env, deadline=time.monotonic() + 10)
    ledger = await store.deliveries.ledger(env.msg_id)
    assert ledger[0].status == "failed"
    assert await _delivered(simulator, "alice") == []


async def test_the_real_answer_after_a_fallback_apology_is_still_delivered(
    client: EasemobClient, simulator: str, store: Storage
) -> None:
    """An outage made a stage answer with the fallback; the DLQ replay brings the answer."""
    from imbot.storage.schema import MessageRow

    sender = ReplySender(client, store.deliveries)
    msg_id = uuid.uuid4().hex

    def env(text: str, kind: ReplyKind) -> Envelope:
        e = _env(text, msg_id=msg_id)
        return e.model_copy(update={"reply": Reply(text=text, kind=kind)})

    deadline = time.monotonic() + 10
    await sender.deliver(env("抱歉，请稍后再试。", "fallback"), deadline=deadline)
    again = await sender.deliver(env("抱歉，请稍后再试。", "fallback"), deadline=deadline)
    await sender.deliver(env("真正的回答", "answer"), deadline=deadline)
    late = await sender.deliver(env("抱歉，请稍后再试。", "fallback"), deadline=deadline)
    assert again.duplicate
    assert late.duplicate
    bodies = [m["body"]["msg"] for m in await _delivered(simulator, "alice")]
    assert bodies[-2:] == ["抱歉，请稍后再试。", "真正的回答"]
    assert bodies.count("抱歉，请稍后再试。") == 1
    # The history the router reads keeps the answer, not the apology.
    async with store.database.engine.connect() as conn:
        from sqlalchemy import select

        row = (
            await conn.execute(
                select(MessageRow.text, MessageRow.kind).where(
                    MessageRow.msg_id == f"{msg_id}:reply"
                )
            )
        ).one()
    assert tuple(row) == ("真正的回答", "answer")


async def test_each_part_sent_is_logged_with_its_ids_and_never_its_text(
    client: EasemobClient, simulator: str, store: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    """A duplicate can be traced from the logs alone: one line per part Easemob accepted."""
    import logging

    text = "".join(f"第{i}句话，内容比较长一些。" for i in range(150))
    parts = split_reply(text, 3000)
    assert len(parts) >= 2
    env = _env(text)
    with caplog.at_level(logging.INFO, logger="imbot.sender"):
        await ReplySender(client, store.deliveries).deliver(env, deadline=time.monotonic() + 10)
    delivered = await _delivered(simulator, "alice")
    lines = [r for r in caplog.records if r.getMessage() == "reply part sent"]
    assert [
        tuple(
            vars(r)[k]
            for k in ("msg_id", "conversation", "part", "parts", "easemob_msg_id", "attempt")
        )
        for r in lines  # the log line's extras
    ] == [
        (env.msg_id, env.conversation_id, i, len(parts), m["id"], 1)
        for i, m in enumerate(delivered)
    ]
    assert not any(part[:20] in repr(r.__dict__) for r in caplog.records for part in parts)
