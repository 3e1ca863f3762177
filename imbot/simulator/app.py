"""A local Easemob: the REST endpoints the sender uses, and a before-send callback firer.

Real HTTP, the documented wire format (reference §3):

- ``POST /{org}/{app}/token``: client credentials → ``access_token``/``expires_in``;
  wrong credentials → 400 ``invalid_grant``.
- ``POST /{org}/{app}/messages/users|chatgroups|chatrooms``: Bearer token checked
  (expired → 401 ``unauthorized``, unknown → 401 ``auth_bad_access_token``), the
  body validated like Easemob (400 ``message_send_error`` texts), body + ext above
  the size limit → 400 14007 (or 413), ``data`` maps each target to a fresh id.
- ``POST /{org}/{app}/chatfiles``: upload as Easemob takes it (multipart/form-data, field
  ``file``, Bearer token; with a ``restrict-access`` header the answer's
  ``entities[0]["share-secret"]`` is then required to download); above 10 MiB → 413.
- ``GET /{org}/{app}/chatfiles/{uuid}``: the file with its Content-Type (reference §3.6a);
  Bearer token checked as for sends; a restricted file needs ``share-secret`` (header or
  ``?share-secret=``): missing or wrong → 403 ``forbidden_op`` (Easemob's exact answer to a
  wrong secret is undocumented); unknown uuid → 404 ``entity_not_found``.
- ``POST /{org}/{app}/stream_message/user|chatgroup``: stream messages (reference §3.6),
  Bearer token checked as for sends, counted against the same ``rate_limit`` (429), the
  chunk validated with Easemob's codes 14001–14038 (``imbot/simulator/streams.py`` lists
  each check); the first chunk answers ``data.msgId``, a later one an empty ``data``.
  A ``cmd`` message sent to ``messages/…`` with ``body.action`` ``TypingBegin``/``TypingEnd``
  is a typing indicator (reference §3.5) on the client view.

The admin API under ``/_sim`` (JSON):

- ``POST /_sim/inject`` — failures on demand, any combination of::

      {"status": 429, "count": 2, "after": 0, "description": "...", "error": "...",
       "error_code": 14007, "retry_after": "1", "endpoint": "messages"|"token"}
      {"delay_ms": 500}            every send answers this much later
      {"rate_limit": 100}          more than 100 sends in any second → 429 (null: off)
      {"max_message_bytes": 5120, "oversize_status": 400|413}
      {"quota": {"messages": 6000, "window_s": 60}}   above → 403 "message send reach limit"
      {"token_ttl_s": 2}           expires_in of tokens issued from now on
      {"expire_tokens": true}      every issued token is now expired → 401
      {"file_delay_ms": 500}       a download sends its headers, then waits this long
      {"file_chunked": true}       downloads are chunked, without Content-Length
      {"status": 503, "endpoint": "stream", "count": 1, "applied": true}
                                   the next stream chunks answer this (``after``, ``error_code``
                                   as above); ``applied``: the chunk is taken and shown
                                   first (Easemob took it, its answer was lost)
      {"stream_chunk_gap_s": 30, "stream_total_s": 1800, "stream_max_bytes": 131072}
                                   the stream limits (14033, 14034, 14032), e.g. a short gap

  ``status``/``count`` queue the next ``count`` answers of that status
  (``after``: let that many sends succeed first); 401 also expires the token used.
- ``GET /_sim/messages?to=&since=&kind=`` — delivered messages (``since``: ms epoch).
- ``GET /_sim/wait?to=alice&count=1&timeout=10[&since=]`` — long-poll until that many
  messages for ``to`` arrived (or the timeout passed); answers like ``/_sim/messages``.
- ``GET /_sim/screen?user=alice|group=g1|room=r1[&peer=ai_bot][&finished=1&timeout=10]`` —
  the client view: what that user's 1:1 chats (or that group or room) show, in order::

      {"items": [{"kind": "message", "id", "from", "type", "text" (txt), "body", "ext", "at"},
                 {"kind": "stream", "id" (msgId), "from", "to", "text" (the chunks so far),
                  "format": "text"|"markdown", "ext", "finished", "finish_reason",
                  "ended": null|14032|14033|14034, "chunks", "seq", "at", "updated_at"},
                 {"kind": "typing", "id", "from", "action": "TypingBegin"|"TypingEnd",
                  "routetype", "at"}],
       "typing": ["ai_bot"]}     senders whose typing indicator shows now

  ``at``: ms epoch; ``peer``: only what that sender sent; ``finished=N``: long-poll until N
  streams there are finished or ended (or ``timeout`` seconds passed, then ``timed_out``).
- ``GET /_sim/stats`` — token, send and stream request counts, answers by status, the
  busiest sliding second of send and stream calls (with a ``rate_limit``).
- ``POST /_sim/reset`` — forget messages, streams, failures, limits and counters (tokens
  stay valid).
- ``POST /_sim/callback`` — sign a before-send callback like Easemob and POST it to
  the gateway (see ``fire_callback``).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any
from uuid import uuid4

import aiohttp
import orjson
from aiohttp import web

from imbot.simulator import streams, wire
from imbot.simulator.callbacks import build_callback, new_message_id


@dataclass
class SimulatorConfig:
    """Start-up settings. ``port=0`` picks a free port; ``serve`` writes the real one back."""

    port: int = 0
    host: str = "127.0.0.1"
    org: str = "demo-org"
    app: str = "demo-app"
    client_id: str = "dev-client"
    client_secret: str = "dev-client-secret"
    token_ttl_s: int = 3600
    gateway_url: str = ""
    secret: str = "dev-callback-secret"  # the callback rule's secret
    max_message_bytes: int = 5 * 1024  # body + ext, serialised
    oversize_status: int = 400  # 400 + error_code 14007 (current docs) or 413 (older docs)
    rate_limit: float | None = None  # send calls per second before 429
    callback_wait_ms: int = 200  # Easemob's default wait for the callback answer
    callback_timeout_s: float = 5.0  # how long /_sim/callback waits for the gateway at most


@dataclass
class Fault:
    status: int
    description: str | None = None
    error: str | None = None
    error_code: int | None = None
    retry_after: str | None = None
    applied: bool = False  # stream chunks: taken (and shown) before this answer

    def response(self) -> web.Response:
        headers = {"Retry-After": self.retry_after} if self.retry_after else None
        return wire.error_response(
            self.status,
            self.description,
            error=self.error,
            error_code=self.error_code,
            headers=headers,
        )


@dataclass
class Behaviour:
    """What the admin API changed; ``reset`` goes back to the configuration."""

    send_faults: deque[Fault | None] = field(default_factory=deque)  # None: a normal answer
    token_faults: deque[Fault] = field(default_factory=deque)
    delay_s: float = 0.0
    rate_limit: float | None = None
    max_message_bytes: int = 5 * 1024
    oversize_status: int = 400
    token_ttl_s: int = 3600
    quota_messages: int | None = None
    quota_window_s: float = 60.0
    file_delay_s: float = 0.0
    file_chunked: bool = False
    stream_faults: deque[Fault | None] = field(default_factory=deque)
    stream_limits: streams.StreamLimits = field(default_factory=streams.StreamLimits)

    @classmethod
    def from_config(cls, config: SimulatorConfig) -> Behaviour:
        return cls(
            rate_limit=config.rate_limit,
            max_message_bytes=config.max_message_bytes,
            oversize_status=config.oversize_status,
            token_ttl_s=config.token_ttl_s,
        )


@dataclass(frozen=True)
class StoredFile:
    data: bytes
    content_type: str
    share_secret: str | None  # None: uploaded without restrict-access


@dataclass
class SimulatorState:
    config: SimulatorConfig
    behaviour: Behaviour
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    messages: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, StoredFile] = field(default_factory=dict)  # uuid -> file (kept by reset)
    streams: streams.StreamBook = field(default_factory=streams.StreamBook)
    token_requests: int = 0
    send_requests: int = 0
    stream_requests: int = 0
    # Most send and stream calls admitted within one sliding second (with a rate_limit).
    busiest_second: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # "token 200", "users 429", ...
    admitted: deque[float] = field(default_factory=deque)  # send times in the last second
    sent_in_window: deque[tuple[float, int]] = field(default_factory=deque)  # for the quota
    arrived: asyncio.Condition | None = None
    http: aiohttp.ClientSession | None = None

    def reset(self) -> None:
        self.behaviour = Behaviour.from_config(self.config)
        self.messages.clear()
        self.streams.clear()
        self.token_requests = self.send_requests = self.stream_requests = 0
        self.busiest_second = 0
        self.answers.clear()
        self.admitted.clear()
        self.sent_in_window.clear()


STATE: web.AppKey[SimulatorState] = web.AppKey("state", SimulatorState)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _ours(request: web.Request) -> web.Response | None:
    """404 as Easemob answers it when the URL names another org/app."""
    cfg = request.app[STATE].config
    org, app = request.match_info["org"], request.match_info["app"]
    if (org, app) == (cfg.org, cfg.app):
        return None
    return wire.error_response(
        404,
        f"Could not find application for {org}/{app} from URI: {request.path}",
        error="organization_application_not_found",
    )


async def _json(request: web.Request) -> Any:
    """The JSON body, or None when it is not JSON (handlers answer 400 then)."""
    try:
        return orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return None


# -- Easemob REST -------------------------------------------------------------


async def token(request: web.Request) -> web.Response:
    state = request.app[STATE]
    cfg = state.config
    state.token_requests += 1
    if (wrong := _ours(request)) is not None:
        return wrong
    if state.behaviour.token_faults:
        return state.behaviour.token_faults.popleft().response()
    body = await _json(request)
    if not isinstance(body, dict):
        return wire.invalid_body()
    for name in ("client_id", "client_secret"):
        if not body.get(name):
            return wire.error_response(400, f"{name} must be provided.", error="illegal_argument")
    if body.get("grant_type") != "client_credentials":
        return wire.error_response(
            400, "grant_type must be client_credentials", error="invalid_grant"
        )
    if body["client_id"] != cfg.client_id:
        return wire.error_response(400, "client_id does not match", error="invalid_grant")
    if body["client_secret"] != cfg.client_secret:
        return wire.error_response(400, "client_secret does not match", error="invalid_grant")
    ttl = state.behaviour.token_ttl_s
    value = "YWMt" + secrets.token_urlsafe(32)
    state.tokens[value] = time.monotonic() + ttl if ttl > 0 else float("inf")
    return web.json_response(
        {"access_token": value, "expires_in": ttl, "application": "sim-app-uuid"}
    )


def _unauthorized(request: web.Request) -> tuple[web.Response | None, str]:
    state = request.app[STATE]
    auth = request.headers.get("Authorization", "")
    presented = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else ""
    expiry = state.tokens.get(presented)
    if not presented:
        return wire.error_response(401, "Unable to authenticate", error="unauthorized"), presented
    if expiry is None:
        return (
            wire.error_response(
                401,
                "Unable to authenticate due to corrupt access token",
                error="auth_bad_access_token",
            ),
            presented,
        )
    if expiry < time.monotonic():
        return wire.error_response(401), presented
    return None, presented


def _over_rate(state: SimulatorState, now: float) -> bool:
    limit = state.behaviour.rate_limit
    if limit is None:
        return False
    while state.admitted and state.admitted[0] <= now - 1.0:
        state.admitted.popleft()
    if len(state.admitted) >= limit:
        return True
    state.admitted.append(now)
    state.busiest_second = max(state.busiest_second, len(state.admitted))
    return False


def _over_quota(state: SimulatorState, now: float, count: int) -> bool:
    b = state.behaviour
    if b.quota_messages is None:
        return False
    window = state.sent_in_window
    while window and window[0][0] <= now - b.quota_window_s:
        window.popleft()
    if sum(n for _, n in window) + count > b.quota_messages:
        return True
    window.append((now, count))
    return False


async def _admitted(request: web.Request) -> tuple[web.Response | None, Any]:
    """What every send checks first (this app's path, a JSON body, a valid token), then
    the configured delay: (the refusal, None) or (None, the token presented)."""
    if (wrong := _ours(request)) is not None:
        return wrong, None
    if request.content_type != "application/json":
        return wire.error_response(415), None
    refused, presented = _unauthorized(request)
    if refused is not None:
        return refused, None
    delay = request.app[STATE].behaviour.delay_s
    if delay:
        await asyncio.sleep(delay)
    return None, presented


async def send(request: web.Request) -> web.Response:
    state = request.app[STATE]
    kind = request.match_info["kind"]
    state.send_requests += 1
    refused, presented = await _admitted(request)
    if refused is not None:
        return refused
    behaviour = state.behaviour
    if behaviour.send_faults:
        fault = behaviour.send_faults.popleft()
        if fault is not None:
            if fault.status == 401:
                state.tokens[presented] = 0.0  # that token is now expired for good
            return fault.response()
    now = time.monotonic()
    if _over_rate(state, now):
        return wire.error_response(429)
    checked = wire.validate_send(kind, await _json(request))
    if isinstance(checked, web.Response):
        return checked
    size = len(orjson.dumps(checked["body"])) + len(orjson.dumps(checked.get("ext", {})))
    if size > behaviour.max_message_bytes:
        if behaviour.oversize_status == 413:
            return wire.error_response(413)
        return wire.send_error(wire.TOO_LARGE, error_code=wire.TOO_LARGE_CODE)
    if _over_quota(state, now, len(checked["to"])):
        return wire.error_response(403)
    data: dict[str, str] = {}
    received_at = time.time() * 1000
    extra = {k: v for k, v in checked.items() if k not in {"from", "to", "type", "body", "ext"}}
    for target in checked["to"]:
        message_id = new_message_id()
        data[target] = message_id
        state.messages.append(
            {
                "id": message_id,
                "kind": kind,
                "from": checked["from"],
                "to": [target],
                "type": checked["type"],
                "body": checked["body"],
                "ext": checked.get("ext", {}),
                "options": extra,
                "received_at": received_at,
            }
        )
    assert state.arrived is not None
    async with state.arrived:
        state.arrived.notify_all()
    cfg = state.config
    return web.json_response(
        {
            "path": f"/messages/{kind}",
            "uri": f"{request.scheme}://{request.host}/{cfg.org}/{cfg.app}/messages/{kind}",
            "timestamp": int(received_at),
            "organization": cfg.org,
            "application": "sim-app-uuid",
            "action": "post",
            "data": data,
            "duration": 0,
            "applicationName": cfg.app,
        }
    )


async def stream_message(request: web.Request) -> web.Response:
    """``POST /{org}/{app}/stream_message/user|chatgroup``: one chunk (reference §3.6)."""
    state = request.app[STATE]
    target: streams.StreamTarget = "user" if request.match_info["target"] == "user" else "chatgroup"
    state.stream_requests += 1
    refused, presented = await _admitted(request)
    if refused is not None:
        return refused
    behaviour = state.behaviour
    fault = behaviour.stream_faults.popleft() if behaviour.stream_faults else None
    if fault is not None and not fault.applied:
        if fault.status == 401:
            state.tokens[presented] = 0.0
        return fault.response()
    if _over_rate(state, time.monotonic()):
        return wire.error_response(429)
    chunk = streams.parse_chunk(await _json(request))
    if isinstance(chunk, web.Response):
        return chunk
    taken = state.streams.accept(target, chunk, new_message_id(), behaviour.stream_limits)
    if isinstance(taken, int):
        return streams.stream_error(taken)
    assert state.arrived is not None
    async with state.arrived:
        state.arrived.notify_all()
    if fault is not None:  # applied: Easemob took the chunk, its answer is lost
        return fault.response()
    cfg = state.config
    path = f"/stream_message/{target}"
    return web.json_response(
        {
            "path": path,
            "uri": f"{request.scheme}://{request.host}/{cfg.org}/{cfg.app}{path}",
            "timestamp": int(taken.updated_at),
            "organization": cfg.org,
            "application": "sim-app-uuid",
            "action": "post",
            "data": {"msgId": taken.msg_id} if chunk.msg_id is None else {},
            "duration": 0,
            "applicationName": cfg.app,
        }
    )


# Easemob's default attachment limit (reference §3.8).
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
_FILE_CHUNK = 64 * 1024


async def upload_file(request: web.Request) -> web.Response:
    """``POST /{org}/{app}/chatfiles`` (multipart ``file``), answered as Easemob does."""
    state = request.app[STATE]
    if (wrong := _ours(request)) is not None:
        return wrong
    refused, _ = _unauthorized(request)
    if refused is not None:
        return refused
    if request.content_length is not None and request.content_length > MAX_UPLOAD_BYTES:
        return wire.error_response(413)
    try:
        form = await request.post()
    except ValueError:
        return wire.invalid_body()
    upload = form.get("file")
    if not isinstance(upload, web.FileField):
        return wire.error_response(400, "file must be provided.", error="illegal_argument")
    data = upload.file.read()
    if len(data) > MAX_UPLOAD_BYTES:
        return wire.error_response(413)
    uuid = str(uuid4())
    restricted = "restrict-access" in request.headers
    secret = secrets.token_urlsafe(24) if restricted else None
    state.files[uuid] = StoredFile(data, upload.content_type or "application/octet-stream", secret)
    entity: dict[str, Any] = {"uuid": uuid, "type": "chatfile"}
    if secret is not None:
        entity["share-secret"] = secret
    cfg = state.config
    return web.json_response(
        {
            "action": "post",
            "application": "sim-app-uuid",
            "path": "/chatfiles",
            "uri": f"{request.scheme}://{request.host}/{cfg.org}/{cfg.app}/chatfiles",
            "entities": [entity],
            "timestamp": int(time.time() * 1000),
            "organization": cfg.org,
            "applicationName": cfg.app,
        }
    )


async def download_file(request: web.Request) -> web.StreamResponse:
    """``GET /{org}/{app}/chatfiles/{uuid}`` (see the module docstring)."""
    state = request.app[STATE]
    if (wrong := _ours(request)) is not None:
        return wrong
    refused, _ = _unauthorized(request)
    if refused is not None:
        return refused
    stored = state.files.get(request.match_info["uuid"])
    if stored is None:
        return wire.error_response(404, "file not found", error="entity_not_found")
    presented = request.headers.get("share-secret") or request.query.get("share-secret")
    if stored.share_secret is not None and not (
        presented and secrets.compare_digest(presented, stored.share_secret)
    ):
        return wire.error_response(
            403, "share-secret is missing or does not match", error="forbidden_op"
        )
    behaviour = state.behaviour
    response = web.StreamResponse(headers={"Content-Type": stored.content_type})
    if not behaviour.file_chunked:
        response.content_length = len(stored.data)
    await response.prepare(request)
    if behaviour.file_delay_s:
        await asyncio.sleep(behaviour.file_delay_s)
    for start in range(0, len(stored.data), _FILE_CHUNK):
        await response.write(stored.data[start : start + _FILE_CHUNK])
    await response.write_eof()
    return response


def _counted(endpoint: str, handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        name = request.match_info.get("kind", endpoint)
        request.app[STATE].answers[f"{name} {response.status}"] += 1
        return response

    return wrapped


# -- admin API ----------------------------------------------------------------


def _matching(
    state: SimulatorState, to: str | None, since: float | None, kind: str | None = None
) -> list[dict[str, Any]]:
    return [
        m
        for m in state.messages
        if (to is None or to in m["to"])
        and (since is None or m["received_at"] >= since)
        and (kind is None or m["kind"] == kind)
    ]


def _float(request: web.Request, name: str) -> float | None:
    value = request.query.get(name)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        raise web.HTTPBadRequest(
            text=f'{{"error": "{name} must be a number"}}', content_type="application/json"
        ) from None


async def list_messages(request: web.Request) -> web.Response:
    state = request.app[STATE]
    found = _matching(
        state, request.query.get("to"), _float(request, "since"), request.query.get("kind")
    )
    return web.json_response({"messages": found, "token_requests": state.token_requests})


async def wait_messages(request: web.Request) -> web.Response:
    """Long-poll until ``count`` messages for ``to`` arrived, or ``timeout`` seconds passed."""
    state = request.app[STATE]
    to = request.query.get("to")
    since = _float(request, "since")
    count = int(_float(request, "count") or 1)
    timeout = _float(request, "timeout")
    assert state.arrived is not None
    timed_out = False
    try:
        async with asyncio.timeout(10.0 if timeout is None else timeout), state.arrived:
            await state.arrived.wait_for(lambda: len(_matching(state, to, since)) >= count)
    except TimeoutError:
        timed_out = True
    return web.json_response(
        {
            "messages": _matching(state, to, since),
            "token_requests": state.token_requests,
            "timed_out": timed_out,
        }
    )


_SCREEN_KINDS = {"user": "users", "group": "chatgroups", "room": "chatrooms"}


async def client_screen(request: web.Request) -> web.Response:
    """The client view of one user's 1:1 chats, a group or a room (module docstring)."""
    state = request.app[STATE]
    given = [(name, request.query[name]) for name in _SCREEN_KINDS if request.query.get(name)]
    if len(given) != 1:
        return _admin_error("give one of user, group, room")
    (name, to), peer = given[0], request.query.get("peer") or None
    kind = _SCREEN_KINDS[name]
    finished = int(_float(request, "finished") or 0)
    timeout = _float(request, "timeout")

    def view() -> dict[str, Any]:
        return streams.screen(
            state.messages, state.streams.streams.values(), kind=kind, to=to, peer=peer
        )

    def done() -> bool:
        items = view()["items"]
        ended = [i for i in items if i["kind"] == "stream" and (i["finished"] or i["ended"])]
        return len(ended) >= finished

    timed_out = False
    if finished:
        assert state.arrived is not None
        try:
            async with asyncio.timeout(10.0 if timeout is None else timeout), state.arrived:
                await state.arrived.wait_for(done)
        except TimeoutError:
            timed_out = True
    return web.json_response({**view(), "timed_out": timed_out})


async def stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {
            "token_requests": state.token_requests,
            "send_requests": state.send_requests,
            "stream_requests": state.stream_requests,
            "streams": len(state.streams.streams),
            "messages": len(state.messages),
            "answers": dict(state.answers),
            "busiest_second": state.busiest_second,
            "pending_faults": len(state.behaviour.send_faults),
        }
    )


