"""Open-loop load at a fixed rate: latency is measured from each request's scheduled time.

Unlike a closed loop (wrk), a slow answer does not slow the sender down, so queueing
delay shows up in the percentiles instead of being hidden (coordinated omission).
Prints one JSON line: sent, ok, errors, p50/p90/p99/max in ms, achieved rate.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
import uuid

import aiohttp


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def signed(template: str, secret: str | None) -> str:
    """With a secret: a fresh callId and timestamp signed into the template (the
    gateway refuses a replayed callId), replacing CALLID, TIMESTAMP and SECURITY."""
    if secret is None:
        return template
    call_id, ts = f"bench#loadgen_{uuid.uuid4()}", str(int(time.time() * 1000))
    security = hashlib.md5(f"{call_id}{secret}{ts}".encode()).hexdigest()
    return (
        template.replace("CALLID", call_id).replace("TIMESTAMP", ts).replace("SECURITY", security)
    )


async def run(
    url: str,
    body_template: str,
    rate: float,
    duration: float,
    connections: int,
    secret: str | None = None,
) -> dict[str, float]:
    total = int(rate * duration)
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        # warm the connection pool
        for i in range(min(connections, 50)):
            async with session.post(
                url,
                data=signed(body_template, secret).replace("MSGID", str(9 * 10**17 + i)).encode(),
            ) as r:
                await r.read()
        start = time.perf_counter() + 0.05

        async def one(i: int, scheduled: float) -> None:
            nonlocal errors
            body = signed(body_template, secret).replace("MSGID", str(10**18 + i)).encode()
            try:
                async with session.post(
                    url, data=body, headers={"Content-Type": "application/json"}
                ) as resp:
                    await resp.read()
                    if resp.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append((time.perf_counter() - scheduled) * 1000)

        tasks: list[asyncio.Task[None]] = []
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, scheduled)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {
        "sent": total,
        "errors": errors,
        "rate": total / elapsed,
        "p50": percentile(latencies, 0.50),
        "p90": percentile(latencies, 0.90),
        "p99": percentile(latencies, 0.99),
        "max": max(latencies),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--secret", help="sign each request (template with CALLID, TIMESTAMP, SECURITY)"
    )
    args = parser.parse_args()
    with open(args.body_file, encoding="utf-8") as fh:
        template = fh.read()
    print(
        json.dumps(
            asyncio.run(
                run(args.url, template, args.rate, args.duration, args.connections, args.secret)
            )
        )
    )


if __name__ == "__main__":
    main()
