"""The cost of routing and of the quota ledger, against baselines measured in the same run.

- the route stage per message on PostgreSQL: the tiered policy (tier lookup, complexity
  score, budget standing) against the fixed-chain route (history window only) on the
  same database;
- the quota reservation's round trip on PostgreSQL (reserve, then settle: the two
  transactions a paid call adds) against one ``SELECT 1`` round trip on the same engine,
  sequentially and with 16 calls at once.

Run: ``python -m bench.quota`` (writes its section of docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy import text

from bench.loadgen import percentile
from bench.pipeline import _drop_postgres, _postgres_url
from bench.report import write_section
from imbot.core.envelope import ChatType, Content, Envelope
from imbot.core.routing import QuotaScope
from imbot.core.settings import DEFAULT_POLICY_FILE, Settings, load_settings
from imbot.routing.budgets import Budgets
from imbot.routing.tiers import TierBook
from imbot.storage import Reservation, Storage, open_storage, upgrade
from imbot.streams.stages import Route

ROUNDS = 2000
QUESTIONS = (
    "你好呀",
    "明天北京天气怎么样",
    "请用 Python 写一个 LRU 缓存并分析复杂度",
    "Compare Raft and Paxos for a five-node cluster, with the trade-offs",
    "谢谢！",
)


def _envelope(n: int) -> Envelope:
    user = f"bench{n % 50}"
    return Envelope(
        msg_id=uuid.uuid4().hex,
        conversation_id=f"chat:ai_bot:{user}",
        chat_type=ChatType.direct,
        sender=user,
        to="ai_bot",
        bot="ai_bot",
        content=Content(type="txt", text=QUESTIONS[n % len(QUESTIONS)]),
    )


def _route(settings: Settings, store: Storage) -> Route:
    return Route(
        settings.policy,
        store.history,
        tiers=TierBook(settings.policy.routing, store.tiers),
        quota=store.quota,
        budgets=Budgets.of(settings),
        usage=store.usage,
    )


def _deciding(stage: Route, deadline: float) -> Callable[[int], Awaitable[object]]:
    """One route decision on the n-th envelope: the call ``_timed`` measures."""
    return lambda n: stage.handle(_envelope(n), deadline=deadline)


async def _timed(rounds: int, one: Callable[[int], Awaitable[object]]) -> list[float]:
    out = []
    for n in range(rounds):
        started = time.perf_counter()
        await one(n)
        out.append((time.perf_counter() - started) * 1000)
    return out


def _fixed_policy(folder: Path) -> Path:
    path = folder / "fixed.yaml"
    path.write_text(
        "models: {demo-lite: {provider: demo, price: {input: 2, output: 6, currency: CNY}}}\n"
        "routes: {default: {models: [demo-lite], history_turns: 10}}\n",
        encoding="utf-8",
    )
    return path


async def _route_costs(url: str, folder: Path) -> dict[str, list[float]]:
    store = await open_storage(url)
    try:
        deadline = time.monotonic() + 3600
        tiered = _route(load_settings(policy_file=DEFAULT_POLICY_FILE), store)
        fixed = _route(load_settings(policy_file=_fixed_policy(folder)), store)
        for stage in (tiered, fixed):  # warm the pool and the caches
            await _timed(200, _deciding(stage, deadline))
        results: dict[str, list[float]] = {"fixed": [], "tiered": []}
        for _ in range(4):  # interleaved, so drift hits both alike
            results["fixed"] += await _timed(ROUNDS // 4, _deciding(fixed, deadline))
            results["tiered"] += await _timed(ROUNDS // 4, _deciding(tiered, deadline))
        return results
    finally:
        await store.close()


async def _ledger_costs(url: str) -> dict[str, list[float]]:
    store = await open_storage(url)
    try:
        scopes = [
            QuotaScope(key=f"user:b:d:{uuid.uuid4().hex[:6]}", label="user daily", micros=10**15),
            QuotaScope(key=f"tenant:b:d:{uuid.uuid4().hex[:6]}", label="tenant daily"),
        ]

        async def select_one(_: int) -> None:
            async with store.database.reading() as session:
                await session.execute(text("SELECT 1"))

        async def reserve_settle(n: int) -> None:
            held = await store.quota.reserve(
                reservation_id=uuid.uuid4().hex,
                msg_id=f"m{n}",
                user_id="b",
                tier="free",
                model="demo-pro",
                scopes=scopes,
                tokens=1000,
                micros=60_000,
                ttl_s=300,
            )
            assert isinstance(held, Reservation)
            await store.quota.settle(held, tokens=300, micros=12_000)

        await _timed(200, reserve_settle)
        await _timed(200, select_one)
        results: dict[str, list[float]] = {"select_1": [], "reserve_settle": []}
        for _ in range(4):
            results["select_1"] += await _timed(ROUNDS // 4, select_one)
            results["reserve_settle"] += await _timed(ROUNDS // 4, reserve_settle)
        # 16 at once on one user's budget (one hot row): the throughput that matters.
        started = time.perf_counter()
        await asyncio.gather(*(_timed(100, reserve_settle) for _ in range(16)))
        results["concurrent_per_s"] = [1600 / (time.perf_counter() - started)]
        return results
    finally:
        await store.close()


def _row(label: str, values: list[float], base: list[float] | None = None) -> str:
    p50, p99 = statistics.median(values), percentile(values, 0.99)
    added = f"{p50 - statistics.median(base):+.3f}" if base else "—"
    return f"| {label} | {p50:.3f} | {p99:.3f} | {added} |"


def main() -> None:
    url = _postgres_url()
    try:
        upgrade(url)
        with tempfile.TemporaryDirectory() as folder:
            route = asyncio.run(_route_costs(url, Path(folder)))
        ledger = asyncio.run(_ledger_costs(url))
    finally:
        _drop_postgres(url)
    body = "\n".join(
        [
            f"PostgreSQL 15 on this machine, {ROUNDS} messages per variant, interleaved.",
            "",
            "| per message (ms) | p50 | p99 | added p50 |",
            "|---|---|---|---|",
            _row("route, fixed chain (history window) — baseline", route["fixed"]),
            _row(
                "route, tiers + complexity + budget standing",
                route["tiered"],
                route["fixed"],
            ),
            _row("`SELECT 1` round trip — baseline", ledger["select_1"]),
            _row(
                "quota reserve + settle (2 transactions)",
                ledger["reserve_settle"],
                ledger["select_1"],
            ),
            "",
            f"Reserve + settle, 16 concurrent callers on one user's budget (one hot row):"
            f" {ledger['concurrent_per_s'][0]:.0f} paid calls/s.",
        ]
    )
    print(body)
    write_section("quota", "Routing and the quota ledger", "python -m bench.quota", body)


if __name__ == "__main__":
    main()
