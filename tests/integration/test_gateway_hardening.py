"""The gateway against hostile input and hostile clients, over real HTTP and raw sockets.

Real parts only: the embedded broker, a real PostgreSQL for the shared callId store,
raw TCP connections for slow clients and malformed requests.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from imbot.core import topics
from imbot.core.envelope import decode_envelope
from imbot.core.settings import Settings
from imbot.core.signature import expected_security
from imbot.devtools.broker import consume_all
from imbot.devtools.processes import free_port
from imbot.gateway.publisher import Publisher
from tests.integration.conftest import start_gateway
from tests.payloads import callback
from tests.unit.test_gateway_input import ODD_VALUES, PATHS, nested, random_json, with_value

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def gateway(make_settings: Callable[..., Settings]) -> AsyncIterator[tuple[Client, Settings]]:
    settings = make_settings()
    client = await start_gateway(settings)
    yield client, settings
    await client.close()


async def _post(client: Client, body: Any) -> tuple[int, dict[str, Any]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = await client.post(
        "/easemob/callback", data=raw, headers={"Content-Type": "application/json"}
    )
    return resp.status, await resp.json()


def resigned(data: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``data`` as another callback would carry it: a new callId, signed again."""
    out = {**data, **changes, "callId": f"myorg#myapp_{uuid.uuid4()}"}
    out["security"] = expected_security(out["callId"], "test-secret", out["timestamp"])
    return out


async def _inbound(settings: Settings, count: int, timeout: float = 1.5) -> list[Any]:
    records = await consume_all(
        settings.kafka_bootstrap, settings.topic(topics.INBOUND), count, timeout=timeout
    )
    return [decode_envelope(v) for _, v in records]


async def test_odd_json_in_any_field_is_never_a_5xx(gateway: tuple[Client, Settings]) -> None:
    import random

    client, _ = gateway
    rng = random.Random(9)
    bases = [
        callback("你好"),
        callback("hi", chat_type="group", to="g1", group_id="g1", ext={"em_at_list": ["ai_bot"]}),
        callback("hi", chat_type="groupchat", to="g1", group_id="g1"),
    ]
    for i in range(120):
        data = rng.choice(bases)
        path = rng.choice(PATHS)
        value = ODD_VALUES[i % len(ODD_VALUES)] if i % 2 else random_json(rng)
        data = resigned(with_value(data, path, value), msg_id=str(10**18 + i))
        status, body = await _post(client, data)
        assert status < 500, (path, value, status, body)
        assert (status == 200) == ("valid" in body), body


async def test_list_in_payload_type_is_answered_not_500(gateway: tuple[Client, Settings]) -> None:
    client, _ = gateway
    data = callback("hi")
    data["payload"]["bodies"][0]["type"] = ["txt"]
    status, body = await _post(client, data)
    assert status == 200  # an unknown body type: not for the AI
    assert body == {"valid": True}


async def test_deep_ext_for_the_bot_is_400_too_deep(gateway: tuple[Client, Settings]) -> None:
    client, settings = gateway
    data = callback("hi", ext={"deep": nested(253)})
    status, body = await _post(client, data)
    assert (status, body["error"]) == (400, "too_deep")
    assert await _inbound(settings, 1, timeout=1.0) == []


async def test_nul_in_the_text_is_removed_before_kafka(gateway: tuple[Client, Settings]) -> None:
    client, settings = gateway
    data = callback("你\x00好\x1b")
    assert await _post(client, data) == (200, {"valid": True})
    [env] = await _inbound(settings, 1)
    assert env.content.text == "你好"


async def test_nul_in_the_sender_is_400(gateway: tuple[Client, Settings]) -> None:
    client, settings = gateway
    status, body = await _post(client, callback(sender="alice\x00"))
    assert (status, body["error"]) == (400, "invalid_field")
    assert "'from'" in body["detail"]
    assert await _inbound(settings, 1, timeout=1.0) == []


async def test_ordinary_group_message_with_empty_msg_id_passes_under_block(
    make_settings: Callable[..., Settings], tmp_path: Any
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "callback: {kafka_failure: block, kafka_failure_code: DOWN}\n"
        "models: {demo: {provider: demo}}\nroutes: {default: {models: [demo]}}\n"
    )
    client = await start_gateway(make_settings(policy_file=policy))
    try:
        data = callback("hi all", chat_type="groupchat", to="g1", group_id="g1", msg_id="x")
        data["msg_id"] = ""
        assert await _post(client, data) == (200, {"valid": True})
    finally:
        await client.close()


