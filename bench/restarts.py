"""Restarts under load: what a stopped or killed replica costs the pipeline.

The whole system as real processes on the embedded broker (SQLite): gateway,
simulator, sender, one worker for moderate-in/route/moderate-out, and **two
replicas of the model stage** (one consumer group, 6 partitions) with a demo
model that takes 1 s. AI messages from distinct users arrive through the gateway
at a steady rate. Meanwhile:

1. replica A is stopped gracefully (SIGTERM, as a rolling deploy does), and
   started again a few seconds later;
2. replica B is killed (SIGKILL, a crashed pod), and started again at once.

For every message: latency from the callback POST to the reply at the simulated
Easemob, and the model-input partition it went through. The replicas' own logs
("partitions assigned") say which replica owned which partition when, so each
message is attributed to the survivor or to the replica that went away.

Printed per configuration, for each event: the extra latency (max over the
event's window minus the quiet baseline p50) of the survivor's own messages and
of the departing replica's messages, and for the kill, how long the killed
replica's partitions went without a completed model call. Also lost and
duplicated replies. The baseline configuration is the old behaviour (rebalance
and stop wait up to 30 s for work in flight).

    python -m bench.restarts
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer

from bench.loadgen import percentile
from bench.report import write_section
from imbot.cli.devstack import DevStack
from imbot.core import topics
from imbot.core.envelope import decode_envelope
from imbot.devtools.broker import EmbeddedBroker
from imbot.simulator.callbacks import build_callback

RATE = 20.0  # messages per second (10 with the 5 s model: the same calls in flight x 2.5)
PARTITIONS = 6
# Seconds from the start of the load.
T_TERM, T_TERM_BACK = 12.0, 17.0
T_KILL, T_KILL_BACK = 32.0, 32.5
DURATION = 50.0
WINDOW = 15.0  # messages sent this long after an event belong to it
POLICY = """
models:
  demo:
    provider: demo
    latency_ms: {model_ms}
    # One replica alone keeps up with the load (64 calls/s > RATE), so what is measured
    # is the rebalance protocol's stall, not a capacity shortfall while one is down.
    max_concurrency: 64
    price: {{input: 0, output: 0, currency: CNY}}
routes:
  default: {{models: [demo], history_turns: 0}}
streaming: {{enabled: false, typing: false}}
"""
MODEL = ["-m", "imbot", "worker", "--stage", "model"]


def _callback(secret: str, user: str, msg_id: str) -> bytes:
    """A signed callback as Easemob sends it (the simulator's builder), a fresh callId."""
    return orjson.dumps(
        build_callback(
            sender=user,
            to="ai_bot",
            text="你好，请介绍一下你自己",
            secret=secret,
            org="bench",
            app="restart",
            msg_id=msg_id,
        )
    )


async def _load(
    stack: DevStack, events: list[tuple[float, str, str]], rate: float
) -> dict[str, Any]:
    """Send at ``rate`` for DURATION while running the restart events; collect replies."""
    total = int(rate * DURATION)
    sent_at: dict[str, float] = {}
    marks: dict[str, float] = {}
    base = 8 * 10**17 + int(time.time()) * 1000
    async with httpx.AsyncClient(timeout=5) as client:
        start = time.time() + 0.1
        pending = sorted(events)

        async def run_event(name: str, action: str) -> None:
            if action == "term":
                await asyncio.to_thread(stack.terminate, name)
            elif action == "kill":
                await asyncio.to_thread(stack.kill, name)
            else:
                await asyncio.to_thread(stack.start_again, name)
            marks[f"{name}:{action}:done"] = time.time() * 1000

        tasks = []
        for n in range(total):
            now = time.time() - start
            while pending and pending[0][0] <= now:
                _, name, action = pending.pop(0)
                marks[f"{action}:{name}"] = time.time() * 1000
                tasks.append(asyncio.create_task(run_event(f"{name}", action)))
            delay = start + n / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            msg_id = str(base + n)
            sent_at[msg_id] = time.time() * 1000
            resp = await client.post(
                stack.callback_url,
                content=_callback(stack.secret, f"r{uuid.uuid4().hex[:10]}", msg_id),
                headers={"Content-Type": "application/json"},
            )
            resp.raise_for_status()
        await asyncio.gather(*tasks)
        received: dict[str, list[float]] = {}
        deadline = time.time() + 90
        while time.time() < deadline:
            messages = (await client.get(f"{stack.simulator_url}/_sim/messages")).json()["messages"]
            received = {}
            for m in messages:
                reply_to = (m.get("ext") or {}).get("imbot_reply_to")
                if reply_to in sent_at:
                    received.setdefault(reply_to, []).append(float(m["received_at"]))
            if len(received) >= total:
                await asyncio.sleep(3)  # anything redelivered twice would arrive now
                messages = (await client.get(f"{stack.simulator_url}/_sim/messages")).json()
                received = {}
                for m in messages["messages"]:
                    reply_to = (m.get("ext") or {}).get("imbot_reply_to")
                    if reply_to in sent_at:
                        received.setdefault(reply_to, []).append(float(m["received_at"]))
                break
            await asyncio.sleep(0.5)
    return {"sent_at": sent_at, "received": received, "marks": marks, "start": start * 1000}


async def _model_records(stack: DevStack) -> dict[str, tuple[int, float]]:
    """msg_id -> (partition of the model's output, model stamp) from imbot.completed."""
    topic = f"{stack.env['IMBOT_TOPIC_PREFIX']}{topics.COMPLETED}"
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=stack.env["IMBOT_KAFKA_BOOTSTRAP"],
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
        group_id=None,
    )
    await consumer.start()
    out: dict[str, tuple[int, float]] = {}
    try:
        idle = 0
        while idle < 10:
            batch = await consumer.getmany(timeout_ms=200)
            idle = 0 if batch else idle + 1
            for tp, records in batch.items():
                for r in records:
                    env = decode_envelope(r.value)
                    stamp = env.stamps.get("model", 0.0)
                    # The first completion counts (a redelivered one is later).
                    if env.msg_id not in out or stamp < out[env.msg_id][1]:
                        out[env.msg_id] = (tp.partition, stamp)
    finally:
        await consumer.stop()
    return out


