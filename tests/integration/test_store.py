"""History, ledger and audit on real SQLite and real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import insert, text

from imbot.core.envelope import ChatType, Completion, Content, Envelope, Verdict, conversation_id
from imbot.core.errors import ConfigurationError, StorageError
from imbot.storage import AuditEntry, HistoryWindow, Storage, open_storage
from imbot.storage.schema import DeliveryRow, MessageRow, ModerationAuditRow, UsageRow, utcnow
from tests.rows import DeliveryTarget, count_rows


def _env(conv: str, n: int, text_: str = "问题") -> Envelope:
    return Envelope(
        msg_id=f"{conv}-{n}",
        conversation_id=conv,
        chat_type=ChatType.direct,
        sender="alice",
        to="ai_bot",
        bot="ai_bot",
        content=Content(type="txt", text=f"{text_}{n}"),
        completion=Completion(
            text=f"回答{n}",
            finish_reason="stop",
            model="demo",
            provider="demo",
            input_tokens=3,
            output_tokens=4,
        ),
    )


def _completion(env: Envelope) -> Completion:
    """The model call's result that ``_env`` always gives an envelope."""
    assert env.completion is not None
    return env.completion


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Storage]:
    s = await open_storage(db_url)
    yield s
    await s.close()


async def test_exchange_is_recorded_once_and_read_back_as_history(store: Storage) -> None:
    conv = conversation_id(
        ChatType.direct, bot="ai_bot", sender=f"u{uuid.uuid4().hex[:8]}", group_id=None
    )
    for n in range(3):
        env = _env(conv, n)
        await store.deliveries.record_exchange(env, f"回答{n}", reply_kind="answer")
        await store.deliveries.record_exchange(
            env, f"回答{n}", reply_kind="answer"
        )  # redelivered: no new rows
    assert await count_rows(store.database, MessageRow, conversation_id=conv) == 6
    window = await store.history.history_window(conv, turns=4, token_budget=1000)
    assert [(t.role, t.content) for t in window] == [
        ("user", "问题1"),
        ("assistant", "回答1"),
        ("user", "问题2"),
        ("assistant", "回答2"),
    ]


async def test_usage_is_recorded_once_per_answered_message(store: Storage) -> None:
    conv = f"chat:ai_bot:{uuid.uuid4().hex[:8]}"
    env = _env(conv, 1)
    assert env.completion is not None
    await store.usage.record_usage(env, env.completion)
    await store.usage.record_usage(env, env.completion)  # the model stage saw the record twice
    assert await count_rows(store.database, UsageRow, conversation_id=conv) == 1


async def test_only_exchanges_the_model_answered_are_history(store: Storage) -> None:
    """A blocked or rejected question must never reach a model later as context."""
    conv = f"chat:ai_bot:{uuid.uuid4().hex[:8]}"
    await store.deliveries.record_exchange(_env(conv, 0), "回答0", reply_kind="answer")
    await store.deliveries.record_exchange(
        _env(conv, 1, "违禁"), "抱歉，这个问题我无法回答。", reply_kind="blocked_input"
    )
    await store.deliveries.record_exchange(_env(conv, 2, "危险"), "抱歉。", reply_kind="rejected")
    await store.deliveries.record_exchange(_env(conv, 3), "请稍后再试", reply_kind="fallback")
    await store.deliveries.record_exchange(_env(conv, 4), "回答4", reply_kind="answer")
    window = await store.history.history_window(conv, turns=10, token_budget=1000)
    assert [t.content for t in window] == ["问题0", "回答0", "问题4", "回答4"]


async def test_cleared_history_is_left_out_of_later_windows(store: Storage) -> None:
    conv = f"chat:ai_bot:{uuid.uuid4().hex[:8]}"
    for n in range(2):
        await store.deliveries.record_exchange(_env(conv, n), f"回答{n}", reply_kind="answer")
    await store.history.clear_history(conv)  # a provider judged the conversation risky
    await store.deliveries.record_exchange(_env(conv, 2), "回答2", reply_kind="answer")
    window = await store.history.history_window(conv, turns=10, token_budget=1000)
    assert [t.content for t in window] == ["问题2", "回答2"]
    assert (
        await count_rows(store.database, MessageRow, conversation_id=conv) == 6
    )  # rows stay, for audit


