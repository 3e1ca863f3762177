"""The console's pages against a large history on PostgreSQL: server time per page.

    .venv/bin/python -m bench.console [--messages 1000000]

Seeds a fresh database (dropped at the end) with ``--messages`` history rows (half
questions, half answers, over 50,000 conversations and the last 7 days), a usage row, a
settled reservation and a delivery per answer, 20,000 ratings and 50 calls in flight, all
server-side (``generate_series``). Then each page is asked for ``--runs`` times by a
logged-in viewer through real HTTP, and its server time (the ``Server-Timing`` header the
console sets) is reported at p50 / p95 / max, beside the same pages over an empty database
measured in the same run (the floor). The figures go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import time
import uuid
from collections.abc import Sequence

import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imbot.console.app import create_app
from imbot.core.settings import load_settings
from imbot.storage import upgrade

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
TOKEN = "bench-viewer-token-0123456789"
PAGES = (
    ("now (overview)", "/"),
    ("now panel (live refresh)", "/now/panel"),
    ("search by user", "/search?kind=user&q=u4242"),
    ("conversation", "/conversation/chat:ai_bot:u4242"),
    ("message (database part)", "/message/m424242"),
    ("money, 2 days", "/money?days=2&user=u4242"),
    ("quality, 14 days", "/quality"),
    ("audit", "/audit"),
)

_SEED = (
    """INSERT INTO conversations (id, chat_type, bot, created_at, last_message_at)
    SELECT 'chat:ai_bot:u' || g, 'chat', 'ai_bot', now() - interval '7 days',
           now() - (g % 10080) * interval '1 minute'
    FROM generate_series(1, 50000) g""",
    # Two rows per exchange: the question m<n> and the answer m<n>:reply, spread evenly
    # over the last 7 days (newest last), conversation u<(n % 50000) + 1>.
    """INSERT INTO messages (msg_id, conversation_id, role, author, text, kind, reply_to,
                             tokens, provider, created_at)
    SELECT CASE WHEN g % 2 = 0 THEN 'm' || (g / 2) ELSE 'm' || (g / 2) || ':reply' END,
           'chat:ai_bot:u' || ((g / 2) % 50000 + 1),
           CASE WHEN g % 2 = 0 THEN 'user' ELSE 'assistant' END,
           CASE WHEN g % 2 = 0 THEN 'u' || ((g / 2) % 50000 + 1) ELSE 'ai_bot' END,
           repeat('字', 40), CASE WHEN g % 2 = 0 THEN 'message' ELSE 'answer' END,
           CASE WHEN g % 2 = 1 THEN 'm' || (g / 2) END, 30,
           CASE WHEN g % 2 = 1 THEN 'demo' END,
           now() - (($1::bigint - g) * interval '1 second' * 604800 / $1::bigint)
    FROM generate_series(0, $1::bigint - 1) g""",
    """INSERT INTO usage (msg_id, conversation_id, model, provider, input_tokens, output_tokens,
                          cost, currency, latency_ms, created_at)
    SELECT 'm' || g, 'chat:ai_bot:u' || (g % 50000 + 1),
           CASE WHEN g % 3 = 0 THEN 'demo-plus' ELSE 'demo-lite' END, 'demo', 30, 60, 0.001,
           'CNY', 800, now() - (($1::bigint / 2 - g) * interval '2 second' * 604800 / $1::bigint)
    FROM generate_series(0, $1::bigint / 2 - 1) g""",
    """INSERT INTO quota_reservations (id, msg_id, user_id, tier, model, keys, tokens, micros,
                                       state, spent_tokens, spent_micros, created_at,
                                       expires_at, settled_at)
    SELECT 'r' || g, 'm' || g, 'u' || (g % 50000 + 1),
           CASE WHEN g % 10 = 0 THEN 'pro' ELSE 'free' END,
           CASE WHEN g % 3 = 0 THEN 'demo-plus' ELSE 'demo-lite' END, '', 2000, 20000,
           'settled', 90, 1000 + g % 5000, t, t + interval '10 minutes', t
    FROM (SELECT g, now() - (($1::bigint / 2 - g) * interval '2 second' * 604800
                             / $1::bigint) AS t
          FROM generate_series(0, $1::bigint / 2 - 1) g) s""",
    """INSERT INTO quota_reservations (id, msg_id, user_id, tier, model, keys, tokens, micros,
                                       state, created_at, expires_at)
    SELECT 'held' || g, 'mh' || g, 'u' || g, 'free', 'demo-plus', '', 2000, 20000, 'held',
           now(), now() + interval '10 minutes'
    FROM generate_series(1, 50) g""",
    """INSERT INTO deliveries (msg_id, part, parts, target_kind, target, status,
                               easemob_msg_id, attempts, created_at, sent_at)
    SELECT 'm' || g, 0, 1, 'users', 'u' || (g % 50000 + 1), 'sent', 'e' || g, 1, now(), now()
    FROM generate_series(0, $1::bigint / 2 - 1) g""",
    """INSERT INTO feedback (msg_id, reply_msg_id, rating, user_id, conversation_id, created_at)
    SELECT 'f' || g, 'e' || (g * 20), CASE WHEN g % 4 = 0 THEN 'down' ELSE 'up' END,
           'u' || (g % 50000 + 1), 'chat:ai_bot:u' || (g % 50000 + 1),
           now() - (g % 20160) * interval '1 minute'
    FROM generate_series(0, 19999) g""",
)


async def _admin(statement: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def _seed(name: str, messages: int) -> float:
    started = time.perf_counter()
    conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:5432/{name}")
    try:
        for statement in _SEED:
            if "$1" in statement:
                await conn.execute(statement, messages)
            else:
                await conn.execute(statement)
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return time.perf_counter() - started


async def _measure(url: str, runs: int) -> dict[str, list[float]]:
    settings = load_settings(
        database_url=url, console_tokens=f"bench:viewer:{TOKEN}", log_json=False
    )
    client: TestClient[web.Request, web.Application] = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    try:
        response = await client.post("/login", data={"token": TOKEN}, allow_redirects=False)
        assert response.status == 303
        times: dict[str, list[float]] = {}
        for label, path in PAGES:
            for _ in range(runs):
                page = await client.get(path, headers={"Accept": "text/html"})
                await page.read()
                assert page.status in (200, 404), (path, page.status)  # 404: the floor
                found = re.search(r"dur=([0-9.]+)", page.headers["Server-Timing"])
                assert found is not None
                times.setdefault(label, []).append(float(found.group(1)))
        return times
    finally:
        await client.close()


def _stats(values: Sequence[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return statistics.median(ordered), p95, ordered[-1]


async def main(messages: int, runs: int) -> None:
    names = {
        kind: f"imbot_bench_console_{kind}_{uuid.uuid4().hex[:6]}" for kind in ("empty", "full")
    }
    for name in names.values():
        await _admin(f'CREATE DATABASE "{name}"')
    try:
        urls = {k: f"postgresql+asyncpg://postgres@127.0.0.1:5432/{n}" for k, n in names.items()}
        for url in urls.values():
            await asyncio.to_thread(upgrade, url)
        seeded = await _seed(names["full"], messages)
        print(f"seeded {messages:,} history rows (and the ledgers) in {seeded:.0f} s")
        floor = await _measure(urls["empty"], runs)
        full = await _measure(urls["full"], runs)
        print(f"\nserver time (ms) over {runs} requests each; floor: the same page, empty database")
        print(f"{'page':28} {'p50':>8} {'p95':>8} {'max':>8} {'floor p50':>10} {'ratio':>7}")
        for label, _ in PAGES:
            p50, p95, top = _stats(full[label])
            base = _stats(floor[label])[0]
            print(f"{label:28} {p50:8.1f} {p95:8.1f} {top:8.1f} {base:10.1f} {p50 / base:7.1f}x")
    finally:
        for name in names.values():
            await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.messages, args.runs))