def _assignments(log_file: Path) -> list[tuple[float, set[int]]]:
    """(time ms, model-input partitions) each time this replica got an assignment."""
    out = []
    for line in log_file.read_bytes().splitlines():
        if b"partitions assigned" not in line:
            continue
        event = orjson.loads(line)
        parts = {int(p.rsplit(":", 1)[1]) for p in event["partitions"] if topics.ROUTED in p}
        out.append((event["ts"] * 1000, parts))
    return out


def _owned_before(assignments: list[tuple[float, set[int]]], at: float) -> set[int]:
    owned: set[int] = set()
    for ts, parts in assignments:
        if ts <= at:
            owned = parts
    return owned


def _cut_short(log_file: Path) -> int:
    total = 0
    for line in log_file.read_bytes().splitlines():
        if b"cut_short" in line:
            total += int(orjson.loads(line).get("cut_short", 0))
    return total


def _before_checkout() -> Path:
    """This tree with the stage runtime of commit 8dce82b (before bounded rebalances),
    plus one log line saying which partitions a worker got (for the attribution)."""
    root = Path(tempfile.mkdtemp(prefix="imbot-before-"))
    repo = Path(__file__).resolve().parent.parent
    tree = subprocess.run(
        ["git", "archive", "HEAD", "imbot"], cwd=repo, check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=tree, check=True)
    for path in ("streams/lanes.py", "streams/faust_app.py", "streams/worker.py"):
        old = subprocess.run(
            ["git", "show", f"{BEFORE}:{path}"], cwd=repo, check=True, capture_output=True
        ).stdout
        # That commit predates the one ``imbot`` namespace: its imports get the prefix.
        new = re.sub(rb"^(\s*)(from|import) (%s)\b" % PACKAGES, rb"\1\2 imbot.\3", old, flags=re.M)
        (root / "imbot" / path).write_bytes(new)
    app = root / "imbot/streams/faust_app.py"
    text = app.read_text()
    anchor = "        return ShortFetchConsumerThread(self, loop=self.loop, beacon=self.beacon)\n"
    assert anchor in text
    app.write_text(text.replace(anchor, anchor + ASSIGNED_LOG))
    return root