async def test_concurrent_usage_rows_are_all_written_once(store: Storage) -> None:
    """Many model calls finishing together: group-committed, none lost or doubled."""
    conv = f"chat:ai_bot:{uuid.uuid4().hex[:8]}"
    envs = [_env(conv, n) for n in range(50)]
    await asyncio.gather(
        *(store.usage.record_usage(e, _completion(e)) for e in envs for _ in range(2))
    )
    assert await count_rows(store.database, UsageRow, conversation_id=conv) == 50


async def test_a_failed_usage_commit_fails_its_callers_who_can_retry(store: Storage) -> None:
    conv = f"chat:ai_bot:{uuid.uuid4().hex[:8]}"
    good = _env(conv, 1)
    assert good.completion is not None
    bad = good.completion.model_copy(update={"model": None})  # NOT NULL column
    results = await asyncio.gather(
        store.usage.record_usage(_env(conv, 2), bad),
        store.usage.record_usage(good, good.completion),
        return_exceptions=True,
    )
    # Our error, not SQLAlchemy's: fatal (no retry cures it), named by the driver's class.
    assert isinstance(results[0], StorageError)
    assert results[0].kind == "IntegrityError"
    # It shared the failed commit, and was written on its own: no error for it.
    assert results[1] is None
    assert await count_rows(store.database, UsageRow, conversation_id=conv) == 1


async def test_one_unstorable_history_row_does_not_fail_the_others_in_its_commit(
    pg_url: str,
) -> None:
    """Deliveries finishing together share the history's commits; one that the
    database refuses (an id longer than its column, on PostgreSQL) fails alone."""
    store = await open_storage(pg_url)
    try:
        conv = f"chat:ai_bot:{uuid.uuid4().hex[:8]}"
        good = [_env(conv, n) for n in range(8)]
        bad = _env(conv, 99).model_copy(update={"msg_id": "9" * 300})
        results = await asyncio.gather(
            *(
                store.deliveries.record_exchange(e, "回答", reply_kind="answer")
                for e in [*good[:4], bad, *good[4:]]
            ),
            return_exceptions=True,
        )
        assert isinstance(results[4], StorageError)
        assert [r for i, r in enumerate(results) if i != 4] == [None] * 8
        for e in good:
            assert await count_rows(store.database, MessageRow, msg_id=e.msg_id) == 1
    finally:
        await store.close()


async def test_history_respects_the_token_budget(store: Storage) -> None:
    conv = f"chat:ai_bot:{uuid.uuid4().hex[:8]}"
    for n in range(3):
        await store.deliveries.record_exchange(_env(conv, n, "长" * 50), "短", reply_kind="answer")
    window = await store.history.history_window(conv, turns=10, token_budget=60)
    # newest first until the budget is spent: the last answer (4 tokens) and question (51)
    assert [t.content for t in window] == ["长" * 50 + "2", "短"]


async def test_masked_text_is_what_history_keeps(store: Storage) -> None:
    conv = f"chat:ai_bot:{uuid.uuid4().hex[:8]}"
    env = _env(conv, 1).model_copy(
        update={
            "moderation_in": Verdict(
                action="mask", text="我的电话是[手机号]", categories=("pii.mobile",)
            )
        }
    )
    await store.deliveries.record_exchange(env, "好的", reply_kind="answer")
    window = await store.history.history_window(conv, turns=2, token_budget=100)
    assert window[0].content == "我的电话是[手机号]"


async def test_ledger_records_attempts_and_sent_parts(store: Storage) -> None:
    msg_id = uuid.uuid4().hex
    where: DeliveryTarget = {"parts": 2, "target_kind": "users", "target": "alice"}
    await store.deliveries.mark_failed(msg_id, 0, "429 reach_limit", final=False, **where)
    await store.deliveries.mark_sent(
        msg_id, 0, "1029457500870543736", end_offset=1000, reply_digest="d1", **where
    )
    # a late duplicate of the failure cannot undo a sent part
    await store.deliveries.mark_failed(msg_id, 0, "timeout", final=False, **where)
    await store.deliveries.mark_failed(msg_id, 1, "400 bad request", final=True, **where)
    ledger = await store.deliveries.ledger(msg_id)
    assert (ledger[0].status, ledger[0].easemob_msg_id, ledger[0].attempts) == (
        "sent",
        "1029457500870543736",
        2,
    )
    assert (ledger[0].end_offset, ledger[0].reply_digest) == (1000, "d1")
    assert (ledger[1].status, ledger[1].attempts) == ("failed", 1)
    assert await count_rows(store.database, DeliveryRow, msg_id=msg_id) == 2


