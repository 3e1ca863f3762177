"""A client that goes away in the middle of its request body, over a raw TCP socket.

That is the client's doing, not the gateway's: counted as ``client_gone`` (never as
``internal_error``), logged below warning level and without the body.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import uuid
from collections.abc import AsyncIterator, Callable

import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client import REGISTRY
from yarl import URL

from imbot.core.kafka import ensure_topics
from imbot.core.settings import Settings
from imbot.devtools.processes import free_port
from imbot.gateway.app import create_app
from tests.payloads import callback


def _callbacks(outcome: str) -> float:
    return REGISTRY.get_sample_value("imbot_gateway_callbacks_total", {"outcome": outcome}) or 0.0


@pytest.fixture
async def gateway(make_settings: Callable[..., Settings]) -> AsyncIterator[str]:
    """The gateway served as ``imbot gateway`` serves it (``web.run_app``'s runner: a
    handler is not cancelled when its client goes away, unlike aiohttp's TestServer);
    its base URL once ready."""
    # A body timeout far longer than the test: only the client's going away ends the read.
    settings = make_settings(gateway_body_timeout_s=30.0)
    await ensure_topics(settings)
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(500):
                if (await http.get(f"{url}/readyz")).status == 200:
                    break
                await asyncio.sleep(0.01)
        yield url
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_client_gone_mid_body_is_counted_as_client_gone(
    gateway: str, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    caplog.set_level(logging.DEBUG)
    marker = uuid.uuid4().hex
    body = orjson.dumps(callback(f"没说完的话 {marker}"))
    gone, internal = _callbacks("client_gone"), _callbacks("internal_error")
    reader, writer = await asyncio.open_connection("127.0.0.1", URL(gateway).port)
    writer.write(
        b"POST /easemob/callback HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body[: len(body) // 2]
    )
    await writer.drain()
    await asyncio.sleep(0.1)  # the head and half the body are read: the handler waits for more
    if how == "reset":
        # SO_LINGER 0: the close sends a TCP RST instead of a FIN.
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    for _ in range(200):
        if _callbacks("client_gone") > gone:
            break
        await asyncio.sleep(0.01)
    assert (_callbacks("client_gone"), _callbacks("internal_error")) == (gone + 1, internal)
    assert reader.at_eof() or await reader.read() == b""  # nothing was answered to nobody
    gateway_records = [r for r in caplog.records if r.name.startswith("imbot.gateway")]
    assert all(r.levelno < logging.WARNING for r in gateway_records), [
        (r.name, r.levelname, r.getMessage()) for r in gateway_records
    ]
    assert marker not in caplog.text
    assert marker not in repr([vars(r) for r in caplog.records])
    # The gateway goes on answering.
    async with aiohttp.ClientSession() as http:
        resp = await http.post(f"{gateway}/easemob/callback", data=orjson.dumps(callback("还在吗")))
        assert (resp.status, await resp.json()) == (200, {"valid": True})
