"""The gateway in front of a Kafka that is slow or gone: it answers Easemob in time anyway.

A real broker behind a real TCP proxy that can hold back the broker's answers, so
the gateway's producer sees exactly what a slow cluster looks like on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from imbot.core.settings import Settings
from imbot.devtools.broker import EmbeddedBroker
from imbot.devtools.processes import free_port
from tests.integration.conftest import start_gateway
from tests.payloads import callback


class DelayProxy:
    """Forwards TCP to the broker; ``delay`` seconds are added to every broker answer."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.delay = 0.0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_w.close()
            return
        up = asyncio.create_task(self._pipe(client_r, broker_w, slow=False))
        down = asyncio.create_task(self._pipe(broker_r, client_w, slow=True))
        self._tasks |= {up, down}
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
        for w in (client_w, broker_w):
            w.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, slow: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if slow and self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(data)
                await writer.drain()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def slow_broker() -> AsyncIterator[tuple[EmbeddedBroker, DelayProxy]]:
    broker_port = free_port()
    proxy = DelayProxy(broker_port)
    await proxy.start()
    broker = EmbeddedBroker(broker_port, advertised_port=proxy.port)
    await asyncio.to_thread(broker.start)
    try:
        yield broker, proxy
    finally:
        await proxy.stop()
        broker.stop()


async def _timed_post(client: Any, body: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
    started = time.perf_counter()
    resp = await client.post(
        "/easemob/callback", data=orjson.dumps(body), headers={"Content-Type": "application/json"}
    )
    return time.perf_counter() - started, resp.status, await resp.json()


async def _timeouts(client: Any) -> float:
    metrics = await (await client.get("/metrics")).text()
    found = re.search(
        r'^imbot_gateway_publish_failures_total\{why="timeout"\} (\S+)$', metrics, re.M
    )
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("pass", {"valid": True}), ("block", {"valid": False, "code": "IMBOT_UNAVAILABLE"})],
)
async def test_a_slow_kafka_is_answered_by_the_fail_policy_before_easemobs_deadline(
    slow_broker: tuple[EmbeddedBroker, DelayProxy],
    make_settings: Callable[..., Settings],
    tmp_path: Any,
    policy: str,
    expected: dict[str, Any],
) -> None:
    broker, proxy = slow_broker
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(
        f"callback: {{kafka_failure: {policy}}}\nmodels: {{demo: {{provider: demo}}}}\n",
        encoding="utf-8",
    )
    settings = make_settings(
        kafka_bootstrap=broker.bootstrap, publish_timeout_ms=60, policy_file=policy_file
    )
    client = await start_gateway(settings)
    try:
        took, status, body = await _timed_post(client, callback("快的时候"))
        assert (status, body) == (200, {"valid": True})  # published normally

        timeouts_before = await _timeouts(client)
        proxy.delay = 1.0  # every broker answer now arrives a second late
        took, status, body = await _timed_post(client, callback("慢的时候"))
        assert (status, body) == (200, expected)
        assert took < 0.2  # Easemob's default wait: answered by our policy, not its timeout
        assert await _timeouts(client) == timeouts_before + 1
    finally:
        proxy.delay = 0.0
        await client.close()
