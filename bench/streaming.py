"""Answers streamed as they are written, against whole messages, in one run.

Two fresh stacks (embedded broker, PostgreSQL, gateway, one combined stage worker, the
sender, the simulated Easemob), the default policy with its demo models writing at a
remote model's pace: first token after 0.5–2 s, then 30–80 tokens/s, 300–600 tokens.
One stack streams (the policy's default ``streaming``), the other sends whole messages
(``streaming.enabled: false``, no typing indicator). The simulated Easemob refuses more
than 100 calls in any second (429), as Easemob's app limit does, and the sender paces at
100/s.

Load: ``--rounds`` rounds of ``--streams`` users asking at once (spread over one second),
each round after the previous one's answers are whole. Measured per message, from the
callback:

* first visible words: the stream's first chunk (streamed) or the message (whole);
* whole answer: the stream's finishing chunk, or the message;
* against the model: its first token (the call's start + its first-token time) and its
  last token (the model stage done), from the delivered envelopes.

Targets (issue 18): first words p50 within the model's first token + 0.6 s; the whole
answer at most 0.5 s after the model's last token; 50 concurrent streams under 100
Easemob calls/s with no 429 that loses a chunk (each stream's text is checked against the
delivered answer). CPU milliseconds per answer by process, both ways: what the per-chunk
review and the chunk hops cost.

    python -m bench.streaming                     # 50 streams, 3 rounds
    python -m bench.streaming --streams 20 --rounds 1 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import yaml
from aiokafka import AIOKafkaConsumer

from bench.loadgen import percentile
from bench.pipeline import CpuSnapshot
from bench.pipeline_floor import _drop_postgres, _postgres_url
from bench.report import write_section
from imbot.cli.devstack import DevStack, simulate
from imbot.core import topics
from imbot.core.envelope import decode_envelope
from imbot.core.settings import DEFAULT_POLICY_FILE
from imbot.devtools.broker import EmbeddedBroker, consume_all
from imbot.simulator.callbacks import build_callback

MODEL = {"first_token_ms": [500, 2000], "tokens_per_s": [30, 80], "output_tokens": [300, 600]}
EASEMOB_LIMIT = 100
QUESTIONS = [
    "请详细介绍一下量子计算的基本原理和应用前景",
    "如何用 Python 写一个高并发的网络爬虫？请给出步骤",
    "比较一下 TCP 和 UDP 的区别，以及各自适合的场景",
    "帮我写一份周末去杭州两天的旅行计划",
    "解释一下机器学习中的过拟合，以及常见的解决办法",
]


def _policy(stream: bool) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(DEFAULT_POLICY_FILE.read_text(encoding="utf-8"))
    for entry in data["models"].values():
        if entry.get("provider") == "demo":
            entry.update(MODEL, max_concurrency=512)
    data["streaming"] = {} if stream else {"enabled": False, "typing": False}
    return data


@dataclass
class Sample:
    sent_ms: float
    first_ms: float | None = None  # first visible words
    whole_ms: float | None = None
    model_first_ms: float | None = None  # the model's first token
    published_ms: float | None = None  # the model stage's first record of the text so far
    released_ms: float | None = None  # the review's first record with text to show
    model_last_ms: float | None = None
    shown: str = ""
    answer: str = ""
    chunks: int = 0


@dataclass
class Result:
    mode: str
    samples: dict[str, Sample] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)
    busiest_second: int = 0
    refused_429: int = 0
    calls: int = 0

    def series(self, name: str) -> list[float]:
        out = []
        for s in self.samples.values():
            if name == "first" and s.first_ms is not None:
                out.append((s.first_ms - s.sent_ms) / 1000)
            elif name == "whole" and s.whole_ms is not None:
                out.append((s.whole_ms - s.sent_ms) / 1000)
            elif name == "first_lag" and None not in (s.first_ms, s.model_first_ms):
                out.append((s.first_ms - s.model_first_ms) / 1000)  # type: ignore[operator]
            elif name == "whole_lag" and None not in (s.whole_ms, s.model_last_ms):
                out.append((s.whole_ms - s.model_last_ms) / 1000)  # type: ignore[operator]
            elif name == "model_first" and s.model_first_ms is not None:
                out.append((s.model_first_ms - s.sent_ms) / 1000)
            elif name == "to_publish" and None not in (s.published_ms, s.model_first_ms):
                out.append((s.published_ms - s.model_first_ms) / 1000)  # type: ignore[operator]
            elif name == "to_release" and None not in (s.released_ms, s.published_ms):
                out.append((s.released_ms - s.published_ms) / 1000)  # type: ignore[operator]
            elif name == "to_screen" and None not in (s.first_ms, s.released_ms):
                out.append((s.first_ms - s.released_ms) / 1000)  # type: ignore[operator]
        return out

    @property
    def intact(self) -> int:
        """Answers whose text on the screen is the delivered answer, whole."""
        return sum(1 for s in self.samples.values() if s.shown and s.shown == s.answer)


async def _round(stack: DevStack, result: Result, users: list[str], round_no: int) -> None:
    secret = stack.secret
    env = stack.env
    async with httpx.AsyncClient(timeout=30) as http:

        async def ask(i: int, user: str) -> None:
            await asyncio.sleep(i / len(users))  # the round's questions over one second
            msg_id = f"{round_no}{uuid.uuid4().int % 10**15:015d}"
            body = build_callback(
                sender=user,
                to="ai_bot",
                text=QUESTIONS[(i + round_no) % len(QUESTIONS)],
                secret=secret,
                org=env["IMBOT_EASEMOB_ORG"],
                app=env["IMBOT_EASEMOB_APP"],
                msg_id=msg_id,
            )
            result.samples[msg_id] = Sample(sent_ms=time.time() * 1000)
            response = await http.post(
                stack.callback_url,
                content=orjson.dumps(body),
                headers={"Content-Type": "application/json"},
            )
            response.raise_for_status()

        await asyncio.gather(*(ask(i, u) for i, u in enumerate(users)))
        # Every answer of the round whole on its user's screen.
        deadline = time.monotonic() + 60
        pending = set(users)
        while pending and time.monotonic() < deadline:
            for user in list(pending):
                items = (
                    await http.get(f"{stack.simulator_url}/_sim/screen", params={"user": user})
                ).json()["items"]
                done = [i for i in items if i["kind"] == "message" or i.get("finished")]
                if len(done) > round_no:
                    pending.discard(user)
            await asyncio.sleep(0.5)


async def _collect(stack: DevStack, result: Result, users: list[str]) -> None:
    """What each screen showed and when, against the delivered envelopes."""
    by_reply: dict[str, dict[str, Any]] = {}
    async with httpx.AsyncClient(timeout=30) as http:
        for user in users:
            items = (
                await http.get(f"{stack.simulator_url}/_sim/screen", params={"user": user})
            ).json()["items"]
            for item in items:
                reply_to = (item.get("ext") or {}).get("imbot_reply_to")
                if reply_to is not None:
                    by_reply[reply_to] = item
        stats = (await http.get(f"{stack.simulator_url}/_sim/stats")).json()
    result.busiest_second = int(stats["busiest_second"])
    result.refused_429 = sum(n for k, n in stats["answers"].items() if k.endswith(" 429"))
    result.calls = int(stats["send_requests"]) + int(stats["stream_requests"])
    records = await consume_all(
        stack.env["IMBOT_KAFKA_BOOTSTRAP"],
        f"{stack.env['IMBOT_TOPIC_PREFIX']}{topics.DELIVERED}",
        len(result.samples),
        timeout=15,
    )
    prefix = stack.env["IMBOT_TOPIC_PREFIX"]
    for topic, field_name in (
        (topics.CHUNKS, "published_ms"),
        (topics.CHUNKS_REVIEWED, "released_ms"),
    ):
        for at_ms, raw in await _timed(stack.env["IMBOT_KAFKA_BOOTSTRAP"], prefix + topic):
            chunk = decode_envelope(raw)
            sample = result.samples.get(chunk.msg_id)
            if sample is None or chunk.partial is None or not chunk.partial.text:
                continue
            if getattr(sample, field_name) is None or at_ms < getattr(sample, field_name):
                setattr(sample, field_name, at_ms)
    for _, value in records:
        env = decode_envelope(value)
        sample = result.samples.get(env.msg_id)
        if sample is None or env.completion is None or env.reply is None:
            continue
        done_ms = env.stamps.get("model")
        if done_ms is not None:
            started = done_ms - env.completion.latency_ms
            sample.model_last_ms = done_ms
            if env.completion.first_token_ms is not None:
                sample.model_first_ms = started + env.completion.first_token_ms
        sample.answer = env.reply.text
        item = by_reply.get(env.msg_id)
        if item is None:
            continue
        sample.shown = item.get("text") or ""
        if item["kind"] == "stream":
            sample.first_ms, sample.whole_ms = float(item["at"]), float(item["updated_at"])
            sample.chunks = int(item["chunks"])
        else:
            sample.first_ms = sample.whole_ms = float(item["at"])


async def _timed(bootstrap: str, topic: str) -> list[tuple[float, bytes]]:
    """Every record of ``topic`` with its timestamp (ms), until none comes for a second."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    out: list[tuple[float, bytes]] = []
    try:
        while batch := await consumer.getmany(timeout_ms=1000):
            out += [(r.timestamp, r.value) for rs in batch.values() for r in rs if r.value]
    finally:
        await consumer.stop()
    return out


