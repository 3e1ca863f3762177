"""Pipeline overhead floor: callback → reply delivered at the simulated Easemob, zero-latency model.

The easy configuration no app runs (distinct users without history, one fixed model of
price zero, no budgets): what the pipeline's machinery costs at the least.
``bench.pipeline`` is the workload a real app sends, measured beside it.

Runs the whole system as real processes (gateway, stage worker, sender, simulator,
embedded broker, SQLite) and sends AI messages from distinct users at a steady
100 per second. Latency is from just before the callback POST to the moment the
simulator received the reply. The baseline, measured in the same run, is the same
pipeline with the consumers' fetch wait left at Faust's built-in 1,500 ms — what
every hop costs on the embedded broker without the fix (reference: embedded-kafka.md).

    python -m bench.pipeline_floor
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import orjson

from bench.loadgen import percentile
from bench.report import write_section
from imbot.cli.devstack import DevStack, simulate
from imbot.core import topics
from imbot.core.envelope import decode_envelope
from imbot.devtools.broker import EmbeddedBroker
from imbot.simulator.callbacks import build_callback

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/test"

RATE = 100.0
DURATION = 20.0
POLICY = """
models:
  demo: {provider: demo, latency_ms: 0, price: {input: 0, output: 0, currency: CNY}}
routes:
  default: {models: [demo], system_prompt: 你是助手。, history_turns: 4}
streaming: {enabled: false, typing: false}
"""


def _callback(secret: str, user: str, n: int) -> bytes:
    """A signed callback as Easemob sends it (the simulator's builder), a fresh callId."""
    return orjson.dumps(
        build_callback(
            sender=user,
            to="ai_bot",
            text=f"第{n}个问题：今天天气怎么样？",
            secret=secret,
            org="bench",
            app="pipe",
            msg_id=str(7 * 10**17 + n),
        )
    )


async def _drive(stack: DevStack) -> dict[str, float]:
    total = int(RATE * DURATION)
    sent_at: dict[str, float] = {}
    prefix = uuid.uuid4().hex[:6]
    async with httpx.AsyncClient(timeout=5) as client:
        start = time.time() + 0.1
        for n in range(total):
            delay = start + n / RATE - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            body = _callback(stack.secret, f"{prefix}{n}", n)
            sent_at[str(7 * 10**17 + n)] = time.time() * 1000
            resp = await client.post(
                stack.callback_url, content=body, headers={"Content-Type": "application/json"}
            )
            resp.raise_for_status()
        received: dict[str, float] = {}
        deadline = time.time() + 60
        while len(received) < total and time.time() < deadline:
            messages = (await client.get(f"{stack.simulator_url}/_sim/messages")).json()["messages"]
            for m in messages:
                reply_to = (m.get("ext") or {}).get("imbot_reply_to")
                if reply_to in sent_at:
                    received[reply_to] = float(m["received_at"])
            await asyncio.sleep(0.5)
    latencies = [received[k] - sent_at[k] for k in received]
    return {
        "sent": total,
        "delivered": len(received),
        "p50": percentile(latencies, 0.5),
        "p90": percentile(latencies, 0.9),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies) if latencies else float("nan"),
    }


async def _hops(stack: DevStack) -> dict[str, float]:
    """Median time per hop, from the per-stage stamps the envelopes carry."""
    from imbot.devtools.broker import consume_all

    records = await consume_all(
        stack.env["IMBOT_KAFKA_BOOTSTRAP"],
        f"{stack.env['IMBOT_TOPIC_PREFIX']}{topics.DELIVERED}",
        10**6,
        timeout=3,
    )
    order = ["gateway", "moderate-in", "route", "model", "moderate-out", "send"]
    gaps: dict[str, list[float]] = {name: [] for name in order[1:]}
    for _, value in records:
        env = decode_envelope(value)
        stamps = {"gateway": env.received_at, **env.stamps}
        for prev, name in itertools.pairwise(order):
            if prev in stamps and name in stamps:
                gaps[name].append(stamps[name] - stamps[prev])
    return {name: statistics.median(v) for name, v in gaps.items() if v}


def _postgres_url() -> str:
    """A fresh PostgreSQL database on the local server, migrated by the stack."""
    import asyncpg

    name = f"imbot_bench_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


