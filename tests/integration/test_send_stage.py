"""The send stage inside its error boundary: Easemob's response classes end to end.

Real broker (outputs and DLQ), real simulator over HTTP, real ledger on SQLite and
PostgreSQL: what the user receives for each kind of trouble.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from imbot.core import topics
from imbot.core.envelope import DlqRecord, Envelope, Reply, encode_envelope
from imbot.core.kafka import ensure_topics, new_producer
from imbot.core.settings import Settings
from imbot.devtools.broker import consume_all
from imbot.sender.service import ReplySender
from imbot.sender.split import part_end, split_reply
from imbot.sender.targets import reply_digest
from imbot.storage import open_storage
from imbot.streams.boundary import Boundary, Outputs
from imbot.streams.stages import Resources, Send
from tests.envelopes import direct_envelope
from tests.integration.conftest import new_easemob_client


class Harness:
    def __init__(self, boundary: Boundary, settings: Settings, simulator: str) -> None:
        self.boundary = boundary
        self.settings = settings
        self.simulator = simulator

    async def process(self, env: Envelope, offset: int = 0) -> str:
        key = env.conversation_id.encode()
        return await self.boundary.process(key, encode_envelope(env), "outbound", 0, offset)

    async def inject(self, **body: Any) -> None:
        async with httpx.AsyncClient() as http:
            (await http.post(f"{self.simulator}/_sim/inject", json=body)).raise_for_status()

    async def delivered(self, to: str) -> list[dict[str, Any]]:
        async with httpx.AsyncClient() as http:
            resp = await http.get(f"{self.simulator}/_sim/messages", params={"to": to})
            return list(resp.json()["messages"])

    async def dlq(self) -> list[DlqRecord]:
        records = await consume_all(
            self.settings.kafka_bootstrap, self.settings.topic(topics.DLQ), 10, timeout=1
        )
        return [DlqRecord.model_validate_json(v) for _, v in records if v]


@pytest.fixture
async def harness(
    make_settings: Callable[..., Settings], simulator: str, db_url: str
) -> AsyncIterator[Harness]:
    settings = make_settings(stage_retry_base_s=0.01, stage_retry_max_s=0.05, sender_deadline_s=2.0)
    await ensure_topics(settings)
    store = await open_storage(db_url)
    client = new_easemob_client(simulator)
    sender = ReplySender(client, store.deliveries)
    stage = Send.build(Resources(settings, sender=sender))
    producer = new_producer(settings)
    await producer.start()
    try:
        yield Harness(Boundary(stage, Outputs(settings, producer), settings), settings, simulator)
    finally:
        await producer.stop()
        await sender.aclose()
        await store.close()


def _env(text: str, user: str) -> Envelope:
    return direct_envelope("问题", user=user, reply=Reply(text=text))


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 429, "count": 2},
        {"status": 503, "count": 2},
        {"status": 429, "count": 1, "retry_after": "0"},
        {"status": 401, "count": 1},  # token rejected: refreshed once, then sent
    ],
)
async def test_transient_answers_are_retried_and_the_reply_arrives_once(
    harness: Harness, fault: dict[str, Any]
) -> None:
    user = f"u{uuid.uuid4().hex[:8]}"
    await harness.inject(**fault)
    assert await harness.process(_env("回答", user)) == "ok"
    assert [m["body"]["msg"] for m in await harness.delivered(user)] == ["回答"]


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"status": 400, "description": "param to can't be empty"}, "bad_request"),
        ({"status": 404}, "not_found"),
    ],
)
async def test_bad_request_and_not_found_go_to_the_dlq_with_the_reason(
    harness: Harness, fault: dict[str, Any], reason: str
) -> None:
    user = f"u{uuid.uuid4().hex[:8]}"
    env = _env("回答", user)
    await harness.inject(**fault)
    assert await harness.process(env, offset=41) == "fatal"
    [record] = await harness.dlq()
    assert (record.stage, record.msg_id, record.offset) == ("send", env.msg_id, 41)
    assert (record.error_kind, record.reason, record.status) == (
        "FatalError",
        reason,
        fault["status"],
    )
    assert await harness.delivered(user) == []


async def test_easemob_down_past_the_deadline_goes_to_the_dlq_for_replay(
    harness: Harness,
) -> None:
    user = f"u{uuid.uuid4().hex[:8]}"
    await harness.inject(status=503, count=10_000)
    started = time.monotonic()
    assert await harness.process(_env("回答", user)) == "exhausted"
    assert time.monotonic() - started >= 1.5  # kept trying for the sender's deadline
    [record] = await harness.dlq()
    assert record.error_kind == "RetryableError"
    assert record.attempts > 2


async def test_a_crash_between_send_and_record_resends_only_that_part(
    harness: Harness,
) -> None:
    """The state a crash leaves: part 0 sent and recorded, part 1 sent but not recorded."""
    user = f"u{uuid.uuid4().hex[:8]}"
    text = "".join(f"第{i}句话，内容比较长一些。" for i in range(250))
    parts = split_reply(text)
    assert len(parts) >= 3
    env = _env(text, user)
    stage = harness.boundary.stage
    assert isinstance(stage, Send)
    sender = stage.sender
    first, second = part_end(text, 0), part_end(text, part_end(text, 0))
    id0 = await sender.client.send_text("users", sender="ai_bot", to=user, text=text[:first])
    await sender.store.mark_sent(
        env.msg_id,
        0,
        id0,
        end_offset=first,
        reply_digest=reply_digest(text),
        parts=len(parts),
        target_kind="users",
        target=user,
    )
    await sender.client.send_text("users", sender="ai_bot", to=user, text=text[first:second])
    # ...the process died here. The redelivered record:
    assert await harness.process(env) == "ok"
    bodies = [m["body"]["msg"] for m in await harness.delivered(user)]
    assert (text[:first], text[first:second]) == (parts[0], parts[1])
    assert bodies == [parts[0], parts[1], parts[1], *parts[2:]]  # one part twice, no more