BEFORE = "8dce82b"
PACKAGES = rb"cli|devtools|core|streams|sender|adapters|moderation|simulator|gateway|storage"
ASSIGNED_LOG = """
    async def on_partitions_assigned(self, assigned, generation_id=0):  # bench only
        await super().on_partitions_assigned(assigned, generation_id)
        import logging

        logging.getLogger("imbot.rebalance").info(
            "partitions assigned",
            extra={
                "generation": generation_id,
                "partitions": sorted(f"{tp.topic}:{tp.partition}" for tp in assigned),
            },
        )
"""


def run(
    broker: EmbeddedBroker, label: str, env: dict[str, str], cwd: Path | None = None
) -> dict[str, float]:
    env = dict(env)
    root = Path(tempfile.mkdtemp(prefix="imbot-restarts-"))
    policy = root / "policy.yaml"
    model_ms = int(env.pop("MODEL_MS", "1000"))
    rate = RATE if model_ms <= 1000 else RATE / 2
    policy.write_text(POLICY.format(model_ms=model_ms), encoding="utf-8")
    stack = DevStack(
        console=False,
        env={
            "IMBOT_KAFKA_BOOTSTRAP": broker.bootstrap,
            "IMBOT_KAFKA_EMBEDDED": "true",
            "IMBOT_TOPIC_PREFIX": f"r{uuid.uuid4().hex[:6]}.",
            "IMBOT_TOPIC_PARTITIONS": str(PARTITIONS),
            "IMBOT_DATABASE_URL": f"sqlite+aiosqlite:///{root}/imbot.db",
            "IMBOT_POLICY_FILE": str(policy),
            "IMBOT_LOG_LEVEL": "INFO",
            "IMBOT_EASEMOB_RATE_LIMIT": "0",
            **env,
        },
        log_dir=root / "logs",
        state_file=root / "dev.json",
        cwd=cwd,
    )
    stack.start(worker_stages=("moderate-in", "route", "moderate-out"))
    try:
        stack.add_service("model-a", MODEL)
        stack.add_service("model-b", MODEL)
        stack.wait_ready(timeout=60)
        time.sleep(15)  # both replicas joined and settled
        events = [
            (T_TERM, "model-a", "term"),
            (T_TERM_BACK, "model-a", "start"),
            (T_KILL, "model-b", "kill"),
            (T_KILL_BACK, "model-b", "start"),
        ]
        load = asyncio.run(_load(stack, events, rate))
        model = asyncio.run(_model_records(stack))
    finally:
        stack.stop()
    logs = root / "logs"
    a, b = _assignments(logs / "model-a.log"), _assignments(logs / "model-b.log")
    sent, received, marks = load["sent_at"], load["received"], load["marks"]
    latency = {m: min(r) - sent[m] for m, r in received.items()}
    (root / "messages.json").write_bytes(
        orjson.dumps(
            {
                "start": load["start"],
                "marks": marks,
                "messages": {
                    m: [sent[m], latency.get(m), *(model.get(m) or (None, None))] for m in sent
                },
            }
        )
    )
    t0 = load["start"]
    quiet = [latency[m] for m in latency if sent[m] < t0 + T_TERM * 1000 - 1000]
    base_p50 = percentile(quiet, 0.5)
    result: dict[str, float] = {
        "sent": len(sent),
        "delivered": len(received),
        "lost": len(sent) - len(received),
        "duplicated": sum(len(r) - 1 for r in received.values()),
        "quiet_p50": base_p50,
        "quiet_p99": percentile(quiet, 0.99),
        "cut_short": _cut_short(logs / "model-a.log") + _cut_short(logs / "model-b.log"),
        "session_s": float(env.get("IMBOT_KAFKA_SESSION_TIMEOUT_S", "6")),
        "model_s": model_ms / 1000,
        "rate": rate,
    }
    for event, victim, survivor_log in (
        ("term", "model-a", b),
        ("kill", "model-b", a),
    ):
        at = marks[f"{event}:{victim}"]
        survivor = _owned_before(survivor_log, at)
        window = [m for m in latency if at - 3000 <= sent[m] < at + WINDOW * 1000]
        own = [latency[m] for m in window if m in model and model[m][0] in survivor]
        moved = [latency[m] for m in window if m in model and model[m][0] not in survivor]
        result[f"{event}_survivor_added_max"] = max(own, default=float("nan")) - base_p50
        result[f"{event}_survivor_p99"] = percentile(own, 0.99)
        result[f"{event}_moved_added_max"] = max(moved, default=float("nan")) - base_p50
        # Longest gap in completed model calls on the departing replica's partitions.
        victim_parts = set(range(PARTITIONS)) - survivor
        stamps = sorted(s for m, (p, s) in model.items() if p in victim_parts and at - 3000 <= s)
        after = [s for s in stamps if s > at]
        result[f"{event}_moved_first_after_s"] = (after[0] - at) / 1000 if after else float("nan")
        gaps = [y - x for x, y in itertools.pairwise(stamps)]
        result[f"{event}_moved_longest_gap_s"] = max(gaps, default=float("nan")) / 1000
        result[f"{event}_stop_took_s"] = (marks[f"{victim}:{event}:done"] - at) / 1000
    print(label, {k: round(v, 2) for k, v in result.items()}, flush=True)
    return result