async def test_audit_entries_are_idempotent(store: Storage) -> None:
    msg_id = uuid.uuid4().hex
    entries = [
        AuditEntry("pii", "mobile", "pii.mobile", "mask"),
        AuditEntry("lexicon", "w1", "violence", "block"),
    ]
    await store.audit.record_audit(msg_id, "input", entries)
    await store.audit.record_audit(msg_id, "input", entries)
    assert await count_rows(store.database, ModerationAuditRow, msg_id=msg_id) == 2


async def test_history_query_uses_the_conversation_index_on_postgres(pg_url: str) -> None:
    """The router's query on a populated table: an index range scan, not a table scan."""
    store = await open_storage(pg_url)
    tag = uuid.uuid4().hex[:8]
    conversations = [f"chat:ai_bot:{tag}-{c}" for c in range(400)]
    try:
        async with store.database.engine.begin() as conn:
            for c in conversations:
                await conn.execute(
                    text(
                        "INSERT INTO conversations (id, chat_type, bot, created_at, last_message_at)"
                        " VALUES (:id, 'chat', 'ai_bot', now(), now())"
                    ),
                    {"id": c},
                )
            await conn.execute(
                insert(MessageRow),
                [
                    {
                        "msg_id": f"{tag}-{n}",
                        "conversation_id": conversations[n % len(conversations)],
                        "role": "user" if (n // 400) % 2 == 0 else "assistant",
                        "author": "alice",
                        "text": f"消息{n}",
                        "kind": "answer",
                        "created_at": utcnow(),
                    }
                    for n in range(20_000)
                ],
            )
            await conn.execute(text("ANALYZE messages"))
        query = HistoryWindow.history_query(conversations[7], 11).compile(
            dialect=store.database.engine.dialect, compile_kwargs={"literal_binds": True}
        )
        async with store.database.engine.connect() as conn:
            plan = (await conn.execute(text(f"EXPLAIN {query}"))).scalars().all()
        assert any(
            "Index Scan Backward using ix_messages_conversation_id_id" in line for line in plan
        ), plan
        assert not any("Seq Scan" in line for line in plan), plan
        window = await store.history.history_window(conversations[7], turns=4, token_budget=10_000)
        assert [t.content for t in window] == [f"消息{n}" for n in (18407, 18807, 19207, 19607)]
    finally:
        await store.close()


async def test_unmigrated_database_is_refused_with_a_clear_message(tmp_path: object) -> None:
    with pytest.raises(ConfigurationError, match="imbot migrate"):
        await open_storage(f"sqlite+aiosqlite:///{tmp_path}/empty.db")


async def test_a_demo_model_s_turns_are_left_out_of_a_real_model_s_window(store: Storage) -> None:
    """After a first `make dev` with the demo model, a real provider must not be shown the
    demo's canned answers as the conversation so far."""
    conv = conversation_id(
        ChatType.direct, bot="ai_bot", sender=f"u{uuid.uuid4().hex[:8]}", group_id=None
    )
    demo = _env(conv, 0)  # answered by the demo model (provider "demo")
    real = _env(conv, 1).model_copy(
        update={
            "completion": Completion(
                text="真回答", finish_reason="stop", model="qwen-plus", provider="dashscope"
            )
        }
    )
    await store.deliveries.record_exchange(demo, "【演示模型 demo】…", reply_kind="answer")
    await store.deliveries.record_exchange(real, "真回答", reply_kind="answer")
    everything = await store.history.history_window(conv, turns=10, token_budget=1000)
    assert [t.content for t in everything] == ["问题0", "【演示模型 demo】…", "问题1", "真回答"]
    for_real = await store.history.history_window(
        conv, turns=10, token_budget=1000, skip_providers=frozenset({"demo"})
    )
    assert [t.content for t in for_real] == ["问题1", "真回答"]
