"""Adapter overhead: ``ChatModel.complete`` vs a bare httpx call, in the same run.

Both sides send the same request to the same fake OpenAI server, which runs in a
separate process so the client side is measured fairly; both use the same client
settings (``adapters.catalog.new_client``) and both parse the JSON answer. Our
side is the full per-model stack the catalog uses (concurrency limit → circuit
breaker → metrics → provider), and also ``ModelCatalog.complete`` (retry and
fallback loop, deadline). Rounds alternate between the variants so drift on a
shared machine hits both alike.

    python -m bench.adapters_overhead
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import orjson

from bench.report import write_section
from imbot.adapters import ChatMessage, ChatRequest, build_catalog
from imbot.adapters.catalog import new_client
from imbot.adapters.openai import build_body
from imbot.core.catalog import OpenAIConfig

ROUNDS = 8
PER_ROUND_C1 = 400
PER_ROUND_C64 = 2000
CONCURRENCY = 64

REQUEST = ChatRequest(
    messages=(
        ChatMessage(role="system", content="你是一个乐于助人的中文助手，回答简洁。"),
        ChatMessage(role="user", content="你好，请介绍一下你自己"),
    ),
    max_output_tokens=512,
    user_id="u_3f9a1c",
)

Call = Callable[[], Awaitable[object]]


def start_fake() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fakes.providers", "openai", "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    base_url = line.strip().rsplit(" ", 1)[-1]
    if not base_url.startswith("http"):
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc, base_url


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def sequential(call: Call, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        out.append((time.perf_counter() - t0) * 1000)
    return out


async def concurrent(call: Call, n: int, workers: int) -> float:
    """Requests per second with ``workers`` callers sharing ``n`` requests."""
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return n / (time.perf_counter() - t0)


async def run(base_url: str) -> str:
    env = {"BENCH_KEY": "sk-bench-0123456789"}
    models = {
        "gpt-4o-mini": {
            "provider": "openai",
            "base_url": base_url,
            "api_key_env": "BENCH_KEY",
            "price": {"input": 0.15, "output": 0.6, "currency": "USD"},
            "max_concurrency": CONCURRENCY,
        }
    }
    catalog = build_catalog(models, env=env)
    model = catalog.model("gpt-4o-mini")
    bare = new_client(CONCURRENCY)
    cfg = OpenAIConfig.model_validate({**models["gpt-4o-mini"], "model": "gpt-4o-mini"})
    body = orjson.dumps(build_body(cfg, "gpt-4o-mini", REQUEST, stream=False))
    url = f"{base_url}/chat/completions"
    headers = {"content-type": "application/json", "authorization": "Bearer sk-bench-0123456789"}
    timeout = httpx.Timeout(60.0, connect=5.0)

    async def bare_call() -> object:
        response = await bare.post(url, content=body, headers=headers, timeout=timeout)
        data = orjson.loads(response.content)
        return data["choices"][0]["message"]["content"]

    async def model_call() -> object:
        return (await model.complete(REQUEST)).text

    async def catalog_call() -> object:
        return (await catalog.complete(["gpt-4o-mini"], REQUEST, deadline_s=30)).text

    variants: dict[str, Call] = {
        "bare httpx": bare_call,
        "ChatModel.complete": model_call,
        "ModelCatalog.complete": catalog_call,
    }
    # Warm up connections, caches and code paths.
    for call in variants.values():
        await concurrent(call, 500, CONCURRENCY)
        await sequential(call, 200)

    lat: dict[str, list[float]] = {k: [] for k in variants}
    rps: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(ROUNDS):
        order = list(variants.items())
        if r % 2:
            order.reverse()
        for name, call in order:
            lat[name].extend(await sequential(call, PER_ROUND_C1))
        for name, call in order:
            rps[name].append(await concurrent(call, PER_ROUND_C64, CONCURRENCY))
    await bare.aclose()
    await catalog.aclose()

    base = lat["bare httpx"]
    b50, b99 = pct(base, 0.5), pct(base, 0.99)
    brps = statistics.median(rps["bare httpx"])
    rows = [
        "| client | c=1 p50 ms | c=1 p99 ms | added p50 ms | added p99 ms | c=64 req/s (median of rounds) | vs bare |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for name in variants:
        p50, p99 = pct(lat[name], 0.5), pct(lat[name], 0.99)
        med = statistics.median(rps[name])
        rows.append(
            f"| {name} | {p50:.3f} | {p99:.3f} | {p50 - b50:+.3f} | {p99 - b99:+.3f} | {med:,.0f} | {med / brps:.0%} |"
        )
        if name == "ChatModel.complete":
            verdicts.append(
                f"- ChatModel.complete: added p50 {p50 - b50:+.3f} ms (target < 0.3) "
                f"{'✅' if p50 - b50 < 0.3 else '❌'}, added p99 {p99 - b99:+.3f} ms (target < 1) "
                f"{'✅' if p99 - b99 < 1 else '❌'}, c=64 throughput {med / brps:.0%} of bare "
                f"(target ≥ 80%) {'✅' if med / brps >= 0.8 else '❌'}"
            )
    load = os.getloadavg()
    notes = [
        "",
        *verdicts,
        "",
        f"{ROUNDS} alternating rounds; c=1: {ROUNDS * PER_ROUND_C1} sequential calls per client; "
        f"c=64: {PER_ROUND_C64} calls per round with 64 concurrent callers. The fake OpenAI "
        "server (aiohttp, `tests.fakes.providers`) runs in its own process; both clients share "
        "`adapters.catalog.new_client` settings and parse the JSON body. ChatModel.complete is "
        "the wrapped per-model stack (limit, breaker, metrics); ModelCatalog.complete adds the "
        "retry/fallback loop and deadline.",
        "",
        f"Load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the end of the run. At c=64 the "
        "single-process fake server and the client compete for the same 2 cores, so the ratio is "
        "the meaningful figure, not the absolute rate; it moves by about ±15% between runs.",
    ]
    return "\n".join(rows + notes)


def main() -> None:
    proc, base_url = start_fake()
    try:
        body = asyncio.run(run(base_url))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(body)
    write_section(
        "adapters",
        "Model adapter overhead vs bare httpx",
        "python -m bench.adapters_overhead",
        body,
    )


if __name__ == "__main__":
    main()
