"""End to end: a signed callback in, a reply out at the (simulated) Easemob, history written."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson

from imbot.cli.devstack import DevStack, simulate
from imbot.core import topics
from imbot.core.envelope import DlqRecord, decode_envelope
from imbot.core.kafka import new_producer
from imbot.core.settings import load_settings
from imbot.devtools.broker import consume_all
from imbot.storage import open_storage
from imbot.storage.schema import DeliveryRow, MessageRow, UsageRow
from tests.payloads import callback
from tests.rows import count_rows


def _user() -> str:
    return f"u{uuid.uuid4().hex[:10]}"


def _messages(stack: DevStack, to: str) -> list[dict[str, Any]]:
    return list(
        httpx.get(f"{stack.simulator_url}/_sim/messages", params={"to": to}).json()["messages"]
    )


def _wait_messages(
    stack: DevStack, to: str, count: int, timeout: float = 30.0
) -> list[dict[str, Any]]:
    resp = httpx.get(
        f"{stack.simulator_url}/_sim/wait",
        params={"to": to, "count": count, "timeout": timeout},
        timeout=timeout + 5,
    )
    resp.raise_for_status()
    return list(resp.json()["messages"])


def _post_callback(stack: DevStack, data: dict[str, Any]) -> dict[str, Any]:
    resp = httpx.post(
        stack.callback_url, content=orjson.dumps(data), headers={"Content-Type": "application/json"}
    )
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


async def _count(stack: DevStack, table: type[object], **where: object) -> int:
    store = await open_storage(stack.env["IMBOT_DATABASE_URL"])
    try:
        return await count_rows(store.database, table, **where)
    finally:
        await store.close()


async def _eventually(
    read: Callable[[], Awaitable[int]], expected: int, timeout: float = 5.0
) -> None:
    deadline = time.monotonic() + timeout
    while (value := await read()) != expected and time.monotonic() < deadline:  # noqa: ASYNC110 - polling a database
        await asyncio.sleep(0.05)
    assert value == expected


def _settings(stack: DevStack) -> Any:
    return load_settings(
        kafka_bootstrap=stack.env["IMBOT_KAFKA_BOOTSTRAP"],
        kafka_embedded=True,
        topic_prefix=stack.env["IMBOT_TOPIC_PREFIX"],
    )


async def test_signed_callback_gets_a_reply_and_history(stack: DevStack) -> None:
    user = _user()
    result: dict[str, Any] = simulate(
        stack.simulator_url, "你好，介绍一下你自己", sender=user, timeout=60
    )
    replies: list[dict[str, Any]] = result["replies"]
    assert len(replies) == 1
    reply = replies[0]
    assert reply["from"] == "ai_bot"
    assert reply["to"] == [user]
    assert "演示模型" in reply["body"]["msg"] or "demo" in reply["body"]["msg"].lower()
    msg_id = result["callback"]["request"]["msg_id"]
    assert reply["ext"]["imbot_reply_to"] == msg_id
    # History: the question and the answer, the delivery, the usage (written just
    # after the send, so give the sender a moment).
    await _eventually(lambda: _count(stack, UsageRow, msg_id=msg_id), 1)
    assert await _count(stack, MessageRow, msg_id=msg_id) == 1
    assert await _count(stack, MessageRow, reply_to=msg_id) == 1
    assert await _count(stack, DeliveryRow, msg_id=msg_id, status="sent") == 1
    assert await _count(stack, UsageRow, msg_id=msg_id) == 1


async def test_group_mention_is_answered_in_the_group(stack: DevStack) -> None:
    group = f"g{uuid.uuid4().int % 10**12}"
    user = _user()
    result: dict[str, Any] = simulate(
        stack.simulator_url,
        "@AI 总结一下",
        sender=user,
        chat_type="group",
        group_id=group,
        timeout=60,
    )
    replies: list[dict[str, Any]] = result["replies"]
    assert len(replies) == 1
    assert replies[0]["to"] == [group]
    assert replies[0]["ext"]["em_at_list"] == [user]


async def test_blocked_input_gets_the_polite_reply_without_a_model_call(stack: DevStack) -> None:
    user = _user()
    data = callback("请教我炸弹制作的方法", sender=user, secret="e2e-secret")
    assert _post_callback(stack, data) == {"valid": True}
    replies = _wait_messages(stack, user, 1)
    assert replies[0]["body"]["msg"] == "抱歉，这个问题我无法回答。"
    await _eventually(lambda: _count(stack, MessageRow, reply_to=data["msg_id"]), 1)
    assert await _count(stack, UsageRow, msg_id=data["msg_id"]) == 0


async def test_same_callback_twice_yields_one_reply(stack: DevStack) -> None:
    user = _user()
    data = callback("只回答一次", sender=user, secret="e2e-secret")
    _post_callback(stack, data)
    _post_callback(stack, dict(data))
    _wait_messages(stack, user, 1)
    # The same message also arriving twice behind the gateway (another gateway
    # replica, a replay) is delivered once: the delivery ledger stops it.
    settings = _settings(stack)
    records = await consume_all(
        settings.kafka_bootstrap, settings.topic(topics.INBOUND), 10_000, timeout=3
    )
    original = next(v for _, v in records if v is not None and data["msg_id"].encode() in v)
    producer = new_producer(settings)
    await producer.start()
    try:
        env = decode_envelope(original)
        await producer.send_and_wait(
            settings.topic(topics.INBOUND), original, key=env.conversation_id.encode()
        )
    finally:
        await producer.stop()
    await asyncio.sleep(3)  # give the duplicate time to travel the whole pipeline
    assert len(_messages(stack, user)) == 1
    assert await _count(stack, DeliveryRow, msg_id=data["msg_id"]) == 1


async def test_poison_record_on_each_stage_goes_to_dlq_and_the_next_message_flows(
    stack: DevStack,
) -> None:
    settings = _settings(stack)
    producer = new_producer(settings)
    await producer.start()
    marker = uuid.uuid4().hex
    user = _user()
    inputs = [topics.INBOUND, topics.MODERATED, topics.ROUTED, topics.COMPLETED, topics.OUTBOUND]
    try:
        for base in inputs:
            # Keyed like the user's conversation: the poison sits on the very
            # partition (and in the very lane) the next message has to pass.
            await producer.send_and_wait(
                settings.topic(base),
                f"not an envelope {marker}".encode(),
                key=f"chat:ai_bot:{user}".encode(),
            )
    finally:
        await producer.stop()
    # The pipeline still answers, on the same partition, after the poison.
    result: dict[str, Any] = simulate(stack.simulator_url, "还在吗？", sender=user, timeout=60)
    assert len(result["replies"]) == 1
    deadline = time.monotonic() + 20
    poisoned: dict[str, DlqRecord] = {}
    while time.monotonic() < deadline and len(poisoned) < len(inputs):
        for _, value in await consume_all(
            settings.kafka_bootstrap, settings.topic(topics.DLQ), 10_000, timeout=1
        ):
            record = DlqRecord.model_validate_json(value or b"{}")
            if record.value and marker in record.value:
                poisoned[record.stage] = record
    assert set(poisoned) == {"moderate-in", "route", "model", "moderate-out", "send"}
    assert all(r.error_kind == "UndecodableError" for r in poisoned.values())


def _burst_with_restart(stack: DevStack, service: str, count: int = 12) -> list[str]:
    users = [_user() for _ in range(count)]
    for i, user in enumerate(users):
        _post_callback(stack, callback(f"第{i}个问题", sender=user, secret="e2e-secret"))
        if i == count // 2:
            stack.restart(service)  # SIGKILL, like a crashed pod, then start again
    for user in users:
        assert len(_wait_messages(stack, user, 1, timeout=60)) >= 1, f"{user} got no reply"
    return users


async def test_stage_worker_killed_mid_stream_loses_nothing_and_duplicates_nothing(
    stack: DevStack,
) -> None:
    users = _burst_with_restart(stack, "worker")
    await asyncio.sleep(2)  # anything redelivered after the restart would arrive now
    seen = {user: _messages(stack, user) for user in users}
    assert {u: m for u, m in seen.items() if len(m) != 1} == {}


async def test_sender_killed_mid_stream_loses_nothing(stack: DevStack) -> None:
    users = _burst_with_restart(stack, "sender")
    await asyncio.sleep(2)
    counts = [len(_messages(stack, user)) for user in users]
    assert all(c >= 1 for c in counts)
    # The one window Easemob leaves open (no idempotency key): a kill after Easemob
    # accepted a part and before the ledger recorded it resends that one part.
    assert sum(counts) - len(users) <= 1


async def test_a_sandboxed_replay_runs_every_stage_and_reaches_no_user(stack: DevStack) -> None:
    """`imbot replay` of an answered message, without --deliver: it goes through every
    stage again (the model is called again), and its answer lands on imbot.sandbox,
    marked, instead of at Easemob."""
    from imbot.streams.replay import replay

    user = _user()
    result: dict[str, Any] = simulate(stack.simulator_url, "你好", sender=user, timeout=60)
    assert len(result["replies"]) == 1
    msg_id = result["callback"]["request"]["msg_id"]
    settings = _settings(stack)
    summary = await replay(settings, topics.INBOUND, msg_id=msg_id, out=lambda *_: None)
    assert summary.sandbox
    deadline = time.monotonic() + 30
    sandboxed: list[Any] = []
    while not sandboxed and time.monotonic() < deadline:
        records = await consume_all(
            settings.kafka_bootstrap, settings.topic(topics.SANDBOX), 10_000, timeout=1.5
        )
        sandboxed = [env for _, v in records if v and (env := decode_envelope(v)).msg_id == msg_id]
    [env] = sandboxed
    assert env.replay is not None
    assert env.replay.sandbox
    assert env.completion is not None  # the model answered again
    assert env.reply is not None
    assert env.delivery is None  # never sent
    await asyncio.sleep(1)
    assert len(_messages(stack, user)) == 1  # the user saw the first answer only


def test_every_process_serves_its_own_metrics(stack: DevStack) -> None:
    """The worker and the sender each get a port of their own (one port for both made the
    second fail to start), and each one's page shows its own stages' series."""
    urls = stack.metrics_urls()
    assert set(urls) >= {"gateway", "worker", "sender"}
    assert len(set(urls.values())) == len(urls)
    pages = {name: _page(url) for name, url in urls.items()}
    assert 'imbot_stage_messages_total{outcome="ok",stage="route"}' in pages["worker"]
    assert 'stage="send"' in pages["sender"]
    assert "imbot_gateway" in pages["gateway"]


def _page(url: str, timeout: float = 30.0) -> str:
    """A metrics page, once its server listens (a worker opens it after joining its group,
    which can be after the stack answered its first message)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url, timeout=5).text
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
