"""A local Easemob: the REST endpoints the sender uses, and a callback firer.

Real HTTP, documented wire format (reference §3): ``POST /{org}/{app}/token``,
``POST /{org}/{app}/messages/users|chatgroups|chatrooms``, Easemob's error bodies.
An admin API under ``/_sim`` injects the documented failures on demand, lists
what was delivered, waits for deliveries, and fires signed before-send callbacks
at the gateway.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from aiohttp import web

from simulator.callbacks import build_callback

_ERRORS: dict[int, tuple[str, str]] = {
    400: ("message_send_error", "message is too large"),
    401: ("unauthorized", "Unable to authenticate due to expired access token"),
    403: ("message_send_error", "message send reach limit"),
    404: ("service_resource_not_found", "Service resource not found"),
    413: ("Request Entity Too Large", "Request Entity Too Large"),
    429: ("reach_limit", "This request has reached api limit"),
    500: ("web_application", "Internal Server Error"),
    503: ("web_application", "Service Unavailable"),
}


@dataclass
class SimulatorConfig:
    port: int = 0
    host: str = "127.0.0.1"
    org: str = "demo-org"
    app: str = "demo-app"
    client_id: str = "dev-client"
    client_secret: str = "dev-client-secret"
    token_ttl_s: int = 3600
    gateway_url: str = ""
    secret: str = "dev-callback-secret"
    max_message_bytes: int = 5 * 1024


@dataclass
class SimulatorState:
    config: SimulatorConfig
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    messages: list[dict[str, Any]] = field(default_factory=list)
    token_requests: int = 0
    inject: deque[tuple[int, str | None]] = field(default_factory=deque)  # (status, description)
    delay_s: float = 0.0
    rate_limit: float | None = None  # calls per second before 429
    calls: deque[float] = field(default_factory=deque)
    arrived: asyncio.Condition | None = None
    ids: Any = field(default_factory=lambda: itertools.count(1029457500870543736))


STATE: web.AppKey[SimulatorState] = web.AppKey("state", SimulatorState)


def _error(status: int, description: str | None = None) -> web.Response:
    error, default = _ERRORS.get(status, ("web_application", "error"))
    body = {
        "error": error,
        "exception": "com.easemob.simulator.SimulatedException",
        "timestamp": int(time.time() * 1000),
        "duration": 0,
        "error_description": description or default,
    }
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def token(request: web.Request) -> web.Response:
    state = request.app[STATE]
    cfg = state.config
    if request.match_info["org"] != cfg.org or request.match_info["app"] != cfg.app:
        return _error(404, "organization_application_not_found")
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "Request body is invalid. Please check body is correct.")
    state.token_requests += 1
    if body.get("client_id") != cfg.client_id or body.get("client_secret") != cfg.client_secret:
        return _error(401, "invalid client credentials")
    value = "YWMt" + secrets.token_urlsafe(24)
    state.tokens[value] = time.monotonic() + cfg.token_ttl_s
    return web.json_response(
        {"access_token": value, "expires_in": cfg.token_ttl_s, "application": "sim-app-uuid"}
    )


async def send(request: web.Request) -> web.Response:
    state = request.app[STATE]
    cfg = state.config
    kind = request.match_info["kind"]
    if request.match_info["org"] != cfg.org or request.match_info["app"] != cfg.app:
        return _error(404, "organization_application_not_found")
    auth = request.headers.get("Authorization", "")
    expiry = state.tokens.get(auth.removeprefix("Bearer "))
    if expiry is None or expiry < time.monotonic():
        return _error(401)
    if state.delay_s:
        await asyncio.sleep(state.delay_s)
    if state.inject and state.inject[0][0] == 200:
        state.inject.popleft()  # a scheduled success: handled normally below
    elif state.inject:
        status, description = state.inject.popleft()
        if status == 401:
            state.tokens.pop(auth.removeprefix("Bearer "), None)
        return _error(status, description)
    now = time.monotonic()
    if state.rate_limit is not None:
        while state.calls and state.calls[0] < now - 1:
            state.calls.popleft()
        if len(state.calls) >= state.rate_limit:
            return _error(429)
        state.calls.append(now)
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _error(400, "Request body is invalid. Please check body is correct.")
    for name in ("from", "to", "type", "body"):
        if not body.get(name):
            return _error(400, f"param {name} can't be empty")
    if "ext" in body and not isinstance(body["ext"], dict):
        return _error(400, "param ext must be JSONObject")
    size = len(orjson.dumps(body.get("body"))) + len(orjson.dumps(body.get("ext", {})))
    if size > cfg.max_message_bytes:
        return _error(413)
    data: dict[str, str] = {}
    for target in body["to"]:
        message_id = str(next(state.ids))
        data[target] = message_id
        state.messages.append(
            {
                "id": message_id,
                "kind": kind,
                "from": body["from"],
                "to": [target],
                "type": body["type"],
                "body": body["body"],
                "ext": body.get("ext", {}),
                "received_at": time.time() * 1000,
            }
        )
    assert state.arrived is not None
    async with state.arrived:
        state.arrived.notify_all()
    return web.json_response(
        {"action": "post", "application": "sim-app-uuid", "path": f"/messages/{kind}", "data": data,
         "timestamp": int(time.time() * 1000), "duration": 0, "organization": cfg.org,
         "applicationName": cfg.app}
    )  # fmt: skip


def _matching(state: SimulatorState, to: str | None, since: float | None) -> list[dict[str, Any]]:
    return [
        m
        for m in state.messages
        if (to is None or to in m["to"]) and (since is None or m["received_at"] >= since)
    ]


async def list_messages(request: web.Request) -> web.Response:
    state = request.app[STATE]
    since = request.query.get("since")
    found = _matching(state, request.query.get("to"), float(since) if since else None)
    return web.json_response({"messages": found, "token_requests": state.token_requests})


async def wait_messages(request: web.Request) -> web.Response:
    """Long-poll until ``count`` messages for ``to`` arrived (or ``timeout`` seconds)."""
    state = request.app[STATE]
    to = request.query.get("to")
    count = int(request.query.get("count", "1"))
    timeout = float(request.query.get("timeout", "10"))
    assert state.arrived is not None
    try:
        async with asyncio.timeout(timeout), state.arrived:
            await state.arrived.wait_for(lambda: len(_matching(state, to, None)) >= count)
    except TimeoutError:
        pass
    return web.json_response({"messages": _matching(state, to, None)})


async def inject(request: web.Request) -> web.Response:
    """Failures on demand.

    ``{"status": 429, "count": 2, "description"?: "...", "after"?: 3}`` (the next sends fail,
    optionally after some succeed), ``{"delay_ms": 500}``, ``{"rate_limit": 100}`` (calls/s,
    then 429), ``{"max_message_bytes": 5120}`` (then 413), ``{"expire_tokens": true}`` (401).
    """
    state = request.app[STATE]
    body = await request.json()
    if "status" in body:
        # "after": let that many sends succeed first (a failure in the middle of a reply)
        for _ in range(int(body.get("after", 0))):
            state.inject.append((200, None))
        for _ in range(int(body.get("count", 1))):
            state.inject.append((int(body["status"]), body.get("description")))
    if "delay_ms" in body:
        state.delay_s = float(body["delay_ms"]) / 1000
    if "rate_limit" in body:
        state.rate_limit = float(body["rate_limit"]) if body["rate_limit"] else None
    if "max_message_bytes" in body:
        state.config.max_message_bytes = int(body["max_message_bytes"])
    if body.get("expire_tokens"):
        state.tokens.clear()
    return web.json_response({"pending": len(state.inject)})


async def reset(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.messages.clear()
    state.inject.clear()
    state.delay_s = 0.0
    state.rate_limit = None
    return web.json_response({"ok": True})


async def fire_callback(request: web.Request) -> web.Response:
    """Sign a before-send callback like Easemob does and POST it to the gateway."""
    state = request.app[STATE]
    cfg = state.config
    spec = await request.json()
    data = build_callback(
        sender=spec.get("from", "alice"),
        to=spec.get("to", "ai_bot"),
        text=spec.get("text", ""),
        secret=cfg.secret,
        org=cfg.org,
        app=cfg.app,
        chat_type=spec.get("chat_type", "chat"),
        group_id=spec.get("group_id"),
        mention=spec.get("mention"),
        shape=spec.get("shape", "bodies"),
        msg_id=spec.get("msg_id"),
    )
    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.post(
            cfg.gateway_url,
            content=orjson.dumps(data),
            headers={"Content-Type": "application/json"},
        )
    elapsed = (time.perf_counter() - started) * 1000
    try:
        answer: Any = response.json()
    except ValueError:
        answer = response.text
    return web.json_response(
        {"request": data, "status": response.status_code, "response": answer, "elapsed_ms": elapsed}
    )


async def _state_ctx(app: web.Application) -> AsyncIterator[None]:
    app[STATE].arrived = asyncio.Condition()
    yield


def create_app(config: SimulatorConfig) -> web.Application:
    app = web.Application()
    app[STATE] = SimulatorState(config)
    app.cleanup_ctx.append(_state_ctx)
    app.router.add_post("/{org}/{app}/token", token)
    app.router.add_post("/{org}/{app}/messages/{kind:users|chatgroups|chatrooms}", send)
    app.router.add_get("/_sim/messages", list_messages)
    app.router.add_get("/_sim/wait", wait_messages)
    app.router.add_post("/_sim/inject", inject)
    app.router.add_post("/_sim/reset", reset)
    app.router.add_post("/_sim/callback", fire_callback)
    return app


async def serve(config: SimulatorConfig) -> web.AppRunner:
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    return runner