class _BrokenPublisher(Publisher):
    """A publisher whose Kafka client fails in a way nobody foresaw."""

    async def start(self) -> None:
        pass

    async def publish(
        self, key: bytes, value: bytes, msg_id: str, timeout: float, *, topic: str | None = None
    ) -> str | None:
        raise RuntimeError(f"unexpected failure while holding {value!r}")


@pytest.mark.parametrize(
    ("policy", "expected"), [("pass", {"valid": True}), ("block", {"valid": False, "code": "DOWN"})]
)
async def test_unexpected_exception_is_answered_by_the_fail_policy_and_counted(
    make_settings: Callable[..., Settings],
    tmp_path: Any,
    caplog: pytest.LogCaptureFixture,
    policy: str,
    expected: dict[str, Any],
) -> None:
    from aiohttp.test_utils import TestServer

    from imbot.gateway.app import create_app

    path = tmp_path / "policy.yaml"
    path.write_text(
        f"callback: {{kafka_failure: {policy}, kafka_failure_code: DOWN}}\n"
        "models: {demo: {provider: demo}}\nroutes: {default: {models: [demo]}}\n"
    )
    settings = make_settings(policy_file=path)
    app = create_app(settings, publisher=_BrokenPublisher(settings))
    client: Client = TestClient(TestServer(app))
    await client.start_server()
    try:
        caplog.set_level(logging.INFO)
        marker = uuid.uuid4().hex
        assert await _post(client, callback(f"secret text {marker}")) == (200, expected)
        text = await (await client.get("/metrics")).text()
        assert 'imbot_gateway_callbacks_total{outcome="internal_error"}' in text
        assert marker not in caplog.text
        assert marker not in repr([vars(r) for r in caplog.records])
        assert "RuntimeError" in repr([vars(r) for r in caplog.records])
    finally:
        await client.close()


# -- replays ----------------------------------------------------------------------


async def _assert_replays_refused(client: Client, other: Client, settings: Settings) -> None:
    first = callback("第一条")
    assert await _post(client, first) == (200, {"valid": True})
    # The same signature carrying another message (a new msg_id, a new text).
    forged = {**first, "msg_id": "666", "payload": {"bodies": [{"type": "txt", "msg": "伪造"}]}}
    assert await _post(other, forged) == (200, {"valid": True})
    # An ordinary message's signature carrying a message for the bot.
    ordinary = callback("hi bob", to="bob")
    assert await _post(client, ordinary) == (200, {"valid": True})
    await asyncio.sleep(0.2)  # the ordinary callIds are written in batches
    hijack = {**ordinary, "to": "ai_bot", "msg_id": "667"}
    assert await _post(other, hijack) == (200, {"valid": True})
    envs = await _inbound(settings, 3)
    assert [e.msg_id for e in envs] == [first["msg_id"]]
    text = await (await other.get("/metrics")).text()
    assert 'imbot_gateway_callbacks_total{outcome="replayed"}' in text


async def test_a_replayed_call_id_is_never_published(gateway: tuple[Client, Settings]) -> None:
    client, settings = gateway
    await _assert_replays_refused(client, client, settings)


async def test_replicas_share_the_call_id_memory_through_postgresql(
    make_settings: Callable[..., Settings], pg_url: str
) -> None:
    settings = make_settings(database_url=pg_url)
    assert settings.callback_replay_store == "auto"  # database, as the URL is PostgreSQL
    one, two = await start_gateway(settings), await start_gateway(settings)
    try:
        for _ in range(100):  # both pools connected
            if (await _post(one, callback("ping", to="bob")))[0] == 200:
                break
        await asyncio.sleep(0.3)
        await _assert_replays_refused(one, two, settings)
        conn = await asyncpg.connect(pg_url.replace("+asyncpg", ""))
        try:
            expires = await conn.fetchval("SELECT max(expires_at) FROM callback_ids")
        finally:
            await conn.close()
        assert expires > time.time() * 1000  # kept until timestamp + window
    finally:
        await one.close()
        await two.close()


