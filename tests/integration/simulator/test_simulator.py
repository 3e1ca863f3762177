"""The Easemob simulator over real HTTP: signed callbacks, Easemob's validation and errors, admin API."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web

from imbot.core.signature import expected_security, verify_signature
from imbot.simulator.app import SimulatorConfig, serve
from imbot.simulator.callbacks import build_callback

SECRET = "rule-secret"
ORG, APP = "myorg", "myapp"


@dataclass
class Receiver:
    """A stand-in gateway: checks the signature as the gateway does and records what came."""

    url: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    verdicts: list[bool] = field(default_factory=list)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    seen = Receiver()

    async def callback(request: web.Request) -> web.Response:
        body = await request.json()
        ok = verify_signature(body["callId"], body["timestamp"], body["security"], [SECRET])
        seen.received.append(body)
        seen.verdicts.append(ok)
        if not ok:
            return web.json_response({"error": "bad signature"}, status=401)
        return web.json_response({"valid": True})

    app = web.Application()
    app.router.add_post("/easemob/callback", callback)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    seen.url = f"http://127.0.0.1:{runner.addresses[0][1]}/easemob/callback"
    yield seen
    await runner.cleanup()


@pytest.fixture
async def sim(receiver: Receiver) -> AsyncIterator[httpx.AsyncClient]:
    config = SimulatorConfig(port=0, org=ORG, app=APP, secret=SECRET, gateway_url=receiver.url)
    runner = await serve(config)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{config.port}") as http:
        yield http
    await runner.cleanup()


async def _token(sim: httpx.AsyncClient) -> str:
    response = await sim.post(
        f"/{ORG}/{APP}/token",
        json={
            "grant_type": "client_credentials",
            "client_id": "dev-client",
            "client_secret": "dev-client-secret",
        },
    )
    assert response.status_code == 200
    token: str = response.json()["access_token"]
    return token


async def _send(
    sim: httpx.AsyncClient, body: Any, *, kind: str = "users", token: str | None = None
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or await _token(sim)}"}
    return await sim.post(f"/{ORG}/{APP}/messages/{kind}", json=body, headers=headers)


def _text(to: list[str], msg: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"from": "ai_bot", "to": to, "type": "txt", "body": {"msg": msg}, **extra}


def _assert_easemob_error(response: httpx.Response, status: int, error: str, text: str) -> None:
    assert response.status_code == status
    body = response.json()
    assert set(body) >= {"error", "exception", "timestamp", "duration", "error_description"}
    assert body["error"] == error
    assert text in body["error_description"]
    assert isinstance(body["timestamp"], int)
    assert body["duration"] == 0


# -- callbacks ------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["bodies", "flat"])
@pytest.mark.parametrize("chat_type", ["chat", "group", "groupchat", "chatroom"])
async def test_fired_callbacks_are_signed_and_shaped_like_easemobs(
    sim: httpx.AsyncClient, receiver: Receiver, shape: str, chat_type: str
) -> None:
    spec: dict[str, Any] = {"from": "alice", "text": "你好", "chat_type": chat_type, "shape": shape}
    if chat_type == "chat":
        spec["to"] = "ai_bot"
    else:
        spec.update(to="ai_bot", group_id="228978123456513", mention=["ai_bot"])
    before = int(time.time() * 1000)
    fired = (await sim.post("/_sim/callback", json=spec)).json()

    assert fired["status"] == 200
    assert fired["response"] == {"valid": True}
    assert fired["elapsed_ms"] >= 0
    assert receiver.verdicts == [True]
    [body] = receiver.received
    assert body == fired["request"]
    assert body["callId"].startswith(f"{ORG}#{APP}_")
    assert before <= body["timestamp"] <= int(time.time() * 1000)  # milliseconds
    assert body["security"] == expected_security(body["callId"], SECRET, body["timestamp"])
    assert isinstance(body["msg_id"], str)
    assert body["msg_id"].isdigit()
    assert len(body["msg_id"]) >= 18
    assert (body["chat_type"], body["from"]) == (chat_type, "alice")
    if chat_type == "chat":
        assert body["to"] == "ai_bot"
        assert "group_id" not in body
    else:
        assert body["to"] == body["group_id"] == "228978123456513"
    payload = body["payload"]
    if shape == "bodies":
        assert payload["bodies"] == [{"type": "txt", "msg": "你好"}]
        message_ext = payload["ext"]
    else:
        assert (payload["type"], payload["msg"]) == ("txt", "你好")
        message_ext = payload.get("ext", {})
    if chat_type != "chat":
        assert message_ext["em_at_list"] == ["ai_bot"]


async def test_callback_signed_with_another_secret_is_refused_by_the_gateway(
    sim: httpx.AsyncClient, receiver: Receiver
) -> None:
    fired = (await sim.post("/_sim/callback", json={"text": "x", "secret": "stolen"})).json()
    assert fired["status"] == 401
    assert receiver.verdicts == [False]


async def test_callback_keeps_a_given_msg_id(sim: httpx.AsyncClient, receiver: Receiver) -> None:
    spec = {"text": "x", "msg_id": "1290012345678901234"}
    first = (await sim.post("/_sim/callback", json=spec)).json()
    second = (await sim.post("/_sim/callback", json=spec)).json()
    assert first["request"]["msg_id"] == second["request"]["msg_id"] == "1290012345678901234"
    assert first["request"]["callId"] != second["request"]["callId"]


async def test_unreachable_gateway_is_reported_not_crashed(sim: httpx.AsyncClient) -> None:
    response = await sim.post(
        "/_sim/callback", json={"text": "x", "gateway_url": "http://127.0.0.1:9/cb"}
    )
    assert response.status_code == 502
    assert "gateway unreachable" in response.json()["error"]


def test_build_callback_is_a_pure_signed_body() -> None:
    body = build_callback(
        sender="bob",
        to="185145305923585",
        text="hello",
        secret="s3cr3t",
        org="orgname",
        app="appname",
        chat_type="chatroom",
        shape="flat",
        msg_id="966475585536657404",
        timestamp=1642589932646,
    )
    assert body["payload"] == {"msg": "hello", "type": "txt"}
    assert body["group_id"] == "185145305923585"
    assert verify_signature(body["callId"], body["timestamp"], body["security"], ["s3cr3t"])
    assert not verify_signature(body["callId"], body["timestamp"], body["security"], ["other"])


# -- token ----------------------------------------------------------------------


async def test_token_with_wrong_credentials_is_invalid_grant(sim: httpx.AsyncClient) -> None:
    response = await sim.post(
        f"/{ORG}/{APP}/token",
        json={"grant_type": "client_credentials", "client_id": "dev-client", "client_secret": "x"},
    )
    _assert_easemob_error(response, 400, "invalid_grant", "client_secret does not match")


async def test_unknown_app_is_404(sim: httpx.AsyncClient) -> None:
    response = await sim.post("/myorg/nope/token", json={})
    _assert_easemob_error(response, 404, "organization_application_not_found", "myorg/nope")


async def test_expired_unknown_and_missing_tokens_are_401(sim: httpx.AsyncClient) -> None:
    await sim.post("/_sim/inject", json={"token_ttl_s": 1})
    token = await _token(sim)
    assert (await _send(sim, _text(["a"]), token=token)).status_code == 200
    await sim.post("/_sim/inject", json={"expire_tokens": True})
    _assert_easemob_error(
        await _send(sim, _text(["a"]), token=token), 401, "unauthorized", "expired access token"
    )
    _assert_easemob_error(
        await _send(sim, _text(["a"]), token="YWMtforged"),
        401,
        "auth_bad_access_token",
        "corrupt access token",
    )
    response = await sim.post(f"/{ORG}/{APP}/messages/users", json=_text(["a"]))
    assert response.status_code == 401


async def test_tokens_expire_after_expires_in(sim: httpx.AsyncClient) -> None:
    assert await _token_with_ttl(sim, 3600)
    await sim.post("/_sim/inject", json={"token_ttl_s": 1})
    token = await _token_with_ttl(sim, 1)
    await asyncio.sleep(1.05)
    assert (await _send(sim, _text(["a"]), token=token)).status_code == 401


async def _token_with_ttl(sim: httpx.AsyncClient, ttl: int) -> str:
    response = await sim.post(
        f"/{ORG}/{APP}/token",
        json={
            "grant_type": "client_credentials",
            "client_id": "dev-client",
            "client_secret": "dev-client-secret",
        },
    )
    assert response.json()["expires_in"] == ttl
    token: str = response.json()["access_token"]
    return token


# -- sending --------------------------------------------------------------------


async def test_send_returns_a_fresh_numeric_id_per_target(sim: httpx.AsyncClient) -> None:
    response = await _send(sim, _text(["a", "b", "c"]))
    assert response.status_code == 200
    body = response.json()
    assert body["action"] == "post"
    assert set(body["data"]) == {"a", "b", "c"}
    ids = list(body["data"].values())
    assert len(set(ids)) == 3
    assert all(isinstance(i, str) and i.isdigit() for i in ids)
    messages = (await sim.get("/_sim/messages")).json()["messages"]
    assert [m["to"] for m in messages] == [["a"], ["b"], ["c"]]
    assert [m["id"] for m in messages] == ids


@pytest.mark.parametrize(
    ("body", "error", "text"),
    [
        (_text(["a"], **{"from": ""}), "message_send_error", "param from can't be empty"),
        (_text([]), "message_send_error", "param to can't be empty"),
        ({**_text(["a"]), "type": ""}, "message_send_error", "param type can't be empty"),
        ({**_text(["a"]), "body": {}}, "message_send_error", "param body can't be empty"),
        (_text(["a"], ext=None), "message_send_error", "param ext must be JSONObject"),
        (_text(["a"], ext=[1]), "message_send_error", "param ext must be JSONObject"),
        (_text([f"u{i}" for i in range(601)]), "message_send_error", "limit 600"),
        ({**_text(["a"]), "to": "a"}, "invalid_request_body", "Request body is invalid"),
        ({**_text(["a"]), "type": "bogus"}, "invalid_request_body", "Request body is invalid"),
        ([1, 2], "invalid_request_body", "Request body is invalid"),
    ],
)
async def test_send_is_validated_like_easemob(
    sim: httpx.AsyncClient, body: Any, error: str, text: str
) -> None:
    _assert_easemob_error(await _send(sim, body), 400, error, text)
    assert (await sim.get("/_sim/messages")).json()["messages"] == []


async def test_group_and_chatroom_target_limits(sim: httpx.AsyncClient) -> None:
    token = await _token(sim)
    groups = await _send(sim, _text(["g1", "g2", "g3", "g4"]), kind="chatgroups", token=token)
    _assert_easemob_error(groups, 400, "message_send_error", "limit 3")
    rooms = await _send(sim, _text([f"r{i}" for i in range(11)]), kind="chatrooms", token=token)
    _assert_easemob_error(rooms, 400, "message_send_error", "limit 10")


async def test_missing_from_sends_as_admin(sim: httpx.AsyncClient) -> None:
    body = _text(["a"])
    del body["from"]
    assert (await _send(sim, body)).status_code == 200
    [message] = (await sim.get("/_sim/messages")).json()["messages"]
    assert message["from"] == "admin"


async def test_not_json_and_wrong_content_type(sim: httpx.AsyncClient) -> None:
    token = await _token(sim)
    headers = {"Authorization": f"Bearer {token}"}
    url = f"/{ORG}/{APP}/messages/users"
    not_json = await sim.post(
        url, content=b"{nope", headers={**headers, "Content-Type": "application/json"}
    )
    _assert_easemob_error(not_json, 400, "invalid_request_body", "Request body is invalid")
    wrong_type = await sim.post(
        url, content=b"{}", headers={**headers, "Content-Type": "text/plain"}
    )
    _assert_easemob_error(wrong_type, 415, "web_application", "Unsupported Media Type")


async def test_body_and_ext_above_five_kb_is_too_large(sim: httpx.AsyncClient) -> None:
    token = await _token(sim)
    big = await _send(sim, _text(["a"], msg="长" * 1750), token=token)  # 5,250 bytes
    _assert_easemob_error(big, 400, "message_send_error", "message is too large")
    assert big.json()["error_code"] == 14007
    with_ext = await _send(sim, _text(["a"], msg="长" * 1500, ext={"k": "x" * 700}), token=token)
    assert with_ext.status_code == 400
    assert (await _send(sim, _text(["a"], msg="长" * 1500), token=token)).status_code == 200
    await sim.post("/_sim/inject", json={"oversize_status": 413})
    old = await _send(sim, _text(["a"], msg="长" * 1750), token=token)
    _assert_easemob_error(old, 413, "Request Entity Too Large", "Request Entity Too Large")


# -- injected failures -------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "text"),
    [
        (429, "reach_limit", "This request has reached api limit"),
        (403, "message_send_error", "message send reach limit"),
        (413, "Request Entity Too Large", "Request Entity Too Large"),
        (500, "unsupported_service_operation", "Internal Server Error"),
        (503, "web_application", "Service Unavailable"),
        (401, "unauthorized", "expired access token"),
    ],
)
async def test_injected_failures_use_the_documented_bodies(
    sim: httpx.AsyncClient, status: int, error: str, text: str
) -> None:
    token = await _token(sim)
    await sim.post("/_sim/inject", json={"status": status, "count": 2, "after": 1})
    assert (await _send(sim, _text(["a"]), token=token)).status_code == 200
    _assert_easemob_error(await _send(sim, _text(["a"]), token=token), status, error, text)
    token = await _token(sim)  # a 401 also expires the token it was given
    _assert_easemob_error(await _send(sim, _text(["a"]), token=token), status, error, text)
    token = await _token(sim)
    assert (await _send(sim, _text(["a"]), token=token)).status_code == 200


async def test_injected_400_too_large_carries_14007(sim: httpx.AsyncClient) -> None:
    await sim.post("/_sim/inject", json={"status": 400, "description": "message is too large"})
    response = await _send(sim, _text(["a"]))
    _assert_easemob_error(response, 400, "message_send_error", "message is too large")
    assert response.json()["error_code"] == 14007


async def test_rate_limit_answers_429_above_the_rate(sim: httpx.AsyncClient) -> None:
    token = await _token(sim)
    await sim.post("/_sim/inject", json={"rate_limit": 10})
    answers = await asyncio.gather(*(_send(sim, _text(["a"]), token=token) for _ in range(15)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200] * 10 + [429] * 5
    _assert_easemob_error(
        next(r for r in answers if r.status_code == 429), 429, "reach_limit", "api limit"
    )


async def test_slow_answers(sim: httpx.AsyncClient) -> None:
    token = await _token(sim)
    await sim.post("/_sim/inject", json={"delay_ms": 300})
    started = time.monotonic()
    assert (await _send(sim, _text(["a"]), token=token)).status_code == 200
    assert time.monotonic() - started >= 0.29


async def test_bad_admin_requests_are_400(sim: httpx.AsyncClient) -> None:
    assert (await sim.post("/_sim/inject", content=b"[")).status_code == 400
    assert (await sim.post("/_sim/inject", json={"oversize_status": 500})).status_code == 400
    assert (await sim.get("/_sim/messages", params={"since": "soon"})).status_code == 400


# -- inspection ---------------------------------------------------------------------


async def test_messages_filter_by_target_and_time(sim: httpx.AsyncClient) -> None:
    token = await _token(sim)
    await _send(sim, _text(["alice"], "one"), token=token)
    await asyncio.sleep(0.01)
    middle = time.time() * 1000
    await _send(sim, _text(["alice", "bob"], "two"), token=token)
    alice = (await sim.get("/_sim/messages", params={"to": "alice"})).json()["messages"]
    assert [m["body"]["msg"] for m in alice] == ["one", "two"]
    recent = (await sim.get("/_sim/messages", params={"since": middle})).json()["messages"]
    assert [(m["to"], m["body"]["msg"]) for m in recent] == [(["alice"], "two"), (["bob"], "two")]


async def test_wait_long_polls_until_the_messages_arrive(sim: httpx.AsyncClient) -> None:
    token = await _token(sim)
    waiting = asyncio.create_task(
        sim.get("/_sim/wait", params={"to": "alice", "count": 2, "timeout": 10})
    )
    await asyncio.sleep(0.05)
    assert not waiting.done()
    started = time.monotonic()
    await _send(sim, _text(["alice"], "one"), token=token)
    await _send(sim, _text(["bob"], "other"), token=token)
    await _send(sim, _text(["alice"], "two"), token=token)
    answer = (await waiting).json()
    assert time.monotonic() - started < 2
    assert answer["timed_out"] is False
    assert [m["body"]["msg"] for m in answer["messages"]] == ["one", "two"]


async def test_wait_gives_up_after_its_timeout(sim: httpx.AsyncClient) -> None:
    started = time.monotonic()
    answer = (await sim.get("/_sim/wait", params={"to": "nobody", "timeout": 0.2})).json()
    assert answer == {"messages": [], "token_requests": 0, "timed_out": True}
    assert 0.15 < time.monotonic() - started < 2


async def test_reset_forgets_messages_failures_and_counters(sim: httpx.AsyncClient) -> None:
    token = await _token(sim)
    await _send(sim, _text(["a"]), token=token)
    await sim.post("/_sim/inject", json={"status": 500, "count": 5, "rate_limit": 1})
    assert (await sim.post("/_sim/reset")).json() == {"ok": True}
    stats = (await sim.get("/_sim/stats")).json()
    assert (stats["messages"], stats["token_requests"], stats["pending_faults"]) == (0, 0, 0)
    for _ in range(3):  # no failures, no rate limit; the token is still valid
        assert (await _send(sim, _text(["a"]), token=token)).status_code == 200


async def test_python_dash_m_simulator_serves() -> None:
    from imbot.devtools.processes import free_port

    port = free_port()
    process = subprocess.Popen(  # noqa: ASYNC220 - a child that runs beside the test
        [sys.executable, "-m", "imbot.simulator", "--port", str(port), "--org", ORG, "--app", APP],
        stderr=subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for _ in range(100):
                try:
                    stats = (await http.get("/_sim/stats")).json()
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            else:
                pytest.fail("simulator did not start")
            assert stats["token_requests"] == 0
            assert (await _send(http, _text(["a"]))).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=10)
        assert process.stderr is not None
        process.stderr.close()