CLUSTER = {
    "IMBOT_KAFKA_SESSION_TIMEOUT_S": "10",
    "IMBOT_KAFKA_REBALANCE_TIMEOUT_S": "10",
    "IMBOT_KAFKA_HEARTBEAT_INTERVAL_S": "1",
}
SHORT = {
    "IMBOT_KAFKA_SESSION_TIMEOUT_S": "3",
    "IMBOT_KAFKA_REBALANCE_TIMEOUT_S": "3",
    "IMBOT_KAFKA_HEARTBEAT_INTERVAL_S": "0.5",
}


# name, IMBOT_ overrides, and "BEFORE" to run the services from the old checkout
def _grace(revoke: str, stop: str) -> dict[str, str]:
    return {"IMBOT_STAGE_REVOKE_GRACE_S": revoke, "IMBOT_STAGE_STOP_GRACE_S": stop}


CONFIGS: list[tuple[str, dict[str, str]] | tuple[str, dict[str, str], str]] = [
    ("before; 1 s model; 6/3/1 s", {}, "BEFORE"),
    ("grace 1 s, stop 1 s; 1 s model; 6/3/1 s", _grace("1", "1")),
    ("grace 0.25 s, stop 0.25 s; 1 s model; 6/3/1 s", _grace("0.25", "0.25")),
    ("grace 0.25 s, stop 0.25 s; 1 s model; 3/3/0.5 s", {**_grace("0.25", "0.25"), **SHORT}),
    ("grace 0.25 s, stop 20 s; 1 s model; 3/3/0.5 s (defaults)", {**_grace("0.25", "20"), **SHORT}),
    (
        "grace 0.25 s, stop 0.25 s; 1 s model; 10/10/1 s",
        {**_grace("0.25", "0.25"), **CLUSTER},
    ),
    ("before; 5 s model; 6/3/1 s", {"MODEL_MS": "5000"}, "BEFORE"),
    (
        "grace 0.25 s, stop 0.25 s; 5 s model; 6/3/1 s",
        {"MODEL_MS": "5000", **_grace("0.25", "0.25")},
    ),
    (
        "grace 0.25 s, stop 20 s; 5 s model; 3/3/0.5 s (defaults)",
        {"MODEL_MS": "5000", **_grace("0.25", "20"), **SHORT},
    ),
]


