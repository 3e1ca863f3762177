"""The alert rules on a real Prometheus scraping the running services: one DLQ record is
enough to make ImbotDLQRecords true (pending: its ``for`` is minutes).

The known (stage, reason) series exist at zero from each worker's start, so the record
makes 0 → 1, which ``increase()`` sees; before that, the first record of a kind made a new
series at 1 and no alert ever saw it. Prometheus is Debian's ``prometheus`` package, the
one ``make promtool`` installs (the same package carries promtool).
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from imbot.cli.devstack import DevStack
from imbot.core import topics
from imbot.core.kafka import new_producer
from imbot.core.settings import load_settings
from imbot.devtools.processes import free_port
from tests.unit.test_monitoring import prometheus_rule


@pytest.fixture
def prometheus(stack: DevStack, tmp_path: Path) -> Iterator[str]:
    """A Prometheus scraping the stack's services every second, with imbot's rules."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no prometheus binary: `make promtool` installs Debian's prometheus package")
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(prometheus_rule()["spec"], sort_keys=False), "utf-8")
    targets = [
        url.removeprefix("http://").removesuffix("/metrics")
        for url in stack.metrics_urls().values()
    ]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "imbot", "static_configs": [{"targets": targets}]}],
    }
    (tmp_path / "prometheus.yaml").write_text(yaml.safe_dump(config), "utf-8")
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yaml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    try:
        response = httpx.get(f"{base}/api/v1/query", params={"query": promql}, timeout=5)
    except httpx.TransportError:
        return []  # not listening yet
    if response.status_code != 200:
        return []
    result: list[dict[str, Any]] = response.json()["data"]["result"]
    return result


def _dlq_alerts(base: str) -> list[dict[str, Any]]:
    try:
        alerts = httpx.get(f"{base}/api/v1/alerts", timeout=5).json()["data"]["alerts"]
    except (httpx.TransportError, KeyError, ValueError):
        return []
    return [a for a in alerts if a["labels"].get("alertname") == "ImbotDLQRecords"]


async def test_a_single_dlq_record_makes_the_dlq_alert_true(
    stack: DevStack, prometheus: str
) -> None:
    # The sender's known DLQ series are scraped at zero before anything goes wrong.
    series = 'imbot_dlq_records_total{stage="send",reason="UndecodableError"}'
    deadline = time.monotonic() + 30
    while not (seen := _query(prometheus, series)) and time.monotonic() < deadline:  # noqa: ASYNC110 - polling Prometheus
        await asyncio.sleep(0.5)
    assert seen, "Prometheus never scraped the sender's DLQ series"
    assert float(seen[0]["value"][1]) == 0
    assert _dlq_alerts(prometheus) == []

    settings = load_settings(
        kafka_bootstrap=stack.env["IMBOT_KAFKA_BOOTSTRAP"],
        kafka_embedded=True,
        topic_prefix=stack.env["IMBOT_TOPIC_PREFIX"],
    )
    producer = new_producer(settings)
    await producer.start()
    try:  # one record the send stage cannot read: one DLQ record
        await producer.send_and_wait(
            settings.topic(topics.OUTBOUND), b"not an envelope", key=uuid.uuid4().hex.encode()
        )
    finally:
        await producer.stop()

    deadline = time.monotonic() + 60
    while not (alerts := _dlq_alerts(prometheus)) and time.monotonic() < deadline:  # noqa: ASYNC110 - polling Prometheus
        await asyncio.sleep(0.5)
    [alert] = alerts
    assert alert["labels"]["stage"] == "send"
    assert alert["labels"]["reason"] == "UndecodableError"
    assert alert["state"] in ("pending", "firing")  # true now; it fires after its `for`
