"""Fake model providers: real aiohttp servers on 127.0.0.1 (random port) that
replay the documented wire formats (../shared/reference/llm-providers.md).

Each fake answers from a script (``push(Reply(...))``) and otherwise with the
provider's normal success, streamed when the request asks for a stream. Every
request is recorded (``fake.requests``) so tests can check what was sent.
``fake.success(stream=…)`` returns that normal answer as a Reply to alter: delay it,
reset the connection (a real TCP RST) after some frames, or stall between frames.
FakeErnie also scripts its token endpoint (``push_token``).

The vision fakes (OpenAI, Anthropic, DashScope's multimodal endpoint, Ollama) check every
image part as their provider does before anything else (inline base64 that decodes, a media
type they take; a URL instead of inline data is refused, since an Easemob URL must never
reach a provider) and keep what they decoded in ``fake.images`` as (media type, bytes).

    async with FakeOpenAI() as fake:
        fake.push(openai_error(429, "Rate limit reached", "requests", "rate_limit_exceeded",
                               headers={"retry-after": "0.1"}))
        ... base_url=fake.base_url ...

Run one as a process (used by the benchmark): ``python -m tests.fakes.providers openai 8000``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import secrets
import socket
import struct
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import orjson
from aiohttp import web

REPLY_TEXT = "你好！有什么可以帮你？"
REPLY_PARTS = ("你好！", "有什么可以帮你？")


@dataclass
class Reply:
    """One scripted answer. ``body`` is sent whole; ``frames`` are written one by one
    (a stream).

    ``delay_s`` waits before the status line (a slow provider). ``drop_after`` resets
    the TCP connection (RST, not a clean close) after that many frames, or, with
    ``body``, half-way through it. ``stall_after`` pauses ``stall_s`` after that many
    frames (a stream that goes quiet between chunks); ``stall_after=0`` stalls after
    the headers, before the first frame."""

    status: int = 200
    body: bytes | None = None
    frames: Sequence[bytes] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    content_type: str = "application/json"
    delay_s: float = 0.0
    frame_delay_s: float = 0.0
    drop_after: int | None = None
    stall_after: int | None = None
    stall_s: float = 0.0

    def first_frame_with(self, text: str) -> int:
        """Index of the first frame carrying ``text`` (to drop or stall right after it)."""
        assert self.frames is not None
        needle = text.encode()
        return next(i for i, frame in enumerate(self.frames) if needle in frame)


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any


def dumps(obj: object) -> bytes:
    return orjson.dumps(obj)


def json_reply(obj: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(status=status, body=dumps(obj), headers=dict(headers or {}))


def plain_error(
    status: int,
    body: bytes = b"<html><body>502 Bad Gateway</body></html>",
    *,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """What a gateway or load balancer in front of the provider answers: no JSON at all."""
    return Reply(status=status, body=body, content_type="text/html", headers=dict(headers or {}))


MALFORMED_BODY = b"<html><body>upstream sent an invalid response</body></html>"


# The image formats every vision provider takes (Anthropic's documented list).
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_DATA_URL = re.compile(r"data:(?P<type>[\w/+.-]+);base64,(?P<data>.*)", re.DOTALL)


class BadImage(ValueError):
    """An image part the provider would refuse (the message is the fake's 400 text)."""


def decode_base64(data: object) -> bytes:
    if not isinstance(data, str) or not data:
        raise BadImage("image data must be a non-empty base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage("image data is not valid base64") from None


def decode_data_url(url: object) -> tuple[str, bytes]:
    """(media type, bytes) of a ``data:<mime>;base64,…`` URL, or BadImage."""
    match = _DATA_URL.fullmatch(url) if isinstance(url, str) else None
    if match is None:
        raise BadImage("only inline data:image/…;base64 URLs are accepted by this fake")
    if match["type"] not in IMAGE_TYPES:
        raise BadImage(f"unsupported image media type {match['type']!r}")
    return match["type"], decode_base64(match["data"])


def _messages(rec: Recorded, *path: str) -> list[dict[str, Any]]:
    node: Any = rec.json if isinstance(rec.json, dict) else {}
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return [m for m in node if isinstance(m, dict)] if isinstance(node, list) else []


def sse(frames: Sequence[object], *, space: bool = True, done: bool = True) -> list[bytes]:
    """OpenAI-style ``data: {json}`` frames, optionally ended by ``data: [DONE]``."""
    prefix = b"data: " if space else b"data:"
    out = [prefix + (f if isinstance(f, bytes) else dumps(f)) + b"\n\n" for f in frames]
    if done:
        out.append(prefix + b"[DONE]\n\n")
    return out


class FakeProvider:
    """Base of every fake: an aiohttp app with one catch-all POST handler."""

    routes: Sequence[str] = ()

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.requests: list[Recorded] = []
        self.images: list[tuple[str, bytes]] = []  # every image a request carried, decoded
        self.script: deque[Reply] = deque()
        self.reply_text = REPLY_TEXT
        self.reply_parts: Sequence[str] = REPLY_PARTS
        self._runner: web.AppRunner | None = None
        self.in_flight = 0
        self.max_in_flight = 0

    # -- lifecycle ----------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        for route in self.routes:
            app.router.add_post(route, self._handle)
        return app

    async def start(self) -> Self:
        self._runner = web.AppRunner(self.app(), handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def root(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root

    def push(self, *replies: Reply) -> None:
        """The next requests get these answers, in order; then the default again."""
        self.script.extend(replies)

    # -- handling -----------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        recorded = Recorded(
            request.method,
            request.path,
            dict(request.query),
            {k.lower(): v for k, v in request.headers.items()},
            body,
        )
        self.requests.append(recorded)
        try:
            self.images.extend(self.read_images(recorded))
        except BadImage as exc:
            return await self.send(request, self.bad_image(str(exc)))
        reply = self.script.popleft() if self.script else self.default(recorded, request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.send(request, reply)
        finally:
            self.in_flight -= 1

    def default(self, rec: Recorded, request: web.Request) -> Reply:
        raise NotImplementedError

    def read_images(self, rec: Recorded) -> list[tuple[str, bytes]]:
        """The request's images in this provider's format, decoded; BadImage when one is
        malformed. A provider without image input sees none (the default)."""
        return []

    def bad_image(self, message: str) -> Reply:
        """The provider's 400 for a malformed image part."""
        return json_reply({"error": message}, 400)

    def success(self, *, stream: bool) -> Reply:
        """The provider's normal answer, as a Reply a test can alter (drop, stall, delay)."""
        raise NotImplementedError

    async def send(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.frames is None:
            body = reply.body or b""
            if reply.drop_after is None:
                return web.Response(
                    status=reply.status,
                    body=body,
                    headers={"Content-Type": reply.content_type, **reply.headers},
                )
            response = web.StreamResponse(
                status=reply.status, headers={"Content-Type": reply.content_type, **reply.headers}
            )
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            _drop(request)
            return response
        response = web.StreamResponse(
            status=reply.status, headers={"Content-Type": reply.content_type, **reply.headers}
        )
        await response.prepare(request)
        for i, frame in enumerate(reply.frames):
            if reply.drop_after is not None and i >= reply.drop_after:
                _drop(request)
                return response
            if reply.stall_after is not None and i == reply.stall_after:
                await asyncio.sleep(reply.stall_s)
            elif reply.frame_delay_s and i:
                await asyncio.sleep(reply.frame_delay_s)
            await response.write(frame)
        await response.write_eof()
        return response


def _drop(request: web.Request) -> None:
    """Reset the connection: SO_LINGER 0 makes close() send RST, so the client sees
    ECONNRESET mid-body, as when a provider's proxy dies, rather than a clean EOF."""
    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def _wants_stream(rec: Recorded) -> bool:
    return isinstance(rec.json, dict) and bool(rec.json.get("stream"))


# -- OpenAI (and compatible servers) ------------------------------------------


def openai_error(
    status: int,
    message: str,
    type_: str | None = None,
    code: str | int | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, object] | None = None,
) -> Reply:
    body: dict[str, object] = {
        "error": {"message": message, "type": type_, "param": None, "code": code}
    }
    body.update(extra or {})
    return json_reply(body, status, headers)


class FakeOpenAI(FakeProvider):
    """``POST /v1/chat/completions``; base_url for clients is ``…/v1``."""

    routes = ("/v1/chat/completions",)

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.finish_reason = "stop"
        self.usage = {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30}

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    def completion_body(self, model: str) -> bytes:
        return dumps(
            {
                "id": "chatcmpl-AbC123",
                "object": "chat.completion",
                "created": 1764000000,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": self.reply_text,
                            "refusal": None,
                        },
                        "logprobs": None,
                        "finish_reason": self.finish_reason,
                    }
                ],
                "usage": {**self.usage, "prompt_tokens_details": {"cached_tokens": 0}},
                "system_fingerprint": "fp_0123abcd",
            }
        )

    def stream_frames(self, model: str, *, include_usage: bool) -> list[bytes]:
        def chunk(delta: dict[str, object], finish: str | None) -> dict[str, object]:
            return {
                "id": "chatcmpl-AbC123",
                "object": "chat.completion.chunk",
                "created": 1764000000,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                "usage": None,
            }

        frames: list[object] = [chunk({"role": "assistant", "content": ""}, None)]
        frames += [chunk({"content": part}, None) for part in self.reply_parts]
        frames.append(chunk({}, self.finish_reason))
        if include_usage:
            frames.append(
                {
                    "id": "chatcmpl-AbC123",
                    "object": "chat.completion.chunk",
                    "created": 1764000000,
                    "model": model,
                    "choices": [],
                    "usage": self.usage,
                }
            )
        return sse(frames)

    def success(
        self, *, stream: bool, model: str = "gpt-4o-mini", include_usage: bool = True
    ) -> Reply:
        headers = {"x-request-id": f"req_{secrets.token_hex(6)}"}
        if stream:
            return Reply(
                frames=self.stream_frames(model, include_usage=include_usage),
                content_type="text/event-stream",
                headers=headers,
            )
        return Reply(body=self.completion_body(model), headers=headers)

    def default(self, rec: Recorded, request: web.Request) -> Reply:
        body = rec.json if isinstance(rec.json, dict) else {}
        model = str(body.get("model", "gpt-4o-mini"))
        include = bool((body.get("stream_options") or {}).get("include_usage"))
        return self.success(stream=_wants_stream(rec), model=model, include_usage=include)

    def read_images(self, rec: Recorded) -> list[tuple[str, bytes]]:
        """``content`` as a list of ``text`` and ``image_url`` parts (reference §15)."""
        found: list[tuple[str, bytes]] = []
        for message in _messages(rec, "messages"):
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    continue
                if kind != "image_url" or not isinstance(part.get("image_url"), dict):
                    raise BadImage(f"invalid content part {kind!r}")
                if part["image_url"].get("detail", "auto") not in ("auto", "low", "high"):
                    raise BadImage("image_url.detail must be auto, low or high")
                found.append(decode_data_url(part["image_url"].get("url")))
        return found

    def bad_image(self, message: str) -> Reply:
        return openai_error(400, message, "invalid_request_error", "invalid_image_format")


# -- Anthropic ------------------------------------------------------------------


def anthropic_error(
    status: int, type_: str, message: str, *, headers: Mapping[str, str] | None = None
) -> Reply:
    return json_reply(
        {"type": "error", "error": {"type": type_, "message": message}, "request_id": "req_018E"},
        status,
        {"request-id": "req_018E", **(headers or {})},
    )


def anthropic_frames(events: Sequence[tuple[str, object]]) -> list[bytes]:
    return [
        f"event: {name}\n".encode() + b"data: " + dumps(data) + b"\n\n" for name, data in events
    ]


class FakeAnthropic(FakeProvider):
    routes = ("/v1/messages",)

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.stop_reason = "end_turn"

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    def stream_events(self, model: str) -> list[tuple[str, object]]:
        events: list[tuple[str, object]] = [
            (
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": "msg_01XyZ",
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {"input_tokens": 18, "output_tokens": 1},
                    },
                },
            ),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            ("ping", {"type": "ping"}),
        ]
        for part in self.reply_parts:
            events.append(
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": part},
                    },
                )
            )
        events += [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": self.stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": 12},
                },
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
        return events

    REQUEST_ID = "req_018EeWyXxfu5pfWkrYcMdjWG"

    def read_images(self, rec: Recorded) -> list[tuple[str, bytes]]:
        """Content blocks ``image`` (``source.type: base64``) beside ``text`` blocks."""
        found: list[tuple[str, bytes]] = []
        for message in _messages(rec, "messages"):
            content = message.get("content")
            if not isinstance(content, list):
                continue
            for block in content:
                kind = block.get("type") if isinstance(block, dict) else None
                if kind == "text" and isinstance(block.get("text"), str):
                    continue
                source = block.get("source") if kind == "image" else None
                if not isinstance(source, dict) or source.get("type") != "base64":
                    raise BadImage(f"messages: invalid content block {kind!r}")
                media_type = source.get("media_type")
                if media_type not in IMAGE_TYPES:
                    raise BadImage(f"messages: image media_type {media_type!r} not supported")
                found.append((str(media_type), decode_base64(source.get("data"))))
        return found

    def bad_image(self, message: str) -> Reply:
        return anthropic_error(400, "invalid_request_error", message)

    def default(self, rec: Recorded, request: web.Request) -> Reply:
        body = rec.json if isinstance(rec.json, dict) else {}
        return self.success(
            stream=_wants_stream(rec), model=str(body.get("model", "claude-haiku-4-5"))
        )

    def success(self, *, stream: bool, model: str = "claude-haiku-4-5") -> Reply:
        headers = {"request-id": self.REQUEST_ID}
        if stream:
            return Reply(
                frames=anthropic_frames(self.stream_events(model)),
                content_type="text/event-stream",
                headers=headers,
            )
        return json_reply(
            {
                "id": "msg_01XyZ",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": self.reply_text}],
                "stop_reason": self.stop_reason,
                "stop_sequence": None,
                "usage": {
                    "input_tokens": 18,
                    "cache_creation_input_tokens": 2,
                    "cache_read_input_tokens": 3,
                    "output_tokens": 12,
                },
            },
            headers=headers,
        )