def _drop_postgres(url: str) -> None:
    """Drop a database ``_postgres_url`` made (the benchmarks leave none behind)."""
    import asyncpg

    name = url.rsplit("/", 1)[1]

    async def drop() -> None:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(drop())


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _postgres_cpu_seconds() -> float:
    """CPU time of every PostgreSQL server process (the backends serving the stack)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() in ("postgres", "postmaster"):
                    total += _cpu_seconds(int(entry.name))
            except OSError:
                continue
    return total


def _cpu_snapshot(stack: DevStack, broker: EmbeddedBroker) -> dict[str, float]:
    snap = {name: _cpu_seconds(proc.pid) for name, proc in stack.procs.items()}
    if broker.pid is not None:
        snap["broker"] = _cpu_seconds(broker.pid)
    snap["postgres"] = _postgres_cpu_seconds()
    return snap


def run(
    broker: EmbeddedBroker, label: str, fetch_wait_ms: int, database: str
) -> tuple[dict[str, float], dict[str, float]]:
    root = Path(tempfile.mkdtemp(prefix="imbot-bench-"))
    policy = root / "policy.yaml"
    policy.write_text(POLICY, encoding="utf-8")
    db_url = _postgres_url() if database == "postgresql" else f"sqlite+aiosqlite:///{root}/imbot.db"
    stack = DevStack(
        console=False,
        env={
            "IMBOT_KAFKA_BOOTSTRAP": broker.bootstrap,
            "IMBOT_KAFKA_EMBEDDED": "true",
            "IMBOT_TOPIC_PREFIX": f"b{uuid.uuid4().hex[:6]}.",
            "IMBOT_DATABASE_URL": db_url,
            "IMBOT_POLICY_FILE": str(policy),
            "IMBOT_LOG_LEVEL": "WARNING",
            "IMBOT_CONSUMER_FETCH_MAX_WAIT_MS": str(fetch_wait_ms),
            # Our overhead, not Easemob's: pacing at the app's 100 calls/s would queue
            # a steady 100 msg/s by itself (bench.sender_throughput measures pacing).
            "IMBOT_EASEMOB_RATE_LIMIT": "0",
        },
        log_dir=root / "logs",
        state_file=root / "dev.json",
    )
    stack.start()
    try:
        stack.wait_ready(timeout=60)
        simulate(stack.simulator_url, "warm-up", sender="warmup", timeout=60)
        before = _cpu_snapshot(stack, broker)
        result = asyncio.run(_drive(stack))
        after = _cpu_snapshot(stack, broker)
        # CPU milliseconds each process spent per message while the load ran.
        result.update(
            {f"cpu_{name}": (after[name] - before[name]) * 1000 / result["sent"] for name in after}
        )
        hops = asyncio.run(_hops(stack))
    finally:
        stack.stop()
        if database == "postgresql":
            _drop_postgres(db_url)
    print(label, result, hops, flush=True)
    return result, hops


TUNED_ROUNDS = 3
CPU_NAMES = ("gateway", "worker", "sender", "broker", "postgres", "simulator")


def main() -> None:
    with EmbeddedBroker() as broker:
        runs: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
        # Alternate the configurations so a burst of load from elsewhere on the
        # machine does not land on one of them only.
        for n in range(1, TUNED_ROUNDS + 1):
            runs[f"imbot, PostgreSQL (fetch wait 10 ms), run {n}"] = run(
                broker, f"tuned-pg-{n}", 10, "postgresql"
            )
            if n == 1:
                runs["imbot, SQLite (fetch wait 10 ms)"] = run(broker, "tuned-sqlite", 10, "sqlite")
            if n == 2:
                runs["baseline: Faust's 1,500 ms fetch wait, PostgreSQL"] = run(
                    broker, "untuned-pg", 1500, "postgresql"
                )
    rows = [
        "| pipeline | delivered | p50 ms | p90 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, (r, _) in runs.items():
        rows.append(
            f"| {name} | {r['delivered']:.0f}/{r['sent']:.0f} | {r['p50']:.1f} | {r['p90']:.1f} | {r['p99']:.1f} | {r['max']:.1f} |"
        )
    tuned = [r for name, (r, _) in runs.items() if name.startswith("imbot, PostgreSQL")]
    median_p99 = statistics.median(r["p99"] for r in tuned)
    median_p50 = statistics.median(r["p50"] for r in tuned)
    hop_names = list(next(iter(runs.values()))[1])
    rows += [
        "",
        "Median time per hop (from the envelope's per-stage stamps; each includes the Kafka hop into that stage):",
        "",
        "| | " + " | ".join(hop_names) + " |",
        "|---|" + "---|" * len(hop_names),
    ]
    for name, (_, hops) in runs.items():
        rows.append(
            f"| {name} | "
            + " | ".join(f"{hops.get(h, float('nan')):.1f} ms" for h in hop_names)
            + " |"
        )
    rows += [
        "",
        "CPU milliseconds per message, by process, while the load ran (the simulator's "
        "figure includes answering the benchmark's polling):",
        "",
        "| | " + " | ".join(CPU_NAMES) + " | all |",
        "|---|" + "---|" * (len(CPU_NAMES) + 1),
    ]
    for name, (r, _) in runs.items():
        cpu = [r.get(f"cpu_{c}", float("nan")) for c in CPU_NAMES]
        rows.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cpu) + f" | {sum(cpu):.1f} |")
    load = os.getloadavg()
    rows += [
        "",
        f"{RATE:.0f} AI messages/s from distinct users for {DURATION:.0f} s; zero-latency demo model; "
        "sender pacing off; everything (load generator, 5 services, broker, database) on the same "
        f"2 cores, which the pipeline keeps about {sum(tuned[0].get(f'cpu_{c}', 0) for c in CPU_NAMES) * RATE / 1000 / 2:.0%} busy "
        f"(load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end, other sessions' work included). "
        f"Target: p99 < 100 ms — **{median_p99:.1f} ms** (median of {len(tuned)} PostgreSQL runs; "
        f"p50 {median_p50:.1f} ms).",
    ]
    body = "\n".join(rows)
    print(body)
    write_section(
        "pipeline",
        "Pipeline overhead: callback to delivered reply",
        "python -m bench.pipeline_floor",
        body,
    )


if __name__ == "__main__":
    main()