async def _join_hold(session_s: float) -> float:
    """Plain aiokafka, no Faust, no imbot: two members of a group, one leaves (LeaveGroup);
    seconds until the other owns every partition. On Kafka this is a heartbeat and two
    round trips; Tansu holds every join phase for about half the session timeout."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    bootstrap = BOOTSTRAP[0]
    topic, group = f"hold{uuid.uuid4().hex[:6]}", f"hold{uuid.uuid4().hex[:6]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 4, 1)])
    await admin.close()

    def member() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=group,
            session_timeout_ms=int(session_s * 1000),
            heartbeat_interval_ms=int(min(1.0, session_s / 3) * 1000),
            fetch_max_wait_ms=10,
        )

    stays, leaves = member(), member()
    await stays.start()
    await leaves.start()

    async def until(consumer: AIOKafkaConsumer, done: Any) -> None:
        while not done():
            await consumer.getmany(timeout_ms=50)

    both = lambda: len(stays.assignment()) + len(leaves.assignment()) == 4  # noqa: E731
    await asyncio.gather(until(stays, both), until(leaves, both))
    # Tansu numbers the first generation 0, where aiokafka skips LeaveGroup.
    leaves._coordinator.generation = max(1, leaves._coordinator.generation)
    started = time.monotonic()
    await leaves.stop()
    await until(stays, lambda: len(stays.assignment()) == 4)
    took = time.monotonic() - started
    await stays.stop()
    return took


BOOTSTRAP: list[str] = []


def main() -> None:
    import sys

    only = [int(a) for a in sys.argv[1:]]  # e.g. `python -m bench.restarts 1`: one configuration
    results = []
    with EmbeddedBroker() as broker:
        BOOTSTRAP.append(broker.bootstrap)
        holds = {t: asyncio.run(_join_hold(t)) for t in (3.0, 6.0, 10.0)}
        print("join hold", holds, flush=True)
        for i, (label, env, *checkout) in enumerate(CONFIGS):
            if only and i not in only:
                continue
            cwd = _before_checkout() if checkout == ["BEFORE"] else None
            results.append((label, run(broker, label, env, cwd)))
    rows = [
        "| configuration | lost | dup | quiet p50 ms | SIGTERM: survivor +max ms"
        " | SIGTERM: moved +max ms | SIGTERM: stop took s | SIGKILL: survivor +max ms"
        " | SIGKILL: moved partitions first call after s (target: session + 3 s)"
        " | SIGKILL: moved +max ms | cut short |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results:
        rows.append(
            f"| {label} | {r['lost']:.0f} | {r['duplicated']:.0f} | {r['quiet_p50']:.0f}"
            f" | {r['term_survivor_added_max']:.0f} | {r['term_moved_added_max']:.0f}"
            f" | {r['term_stop_took_s']:.1f} | {r['kill_survivor_added_max']:.0f}"
            f" | {r['kill_moved_first_after_s']:.1f} ({r['session_s'] + 3:.0f})"
            f" | {r['kill_moved_added_max']:.0f}"
            f" | {r['cut_short']:.0f} |"
        )
    load = os.getloadavg()
    rows += [
        "",
        f"Messages from distinct users through the gateway for {DURATION:.0f} s: {RATE:.0f}/s"
        f" with the 1 s model, {RATE / 2:.0f}/s with the 5 s one; 2 replicas of the model stage"
        f" (demo model, at most 64 calls at a time each, so one replica alone keeps up),"
        f" {PARTITIONS} partitions, everything else as in `imbot dev`. SIGTERM of replica A at"
        f" {T_TERM:.0f} s (started again at {T_TERM_BACK:.0f} s), SIGKILL of replica B at"
        f" {T_KILL:.0f} s (started again at {T_KILL_BACK:.1f} s). 'before' = the stage runtime"
        f" of commit {BEFORE} (Faust's unbounded wait for every message in a stream on"
        " revocation and stop, a 30 s drain, no LeaveGroup at Tansu's generation 0)."
        " 'grace' = IMBOT_STAGE_REVOKE_GRACE_S, 'stop' = IMBOT_STAGE_STOP_GRACE_S; a/b/c s = session / rebalance / heartbeat"
        " timeouts. '+max' = the largest latency of the messages sent from 3 s before the"
        f" event to {WINDOW:.0f} s after it (both rebalances, the departure's and the"
        " restarted replica's join), minus the quiet p50; 'survivor' = messages on the"
        " partitions the other replica owned before the event; 'moved' = the departing"
        " replica's. 'cut short' = messages the lanes gave up at a rebalance or stop"
        " (redelivered). Everything on the same 2 cores"
        f" (load average {load[0]:.1f} at the end, other sessions' work included).",
        "",
        "Tansu holds a rebalance's join phase for longer the longer the session timeout (a real"
        " Kafka broker completes it once every member has rejoined). Plain aiokafka, two"
        " members, one leaves: the other owns every partition after "
        + ", ".join(f"{took:.1f} s (session {t:.0f} s)" for t, took in holds.items())
        + ".",
    ]
    body = "\n".join(rows)
    print(body)
    if only:
        return
    write_section("restarts", "Restarts", "python -m bench.restarts", body)


if __name__ == "__main__":
    main()