async def test_unreachable_call_id_store_is_answered_by_the_fail_policy(
    make_settings: Callable[..., Settings], tmp_path: Any
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "callback: {kafka_failure: block, kafka_failure_code: DOWN}\n"
        "models: {demo: {provider: demo}}\nroutes: {default: {models: [demo]}}\n"
    )
    dead = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/none"
    settings = make_settings(policy_file=path, database_url=dead)
    client = await start_gateway(settings)
    try:
        assert await _post(client, callback()) == (200, {"valid": False, "code": "DOWN"})
        # Ordinary messages do not wait for the store.
        assert await _post(client, callback(to="bob")) == (200, {"valid": True})
        text = await (await client.get("/metrics")).text()
        assert 'imbot_gateway_callbacks_total{outcome="replay_store_failed"}' in text
        assert await _inbound(settings, 1, timeout=1.0) == []
    finally:
        await client.close()


async def test_stale_timestamp_is_refused_by_default(gateway: tuple[Client, Settings]) -> None:
    client, _ = gateway
    status, body = await _post(client, callback(timestamp=int((time.time() - 600) * 1000)))
    assert (status, body["error"]) == (401, "stale_timestamp")


# -- logs -------------------------------------------------------------------------


async def test_rejected_request_with_a_60kb_call_id_logs_a_short_line(
    gateway: tuple[Client, Settings], caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = gateway
    caplog.set_level(logging.INFO)
    data = callback(secret="wrong")
    data["callId"] = "c" * 60_000
    data["msg_id"] = "m" * 1000
    status, _ = await _post(client, data)
    assert status == 401
    [record] = [r for r in caplog.records if r.getMessage() == "callback rejected"]
    assert len(repr(vars(record))) < 1024


async def _raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_malformed_request_logs_one_short_line_without_the_request(
    gateway: tuple[Client, Settings], caplog: pytest.LogCaptureFixture
) -> None:
    client, _ = gateway
    caplog.set_level(logging.DEBUG)
    marker = uuid.uuid4().hex
    port = client.server.port
    assert port is not None
    answer = await _raw(
        port, f"POST /easemob/callback?{marker} HTTP/1.1 junk {marker}\r\n\r\n".encode()
    )
    assert b" 400 " in answer.split(b"\r\n", 1)[0]  # (its body quotes the request to its sender)
    answer = await _raw(
        port,
        b"POST /easemob/callback HTTP/1.1\r\nHost: gw\r\nContent-Length: x"
        + marker.encode()
        + b"\r\n\r\n",
    )
    assert b" 400 " in answer.split(b"\r\n", 1)[0]
    assert caplog.records, "the malformed requests are logged"
    for record in caplog.records:
        assert record.exc_info is None
        line = repr(vars(record))
        assert marker not in line
        assert len(line) < 1024


# -- slow clients -----------------------------------------------------------------


@pytest.fixture
async def strict_gateway(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[tuple[Client, Settings]]:
    settings = make_settings(gateway_keepalive_timeout_s=0.5, gateway_body_timeout_s=0.5)
    client = await start_gateway(settings)
    yield client, settings
    await client.close()


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before closing the connection; fails if it stays open."""
    return await asyncio.wait_for(reader.read(), seconds)


async def test_idle_connection_is_closed(strict_gateway: tuple[Client, Settings]) -> None:
    client, _ = strict_gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        assert await _closed_within(reader, 3) == b""
    finally:
        writer.close()


async def test_idle_keep_alive_after_an_answer_is_closed(
    strict_gateway: tuple[Client, Settings],
) -> None:
    client, _ = strict_gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        answer = await _closed_within(reader, 3)
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def test_slow_header_is_closed(strict_gateway: tuple[Client, Settings]) -> None:
    client, _ = strict_gateway
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    head = b"POST /easemob/callback HTTP/1.1\r\nHost: gw\r\nX-Pad: " + b"p" * 100
    sent, answer = 0, None
    try:
        for byte in head:  # one byte per 100 ms: the head never completes
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                break
            sent += 1
            try:
                answer = await asyncio.wait_for(reader.read(), 0.1)
                break  # the server closed the connection
            except TimeoutError:
                continue
    finally:
        writer.close()
    assert answer == b"" or answer is None  # closed without an answer
    assert sent < len(head)  # long before the head was complete


async def test_slow_body_is_408_and_closed(strict_gateway: tuple[Client, Settings]) -> None:
    client, settings = strict_gateway
    body = json.dumps(callback("慢慢来")).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        writer.write(
            b"POST /easemob/callback HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        answer = b""
        for byte in body:
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(4096), 0.1)
            except TimeoutError:
                continue
            if not chunk:
                break
            answer += chunk
        answer += await _closed_within(reader, 3)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 408")
    assert b"body_timeout" in answer
    assert await _inbound(settings, 1, timeout=1.0) == []