# -- Baidu ERNIE v1 ---------------------------------------------------------------


def ernie_error(code: int, message: str) -> Reply:
    """ERNIE v1 reports errors inside an HTTP 200."""
    return json_reply({"error_code": code, "error_msg": message, "id": "as-err0001"})


class FakeErnie(FakeProvider):
    """Token endpoint ``/oauth/2.0/token`` and chat ``/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/{path}``."""

    routes = ("/oauth/2.0/token", "/rpc/2.0/ai_custom/v1/wenxinworkshop/chat/{endpoint}")

    def __init__(self, *, api_key: str = "ak-test", secret_key: str = "sk-test", **kw: Any) -> None:
        super().__init__(**kw)
        self.api_key = api_key
        self.secret_key = secret_key
        self.valid_tokens: set[str] = set()
        self.tokens_issued = 0
        self.token_requests = 0
        # Scripted answers of the token endpoint (then the normal exchange again).
        self.token_script: deque[Reply] = deque()
        self.extra: dict[str, object] = {}

    @property
    def base_url(self) -> str:
        return f"{self.root}/rpc/2.0/ai_custom/v1/wenxinworkshop/chat"

    @property
    def token_url(self) -> str:
        return f"{self.root}/oauth/2.0/token"

    def expire_tokens(self) -> None:
        self.valid_tokens.clear()

    def push_token(self, *replies: Reply) -> None:
        """The next token exchanges get these answers, in order."""
        self.token_script.extend(replies)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/oauth/2.0/token":
            self.token_requests += 1
            if self.token_script:
                return await self.send(request, self.token_script.popleft())
            return self._token(request)
        token = request.query.get("access_token", "")
        if token not in self.valid_tokens and not self.script:
            await request.read()
            self.requests.append(
                Recorded(request.method, request.path, dict(request.query), {}, None)
            )
            return await self.send(request, ernie_error(111, "Access token expired"))
        return await super()._handle(request)

    def _token(self, request: web.Request) -> web.Response:
        q = request.query
        if q.get("client_id") != self.api_key:
            return web.json_response(
                {"error": "invalid_client", "error_description": "unknown client id"}
            )
        if q.get("client_secret") != self.secret_key:
            return web.json_response(
                {"error": "invalid_client", "error_description": "Client authentication failed"}
            )
        self.tokens_issued += 1
        token = f"24.{secrets.token_hex(16)}.2592000.1766592000.282335-{self.tokens_issued}"
        self.valid_tokens.add(token)
        return web.json_response(
            {
                "refresh_token": "25.b1c2-12345",
                "expires_in": 2592000,
                "session_key": "9mzd==",
                "access_token": token,
                "scope": "public brain_all_scope wenxinworkshop_mgr",
                "session_secret": "6a29",
            }
        )

    def frame(self, i: int, text: str, *, end: bool) -> dict[str, object]:
        frame: dict[str, object] = {
            "id": "as-8fq2k1x0ab",
            "object": "chat.completion",
            "created": 1764000000 + i,
            "sentence_id": i,
            "is_end": end,
            "is_truncated": False,
            "result": text,
            "need_clear_history": False,
            "usage": {
                "prompt_tokens": 14,
                "completion_tokens": 86 if end else 0,
                "total_tokens": 100 if end else 14,
            },
        }
        if end:
            frame["finish_reason"] = "normal"
        frame.update(self.extra)
        return frame

    def default(self, rec: Recorded, request: web.Request) -> Reply:
        return self.success(stream=_wants_stream(rec))

    def success(self, *, stream: bool) -> Reply:
        if stream:
            parts = list(self.reply_parts)
            frames = [self.frame(i, p, end=i == len(parts) - 1) for i, p in enumerate(parts)]
            return Reply(frames=sse(frames, done=False), content_type="text/event-stream")
        body: dict[str, object] = {
            "id": "as-8fq2k1x0ab",
            "object": "chat.completion",
            "created": 1764000000,
            "result": self.reply_text,
            "is_truncated": False,
            "need_clear_history": False,
            "finish_reason": "normal",
            "flag": 0,
            "usage": {"prompt_tokens": 14, "completion_tokens": 86, "total_tokens": 100},
        }
        body.update(self.extra)
        return json_reply(body)


