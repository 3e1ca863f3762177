"""Quotas on real concurrency: two worker processes, the embedded broker, PostgreSQL and a
fake OpenAI-compatible provider (a real local HTTP server) that counts the calls it is paid
for.

- 100 messages at once from one user whose daily budget covers 10 calls: at most 10 calls
  reach the provider, the recorded spend never exceeds the budget, every message gets
  either a completion or the quota reply.
- A worker SIGKILLed in the middle of a call it reserved for: after the reservation's time
  to live the budget is whole again, and the message (redelivered) is answered. Killed
  once its route stage has committed the message, so the model stage's record is the one
  copy redelivered; a message that is also routed again is test_quota_redelivery's case.

Outcomes are read once the workers have finished every record they were given (their
group has committed past it), never as a race between reading one topic and another.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from sqlalchemy import text

from imbot.core import topics
from imbot.core.envelope import ChatType, Content, Envelope, encode_envelope
from imbot.core.kafka import ensure_topics, new_producer
from imbot.core.settings import Settings, load_settings
from imbot.devtools.broker import EmbeddedBroker
from imbot.routing.budgets import Budgets
from imbot.storage import open_storage
from imbot.storage.schema import utcnow
from imbot.streams.worker import consumer_group
from tests.fakes.providers import FakeOpenAI, Reply

PRICE = 1000  # CNY per million tokens, in and out: a call of 30 tokens costs 0.03
USAGE_TOKENS = 30  # the fake's usage per call (21 prompt + 9 completion)
CALL_MICROS = USAGE_TOKENS * PRICE
TTL_S = 3.0  # the killed worker's reservation's time to live


def _policy(base_url: str, *, daily_cost: float, ttl_s: float) -> str:
    return f"""
models:
  paid:
    provider: openai
    base_url: {base_url}
    model: gpt-test
    api_key_env: null
    price: {{input: {PRICE}, output: {PRICE}, currency: CNY}}
    retry: {{max_attempts: 1}}
routes:
  default: {{system_prompt: null, max_output_tokens: 30, history_turns: 0}}
routing:
  levels: [{{name: light, below: 0.5}}, {{name: strong}}]
  default_tier: free
  tiers:
    free:
      models: {{light: [paid], strong: [paid]}}
      quota: {{daily: {{cost: {daily_cost}}}}}
      downgrade_at: 1.0
  reservation_ttl_s: {ttl_s}
