"""Easemob REST sends per second to the simulator: paced at 100/s, and unpaced.

The simulator runs in its own process. 32 concurrent senders call
``EasemobClient.send_text``. Paced: the rate must hold within 5% of 100/s and no
one-second window may exceed it (plus the bucket's burst); unpaced shows one
sender process's raw capacity against the same server.

    python -m bench.sender_throughput
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import httpx

from bench.report import write_section
from core.kafka import free_port
from sender.easemob import EasemobClient
from sender.pacing import Pacer

DURATION = 10.0
CONCURRENCY = 32
RATE = 100.0


async def run(base_url: str, pacer: Pacer | None) -> dict[str, float]:
    client = EasemobClient(
        base_url=base_url, org="demo-org", app="demo-app", client_id="dev-client",
        client_secret="dev-client-secret", pacer=pacer,
    )  # fmt: skip
    stamps: list[float] = []
    await client.send_text("users", sender="ai_bot", to="warmup", text="warm-up")
    start = time.monotonic()
    end = start + DURATION

    async def worker(n: int) -> None:
        i = 0
        while time.monotonic() < end:
            await client.send_text("users", sender="ai_bot", to=f"u{n}", text=f"消息{i}")
            stamps.append(time.monotonic())
            i += 1

    await asyncio.gather(*(worker(n) for n in range(CONCURRENCY)))
    await client.aclose()
    elapsed = max(stamps) - start
    windows = [
        sum(1 for s in stamps if start + k <= s < start + k + 1) for k in range(int(DURATION))
    ]
    return {"rate": len(stamps) / elapsed, "max_window": max(windows), "min_window": min(windows)}


def main() -> None:
    port = free_port()
    sim = subprocess.Popen([sys.executable, "-m", "simulator", "--port", str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                httpx.get(f"{base}/_sim/messages", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        paced = asyncio.run(run(base, Pacer(RATE, burst=1)))
        httpx.post(f"{base}/_sim/reset")
        raw = asyncio.run(run(base, None))
    finally:
        sim.terminate()
        sim.wait()
    deviation = abs(paced["rate"] - RATE) / RATE
    body = "\n".join(
        [
            "| sender | sends/s | busiest 1 s window | quietest 1 s window |",
            "|---|---|---|---|",
            f"| paced at {RATE:.0f}/s (token bucket, burst 1) | **{paced['rate']:.1f}** | {paced['max_window']:.0f} | {paced['min_window']:.0f} |",
            f"| unpaced (raw capacity of one sender process) | **{raw['rate']:,.0f}** | {raw['max_window']:.0f} | {raw['min_window']:.0f} |",
            "",
            f"{CONCURRENCY} concurrent senders for {DURATION:.0f} s against the simulator in its own process "
            f"(same 2 cores). Paced rate is {deviation:.1%} from {RATE:.0f}/s (target within 5%, never above: "
            f"busiest window {paced['max_window']:.0f}).",
        ]
    )
    print(body)
    write_section(
        "sender", "Sender: Easemob REST sends per second", "python -m bench.sender_throughput", body
    )


if __name__ == "__main__":
    main()
