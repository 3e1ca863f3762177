"""Database errors never put user text into logs or DLQ records.

SQLAlchemy's error message carries the bound parameters (user questions, bot answers)
unless the engine hides them, and PostgreSQL's own message can quote the failing row.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from imbot.core import topics
from imbot.core.envelope import ChatType, Content, DlqRecord, Envelope, Reply, encode_envelope
from imbot.core.kafka import ensure_topics, new_producer
from imbot.core.settings import Settings
from imbot.devtools.broker import consume_all
from imbot.sender.service import ReplySender
from imbot.storage import Storage, describe_db_error, open_storage
from imbot.streams.boundary import Boundary, Outputs
from imbot.streams.stages import Resources, Send
from tests.integration.conftest import new_easemob_client
from tests.integration.test_sender_claims import _delivered


def _everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    """Every message, extra field and traceback the handlers were given."""
    formatter = logging.Formatter()
    return "\n".join(
        repr(record.__dict__)
        + (formatter.formatException(record.exc_info) if record.exc_info else "")
        for record in caplog.records
    )


async def test_engine_errors_carry_no_bound_parameters(db_url: str) -> None:
    marker = f"MARKER{uuid.uuid4().hex}"
    store = await open_storage(db_url)
    try:
        async with store.database.engine.connect() as conn:
            await conn.execute(text("CREATE TEMP TABLE privacy_probe (k INTEGER UNIQUE, v TEXT)"))
            insert = text("INSERT INTO privacy_probe (k, v) VALUES (1, :v)")
            await conn.execute(insert, {"v": "first"})
            with pytest.raises(IntegrityError) as raised:
                await conn.execute(insert, {"v": marker})
    finally:
        await store.close()
    assert marker not in str(raised.value)
    description = describe_db_error(raised.value)
    assert marker not in description
    assert description.startswith("IntegrityError")


@pytest.fixture
async def pg_store(pg_url: str) -> AsyncIterator[Storage]:
    s = await open_storage(pg_url)
    yield s
    await s.close()


async def test_a_database_error_in_a_stage_leaves_no_user_text_in_logs_or_the_dlq(
    make_settings: Callable[..., Settings],
    simulator: str,
    pg_store: Storage,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL refuses the history row (a constraint quoting the failing row)."""
    marker = f"MARKER{uuid.uuid4().hex}"
    constraint = f"ck_probe_{uuid.uuid4().hex[:8]}"
    async with pg_store.database.engine.begin() as conn:
        await conn.execute(
            text(
                f"ALTER TABLE messages ADD CONSTRAINT {constraint}"
                f" CHECK (position('{marker}' in text) = 0)"
            )
        )
    settings = make_settings(stage_retry_base_s=0.01, stage_retry_max_s=0.05)
    await ensure_topics(settings)
    sender = ReplySender(new_easemob_client(simulator), pg_store.deliveries)
    stage = Send.build(Resources(settings, sender=sender))
    producer = new_producer(settings)
    await producer.start()
    user = f"u{uuid.uuid4().hex[:8]}"
    env = Envelope(
        msg_id=uuid.uuid4().hex,
        conversation_id=f"chat:ai_bot:{user}",
        chat_type=ChatType.direct,
        sender=user,
        to="ai_bot",
        bot="ai_bot",
        content=Content(type="txt", text=f"我的问题 {marker}"),
        reply=Reply(text="回答"),
    )
    try:
        boundary = Boundary(stage, Outputs(settings, producer), settings)
        with caplog.at_level(logging.INFO):  # what production logs
            outcome = await boundary.process(
                env.conversation_id.encode(), encode_envelope(env), "outbound", 0, 7
            )
        records = await consume_all(
            settings.kafka_bootstrap, settings.topic(topics.DLQ), 1, timeout=5
        )
    finally:
        await producer.stop()
        await sender.aclose()
        async with pg_store.database.engine.begin() as conn:
            await conn.execute(text(f"ALTER TABLE messages DROP CONSTRAINT {constraint}"))
    assert outcome == "fatal"
    [record] = [DlqRecord.model_validate_json(v) for _, v in records if v]
    assert marker not in record.error
    assert record.error.startswith("IntegrityError")
    assert f"constraint={constraint}" in record.error  # still says what went wrong
    logged = _everything_logged(caplog)
    assert "database error, to DLQ" in logged
    assert marker not in logged
    # The reply reached the user once; its ledger row was committed before the history.
    assert len(await _delivered(simulator, user)) == 1
    assert [row.status for row in (await pg_store.deliveries.ledger(env.msg_id)).values()] == [
        "sent"
    ]