"""


class SlowOpenAI(FakeOpenAI):
    """Answers every call after ``delay_s``, so calls overlap."""

    delay_s = 0.3

    def __init__(self) -> None:
        super().__init__()
        self.called = asyncio.Event()

    async def _handle(self, request: Any) -> Any:
        self.called.set()
        return await super()._handle(request)

    def default(self, rec: Any, request: Any) -> Reply:
        reply = super().default(rec, request)
        reply.delay_s = self.delay_s
        return reply


def _message(user: str, group: str) -> Envelope:
    """What moderate-in passes to the router: one user, each message in its own group
    (so the conversations run concurrently, as one user's do across groups)."""
    return Envelope(
        msg_id=uuid.uuid4().hex,
        conversation_id=f"group:{group}",
        chat_type=ChatType.group,
        sender=user,
        to=group,
        bot="ai_bot",
        content=Content(type="txt", text="你好"),
    )


def _worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "imbot", "worker", "--stage", "route", "--stage", "model"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _environment(broker: EmbeddedBroker, prefix: str, db: str, policy: Path) -> dict[str, str]:
    return {
        **os.environ,
        "IMBOT_KAFKA_BOOTSTRAP": broker.bootstrap,
        "IMBOT_KAFKA_EMBEDDED": "true",
        "IMBOT_TOPIC_PREFIX": prefix,
        "IMBOT_TOPIC_PARTITIONS": "4",
        "IMBOT_DATABASE_URL": db,
        "IMBOT_POLICY_FILE": str(policy),
        "IMBOT_STAGE_REVOKE_GRACE_S": "0.5",
        "IMBOT_STAGE_DEADLINE_S": "20",
        "IMBOT_LOG_JSON": "true",
        "PYTHONUNBUFFERED": "1",
    }


async def _produce(settings: Settings, envelopes: list[Envelope]) -> None:
    producer = new_producer(settings)
    await producer.start()
    try:
        sends = [
            await producer.send(
                settings.topic(topics.MODERATED),
                encode_envelope(e),
                key=e.conversation_id.encode(),
            )
            for e in envelopes
        ]
        await asyncio.gather(*sends)
    finally:
        await producer.stop()


async def _read(bootstrap: str, topic: str, partitions: int) -> list[Any]:
    """Every record of ``topic`` (all partitions), read until none came for 0.5 s. Not
    bounded by the broker's end offsets: the embedded broker's can lag (see test_replay)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False, fetch_max_wait_ms=10
    )
    await consumer.start()
    records: list[Any] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 0.5:
            batch = await consumer.getmany(timeout_ms=100)
            for part in batch.values():
                records.extend(part)
                idle_since = time.monotonic()
    finally:
        await consumer.stop()
    return records


async def _finished(broker: EmbeddedBroker, settings: Settings, stages: list[str]) -> bool:
    """Whether the workers have finished every record they read: their group has committed
    past the last record of each stage's input. A stage commits a record only once its
    outputs are published, so every outcome of those records is on its topic by then.
    Checked in pipeline order, so a routed record made from a moderated one that is
    finished is already there to be checked."""
    group = consumer_group(settings, ["route", "model"])
    committed = AIOKafkaConsumer(
        bootstrap_servers=broker.bootstrap, group_id=group, enable_auto_commit=False
    )
    await committed.start()  # never subscribes, so never joins the workers' group
    try:
        for stage in stages:
            topic = settings.topic(topics.MODERATED if stage == "route" else topics.ROUTED)
            ends: dict[TopicPartition, int] = {}
            for r in await _read(broker.bootstrap, topic, settings.topic_partitions):
                ends[TopicPartition(r.topic, r.partition)] = r.offset + 1
            for tp, end in ends.items():
                if (await committed.committed(tp) or 0) < end:
                    return False
    finally:
        await committed.stop()
    return True


async def _wait_finished(
    broker: EmbeddedBroker,
    settings: Settings,
    procs: list[subprocess.Popen[bytes]],
    stages: tuple[str, ...] = ("route", "model"),
    timeout: float = 90,
) -> None:
    deadline = time.monotonic() + timeout
    while not await _finished(broker, settings, list(stages)):
        assert all(p.poll() is None for p in procs), "a worker exited (see its log)"
        assert time.monotonic() < deadline, f"the workers did not finish their {stages} records"
        await asyncio.sleep(0.2)


async def _outcomes(
    broker: EmbeddedBroker,
    settings: Settings,
    wanted: set[str],
    procs: list[subprocess.Popen[bytes]],
) -> dict[str, list[str]]:
    """msg_id → its outcomes ("completed", or the kind of the reply sent instead), once
    the workers have finished every record: nothing more is on its way."""
    await _wait_finished(broker, settings, procs)
    seen: dict[str, list[str]] = {m: [] for m in wanted}
    for topic in (topics.COMPLETED, topics.OUTBOUND):
        for r in await _read(broker.bootstrap, settings.topic(topic), settings.topic_partitions):
            record = orjson.loads(r.value or b"{}")
            if record.get("msg_id") in wanted:
                kind = "completed" if topic == topics.COMPLETED else record["reply"]["kind"]
                seen[record["msg_id"]].append(kind)
    return seen


async def _held_until(db: str, msg_id: str) -> datetime:
    """When the reservation held for ``msg_id`` expires (``QuotaLedger.expire_stale``
    returns it once its ``expires_at`` is before the expiring worker's clock)."""
    storage = await open_storage(db)
    try:
        async with storage.database.reading() as session:
            query = text(
                "SELECT expires_at FROM quota_reservations WHERE msg_id = :m AND state = 'held'"
            )
            until: datetime = (await session.execute(query, {"m": msg_id})).scalar_one()
    finally:
        await storage.close()
    return until


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.postgres
async def test_two_workers_and_100_concurrent_messages_spend_at_most_the_budget(
    broker: EmbeddedBroker, pg_url: str, tmp_path: Path
) -> None:
    prefix = f"qr{uuid.uuid4().hex[:6]}."
    async with SlowOpenAI() as provider:
        policy = tmp_path / "policy.yaml"
        budget_micros = 10 * CALL_MICROS
        policy.write_text(_policy(provider.base_url, daily_cost=budget_micros / 1e6, ttl_s=120))
        env = _environment(broker, prefix, pg_url, policy)
        settings = load_settings(
            kafka_bootstrap=broker.bootstrap,
            kafka_embedded=True,
            topic_prefix=prefix,
            topic_partitions=4,
            policy_file=policy,
        )
        await ensure_topics(settings)
        user = f"u{uuid.uuid4().hex[:8]}"
        procs = [_worker(env, tmp_path / f"w{i}.log") for i in range(2)]
        try:
            messages = [_message(user, f"g{uuid.uuid4().hex[:10]}") for _ in range(100)]
            await _produce(settings, messages)
            outcomes = await _outcomes(broker, settings, {m.msg_id for m in messages}, procs)
        finally:
            _stop(procs)
        assert all(outcomes.values()), "every message has an outcome"
        calls = len(provider.requests)
        completed = sum("completed" in kinds for kinds in outcomes.values())
        assert 1 <= calls <= 10
        assert completed == calls  # one call per answered message, none repeated
        assert {k for kinds in outcomes.values() for k in kinds} <= {"completed", "quota"}
        assert provider.max_in_flight > 1  # the calls really overlapped

    storage = await open_storage(pg_url)
    try:
        spent = await storage.quota.spend(user_id=user)
        assert sum(r.calls for r in spent) == calls
        total = sum(r.micros for r in spent)
        assert total == calls * CALL_MICROS <= budget_micros
    finally:
        await storage.close()


@pytest.mark.postgres
async def test_a_killed_worker_s_reservation_expires_and_the_budget_is_whole_again(
    broker: EmbeddedBroker, pg_url: str, tmp_path: Path
) -> None:
    prefix = f"qk{uuid.uuid4().hex[:6]}."
    async with SlowOpenAI() as provider:
        provider.push(Reply(body=b"{}", delay_s=60))  # the first call hangs: its worker dies
        policy = tmp_path / "policy.yaml"
        # Room for one call's reservation only.
        policy.write_text(_policy(provider.base_url, daily_cost=0.04, ttl_s=TTL_S))
        env = _environment(broker, prefix, pg_url, policy)
        settings = load_settings(
            kafka_bootstrap=broker.bootstrap,
            kafka_embedded=True,
            topic_prefix=prefix,
            topic_partitions=4,
            policy_file=policy,
        )
        await ensure_topics(settings)
        user = f"u{uuid.uuid4().hex[:8]}"
        message = _message(user, f"g{uuid.uuid4().hex[:10]}")
        first = _worker(env, tmp_path / "first.log")
        second: subprocess.Popen[bytes] | None = None
        try:
            await _produce(settings, [message])
            await asyncio.wait_for(provider.called.wait(), 60)  # the first worker's call
            # The route stage has finished the message (committed it): the model stage's
            # record, whose call hangs, is the one left to redeliver.
            await _wait_finished(broker, settings, [first], stages=("route",))
            first.send_signal(signal.SIGKILL)  # holding its reservation
            first.wait(10)
            # Until its time to live the dead worker's reservation holds the budget (its
            # call may still be billed); after it, the budget is whole again. Expiry
            # compares ``expires_at`` with the expiring worker's clock: this host's.
            until = await _held_until(pg_url, message.msg_id)
            await asyncio.sleep(max(0.0, (until - utcnow()).total_seconds()))
            second = _worker(env, tmp_path / "second.log")
            outcomes = await _outcomes(broker, settings, {message.msg_id}, [second])
        finally:
            _stop([p for p in (first, second) if p is not None])
        # Redelivered to the second worker, whose reservation found the budget taken by
        # a dead worker's reservation, expired it, and made the call: answered once.
        assert outcomes == {message.msg_id: ["completed"]}
        assert len(provider.requests) == 2  # the dead worker's call, then the second's

    storage = await open_storage(pg_url)
    try:
        [row] = await storage.quota.spend(user_id=user)
        assert (row.calls, row.micros) == (1, CALL_MICROS)
        scopes = Budgets.of(settings).scopes(message, "free")
        [daily] = await storage.quota.states(scopes)
        # Nothing is left reserved: the dead worker's hold expired, the call settled.
        assert (daily.reserved_micros, daily.spent_micros) == (0, CALL_MICROS)
    finally:
        await storage.close()
