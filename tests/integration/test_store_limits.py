"""The schema holds the longest values the pipeline admits, and nothing the sender writes
after Easemob accepted a reply can fail on the data (SQLite and PostgreSQL).

A write that fails after Easemob's acceptance sends the record to the DLQ without a
ledger row, and replaying it shows the user the reply a second time.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import inspect, select

from imbot.core.envelope import (
    ChatType,
    Completion,
    Content,
    Envelope,
    Reply,
    ReplyKind,
    conversation_id,
)
from imbot.core.errors import FatalError
from imbot.core.limits import GROUP_ID_MAX, MSG_ID_MAX, USER_ID_MAX
from imbot.sender.easemob import EasemobClient
from imbot.sender.service import ReplySender, fallback_ledger_id
from imbot.storage import Storage, open_storage
from imbot.storage.schema import ConversationRow, DeliveryRow, MessageRow, UsageRow
from tests.rows import count_rows


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Storage]:
    s = await open_storage(db_url)
    yield s
    await s.close()


async def _delivered(simulator: str, to: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        resp = await http.get(f"{simulator}/_sim/messages", params={"to": to})
        return list(resp.json()["messages"])


def _longest(n: int, tag: str) -> str:
    """A unique id of exactly ``n`` characters."""
    head = f"{tag}{uuid.uuid4().hex}"
    return (head + "x" * n)[:n]


def _env(
    *,
    msg_id: str,
    user: str,
    bot: str,
    group: str | None = None,
    reply: str = "回答",
    kind: ReplyKind = "answer",
    question: str = "问题",
) -> Envelope:
    chat_type = ChatType.group if group else ChatType.direct
    return Envelope(
        msg_id=msg_id,
        conversation_id=conversation_id(chat_type, bot=bot, sender=user, group_id=group),
        chat_type=chat_type,
        sender=user,
        to=group or bot,
        bot=bot,
        content=Content(type="txt", text=question),
        reply=Reply(text=reply, kind=kind),
    )


async def _column_lengths(store: Storage) -> dict[tuple[str, str], int | None]:
    """String column lengths as the migrated database has them (not the models)."""

    def read(sync_conn: Any) -> dict[tuple[str, str], int | None]:
        inspector = inspect(sync_conn)
        return {
            (table, column["name"]): getattr(column["type"], "length", None)
            for table in inspector.get_table_names()
            for column in inspector.get_columns(table)
        }

    async with store.database.engine.connect() as conn:
        return await conn.run_sync(read)


async def test_the_migrated_columns_hold_the_longest_admitted_and_derived_ids(
    store: Storage,
) -> None:
    lengths = await _column_lengths(store)
    longest_account = max(USER_ID_MAX, GROUP_ID_MAX)
    longest_conversation = max(
        len(conversation_id(ChatType.direct, bot="b" * USER_ID_MAX, sender="u" * USER_ID_MAX,
                            group_id=None)),
        len(conversation_id(ChatType.chatroom, bot="b", sender="u", group_id="g" * GROUP_ID_MAX)),
    )  # fmt: skip
    longest_msg_id = max(
        len(f"{'m' * MSG_ID_MAX}:reply"), len(fallback_ledger_id("m" * MSG_ID_MAX))
    )
    needs = {
        ("messages", "msg_id"): longest_msg_id,
        ("messages", "reply_to"): MSG_ID_MAX,
        ("messages", "author"): longest_account,
        ("messages", "conversation_id"): longest_conversation,
        ("conversations", "id"): longest_conversation,
        ("conversations", "bot"): USER_ID_MAX,
        ("deliveries", "msg_id"): longest_msg_id,
        ("deliveries", "target"): longest_account,
        ("deliveries", "easemob_msg_id"): 64,  # Easemob's ids are ~19 digits
        ("usage", "msg_id"): MSG_ID_MAX,
        ("usage", "conversation_id"): longest_conversation,
        # e.g. "accounts/fireworks/models/llama-v3p1-405b-instruct" (longer ones are clipped)
        ("usage", "model"): 80,
        ("usage", "provider"): 32,
        ("moderation_audit", "msg_id"): MSG_ID_MAX,
    }
    # Margin: at least the longest value and a half again (the sizes are not tight).
    too_small = {
        where: (lengths.get(where), need)
        for where, need in needs.items()
        if (lengths.get(where) or 0) < need * 3 // 2
    }
    assert too_small == {}


async def test_the_longest_admitted_ids_are_delivered_once_with_ledger_history_and_usage(
    client: EasemobClient, simulator: str, store: Storage
) -> None:
    sender = ReplySender(client, store.deliveries)
    user, bot = _longest(USER_ID_MAX, "u"), _longest(USER_ID_MAX, "b")
    group = _longest(GROUP_ID_MAX, "9")
    for env in (
        _env(msg_id=_longest(MSG_ID_MAX, "d"), user=user, bot=bot),
        _env(msg_id=_longest(MSG_ID_MAX, "g"), user=user, bot=bot, group=group),
        _env(msg_id=_longest(MSG_ID_MAX, "f"), user=user, bot=bot, kind="fallback"),
    ):
        completion = Completion(
            text="回答", finish_reason="stop", model="m" * 128, provider="p" * 64,
            input_tokens=3, output_tokens=4, cost=0.1, currency="CNY",
        )  # fmt: skip
        await store.usage.record_usage(env, completion)
        first = await sender.deliver(env, deadline=time.monotonic() + 10)
        again = await sender.deliver(env, deadline=time.monotonic() + 10)
        assert (first.duplicate, again.duplicate) == (False, True)
        ledger_id = env.msg_id if env.reply and env.reply.kind != "fallback" else None
        ledger = await store.deliveries.ledger(ledger_id or fallback_ledger_id(env.msg_id))
        assert [row.status for row in ledger.values()] == ["sent"]
        assert await count_rows(store.database, MessageRow, msg_id=env.msg_id) == 1
        assert await count_rows(store.database, MessageRow, msg_id=f"{env.msg_id}:reply") == 1
        assert await count_rows(store.database, ConversationRow, id=env.conversation_id) == 1
        assert await count_rows(store.database, UsageRow, msg_id=env.msg_id) == 1
    assert len(await _delivered(simulator, user)) == 2
    assert len(await _delivered(simulator, group)) == 1


async def test_a_record_from_before_the_gateway_limits_is_delivered_once(
    client: EasemobClient, simulator: str, store: Storage
) -> None:
    """An id longer than the old columns (80) but under the new ones: one reply, not two."""
    sender = ReplySender(client, store.deliveries)
    env = _env(msg_id=_longest(100, "old"), user=_longest(70, "u"), bot="ai_bot")
    await sender.deliver(env, deadline=time.monotonic() + 10)
    # The record is seen again (a replay): nothing more is sent.
    assert (await sender.deliver(env, deadline=time.monotonic() + 10)).duplicate
    assert len(await _delivered(simulator, env.sender)) == 1
    assert await count_rows(store.database, DeliveryRow, msg_id=env.msg_id) == 1
    assert await count_rows(store.database, MessageRow, msg_id=f"{env.msg_id}:reply") == 1


async def test_ids_the_database_cannot_hold_are_refused_before_anything_is_sent(
    client: EasemobClient, simulator: str, store: Storage
) -> None:
    sender = ReplySender(client, store.deliveries)
    user = _longest(20, "u")
    for env in (
        _env(msg_id=_longest(300, "m"), user=user, bot="ai_bot"),
        _env(msg_id=uuid.uuid4().hex, user=user, bot=_longest(200, "b")),
        _env(msg_id=uuid.uuid4().hex, user=user, bot="ai_bot", group=_longest(200, "g")),
    ):
        with pytest.raises(FatalError) as raised:
            await sender.deliver(env, deadline=time.monotonic() + 10)
        assert raised.value.reason == "bad_request"
    assert await _delivered(simulator, user) == []


async def test_nul_characters_in_the_texts_do_not_fail_the_history(
    client: EasemobClient, simulator: str, store: Storage
) -> None:
    """PostgreSQL refuses NUL in text columns; the question and the reply still go in."""
    sender = ReplySender(client, store.deliveries)
    env = _env(
        msg_id=uuid.uuid4().hex, user=_longest(20, "u"), bot="ai_bot",
        question="问\x00题", reply="回\x00答",
    )  # fmt: skip
    await sender.deliver(env, deadline=time.monotonic() + 10)
    assert (await sender.deliver(env, deadline=time.monotonic() + 10)).duplicate
    assert len(await _delivered(simulator, env.sender)) == 1
    async with store.database.engine.connect() as conn:
        texts = (
            await conn.execute(
                select(MessageRow.text)
                .where(MessageRow.conversation_id == env.conversation_id)
                .order_by(MessageRow.id)
            )
        ).scalars()
        assert list(texts) == ["问\ufffd题", "回\ufffd答"]


async def test_long_model_names_from_a_provider_are_accounted(store: Storage) -> None:
    """The model name is what the provider answered: free text, clipped, never lost."""
    env = _env(msg_id=uuid.uuid4().hex, user="alice", bot="ai_bot")
    completion = Completion(
        text="回答", finish_reason="stop", model="vendor/" + "m" * 300, provider="p" * 100,
        input_tokens=3, output_tokens=4, cost=0.1, currency="CNY-LONGER",
    )  # fmt: skip
    await store.usage.record_usage(env, completion)
    async with store.database.engine.connect() as conn:
        model, provider = (
            await conn.execute(
                select(UsageRow.model, UsageRow.provider).where(UsageRow.msg_id == env.msg_id)
            )
        ).one()
    assert (model, provider) == (completion.model[:128], "p" * 64)
