"""Baidu ERNIE v1 (wenxinworkshop): OAuth access token in the query string,
errors reported inside HTTP 200 bodies, streams that end on ``is_end``.

The access token is exchanged once per (API key, secret key), cached until
shortly before it expires, and renewed when a call says 110/111 (then the call
is retried once, as Baidu's own SDK does).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import Any, Self
from urllib.parse import urlencode

import httpx
import orjson

from imbot.adapters.base import ChatRequest, Delta, Done, StreamEvent, Usage, UsageEvent
from imbot.adapters.http_model import (
    AuthExpired,
    HttpChatModel,
    Parsed,
    Prepared,
    StreamDecoder,
    secret_from_env,
)
from imbot.adapters.json_fields import as_int, as_str, loads_object
from imbot.adapters.provider_errors import classify_status
from imbot.adapters.sse import SseEvent
from imbot.core.catalog import ErnieConfig, _ModelEntry
from imbot.core.envelope import FinishReason
from imbot.core.errors import (
    ConfigurationError,
    ContentRejected,
    FatalError,
    ImbotError,
    RetryableError,
)

_FINISH: dict[str, FinishReason] = {
    "normal": "stop",
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "function_call": "tool_calls",
}

RETRYABLE_CODES = frozenset({1, 2, 4, 13, 15, 18, 336000, 336100, 336501, 336502})
AUTH_EXPIRED_CODES = frozenset({110, 111})
CONFIG_CODES = frozenset({3, 6, 14, 100, 336004, 336005})
QUOTA_CODES = frozenset({17, 19})
CONTEXT_CODES = frozenset({336103, 336007})


def build_messages(request: ChatRequest) -> list[dict[str, str]]:
    """ERNIE wants an odd number of turns alternating user/assistant, starting and
    ending with user: merge neighbours with the same role, drop a leading assistant."""
    messages: list[dict[str, str]] = []
    for m in request.conversation:
        if not messages and m.role == "assistant":
            continue
        if messages and messages[-1]["role"] == m.role:
            messages[-1]["content"] += "\n\n" + m.content
        else:
            messages.append({"role": m.role, "content": m.content})
    return messages


def build_body(request: ChatRequest, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"messages": build_messages(request)}
    system = request.system_prompt
    if system:
        body["system"] = system
    if request.temperature is not None:
        # ERNIE accepts (0, 1]; 0 is an error.
        body["temperature"] = min(max(request.temperature, 0.01), 1.0)
    if request.max_output_tokens is not None:
        body["max_output_tokens"] = min(max(request.max_output_tokens, 2), 2048)
    if request.user_id:
        body["user_id"] = request.user_id
    if stream:
        body["stream"] = True
    return body


def error_code_of(data: Mapping[str, Any]) -> tuple[int, str] | None:
    """The (code, message) of an error body, in either documented spelling."""
    if "error_code" in data:
        return as_int(data["error_code"]), as_str(data.get("error_msg")) or ""
    if "code" in data and "msg" in data and as_int(data["code"]):
        return as_int(data["code"]), as_str(data.get("msg")) or ""
    return None


def map_error_code(code: int, message: str, request_id: str | None, raw: str) -> ImbotError:
    kw: dict[str, Any] = {"code": str(code), "request_id": request_id, "raw": raw, "status": 200}
    text = message or f"ERNIE error {code}"
    if code in RETRYABLE_CODES:
        return RetryableError(text, **kw)
    if code in AUTH_EXPIRED_CODES or code in CONFIG_CODES:
        return ConfigurationError(text, **kw)
    if code in QUOTA_CODES:
        return FatalError(text, reason="quota_exhausted", **kw)
    if code in CONTEXT_CODES:
        return FatalError(text, reason="context_length", **kw)
    return FatalError(text, reason="bad_request", **kw)


def raise_if_error(data: Mapping[str, Any], raw: str) -> None:
    found = error_code_of(data)
    if found is None:
        return
    code, message = found
    error = map_error_code(code, message, as_str(data.get("id")), raw)
    if code in AUTH_EXPIRED_CODES:
        raise AuthExpired(error)
    raise error


def safety_of(data: Mapping[str, Any]) -> dict[str, object]:
    safety: dict[str, object] = {}
    flag = data.get("flag")
    if isinstance(flag, int) and flag:
        safety["flag"] = flag
    if data.get("is_safe") == 0:
        safety["is_safe"] = 0
    if "ban_round" in data and safety:
        safety["ban_round"] = data["ban_round"]
    return safety


def reject_if_risky(data: Mapping[str, Any]) -> None:
    """need_clear_history: Baidu judged the input risky and asks us to end the conversation.

    Raised as ContentRejected rather than returned as a content_filter result: the
    ``result`` is only Baidu's canned refusal, the turn must not go to another model,
    and ``clear_history`` tells the caller to drop the stored history (otherwise every
    later turn carries the risky one again). ``ban_round`` (-1 = this question) is kept
    in the message for the log."""
    if data.get("need_clear_history"):
        ban_round = data.get("ban_round")
        where = f" (ban_round={ban_round})" if ban_round is not None else ""
        raise ContentRejected(
            f"provider judged the conversation risky: need_clear_history{where}",
            stage="input",
            clear_history=True,
            code="need_clear_history",
            request_id=as_str(data.get("id")),
            raw=orjson.dumps(
                {k: data[k] for k in ("id", "need_clear_history", "ban_round") if k in data}
            ).decode(),
        )


def finish_of(
    data: Mapping[str, Any], safety: Mapping[str, object]
) -> tuple[FinishReason, str | None]:
    raw = as_str(data.get("finish_reason"))
    finish: FinishReason = _FINISH.get(raw, "error") if raw else "stop"
    if data.get("is_truncated") and finish == "stop":
        finish = "length"
    if safety:
        finish = "content_filter"
    return finish, raw


def usage_of(data: Mapping[str, Any]) -> Usage | None:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    return Usage(
        input_tokens=as_int(usage.get("prompt_tokens")),
        output_tokens=as_int(usage.get("completion_tokens")),
    )


def parse_completion(headers: Mapping[str, str], body: bytes) -> Parsed:
    raw = body[:500].decode("utf-8", "replace")
    data = loads_object(body)
    if data is None:
        raise RetryableError("malformed ERNIE body", code="malformed_body", raw=raw)
    raise_if_error(data, raw)
    reject_if_risky(data)
    if "result" not in data:
        raise RetryableError("ERNIE body without result", code="malformed_body", raw=raw)
    safety = safety_of(data)
    finish, raw_finish = finish_of(data, safety)
    return Parsed(
        text=as_str(data.get("result")) or "",
        finish_reason=finish,
        raw_finish_reason=raw_finish,
        usage=usage_of(data),
        request_id=as_str(data.get("id")) or headers.get("x-baidu-request-id"),
        safety=safety,
    )


def parse_token(status: int, body: bytes) -> tuple[str, float]:
    """(access_token, expires_in seconds) from the OAuth answer, or raise."""
    raw = body[:300].decode("utf-8", "replace")
    data = loads_object(body)
    if data is not None and isinstance(data.get("access_token"), str):
        return data["access_token"], float(as_int(data.get("expires_in")) or 2592000)
    if data is not None and "error" in data:
        reason = as_str(data.get("error_description")) or as_str(data.get("error")) or ""
        raise ConfigurationError(
            f"ERNIE access token refused: {reason}", code=as_str(data.get("error")), status=status
        )
    if status >= 500 or status == 429 or data is None:
        raise RetryableError(f"ERNIE token endpoint failed (HTTP {status})", status=status, raw=raw)
    raise ConfigurationError(
        f"ERNIE token endpoint refused (HTTP {status})", status=status, raw=raw
    )


class ErnieStreamDecoder(StreamDecoder):
    def handle(self, event: SseEvent) -> Iterable[StreamEvent]:
        data = loads_object(event.data)
        if data is None:
            raise RetryableError(
                "malformed ERNIE stream frame", code="malformed_body", raw=event.data[:500]
            )
        raise_if_error(data, event.data[:500])
        reject_if_risky(data)
        if self.request_id is None:
            self.request_id = as_str(data.get("id"))
        events: list[StreamEvent] = []
        text = data.get("result")
        if text:
            events.append(Delta(str(text)))
        self.safety.update(safety_of(data))
        if data.get("is_end"):
            usage = usage_of(data)
            if usage is not None:
                events.append(UsageEvent(usage))
            finish, raw = finish_of(data, self.safety)
            events.append(Done(finish, raw))
        return events


class ErnieChatModel(HttpChatModel):
    """The API key is not a header here: AK/SK are exchanged for an access token that
    goes in the query string (``prepare``), so ERNIE keeps a constructor for that state."""

    provider = "ernie"
    auth_header = None
    config: ErnieConfig
    # Renew this long before the token's stated expiry.
    REFRESH_MARGIN_S = 24 * 3600.0

    def __init__(
        self,
        name: str,
        config: ErnieConfig,
        client: httpx.AsyncClient,
        *,
        api_key: str | None,
        secret_key: str,
    ) -> None:
        super().__init__(name, config, client, api_key=api_key, secrets=(secret_key,))
        self._secret_key = secret_key
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock: asyncio.Lock | None = None

    @classmethod
    def from_config(
        cls, name: str, config: _ModelEntry, client: httpx.AsyncClient, env: Mapping[str, str]
    ) -> Self:
        if not isinstance(config, ErnieConfig):
            raise TypeError(f"ERNIE model {name!r} needs an ErnieConfig")
        api_key = secret_from_env(env, config.api_key_env, name, required=True)
        secret_key = secret_from_env(env, config.secret_key_env, name, required=True)
        return cls(name, config, client, api_key=api_key, secret_key=secret_key or "")

    def endpoint(self) -> str:
        return f"/{self.config.endpoint or self.model}"

    async def access_token(self) -> str:
        if self._token is not None and time.monotonic() < self._token_expires:
            return self._token
        if self._token_lock is None:
            self._token_lock = asyncio.Lock()
        async with self._token_lock:  # one exchange even when many calls start together
            if self._token is None or time.monotonic() >= self._token_expires:
                await self._exchange()
        assert self._token is not None
        return self._token

    async def _exchange(self) -> None:
        query = urlencode(
            {
                "grant_type": "client_credentials",
                "client_id": self.api_key or "",
                "client_secret": self._secret_key,
            }
        )
        try:
            response = await self.client.post(
                f"{self.config.token_url}?{query}",
                headers={"content-type": "application/json"},
                timeout=self._timeout,
            )
        except httpx.TransportError as exc:
            raise self._transport_error(exc) from None
        try:
            token, expires_in = parse_token(response.status_code, response.content)
        except ImbotError as exc:
            raise self._tag(exc) from None
        self._token = token
        margin = min(self.REFRESH_MARGIN_S, expires_in / 10)
        self._token_expires = time.monotonic() + expires_in - margin
        self._secrets = (*self._secrets, token)

    async def refresh_auth(self) -> None:
        self._token = None
        await self.access_token()

    def build_body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        return build_body(request, stream=stream)

    async def prepare(self, request: ChatRequest, *, stream: bool) -> Prepared:
        prepared = await super().prepare(request, stream=stream)
        prepared.url = f"{prepared.url}?access_token={await self.access_token()}"
        return prepared

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> Parsed:
        return parse_completion(headers, body)

    def map_error(self, status: int, headers: Mapping[str, str], body: bytes) -> ImbotError:
        data = loads_object(body)
        raw = body[:500].decode("utf-8", "replace")
        if data is not None:
            found = error_code_of(data)
            if found is not None:
                return map_error_code(found[0], found[1], as_str(data.get("id")), raw)
        return classify_status(status, f"HTTP {status}", headers=headers, raw=raw)

    def stream_error_body(self, headers: Mapping[str, str]) -> bool:
        return "application/json" in headers.get("content-type", "")

    def request_id_of(self, headers: Mapping[str, str], body_id: str | None) -> str | None:
        # Baidu's id is the body's ``as-…``; the header is not sent by every endpoint.
        return body_id or headers.get("x-baidu-request-id")

    def decoder(self, headers: Mapping[str, str]) -> StreamDecoder:
        return ErnieStreamDecoder()
