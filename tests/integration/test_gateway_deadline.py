"""The publish deadline against a broker that stops answering (a private broker, paused).

SIGSTOP keeps the broker's sockets open but answers nothing, like a broker stuck
in a long GC pause or a partition leader that went silent: the gateway must answer
Easemob by the fail policy before its budget, and when the broker resumes and acks
the record after all, a repeat of the same callback must not publish it twice.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from imbot.core import topics
from imbot.core.envelope import decode_envelope
from imbot.core.settings import Settings
from imbot.core.signature import expected_security
from imbot.devtools.broker import EmbeddedBroker, consume_all
from tests.integration.conftest import start_gateway
from tests.payloads import callback


@pytest.fixture
def paused_broker() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker()
    broker.start()
    try:
        yield broker
    finally:
        if broker.pid is not None:
            os.kill(broker.pid, signal.SIGCONT)
        broker.stop()


async def _post(client: Any, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/easemob/callback", data=orjson.dumps(body))
    return resp.status, await resp.json()


def _second_rule(data: dict[str, Any]) -> dict[str, Any]:
    """The same message as another callback rule sends it: a new callId, signed again."""
    out = {**data, "callId": f"myorg#myapp_{uuid.uuid4()}"}
    out["security"] = expected_security(out["callId"], "old-secret", out["timestamp"])
    return out


def _late_acks(metrics: str) -> float:
    m = re.search(r"^imbot_gateway_late_acks_total ([\d.e+]+)$", metrics, re.M)
    return float(m.group(1)) if m else 0.0


async def test_silent_broker_is_answered_by_fail_policy_and_a_late_ack_is_remembered(
    make_settings: Callable[..., Settings], tmp_path: Any, paused_broker: EmbeddedBroker
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "callback: {kafka_failure: block, kafka_failure_code: DOWN}\n"
        "models: {demo: {provider: demo}}\nroutes: {default: {models: [demo]}}\n"
    )
    settings = make_settings(policy_file=policy, kafka_bootstrap=paused_broker.bootstrap)
    client = await start_gateway(settings)
    try:
        warm = callback("先来一条")
        assert await _post(client, warm) == (200, {"valid": True})
        late_before = _late_acks(await (await client.get("/metrics")).text())

        assert paused_broker.pid is not None
        os.kill(paused_broker.pid, signal.SIGSTOP)
        # Alice's record goes out in a produce request the silent broker never answers.
        # Then three from carol at once: the first is queued behind that request, the
        # other two wait inside ``producer.send`` for room in carol's one-record batch.
        # So both ways a deadline can strike are exercised: queued, and not yet queued.
        alice = callback("broker 没有回应")
        carol = [callback(f"第 {i} 条", sender="carol") for i in range(3)]
        stuck = [alice, *carol]
        try:
            started = time.perf_counter()
            answers = [await _post(client, alice)]
            answers += await asyncio.gather(*(_post(client, d) for d in carol))
            elapsed = time.perf_counter() - started
        finally:
            os.kill(paused_broker.pid, signal.SIGCONT)
        assert answers == [(200, {"valid": False, "code": "DOWN"})] * 4
        # Two deadlines of 120 ms (publish_timeout_ms) one after the other, each inside
        # Easemob's 200 ms; the slack is for a loaded test machine. Without the deadline
        # each would wait for aiokafka's 10 s request timeout.
        assert elapsed < 0.8, elapsed
        # The two records already queued (alice's, carol's first) are acked once the
        # broker resumes; the other two were never handed to Kafka.
        for _ in range(100):
            if _late_acks(await (await client.get("/metrics")).text()) >= late_before + 2:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the queued records were never acked after the broker resumed")
        # Easemob was told DOWN for all four. Say each arrives again through a second
        # rule (its own callId): the late-acked ones are duplicates, the others are
        # published now.
        again = [_second_rule(d) for d in stuck]
        assert [await _post(client, d) for d in again] == [(200, {"valid": True})] * 4
        records = await consume_all(
            settings.kafka_bootstrap, settings.topic(topics.INBOUND), 6, timeout=1.5
        )
        published = sorted(decode_envelope(v).msg_id for _, v in records)
        assert published == sorted(d["msg_id"] for d in [warm, *stuck])  # each exactly once
    finally:
        await client.close()
