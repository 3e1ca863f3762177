"""How long the console's trace of one message takes, narrowed and wide.

    .venv/bin/python -m bench.console_trace [--rate 100] [--window-s 240] [--spread 20000]

On the embedded broker, topics of 12 partitions: the pipeline's six topics of a whole
message (inbound … delivered) get ``--rate`` messages a second for ``--window-s`` seconds
around the traced message (the density of a 100 msg/s app in the console's window: 3
minutes before its first database row, 1 after its delivery), and ``--spread`` more
messages stamped over the 7 days before (what the retention holds besides; far fewer than
a real week, which only makes the wide scan look better). The narrowed trace (one
partition, the window) and the wide one (every partition, 7 days) of the message are then
timed. The figures go to docs/benchmarks.md by hand.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

from aiokafka.partitioner import DefaultPartitioner

from imbot.core import topics
from imbot.core.envelope import ChatType, Content, Envelope, encode_envelope
from imbot.core.kafka import ensure_topics, new_producer
from imbot.core.settings import load_settings
from imbot.devtools.broker import EmbeddedBroker
from imbot.streams.trace import trace

WHOLE = (
    topics.INBOUND,
    topics.MODERATED,
    topics.ROUTED,
    topics.COMPLETED,
    topics.OUTBOUND,
    topics.DELIVERED,
)
PARTITIONS = 12
WEEK_S = 7 * 24 * 3600


def _envelope(n: int) -> tuple[bytes, bytes]:
    user = f"u{n % 5000}"
    conversation = f"chat:ai_bot:{user}"
    env = Envelope(
        msg_id=f"bench-{n:09d}",
        conversation_id=conversation,
        chat_type=ChatType.direct,
        sender=user,
        to="ai_bot",
        bot="ai_bot",
        content=Content(type="txt", text="字" * 40),
    )
    return conversation.encode(), encode_envelope(env)


async def main(rate: float, window_s: float, spread: int, wide: bool) -> None:
    broker = EmbeddedBroker()
    broker.start()
    try:
        settings = load_settings(
            kafka_bootstrap=broker.bootstrap,
            kafka_embedded=True,
            topic_prefix=f"bt{uuid.uuid4().hex[:6]}.",
            topic_partitions=PARTITIONS,
            log_json=False,
        )
        await ensure_topics(settings)
        now_ms = int(time.time() * 1000)
        dense = int(rate * window_s)
        target = dense // 2
        stamps = [(n, now_ms - int((dense - n) * 1000 / rate)) for n in range(dense)]
        stamps += [
            (dense + k, now_ms - int(window_s * 1000) - int(k * WEEK_S * 1000 / max(spread, 1)))
            for k in range(spread)
        ]
        producer = new_producer(settings)
        await producer.start()
        started = time.perf_counter()
        try:
            for base in WHOLE:
                pending = []
                for n, at in stamps:
                    key, value = _envelope(n)
                    pending.append(
                        await producer.send(settings.topic(base), value, key=key, timestamp_ms=at)
                    )
                for sent in pending:
                    await sent
        finally:
            await producer.stop()
        total = len(stamps) * len(WHOLE)
        print(f"produced {total:,} records in {time.perf_counter() - started:.0f} s")
        key, _ = _envelope(target)
        partition = DefaultPartitioner()(key, list(range(PARTITIONS)), list(range(PARTITIONS)))
        at = stamps[target][1]
        for label, kwargs in (
            (
                "narrowed: one partition, 4 minutes",
                {
                    "partition": partition,
                    "since_ms": at - 180_000,
                    "until_ms": at + 60_000,
                },
            ),
            ("wide: every partition, 7 days", {"since_ms": now_ms - WEEK_S * 1000 - 600_000}),
        )[: 2 if wide else 1]:
            t0 = time.perf_counter()
            result = await trace(settings, f"bench-{target:09d}", **kwargs)
            took = time.perf_counter() - t0
            print(
                f"{label:36} {took * 1000:8.0f} ms  {len(result.views)} records found,"
                f" {result.scanned:,} scanned, stopped: {result.stopped} {result.unfinished[:3]}"
            )
    finally:
        broker.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--window-s", type=float, default=240.0)
    parser.add_argument("--spread", type=int, default=20_000)
    parser.add_argument("--no-wide", action="store_true", help="time the narrowed trace only")
    args = parser.parse_args()
    asyncio.run(main(args.rate, args.window_s, args.spread, not args.no_wide))
