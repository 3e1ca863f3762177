"""A replica stopped with SIGTERM (a rolling deploy) leaves its group; nothing in flight is lost.

Two real model-stage worker processes share one consumer group on the embedded
broker. With a stop grace shorter than the demo model's call, the stopped
replica has work in flight that it must cut short and leave to the other
replica (redelivered, not lost). With the default kind of grace (longer than a
call) it finishes what it started before it leaves, so no model call is made
twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from imbot.core import topics
from imbot.core.envelope import Envelope, RouteDecision, encode_envelope
from imbot.core.kafka import ensure_topics, new_producer
from imbot.core.settings import load_settings
from imbot.devtools.broker import EmbeddedBroker, consume_all
from imbot.streams.lanes import KeyedLanes
from imbot.streams.offsets import CommitLedger
from tests.envelopes import direct_envelope
from tests.fakes.faust_stream import FakeEvent, FakeStream

POLICY = """
models:
  demo: {provider: demo, latency_ms: 1500, price: {input: 0, output: 0, currency: CNY}}
routes:
  default: {models: [demo], history_turns: 0}
"""
PARTITIONS = 4


def _routed(user: str) -> Envelope:
    return direct_envelope(user=user, route=RouteDecision(route="default", models=("demo",)))


def _assigned(log: Path) -> list[set[int]]:
    """The model-input partitions of each assignment this worker logged."""
    out = []
    for line in log.read_bytes().splitlines():
        event = orjson.loads(line)
        if event["event"] == "partitions assigned":
            out.append({int(p.rsplit(":", 1)[1]) for p in event["partitions"]})
    return out


def _start_model_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "imbot", "worker", "--stage", "model"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _wait(predicate: Callable[[], object], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


@pytest.mark.parametrize("stop_grace_s", [0.5, 10.0])
async def test_a_sigtermed_replica_hands_its_partitions_over_and_loses_nothing(
    broker: EmbeddedBroker, sqlite_url: str, tmp_path: Path, stop_grace_s: float
) -> None:
    prefix = f"rb{uuid.uuid4().hex[:6]}."
    (tmp_path / "policy.yaml").write_text(POLICY, encoding="utf-8")
    env = {
        **os.environ,
        "IMBOT_KAFKA_BOOTSTRAP": broker.bootstrap,
        "IMBOT_KAFKA_EMBEDDED": "true",
        "IMBOT_TOPIC_PREFIX": prefix,
        "IMBOT_TOPIC_PARTITIONS": str(PARTITIONS),
        "IMBOT_DATABASE_URL": sqlite_url,
        "IMBOT_POLICY_FILE": str(tmp_path / "policy.yaml"),
        "IMBOT_STAGE_REVOKE_GRACE_S": "0.5",
        "IMBOT_STAGE_STOP_GRACE_S": str(stop_grace_s),
        "IMBOT_LOG_JSON": "true",
        "IMBOT_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    settings = load_settings(
        kafka_bootstrap=broker.bootstrap,
        kafka_embedded=True,
        topic_prefix=prefix,
        topic_partitions=PARTITIONS,
    )
    await ensure_topics(settings)
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b")}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, log in logs.items():
            procs[name] = _start_model_worker(env, log)
        # Both replicas own part of the partitions.
        await asyncio.to_thread(
            _wait,
            lambda: all(
                a and a[-1] and len(a[-1]) < PARTITIONS for a in map(_assigned, logs.values())
            ),
        )
        a_owned = _assigned(logs["a"])[-1]

        producer = new_producer(settings)
        await producer.start()
        sent = [_routed(f"u{uuid.uuid4().hex[:8]}") for _ in range(40)]
        try:
            for env_ in sent:
                await producer.send_and_wait(
                    settings.topic(topics.ROUTED),
                    encode_envelope(env_),
                    key=env_.conversation_id.encode(),
                )
        finally:
            await producer.stop()
        await asyncio.sleep(0.5)  # replica A is in the middle of its model calls

        procs["a"].send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(procs["a"].wait, 30) == 0

        # B took A's partitions over...
        await asyncio.to_thread(_wait, lambda: _assigned(logs["b"])[-1] == set(range(PARTITIONS)))
        # ...and every message was completed, those A had in flight included.
        wanted = {e.msg_id for e in sent}
        done: set[str] = set()
        deadline = time.monotonic() + 60
        while not done >= wanted and time.monotonic() < deadline:
            completed = await consume_all(
                broker.bootstrap, settings.topic(topics.COMPLETED), 2 * len(sent), timeout=2
            )
            done = {orjson.loads(v)["msg_id"] for _, v in completed if v}
        assert wanted - done == set()
        stopped = [orjson.loads(line) for line in logs["a"].read_bytes().splitlines()]
        cut = next(e for e in stopped if e["event"] == "worker stopping")["cut_short"]
        if stop_grace_s < 1.5:
            assert cut > 0  # A really had work in flight when it stopped
        else:
            # A finished every call it had started: none is made (and paid) twice.
            assert cut == 0
            await asyncio.sleep(2)  # anything redone would be completed by now
            completed = await consume_all(
                broker.bootstrap, settings.topic(topics.COMPLETED), 2 * len(sent), timeout=2
            )
            ids = [orjson.loads(v)["msg_id"] for _, v in completed if v]
            assert sorted(ids) == sorted(wanted)
        # A said goodbye (LeaveGroup) instead of letting its session time out.
        assert any(e["event"] == "left the group" for e in stopped)
        assert a_owned  # and really owned partitions before
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()


async def test_a_partition_that_comes_back_is_not_worked_on_twice() -> None:
    """A rebalance revokes every partition and hands most back: a model call still
    running then is not repeated for its redelivered copy, which is finished by the
    first call's result; a partition that went elsewhere counts for nothing here."""
    gate = asyncio.Event()
    calls: list[tuple[str, int]] = []
    both_running = asyncio.Event()

    async def handler(event: Any) -> bool:
        calls.append((event.message.tp, event.message.offset))
        if len(calls) == 2:
            both_running.set()
        await gate.wait()  # a model call in progress
        return True

    stream = FakeStream()
    ledger: CommitLedger[str] = CommitLedger()
    ledger.assign({"p0", "p1"}, generation=0)
    lanes = KeyedLanes(handler, ledger=ledger, max_in_flight=4, grace=0)
    consumer = asyncio.create_task(lanes.consume(stream))
    try:
        await stream.queue.put(FakeEvent(b"kept", "p0", 7))
        await stream.queue.put(FakeEvent(b"moved", "p1", 3))
        await asyncio.wait_for(both_running.wait(), 10)

        ledger.close({"p0", "p1"})
        assert await lanes.release({"p0", "p1"}, grace=0, cancel=False) == 2
        assert ledger.positions() == {"p0": 7, "p1": 3}  # what is committed at revocation
        ledger.revoke({"p0", "p1"})
        ledger.assign({"p0"}, generation=1)  # p0 came back, p1 went elsewhere
        await stream.queue.put(FakeEvent(b"kept", "p0", 7, generation_id=1))  # redelivered
        gate.set()
        async with asyncio.timeout(10):
            while ledger.positions() != {"p0": 8}:  # noqa: ASYNC110 - the ledger's state
                await asyncio.sleep(0.01)

        assert calls == [("p0", 7), ("p1", 3)]  # each record handled once
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