def run(mode: str, streams: int, rounds: int) -> Result:
    root = Path(tempfile.mkdtemp(prefix="imbot-bench-streaming-"))
    policy_file = root / "policy.yaml"
    policy_file.write_text(
        yaml.safe_dump(_policy(mode == "streamed"), allow_unicode=True), encoding="utf-8"
    )
    result = Result(mode)
    with EmbeddedBroker() as broker:
        db_url = _postgres_url()
        stack = DevStack(
            console=False,
            env={
                "IMBOT_KAFKA_BOOTSTRAP": broker.bootstrap,
                "IMBOT_KAFKA_EMBEDDED": "true",
                "IMBOT_TOPIC_PREFIX": f"st{uuid.uuid4().hex[:6]}.",
                "IMBOT_DATABASE_URL": db_url,
                "IMBOT_POLICY_FILE": str(policy_file),
                "IMBOT_LOG_LEVEL": "WARNING",
                "IMBOT_EASEMOB_RATE_LIMIT": str(EASEMOB_LIMIT),
                "IMBOT_STAGE_MAX_IN_FLIGHT": "512",
            },
            log_dir=root / "logs",
            state_file=root / "dev.json",
        )
        stack.start()
        try:
            stack.wait_ready(timeout=60)
            simulate(stack.simulator_url, "你好", sender="warmup", timeout=60)
            httpx.post(f"{stack.simulator_url}/_sim/reset").raise_for_status()
            httpx.post(
                f"{stack.simulator_url}/_sim/inject", json={"rate_limit": EASEMOB_LIMIT}
            ).raise_for_status()
            pids = dict(stack.pids())
            if broker.pid is not None:
                pids["broker"] = broker.pid
            users = [f"s{uuid.uuid4().hex[:8]}" for _ in range(streams)]
            database = db_url.rsplit("/", 1)[1]
            before = CpuSnapshot.take(pids, database)
            for n in range(rounds):
                asyncio.run(_round(stack, result, users, n))
            result.cpu = CpuSnapshot.take(pids, database).since(before, len(result.samples))
            del result.cpu["loadgen"]  # this process: it polls the screens, not imbot's work
            asyncio.run(_collect(stack, result, users))
            stack.check_alive()
        finally:
            stack.stop()
            _drop_postgres(db_url)
    return result


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def _p(values: list[float], q: float) -> str:
    return f"{percentile(values, q):.2f}" if values else "–"