# -- DashScope native ---------------------------------------------------------------


def dashscope_error(status: int, code: str, message: str) -> Reply:
    return json_reply(
        {"code": code, "message": message, "request_id": "5b0c2a4e-err"},
        status,
        {"x-request-id": "5b0c2a4e-err"},
    )


def dashscope_frames(
    frames: Sequence[tuple[str, int, object]], *, start_id: int = 1
) -> list[bytes]:
    """DashScope SSE: ``id:N``, ``event:…``, ``:HTTP_STATUS/NNN``, ``data:{json}`` — no spaces."""
    out = []
    for i, (event, status, data) in enumerate(frames, start=start_id):
        out.append(
            f"id:{i}\nevent:{event}\n:HTTP_STATUS/{status}\n".encode()
            + b"data:"
            + dumps(data)
            + b"\n\n"
        )
    return out


class FakeDashScope(FakeProvider):
    """The text endpoint, and the multimodal one (qwen-vl), whose messages and answers carry
    content as a list of ``{"text"}``/``{"image"}`` parts."""

    TEXT_PATH = "/api/v1/services/aigc/text-generation/generation"
    MULTIMODAL_PATH = "/api/v1/services/aigc/multimodal-generation/generation"
    routes = (TEXT_PATH, MULTIMODAL_PATH)
    REQUEST_ID = "5b0c2a4e-8c1d-9f0e-a1b2-3c4d5e6f7a8b"

    @property
    def base_url(self) -> str:
        return f"{self.root}/api/v1"

    def read_images(self, rec: Recorded) -> list[tuple[str, bytes]]:
        found: list[tuple[str, bytes]] = []
        for message in _messages(rec, "input", "messages"):
            content = message.get("content")
            if rec.path == self.TEXT_PATH:
                if not isinstance(content, str):
                    raise BadImage("text-generation takes string content only")
                continue
            if not isinstance(content, list):
                raise BadImage("multimodal-generation takes content as a list of parts")
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    continue
                if not isinstance(part, dict) or "image" not in part:
                    raise BadImage("content parts are {text} or {image}")
                found.append(decode_data_url(part["image"]))
        return found

    def bad_image(self, message: str) -> Reply:
        return dashscope_error(400, "InvalidParameter", message)

    def result_frame(
        self, text: str, finish: str, output_tokens: int, *, multimodal: bool = False
    ) -> dict[str, object]:
        content: object = [{"text": text}] if multimodal else text
        return {
            "output": {
                "choices": [
                    {"message": {"content": content, "role": "assistant"}, "finish_reason": finish}
                ]
            },
            "usage": {
                "total_tokens": 22 + output_tokens,
                "output_tokens": output_tokens,
                "input_tokens": 22,
            },
            "request_id": self.REQUEST_ID,
        }

    def stream_frames(
        self, incremental: bool, *, multimodal: bool = False
    ) -> list[tuple[str, int, object]]:
        frames: list[tuple[str, int, object]] = []
        so_far = ""
        for i, part in enumerate(self.reply_parts):
            so_far += part
            text = part if incremental else so_far
            frames.append(
                ("result", 200, self.result_frame(text, "null", i + 1, multimodal=multimodal))
            )
        last = "" if incremental else so_far
        frames.append(("result", 200, self.result_frame(last, "stop", 9, multimodal=multimodal)))
        return frames

    def default(self, rec: Recorded, request: web.Request) -> Reply:
        params = (rec.json or {}).get("parameters") or {}
        return self.success(
            stream=rec.headers.get("x-dashscope-sse") == "enable",
            incremental=bool(params.get("incremental_output")),
            multimodal=rec.path == self.MULTIMODAL_PATH,
        )

    def success(self, *, stream: bool, incremental: bool = True, multimodal: bool = False) -> Reply:
        if stream:
            return Reply(
                frames=dashscope_frames(self.stream_frames(incremental, multimodal=multimodal)),
                content_type="text/event-stream;charset=UTF-8",
                headers={"x-request-id": self.REQUEST_ID},
            )
        return json_reply(
            self.result_frame(self.reply_text, "stop", 9, multimodal=multimodal),
            headers={"x-request-id": self.REQUEST_ID},
        )