def _admin_error(text: str) -> web.Response:
    return web.json_response({"error": text}, status=400)


async def inject(request: web.Request) -> web.Response:
    """Failures and limits on demand (see the module docstring)."""
    state = request.app[STATE]
    body = await _json(request)
    if not isinstance(body, dict):
        return _admin_error("body must be a JSON object")
    b = state.behaviour
    try:
        if "status" in body:
            fault = Fault(
                status=int(body["status"]),
                description=body.get("description"),
                error=body.get("error"),
                error_code=int(body["error_code"]) if body.get("error_code") else None,
                retry_after=str(body["retry_after"]) if body.get("retry_after") else None,
                applied=bool(body.get("applied", False)),
            )
            count = int(body.get("count", 1))
            endpoint = body.get("endpoint", "messages")
            if endpoint == "token":
                b.token_faults.extend([fault] * count)
            elif endpoint == "stream":
                b.stream_faults.extend([None] * int(body.get("after", 0)))
                b.stream_faults.extend([fault] * count)
            else:
                b.send_faults.extend([None] * int(body.get("after", 0)))
                b.send_faults.extend([fault] * count)
        if "delay_ms" in body:
            b.delay_s = float(body["delay_ms"] or 0) / 1000
        if "rate_limit" in body:
            b.rate_limit = float(body["rate_limit"]) if body["rate_limit"] else None
        if "max_message_bytes" in body:
            b.max_message_bytes = int(body["max_message_bytes"])
        if "oversize_status" in body:
            if int(body["oversize_status"]) not in (400, 413):
                return _admin_error("oversize_status must be 400 or 413")
            b.oversize_status = int(body["oversize_status"])
        if "quota" in body:
            quota = body["quota"] or {}
            b.quota_messages = int(quota["messages"]) if quota else None
            b.quota_window_s = float(quota.get("window_s", 60)) if quota else 60.0
        if "token_ttl_s" in body:
            b.token_ttl_s = int(body["token_ttl_s"])
        if "file_delay_ms" in body:
            b.file_delay_s = float(body["file_delay_ms"] or 0) / 1000
        if "file_chunked" in body:
            b.file_chunked = bool(body["file_chunked"])
        limits = b.stream_limits
        if "stream_chunk_gap_s" in body:
            limits = replace(limits, chunk_gap_s=float(body["stream_chunk_gap_s"]))
        if "stream_total_s" in body:
            limits = replace(limits, total_s=float(body["stream_total_s"]))
        if "stream_max_bytes" in body:
            limits = replace(limits, max_bytes=int(body["stream_max_bytes"]))
        b.stream_limits = limits
    except (TypeError, ValueError, KeyError) as exc:
        return _admin_error(f"bad value: {exc}")
    if body.get("expire_tokens"):
        for value in state.tokens:
            state.tokens[value] = 0.0
    return web.json_response(
        {
            "pending": len(b.send_faults),
            "pending_token": len(b.token_faults),
            "pending_stream": len(b.stream_faults),
        }
    )


