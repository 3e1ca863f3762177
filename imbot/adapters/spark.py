"""iFlytek Spark HTTP API: OpenAI-like frames with Spark's numeric ``code``/``sid``,
no finish reason (``stop`` at ``[DONE]``), usage on the last content chunk, and
errors either as ``{"error": {"code": "11200", …}}`` or ``{"code": 10013, …}``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from imbot.adapters.base import ChatRequest, Delta, Done, StreamEvent, UsageEvent
from imbot.adapters.http_model import HttpChatModel, Parsed, StreamDecoder
from imbot.adapters.json_fields import as_int, as_str, loads_object
from imbot.adapters.openai import map_finish, parse_usage
from imbot.adapters.provider_errors import classify_status
from imbot.adapters.sse import SseEvent
from imbot.core.catalog import SparkConfig
from imbot.core.envelope import FinishReason
from imbot.core.errors import (
    ConfigurationError,
    ContentRejected,
    FatalError,
    ImbotError,
    RetryableError,
)

RETRYABLE = frozenset(
    {
        10000,
        10001,
        10002,
        10006,
        10007,
        10008,
        10009,
        10010,
        10011,
        10012,
        10017,
        10110,
        10222,
        11202,
        11203,
    }
)
FATAL = frozenset({10003, 10004, 10005, 10163})
CONFIG = frozenset({10015})
# "Not authorised" or "volume over limit" under one code (§8.6): the message decides.
AUTH_OR_QUOTA = frozenset({10016, 11200})
_QUOTA_WORDS = (
    "quota",
    "exhaust",
    "insufficient",
    "over limit",
    "exceed",
    "用尽",
    "耗尽",
    "不足",
    "超过",
    "超出",
)
_AUTH_WORDS = ("auth", "licen", "permission", "授权", "未开通", "权限")


def build_body(model: str, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in request.messages],
    }
    if request.max_output_tokens is not None:
        body["max_tokens"] = request.max_output_tokens
    if request.temperature is not None:
        body["temperature"] = min(max(request.temperature, 0.01), 1.0)
    if request.user_id:
        body["user"] = request.user_id
    if stream:
        body["stream"] = True
    return body


def map_code(code: int, message: str, sid: str | None, raw: str, status: int | None) -> ImbotError:
    kw: dict[str, Any] = {"code": str(code), "request_id": sid, "raw": raw, "status": status}
    if code == 10013:
        return ContentRejected(message, stage="input", **kw)
    if code == 10014:
        return ContentRejected(message, stage="output", **kw)
    if code == 10019:
        return ContentRejected(message, stage="input", clear_history=True, **kw)
    if code in RETRYABLE:
        return RetryableError(message, **kw)
    if code == 10907:
        return FatalError(message, reason="context_length", **kw)
    if code == 11201:
        return FatalError(message, reason="quota_exhausted", **kw)
    if code in FATAL:
        return FatalError(message, reason="bad_request", **kw)
    if code in AUTH_OR_QUOTA:
        return quota_or_configuration(message, kw)
    if code in CONFIG:
        return ConfigurationError(message, **kw)
    return FatalError(message, reason="other", **kw)


def quota_or_configuration(message: str, kw: dict[str, Any]) -> ImbotError:
    """10016/11200: tokens or volume used up is quota (alert, wait for the operator);
    a feature or version not enabled, or a message that names both, is configuration."""
    lowered = message.lower()
    quota = any(w in lowered for w in _QUOTA_WORDS)
    auth = any(w in lowered for w in _AUTH_WORDS)
    if quota and not auth:
        return FatalError(message, reason="quota_exhausted", **kw)
    return ConfigurationError(message, **kw)


def error_of(
    status: int, data: Mapping[str, Any] | None, raw: str, headers: Mapping[str, str]
) -> ImbotError | None:
    """The error a body carries (either envelope), or None for a success body."""
    if data is None:
        return None
    nested = data.get("error")
    if isinstance(nested, dict):
        message = as_str(nested.get("message")) or f"HTTP {status}"
        code = as_int(nested.get("code"))
        if code:
            return map_code(code, message, as_str(data.get("sid")), raw, status)
        return (
            classify_status(status, message, headers=headers, raw=raw)
            if status >= 300
            else (RetryableError(message, raw=raw, status=status))
        )
    code = as_int(data.get("code"))
    if code:
        message = as_str(data.get("message")) or f"Spark error {code}"
        return map_code(code, message, as_str(data.get("sid")), raw, status)
    return None


def parse_completion(headers: Mapping[str, str], body: bytes) -> Parsed:
    raw = body[:500].decode("utf-8", "replace")
    data = loads_object(body)
    if data is None:
        raise RetryableError("malformed Spark body", code="malformed_body", raw=raw)
    error = error_of(200, data, raw, headers)
    if error is not None:
        raise error
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RetryableError("Spark body without choices", code="malformed_body", raw=raw)
    message = choices[0].get("message") or {}
    raw_finish = as_str(choices[0].get("finish_reason"))
    finish: FinishReason = map_finish(raw_finish)
    return Parsed(
        text=as_str(message.get("content")) or "",
        finish_reason=finish,
        raw_finish_reason=raw_finish,
        usage=parse_usage(data.get("usage")),
        request_id=as_str(data.get("sid")) or as_str(data.get("id")),
    )


class SparkStreamDecoder(StreamDecoder):
    def __init__(self) -> None:
        super().__init__()
        self._finish: str | None = None

    def handle(self, event: SseEvent) -> Iterable[StreamEvent]:
        if event.data == "[DONE]":
            return (Done(map_finish(self._finish), self._finish),)
        data = loads_object(event.data)
        if data is None:
            raise RetryableError(
                "malformed Spark frame", code="malformed_body", raw=event.data[:500]
            )
        error = error_of(200, data, event.data[:500], {})
        if error is not None:
            raise error
        self.request_id = self.request_id or as_str(data.get("sid"))
        events: list[StreamEvent] = []
        choices = data.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            delta = choices[0].get("delta") or {}
            if delta.get("content"):
                events.append(Delta(str(delta["content"])))
            if choices[0].get("finish_reason"):
                self._finish = as_str(choices[0]["finish_reason"])
        usage = parse_usage(data.get("usage"))
        if usage is not None:
            events.append(UsageEvent(usage))
        return events


class SparkChatModel(HttpChatModel):
    provider = "spark"
    path = "/chat/completions"
    config: SparkConfig

    def build_body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        return build_body(self.model, request, stream=stream)

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> Parsed:
        return parse_completion(headers, body)

    def map_error(self, status: int, headers: Mapping[str, str], body: bytes) -> ImbotError:
        raw = body[:500].decode("utf-8", "replace")
        error = error_of(status, loads_object(body), raw, headers)
        return error or classify_status(status, f"HTTP {status}", headers=headers, raw=raw)

    def decoder(self, headers: Mapping[str, str]) -> StreamDecoder:
        return SparkStreamDecoder()