def report(results: list[Result], streams: int, rounds: int, write: bool) -> None:
    rows = [
        "| delivery | answers | first words p50 / p90 / p99 s | over the model's first token"
        " p50 / p99 s | whole answer p50 / p99 s | after the model's last token p50 / p99 s"
        " | chunks per answer | Easemob calls, busiest second | 429s | text intact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        first, whole = r.series("first"), r.series("whole")
        first_lag, whole_lag = r.series("first_lag"), r.series("whole_lag")
        chunks = [s.chunks for s in r.samples.values() if s.chunks]
        rows.append(
            f"| {r.mode} | {len(r.samples)} | {_p(first, 0.5)} / {_p(first, 0.9)} /"
            f" {_p(first, 0.99)} | {_p(first_lag, 0.5)} / {_p(first_lag, 0.99)} |"
            f" {_p(whole, 0.5)} / {_p(whole, 0.99)} | {_p(whole_lag, 0.5)} /"
            f" {_p(whole_lag, 0.99)} | {statistics.fmean(chunks) if chunks else 0:.1f} |"
            f" {r.calls}, {r.busiest_second} | {r.refused_429} | {r.intact}/{len(r.samples)} |"
        )
    streamed_results = [r for r in results if r.mode == "streamed"]
    if streamed_results:
        r = streamed_results[0]
        rows += [
            "",
            "Where the first words' time goes, streamed (medians, seconds): from the model's"
            " first token to the model stage's first record of the text so far (the first"
            " clause being written), to the review's first release, to the screen (the"
            " sender, its pacing, Easemob):",
            "",
            "| to the first record | to the first release | to the screen |",
            "|---|---|---|",
            f"| {_p(r.series('to_publish'), 0.5)} | {_p(r.series('to_release'), 0.5)} |"
            f" {_p(r.series('to_screen'), 0.5)} |",
        ]
    names = ["gateway", "worker", "sender", "broker", "postgres", "simulator"]
    rows += [
        "",
        "CPU milliseconds per answer while the rounds ran, by process:",
        "",
        "| delivery | " + " | ".join(names) + " | all |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for r in results:
        cells = [f"{r.cpu.get(n, 0.0):.1f}" for n in names]
        rows.append(f"| {r.mode} | " + " | ".join(cells) + f" | {sum(r.cpu.values()):.1f} |")
    streamed = next((r for r in results if r.mode == "streamed"), None)
    verdict = ""
    if streamed is not None:
        lag50 = percentile(streamed.series("first_lag"), 0.5)
        whole50 = percentile(streamed.series("whole_lag"), 0.5)
        whole99 = percentile(streamed.series("whole_lag"), 0.99)
        verdict = (
            f"\n\nAgainst issue 18's targets, streamed: first words {lag50:.2f} s after the"
            f" model's first token at p50 (target ≤ 0.6 s); the whole answer {whole50:.2f} s"
            f" (p50) and {whole99:.2f} s (p99) after the model's last token (target ≤ 0.5 s);"
            f" busiest second {streamed.busiest_second} Easemob calls (limit"
            f" {EASEMOB_LIMIT}), {streamed.refused_429} answered 429, and"
            f" {streamed.intact} of {len(streamed.samples)} answers whole and exact on the"
            " screen."
        )
    for r in results:
        broken = [(k, x) for k, x in r.samples.items() if x.shown != x.answer]
        for msg_id, x in broken[:5]:
            at = next(
                (i for i, (a, b) in enumerate(zip(x.shown, x.answer, strict=False)) if a != b),
                min(len(x.shown), len(x.answer)),
            )
            print(
                f"  {r.mode}: {msg_id} shown {len(x.shown)} chars, answer {len(x.answer)},"
                f" first difference at {at}: {x.shown[max(0, at - 5) : at + 15]!r} /"
                f" {x.answer[max(0, at - 5) : at + 15]!r}",
                flush=True,
            )
    body = (
        "\n".join(rows)
        + verdict
        + (
            f"\n\n{streams} users asking at once (spread over one second), {rounds} round(s), each"
            " after the previous one's answers were whole; demo models writing like a remote model"
            " (first token 0.5–2 s, then 30–80 tokens/s, 300–600 tokens); the default policy"
            " (tiers, budgets, history); PostgreSQL; embedded broker; one combined stage worker;"
            f" sender paced at {EASEMOB_LIMIT} calls/s and the simulated Easemob refusing more than"
            f" {EASEMOB_LIMIT} in any second. 'over the model's first token' = first words on the"
            " screen minus (the call's start + the model's first-token time), from the delivered"
            " envelope; 'after the model's last token' = the answer whole on the screen minus the"
            " model stage's end. 'text intact' = the screen's text equals the delivered answer."
            f" Everything on the same 2 cores (load average {_load()} at the end, other work"
            " on the machine included)."
        )
    )
    print(body)
    if write:
        write_section(
            "streaming",
            "Streaming: first words and whole answers, streamed and not",
            "python -m bench.streaming",
            body,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    results = [run(mode, args.streams, args.rounds) for mode in ("streamed", "whole")]
    report(results, args.streams, args.rounds, write=not args.no_write)


if __name__ == "__main__":
    main()