async def reset(request: web.Request) -> web.Response:
    request.app[STATE].reset()
    return web.json_response({"ok": True})


_GROUP_TYPES = {"group", "groupchat", "chatroom"}


async def fire_callback(request: web.Request) -> web.Response:
    """Sign a before-send callback like Easemob does and POST it to the gateway.

    Body: ``{"from", "to", "text", "chat_type": "chat"|"group"|"groupchat"|"chatroom",
    "group_id"?, "mention"?: [...], "shape": "bodies"|"flat", "msg_id"?, "ext"?,
    "secret"? (sign with another secret), "gateway_url"? (another target)}``.
    For groups and chatrooms ``to`` becomes the group id, as Easemob sends it.
    Answers ``{"request", "status", "response", "elapsed_ms", "within_wait"}``;
    ``within_wait`` says whether the answer came within Easemob's wait time.
    """
    state = request.app[STATE]
    cfg = state.config
    spec = await _json(request)
    if not isinstance(spec, dict):
        return _admin_error("body must be a JSON object")
    url = spec.get("gateway_url") or cfg.gateway_url
    if not url:
        return _admin_error("no gateway URL: start with --gateway-url or pass gateway_url")
    chat_type = spec.get("chat_type", "chat")
    to = spec.get("to", "ai_bot")
    group_id = spec.get("group_id")
    if chat_type in _GROUP_TYPES:
        group_id = group_id or to
        to = group_id
    try:
        data = build_callback(
            sender=spec.get("from", "alice"),
            to=to,
            text=spec.get("text", ""),
            secret=spec.get("secret") or cfg.secret,
            org=cfg.org,
            app=cfg.app,
            chat_type=chat_type,
            group_id=group_id,
            mention=spec.get("mention"),
            shape=spec.get("shape", "bodies"),
            msg_id=spec.get("msg_id"),
            ext=spec.get("ext"),
        )
    except (TypeError, ValueError) as exc:
        return _admin_error(str(exc))
    assert state.http is not None
    started = time.perf_counter()
    try:
        async with state.http.post(
            url,
            json=data,
            timeout=aiohttp.ClientTimeout(total=cfg.callback_timeout_s),
        ) as response:
            raw = await response.read()
            status = response.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return web.json_response(
            {"request": data, "error": f"gateway unreachable: {type(exc).__name__}"}, status=502
        )
    elapsed = (time.perf_counter() - started) * 1000
    try:
        answer: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        answer = raw.decode(errors="replace")
    return web.json_response(
        {
            "request": data,
            "status": status,
            "response": answer,
            "elapsed_ms": elapsed,
            "within_wait": elapsed <= cfg.callback_wait_ms,
        }
    )


