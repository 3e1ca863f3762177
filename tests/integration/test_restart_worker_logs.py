"""A worker process logs one JSON object per line per event, Faust's own lines included.

Faust's worker (mode) used to install a plain-text root handler next to ours, so
every event came out twice: once as text, once as JSON.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from imbot.devtools.broker import EmbeddedBroker


def _env(bootstrap: str, database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "IMBOT_KAFKA_BOOTSTRAP": bootstrap,
        "IMBOT_KAFKA_EMBEDDED": "true",
        "IMBOT_TOPIC_PREFIX": f"l{uuid.uuid4().hex[:6]}.",
        "IMBOT_TOPIC_PARTITIONS": "2",
        "IMBOT_DATABASE_URL": database_url,
        "IMBOT_LOG_JSON": "true",
        "IMBOT_LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }


def _json_lines(*outputs: str) -> list[dict[str, Any]]:
    events = []
    for output in outputs:
        for line in output.splitlines():
            event = orjson.loads(line)  # raises on a plain-text line
            assert isinstance(event, dict), line
            events.append(event)
    return events


def _assert_no_event_twice(events: list[dict[str, Any]]) -> None:
    seen = collections.Counter((e["logger"], e["event"], e["ts"]) for e in events)
    assert [key for key, n in seen.items() if n > 1] == []
    # mode's plain-text formatter leaves its "extra" attribute on the record.
    assert all("extra" not in e for e in events)


def test_a_stopped_worker_logged_each_event_once_as_json(
    broker: EmbeddedBroker, sqlite_url: str, tmp_path: Path
) -> None:
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "imbot", "worker", "--stage", "route"],
            env=_env(broker.bootstrap, sqlite_url),
            stdout=stdout,
            stderr=stderr,
        )
        try:
            deadline = time.monotonic() + 60
            while b"worker ready" not in err.read_bytes():
                assert proc.poll() is None, err.read_text()
                assert time.monotonic() < deadline, err.read_text()
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    events = _json_lines(out.read_text(), err.read_text())
    _assert_no_event_twice(events)
    texts = [e["event"] for e in events]
    assert "worker ready" in texts
    # Lines written by mode's services (the consumer starting and stopping) are JSON too.
    assert any("Consumer]: Starting..." in t for t in texts)
    assert any("Consumer]: Stopping..." in t for t in texts)


def test_faust_and_aiokafka_errors_are_json_lines(sqlite_url: str) -> None:
    """A worker that cannot reach Kafka: aiokafka's error and Faust's crash, once each."""
    done = subprocess.run(
        [sys.executable, "-m", "imbot", "worker", "--stage", "route"],
        env=_env("127.0.0.1:1", sqlite_url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    events = _json_lines(done.stdout, done.stderr)
    _assert_no_event_twice(events)
    loggers = {e["logger"] for e in events}
    assert {"aiokafka", "faust.worker"} <= loggers
    crash = next(e for e in events if e["logger"] == "faust.worker")
    assert crash["level"] == "error"
    assert "Traceback" in crash["exc"]  # the traceback inside the JSON object, not as text