# -- iFlytek Spark HTTP ---------------------------------------------------------------


def spark_error(
    code: int, message: str, *, status: int = 200, nested: bool = False, sid: str = "cha000e1"
) -> Reply:
    """Spark's native ``{"code": N, …}`` body, or (``nested``) the OpenAI-like envelope
    with the code as a string and the sid inside the message."""
    if nested:
        body: dict[str, object] = {
            "error": {
                "message": f"{message} (sid: {sid})",
                "type": "api_error",
                "param": None,
                "code": str(code),
            }
        }
    else:
        body = {"code": code, "message": message, "sid": sid}
    return json_reply(body, status)


class FakeSpark(FakeProvider):
    routes = ("/v1/chat/completions",)
    SID = "cha000b5678@dx19a0b1c2d3e4f5a6c8"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.data_space = True  # real captures exist with and without the space

    @property
    def base_url(self) -> str:
        return f"{self.root}/v1"

    def default(self, rec: Recorded, request: web.Request) -> Reply:
        return self.success(stream=_wants_stream(rec))

    def success(self, *, stream: bool) -> Reply:
        if stream:
            frames: list[object] = []
            for i, part in enumerate(self.reply_parts):
                chunk: dict[str, object] = {
                    "code": 0,
                    "message": "Success",
                    "sid": self.SID,
                    "id": self.SID,
                    "created": 1764000000,
                    "choices": [{"delta": {"role": "assistant", "content": part}, "index": 0}],
                }
                if i == len(self.reply_parts) - 1:
                    chunk["usage"] = {
                        "prompt_tokens": 6,
                        "completion_tokens": 12,
                        "total_tokens": 18,
                    }
                frames.append(chunk)
            return Reply(
                frames=sse(frames, space=self.data_space), content_type="text/event-stream"
            )
        return json_reply(
            {
                "code": 0,
                "message": "Success",
                "sid": "cha000b1234@dx19a0b1c2d3e4f5a6b7",
                "choices": [
                    {"message": {"role": "assistant", "content": self.reply_text}, "index": 0}
                ],
                "usage": {"prompt_tokens": 6, "completion_tokens": 42, "total_tokens": 48},
            }
        )