# -- app ----------------------------------------------------------------------


async def _resources(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.arrived = asyncio.Condition()
    state.http = aiohttp.ClientSession()
    yield
    await state.http.close()


def create_app(config: SimulatorConfig) -> web.Application:
    # Uploads up to Easemob's attachment limit (aiohttp's default body cap is 1 MiB).
    app = web.Application(client_max_size=MAX_UPLOAD_BYTES + _FILE_CHUNK)
    app[STATE] = SimulatorState(config, Behaviour.from_config(config))
    app.cleanup_ctx.append(_resources)
    app.router.add_post("/{org}/{app}/token", _counted("token", token))
    app.router.add_post(
        "/{org}/{app}/messages/{kind:users|chatgroups|chatrooms}", _counted("messages", send)
    )
    app.router.add_post(
        "/{org}/{app}/stream_message/{target:user|chatgroup}",
        _counted("stream", stream_message),
    )
    app.router.add_post("/{org}/{app}/chatfiles", _counted("chatfiles", upload_file))
    app.router.add_get("/{org}/{app}/chatfiles/{uuid}", _counted("chatfiles", download_file))
    app.router.add_get("/_sim/messages", list_messages)
    app.router.add_get("/_sim/wait", wait_messages)
    app.router.add_get("/_sim/screen", client_screen)
    app.router.add_get("/_sim/stats", stats)
    app.router.add_post("/_sim/inject", inject)
    app.router.add_post("/_sim/reset", reset)
    app.router.add_post("/_sim/callback", fire_callback)
    return app


async def serve(config: SimulatorConfig) -> web.AppRunner:
    """Start the simulator on ``config.host:config.port`` (0: a free port, written back).

    Stop it with ``await runner.cleanup()``.
    """
    runner = web.AppRunner(create_app(config), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    if not config.port:
        config.port = int(runner.addresses[0][1])
    return runner
