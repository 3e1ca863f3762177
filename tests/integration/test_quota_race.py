"""Quotas on real concurrency: two worker processes, the embedded broker, PostgreSQL and a
fake OpenAI-compatible provider (a real local HTTP server) that counts the calls it is paid
for.

- 100 messages at once from one user whose daily budget covers 10 calls: at most 10 calls
  reach the provider, the recorded spend never exceeds the budget, every message gets
  either a completion or the quota reply.
- A worker SIGKILLed in the middle of a call it reserved for: after the reservation's time
  to live the budget is whole again, and the message (redelivered) is answered.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

from imbot.core import topics
from imbot.core.envelope import ChatType, Content, Envelope, encode_envelope
from imbot.core.kafka import ensure_topics, new_producer
from imbot.core.settings import Settings, load_settings
from imbot.devtools.broker import EmbeddedBroker, consume_all
from imbot.storage import open_storage
from imbot.streams.stages import Budgets
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


async def _outcomes(
    broker: EmbeddedBroker,
    settings: Settings,
    wanted: set[str],
    procs: list[subprocess.Popen[bytes]],
    timeout: float = 90,
) -> dict[str, str]:
    """msg_id → "completed" or the reply kind, once every wanted message has one."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while not wanted <= seen.keys() and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), "a worker exited (see its log)"
        seen = {}
        for topic in (topics.COMPLETED, topics.OUTBOUND):
            for _, value in await consume_all(
                broker.bootstrap, settings.topic(topic), 10 * len(wanted), timeout=1.5
            ):
                record = orjson.loads(value or b"{}")
                if record.get("msg_id") in wanted:
                    kind = "completed" if topic == topics.COMPLETED else record["reply"]["kind"]
                    seen.setdefault(record["msg_id"], kind)
    return seen


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
        assert len(outcomes) == 100, "every message has an outcome"
        calls = len(provider.requests)
        completed = sum(kind == "completed" for kind in outcomes.values())
        assert 1 <= calls <= 10
        assert completed == calls  # one call per answered message, none repeated
        assert {k for k in outcomes.values() if k != "completed"} <= {"quota"}
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
            first.send_signal(signal.SIGKILL)  # holding its reservation
            first.wait(10)
            # Until its time to live the dead worker's reservation holds the budget (its
            # call may still be billed); after it, the budget is whole again.
            await asyncio.sleep(TTL_S + 0.5)
            second = _worker(env, tmp_path / "second.log")
            outcomes = await _outcomes(broker, settings, {message.msg_id}, [second])
        finally:
            _stop([p for p in (first, second) if p is not None])
        # Redelivered to the second worker, whose reservation found the budget taken by
        # a dead worker's reservation, expired it, and made the call.
        assert outcomes == {message.msg_id: "completed"}
        # The dead worker's call, then the second worker's (a rebalance while the dead
        # member is evicted can redeliver once more: each such call is paid and counted).
        answered_calls = len(provider.requests) - 1
        assert answered_calls >= 1

    storage = await open_storage(pg_url)
    try:
        [row] = await storage.quota.spend(user_id=user)
        assert (row.calls, row.micros) == (answered_calls, answered_calls * CALL_MICROS)
        scopes = Budgets.of(settings).scopes(message, "free")
        [daily] = await storage.quota.states(scopes)
        # Nothing is left reserved: the dead worker's hold expired, the rest settled.
        assert (daily.reserved_micros, daily.spent_micros) == (0, answered_calls * CALL_MICROS)
    finally:
        await storage.close()