# -- Ollama native ------------------------------------------------------------------


def ollama_error(status: int, message: str) -> Reply:
    return json_reply({"error": message}, status)


class FakeOllama(FakeProvider):
    routes = ("/api/chat",)

    def read_images(self, rec: Recorded) -> list[tuple[str, bytes]]:
        """``images``: bare base64 strings beside a message's text (no media type)."""
        found: list[tuple[str, bytes]] = []
        for message in _messages(rec, "messages"):
            images = message.get("images")
            if images is None:
                continue
            if not isinstance(images, list):
                raise BadImage("images must be a list of base64 strings")
            found.extend(("", decode_base64(image)) for image in images)
        return found

    def bad_image(self, message: str) -> Reply:
        return ollama_error(400, message)

    def final(self, model: str, text: str) -> dict[str, object]:
        return {
            "model": model,
            "created_at": "2026-11-24T08:00:00.14Z",
            "message": {"role": "assistant", "content": text},
            "done": True,
            "done_reason": "stop",
            "total_duration": 1834560334,
            "load_duration": 101397084,
            "prompt_eval_count": 24,
            "prompt_eval_duration": 13074791,
            "eval_count": 11,
            "eval_duration": 52479709,
        }

    def default(self, rec: Recorded, request: web.Request) -> Reply:
        body = rec.json if isinstance(rec.json, dict) else {}
        model = str(body.get("model", "qwen2.5:7b"))
        # Ollama streams unless told not to.
        return self.success(stream=bool(body.get("stream", True)), model=model)

    def success(self, *, stream: bool, model: str = "qwen2.5:7b") -> Reply:
        if stream:
            lines = [
                dumps(
                    {
                        "model": model,
                        "created_at": "2026-11-24T08:00:00.10Z",
                        "message": {"role": "assistant", "content": part},
                        "done": False,
                    }
                )
                + b"\n"
                for part in self.reply_parts
            ]
            lines.append(dumps(self.final(model, "")) + b"\n")
            return Reply(frames=lines, content_type="application/x-ndjson")
        return json_reply(self.final(model, self.reply_text))


FAKES: dict[str, type[FakeProvider]] = {
    "openai": FakeOpenAI,
    "anthropic": FakeAnthropic,
    "ernie": FakeErnie,
    "dashscope": FakeDashScope,
    "spark": FakeSpark,
    "ollama": FakeOllama,
}


async def serve(provider: str, port: int) -> None:
    fake = FAKES[provider](port=port)
    await fake.start()
    print(f"{provider} fake listening on {fake.base_url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await fake.close()


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    provider = args[0] if args else "openai"
    port = int(args[1]) if len(args) > 1 else 0
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(provider, port))


if __name__ == "__main__":
    main()
