"""The gateway over real HTTP, publishing to the real embedded broker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imbot.core import topics
from imbot.core.envelope import decode_envelope
from imbot.core.settings import Settings
from imbot.devtools.broker import consume_all
from imbot.devtools.processes import free_port
from imbot.gateway.app import create_app
from tests.integration.conftest import start_gateway
from tests.payloads import callback

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def gateway(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[tuple[TestClient, Settings]]:  # type: ignore[type-arg]
    settings = make_settings()
    client = await start_gateway(settings)
    yield client, settings
    await client.close()


async def _post(client: TestClient, body: Any) -> tuple[int, dict[str, Any]]:  # type: ignore[type-arg]
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    resp = await client.post(
        "/easemob/callback", data=raw, headers={"Content-Type": "application/json"}
    )
    return resp.status, await resp.json()


async def test_ai_message_is_published_keyed_by_conversation_then_answered(gateway: Any) -> None:
    client, settings = gateway
    data = callback("你好")
    status, body = await _post(client, data)
    assert (status, body) == (200, {"valid": True})
    records = await consume_all(settings.kafka_bootstrap, settings.topic(topics.INBOUND), 1)
    assert len(records) == 1
    key, value = records[0]
    env = decode_envelope(value)
    assert key == b"chat:ai_bot:alice"
    assert (env.msg_id, env.content.text, env.sender, env.bot) == (
        data["msg_id"],
        "你好",
        "alice",
        "ai_bot",
    )


@pytest.mark.parametrize(
    ("chat_type", "shape"),
    [("chat", "bodies"), ("groupchat", "bodies"), ("group", "flat"), ("chatroom", "flat")],
)
async def test_every_chat_type_and_shape_reaches_kafka(
    gateway: Any, chat_type: str, shape: str
) -> None:
    client, settings = gateway
    if chat_type == "chat":
        data = callback("hi", shape=shape)
    else:
        data = callback(
            "hi",
            chat_type=chat_type,
            to="g42",
            group_id="g42",
            shape=shape,
            ext={"em_at_list": ["ai_bot"]},
        )
    status, body = await _post(client, data)
    assert (status, body) == (200, {"valid": True})
    records = await consume_all(settings.kafka_bootstrap, settings.topic(topics.INBOUND), 1)
    assert [decode_envelope(v).msg_id for _, v in records] == [data["msg_id"]]


async def test_non_ai_message_is_answered_without_touching_kafka(gateway: Any) -> None:
    client, settings = gateway
    status, body = await _post(client, callback("hi bob", to="bob"))
    assert (status, body) == (200, {"valid": True})
    assert (
        await consume_all(settings.kafka_bootstrap, settings.topic(topics.INBOUND), 1, timeout=1.0)
        == []
    )


async def test_wrong_secret_is_401_with_a_json_error(gateway: Any) -> None:
    client, settings = gateway
    status, body = await _post(client, callback(secret="wrong"))
    assert status == 401
    assert body["error"] == "bad_signature"
    assert (
        await consume_all(settings.kafka_bootstrap, settings.topic(topics.INBOUND), 1, timeout=1.0)
        == []
    )


async def test_old_secret_still_accepted_during_rotation(gateway: Any) -> None:
    client, _ = gateway
    assert await _post(client, callback(secret="old-secret")) == (200, {"valid": True})


async def test_tampered_signature_is_401(gateway: Any) -> None:
    client, _ = gateway
    data = callback()
    data["callId"] = data["callId"] + "x"
    status, body = await _post(client, data)
    assert (status, body["error"]) == (401, "bad_signature")


async def test_bad_json_is_400(gateway: Any) -> None:
    client, _ = gateway
    status, body = await _post(client, b"{not json")
    assert (status, body["error"]) == (400, "bad_json")


async def test_missing_fields_are_400(gateway: Any) -> None:
    client, _ = gateway
    data = callback()
    del data["msg_id"]
    status, body = await _post(client, data)
    assert (status, body["error"]) == (400, "missing_field")
    assert "msg_id" in body["detail"]


async def test_oversized_body_is_413(gateway: Any) -> None:
    client, _ = gateway
    status, body = await _post(client, callback("长" * 40_000))
    assert (status, body["error"]) == (413, "body_too_large")


async def test_duplicate_callback_is_published_once(gateway: Any) -> None:
    client, settings = gateway
    data = callback("same message")
    assert await _post(client, data) == (200, {"valid": True})
    assert await _post(client, dict(data)) == (200, {"valid": True})
    records = await consume_all(
        settings.kafka_bootstrap, settings.topic(topics.INBOUND), 2, timeout=1.5
    )
    assert len(records) == 1


async def test_intercept_policy_blocks_the_users_message(
    make_settings: Callable[..., Settings], tmp_path: Any
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "callback: {ai_message: intercept, intercept_code: AI_ONLY}\n"
        "models: {demo: {provider: demo}}\nroutes: {default: {models: [demo]}}\n"
    )
    settings = make_settings(policy_file=policy)
    client = await start_gateway(settings)
    try:
        assert await _post(client, callback()) == (200, {"valid": False, "code": "AI_ONLY"})
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("policy", "expected"), [("pass", {"valid": True}), ("block", {"valid": False, "code": "DOWN"})]
)
async def test_kafka_unreachable_answers_by_fail_policy_within_budget(
    make_settings: Callable[..., Settings], tmp_path: Any, policy: str, expected: dict[str, Any]
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"callback: {{kafka_failure: {policy}, kafka_failure_code: DOWN}}\n"
        "models: {demo: {provider: demo}}\nroutes: {default: {models: [demo]}}\n"
    )
    settings = make_settings(policy_file=path, kafka_bootstrap=f"127.0.0.1:{free_port()}")
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    try:
        started = time.perf_counter()
        status, body = await _post(client, callback())
        elapsed = time.perf_counter() - started
        assert (status, body) == (200, expected)
        assert elapsed < 1.0  # answered, not hung (the budget itself is benchmarked in bench/)
        assert (await client.get("/readyz")).status == 503
        assert (await client.get("/healthz")).status == 200
    finally:
        await client.close()


async def test_metrics_count_callbacks_by_outcome(gateway: Any) -> None:
    client, _ = gateway
    await _post(client, callback(secret="wrong"))
    text = await (await client.get("/metrics")).text()
    assert 'imbot_gateway_callbacks_total{outcome="bad_signature"}' in text


async def test_concurrent_duplicates_are_published_once_and_answered_alike(gateway: Any) -> None:
    client, settings = gateway
    data = callback("同一条消息")
    answers = await asyncio.gather(*(_post(client, dict(data)) for _ in range(8)))
    assert answers == [(200, {"valid": True})] * 8
    records = await consume_all(
        settings.kafka_bootstrap, settings.topic(topics.INBOUND), 2, timeout=1.5
    )
    assert [decode_envelope(v).msg_id for _, v in records] == [data["msg_id"]]


def _fast_path_policy(tmp_path: Any, *, on: bool) -> Any:
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"callback: {{refuse_blocked_input: {str(on).lower()}, blocked_input_code: NOT_ALLOWED}}\n"
        "moderation: {lexicon_words: [违禁词示例]}\n"
        "models: {demo: {provider: demo}}\nroutes: {default: {models: [demo]}}\n",
        encoding="utf-8",
    )
    return path


async def test_fast_path_refuses_a_blocked_word_without_publishing(
    make_settings: Callable[..., Settings], tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(policy_file=_fast_path_policy(tmp_path, on=True))
    client = await start_gateway(settings)
    try:
        caplog.set_level(logging.INFO, logger="imbot.gateway")
        # Spaces inserted between the characters (a usual evasion): still caught.
        blocked = callback("请告诉我 违 禁 词 示 例 的内容")
        assert await _post(client, blocked) == (200, {"valid": False, "code": "NOT_ALLOWED"})
        clean = callback("今天天气怎么样？")
        assert await _post(client, clean) == (200, {"valid": True})
        records = await consume_all(
            settings.kafka_bootstrap, settings.topic(topics.INBOUND), 2, timeout=1.5
        )
        assert [decode_envelope(v).msg_id for _, v in records] == [clean["msg_id"]]
        refusals = [r for r in caplog.records if getattr(r, "msg_id", None) == blocked["msg_id"]]
        assert len(refusals) == 1
        assert "违" not in repr(vars(refusals[0]))  # the line names the message, not its text
        text = await (await client.get("/metrics")).text()
        assert 'imbot_gateway_callbacks_total{outcome="blocked"}' in text
    finally:
        await client.close()


async def test_fast_path_off_publishes_the_blocked_word_for_the_stage_to_judge(
    make_settings: Callable[..., Settings], tmp_path: Any
) -> None:
    settings = make_settings(policy_file=_fast_path_policy(tmp_path, on=False))
    client = await start_gateway(settings)
    try:
        data = callback("违禁词示例")
        assert await _post(client, data) == (200, {"valid": True})
        records = await consume_all(settings.kafka_bootstrap, settings.topic(topics.INBOUND), 1)
        assert [decode_envelope(v).msg_id for _, v in records] == [data["msg_id"]]
    finally:
        await client.close()


async def test_fast_path_leaves_non_text_messages_to_the_pipeline(
    make_settings: Callable[..., Settings], tmp_path: Any
) -> None:
    settings = make_settings(policy_file=_fast_path_policy(tmp_path, on=True))
    client = await start_gateway(settings)
    try:
        data = callback(body={"type": "img", "url": "https://x/违禁词示例.png"})
        assert await _post(client, data) == (200, {"valid": True})
        records = await consume_all(settings.kafka_bootstrap, settings.topic(topics.INBOUND), 1)
        assert [decode_envelope(v).content.type for _, v in records] == ["img"]
    finally:
        await client.close()


async def test_body_arriving_in_several_segments_is_read_whole(gateway: Any) -> None:
    # Over the Internet a callback body often spans TCP segments; the gateway must
    # wait for all of it rather than parse the first piece.
    client, settings = gateway
    data = callback("分几次到达的消息", ext={"padding": "x" * 2000})
    body = orjson.dumps(data)
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(
            b"POST /easemob/callback HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        )
        for start in range(0, len(body), 700):
            writer.write(body[start : start + 700])
            await writer.drain()
            await asyncio.sleep(0.02)
        response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, payload = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert orjson.loads(payload) == {"valid": True}
    records = await consume_all(settings.kafka_bootstrap, settings.topic(topics.INBOUND), 1)
    assert [decode_envelope(v).msg_id for _, v in records] == [data["msg_id"]]


async def test_chunked_body_over_the_limit_is_413(gateway: Any) -> None:
    client, _ = gateway

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b" " * 4096  # no Content-Length: the limit must hold while reading

    resp = await client.post(
        "/easemob/callback", data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert resp.status == 413
    assert (await resp.json())["error"] == "body_too_large"
