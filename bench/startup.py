"""Start-up: ``imbot dev`` from launch to the first reply it prints. Target: under 15 s.

Baseline in the same run: the time to start the embedded broker alone and the time
for a bare Faust app to join its consumer group on it — the floor the stack cannot beat.

    python -m bench.startup
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from faust import StreamT

from bench.report import write_section
from imbot.core.kafka import ensure_topics
from imbot.core.settings import load_settings
from imbot.devtools.broker import EmbeddedBroker
from imbot.streams.faust_app import create_app

RUNS = 3


def measure_dev() -> float:
    workdir = Path(tempfile.mkdtemp(prefix="imbot-startup-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMBOT_")}
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "imbot", "dev"],
        cwd=workdir,
        env={**env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if re.search(r"first reply after", line):
                return time.monotonic() - started
        raise RuntimeError("imbot dev exited before its first reply")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def faust_join(bootstrap: str) -> float:
    settings = load_settings(
        kafka_bootstrap=bootstrap, kafka_embedded=True, topic_prefix="startup."
    )
    await ensure_topics(settings, ["x"])
    app = create_app(settings, "startup-floor")
    joined = asyncio.Event()
    topic = app.topic("startup.x", key_type=bytes, value_type=bytes)

    async def agent(stream: StreamT[bytes]) -> None:
        joined.set()
        async for _ in stream:
            pass

    app.agent(topic, name="floor")(agent)
    started = time.monotonic()
    await app.start()
    while not app.consumer.assignment():  # noqa: ASYNC110 - Faust offers no event for it
        await asyncio.sleep(0.05)
    took = time.monotonic() - started
    await app.stop()
    return took


def main() -> None:
    dev = [measure_dev() for _ in range(RUNS)]
    t = time.monotonic()
    with EmbeddedBroker() as broker:
        broker_start = time.monotonic() - t
        join = asyncio.run(faust_join(broker.bootstrap))
    body = "\n".join(
        [
            "| measurement | seconds |",
            "|---|---|",
            f"| `imbot dev`: launch → first reply printed (median of {RUNS}) | **{sorted(dev)[RUNS // 2]:.1f}** |",
            f"| `imbot dev`, each run | {', '.join(f'{d:.1f}' for d in dev)} |",
            f"| floor: embedded broker start | {broker_start:.2f} |",
            f"| floor: a bare Faust app joining its group on it | {join:.1f} |",
            "",
            "Target: under 15 s. The run includes migrations, topic creation, five processes starting, "
            "two Faust consumer groups joining, and one message through every stage.",
        ]
    )
    print(body)
    write_section(
        "startup", "Start-up: `imbot dev` to first reply", "python -m bench.startup", body
    )


if __name__ == "__main__":
    main()
