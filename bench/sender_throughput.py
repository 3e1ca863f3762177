"""Easemob REST sends per second to the simulator: paced at 100/s, and unpaced.

The simulator runs in its own process (``python -m imbot.simulator``); this process runs
one ``EasemobClient`` with 32 concurrent callers of ``send_text``.

- Paced (``Pacer(100, burst=1)``): the rate over each 10 s window must be within 5%
  of 100/s and never above it; the busiest sliding 1 s window is reported too (a
  token bucket with burst 1 allows at most 100 calls in any window under 1 s).
- Unpaced: the raw capacity of one sender process against the same server, the
  baseline the paced figure is compared with.

- ``ReplySender.deliver`` with the ledger and history on PostgreSQL, unpaced, and the
  crash window inside it: the time from Easemob's answer to the part's ledger row
  committed (a crash in that window shows the part twice), p50 / p99.

    .venv/bin/python -m bench.sender_throughput [--paced-seconds 20] [--raw-seconds 10]
    .venv/bin/python -m bench.sender_throughput --deliveries-only [--raw-seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from bench.pipeline import _drop_postgres, _postgres_url
from bench.report import write_section
from imbot.devtools.processes import free_port
from imbot.sender.easemob import EasemobClient
from imbot.sender.pacing import Pacer
from imbot.storage import upgrade

CONCURRENCY = 32
RATE = 100.0
WINDOW = 10.0


@dataclass
class Run:
    sends: int
    elapsed: float
    windows: list[float]  # sends/s in each full WINDOW-second window
    busiest_second: int  # most sends in any sliding window just under 1 s
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.sends / self.elapsed


def _busiest(stamps: list[float], window: float) -> int:
    best, j = 0, 0
    for i, t in enumerate(stamps):
        while stamps[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


async def _measure(
    call: Callable[[int, int], Awaitable[object]], duration: float, concurrency: int = CONCURRENCY
) -> Run:
    """``concurrency`` callers repeating ``call(caller, i)`` for ``duration`` seconds."""
    loop = asyncio.get_running_loop()
    stamps: list[float] = []
    latencies: list[float] = []
    start = loop.time()
    end = start + duration

    async def worker(n: int) -> None:
        i = 0
        while loop.time() < end:
            began = loop.time()
            await call(n, i)
            done = loop.time()
            if done <= end:
                stamps.append(done)
                latencies.append(done - began)
            i += 1

    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    stamps.sort()
    latencies.sort()
    windows = [
        sum(1 for s in stamps if start + k * WINDOW <= s < start + (k + 1) * WINDOW) / WINDOW
        for k in range(int(duration // WINDOW))
    ]
    return Run(
        sends=len(stamps),
        elapsed=duration,
        windows=windows,
        busiest_second=_busiest(stamps, 1.0 - 1e-9),
        p50_ms=latencies[len(latencies) // 2] * 1000,
        p99_ms=latencies[int(len(latencies) * 0.99)] * 1000,
    )


def _client(base_url: str, pacer: Pacer | None = None) -> EasemobClient:
    return EasemobClient(
        base_url=base_url, org="demo-org", app="demo-app", client_id="dev-client",
        client_secret="dev-client-secret", pacer=pacer,
    )  # fmt: skip


async def run(base_url: str, pacer: Pacer | None, duration: float) -> Run:
    client = _client(base_url, pacer)
    await client.send_text("users", sender="ai_bot", to="warmup", text="warm-up")

    async def send(n: int, i: int) -> str:
        return await client.send_text("users", sender="ai_bot", to=f"u{n}", text=f"消息{i}")

    result = await _measure(send, duration)
    await client.aclose()
    return result


@dataclass
class Window:
    """From Easemob's answer to the ledger row committed, per part (seconds)."""

    samples: list[float]

    def quantile(self, q: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000 if ordered else 0.0


async def run_deliveries(
    base_url: str, db_url: str, duration: float, concurrency: int = CONCURRENCY
) -> tuple[Run, Window]:
    """Unpaced ``ReplySender.deliver``, and the window between Easemob's answer and the
    ledger commit (measured around the client's and the store's calls, per task)."""
    from imbot.core.envelope import ChatType, Content, Envelope, Reply
    from imbot.sender.service import ReplySender
    from imbot.storage import DeliveryLedger, open_database

    answered: dict[asyncio.Task[object] | None, float] = {}
    window = Window([])

    class TimedClient(EasemobClient):
        async def send_text(self, *args: Any, **kwargs: Any) -> str:
            result = await super().send_text(*args, **kwargs)
            answered[asyncio.current_task()] = time.perf_counter()
            return result

    class TimedLedger(DeliveryLedger):
        async def mark_sent(self, *args: Any, **kwargs: Any) -> None:
            await super().mark_sent(*args, **kwargs)
            began = answered.pop(asyncio.current_task(), None)
            if began is not None:
                window.samples.append(time.perf_counter() - began)

    database = await open_database(db_url)
    ledger = TimedLedger(database)
    client = TimedClient(
        base_url=base_url, org="demo-org", app="demo-app", client_id="dev-client",
        client_secret="dev-client-secret",
    )  # fmt: skip
    sender = ReplySender(client, ledger)
    tag = uuid.uuid4().hex[:8]

    async def deliver(n: int, i: int) -> object:
        env = Envelope(
            msg_id=f"{tag}-{n}-{i}",
            conversation_id=f"chat:ai_bot:u{n}",
            chat_type=ChatType.direct,
            sender=f"u{n}",
            to="ai_bot",
            bot="ai_bot",
            content=Content(type="txt", text=f"问题{i}"),
            reply=Reply(text=f"回答{i}"),
        )
        return await sender.deliver(env, deadline=time.monotonic() + 30)

    await deliver(-1, 0)  # warm-up: token, connections, prepared statements
    window.samples.clear()
    result = await _measure(deliver, duration, concurrency)
    await sender.aclose()
    await database.close()
    return result, window


def _deliveries_line(delivered: Run, window: Window) -> str:
    return (
        "| unpaced `ReplySender.deliver` with the ledger and history on PostgreSQL"
        f" | **{delivered.rate:,.0f}** | | {delivered.busiest_second}"
        f" | {delivered.p50_ms:.1f} / {delivered.p99_ms:.1f} ms; crash window (Easemob's answer"
        f" to ledger commit) {window.quantile(0.5):.2f} / {window.quantile(0.99):.2f} ms |"
    )


def _wait_ready(base: str) -> None:
    for _ in range(100):
        try:
            httpx.get(f"{base}/_sim/stats", timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError("simulator did not start")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sender_throughput")
    parser.add_argument("--paced-seconds", type=float, default=20.0)
    parser.add_argument("--raw-seconds", type=float, default=10.0)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--deliveries-only", action="store_true", help="only ReplySender.deliver (print only)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=CONCURRENCY, help="with --deliveries-only"
    )
    args = parser.parse_args()
    port = free_port()
    sim = subprocess.Popen(
        [sys.executable, "-m", "imbot.simulator", "--port", str(port)], stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    if args.deliveries_only:
        try:
            _wait_ready(base)
            db_url = _postgres_url()
            try:
                upgrade(db_url)
                delivered, window = asyncio.run(
                    run_deliveries(base, db_url, args.raw_seconds, args.concurrency)
                )
            finally:
                _drop_postgres(db_url)
        finally:
            sim.terminate()
            sim.wait()
        print(f"{args.concurrency} concurrent callers: {_deliveries_line(delivered, window)}")
        return
    try:
        _wait_ready(base)
        paced = asyncio.run(run(base, Pacer(RATE, burst=1), args.paced_seconds))
        stats = httpx.get(f"{base}/_sim/stats").json()
        arrivals = sorted(
            m["received_at"] / 1000
            for m in httpx.get(f"{base}/_sim/messages", timeout=30).json()["messages"]
            if m["to"] != ["warmup"]
        )
        httpx.post(f"{base}/_sim/reset")
        raw = asyncio.run(run(base, None, args.raw_seconds))
        httpx.post(f"{base}/_sim/reset")
        db_url = _postgres_url()
        try:
            upgrade(db_url)
            delivered, window = asyncio.run(run_deliveries(base, db_url, args.raw_seconds))
        finally:
            _drop_postgres(db_url)
    finally:
        sim.terminate()
        sim.wait()
    # What Easemob would meter: arrival times at the server, in 10 s windows from the first.
    first = arrivals[0]
    arrival_windows = [
        sum(1 for a in arrivals if first + k * WINDOW <= a < first + (k + 1) * WINDOW) / WINDOW
        for k in range(int(args.paced_seconds // WINDOW))
    ]
    arrival_busiest = _busiest(arrivals, 1.0 - 1e-9)
    refused = sum(n for k, n in stats["answers"].items() if not k.endswith(" 200"))
    checked = paced.windows + arrival_windows
    worst = max(abs(w - RATE) / RATE for w in checked)
    # A token bucket's bound over any window of T seconds is burst + rate * T calls:
    # with burst 1, at most 1,001 calls in a 10 s window (100.1/s). That one call is
    # the bucket's burst, not a sustained rate above the limit.
    holds = worst <= 0.05 and max(checked) * WINDOW <= RATE * WINDOW + 1 + 1e-6
    windows = ", ".join(f"{w:.1f}" for w in paced.windows)
    load = os.getloadavg()[0]
    body = "\n".join(
        [
            f"| sender | sends/s | per {WINDOW:.0f} s window | busiest 1 s (sliding) | p50 / p99 send |",
            "|---|---|---|---|---|",
            f"| paced at {RATE:.0f}/s (token bucket, burst 1) | **{paced.rate:.1f}** | {windows} | {paced.busiest_second} | {paced.p50_ms:.1f} / {paced.p99_ms:.1f} ms |",
            f"| paced, as the simulator saw the requests arrive | {sum(arrival_windows) / len(arrival_windows):.1f} | {', '.join(f'{w:.1f}' for w in arrival_windows)} | {arrival_busiest} | |",
            f"| unpaced (raw capacity of one sender process) | **{raw.rate:,.0f}** | {', '.join(f'{w:,.0f}' for w in raw.windows)} | {raw.busiest_second} | {raw.p50_ms:.1f} / {raw.p99_ms:.1f} ms |",
            _deliveries_line(delivered, window),
            "",
            f"Paced: every {WINDOW:.0f} s window (completions at the client and arrivals at the "
            f"server) within {worst:.1%} of {RATE:.0f}/s and none above the bucket's bound of "
            f"{RATE * WINDOW:.0f} + 1 calls (the burst of 1; target: within 5%, never above) — "
            f"**{'holds' if holds else 'MISSED'}**; {refused} non-200 answers while paced. "
            "The bucket issues calls 10 ms apart; a sliding second of completions or arrivals can "
            "still hold 101 because network and scheduling jitter moves single requests by a few ms "
            "(set `IMBOT_EASEMOB_RATE_LIMIT=99` for a margin against Easemob's own counter). "
            "The paced p50 is queueing, not Easemob: 32 callers share 100 calls/s. "
            f"Raw capacity is {raw.rate / RATE:.1f}× the paced rate (ratio against the same "
            "simulator in the same run), so pacing, not the client, sets the pace.",
            "",
            f"{CONCURRENCY} concurrent callers of `EasemobClient.send_text` (or of `ReplySender.deliver`, "
            "one-part replies, each a new message: ledger read, the part's claim committed, send, "
            "the ledger row committed alone, then the history; the crash window is the time "
            "from Easemob's answer to that ledger commit) "
            "in one process, the simulator "
            f"in another; both share this 2-core machine with other sessions' work (1-min load "
            f"average {load:.1f} at the end), so the raw figure is a floor and will be re-run later; "
            "the paced figure does not depend on spare CPU as long as raw capacity stays well above 100/s.",
        ]
    )
    print(body)
    if not args.no_write:
        write_section(
            "sender",
            "Sender: Easemob REST sends per second",
            ".venv/bin/python -m bench.sender_throughput",
            body,
        )


if __name__ == "__main__":
    main()
