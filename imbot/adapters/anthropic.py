"""Anthropic Messages API: system prompt at the top level, required max_tokens,
event-named SSE frames, usage split between message_start and message_delta."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from imbot.adapters.base import (
    ChatMessage,
    ChatRequest,
    Delta,
    Done,
    StreamEvent,
    Usage,
    UsageEvent,
)
from imbot.adapters.http_model import HttpChatModel, Parsed, StreamDecoder
from imbot.adapters.json_fields import as_int, as_str, loads_object
from imbot.adapters.provider_errors import classify_status, refine_fatal
from imbot.adapters.rate_limit_headers import anthropic_reset_s
from imbot.adapters.sse import SseEvent
from imbot.core.catalog import AnthropicConfig
from imbot.core.envelope import FinishReason
from imbot.core.errors import FatalError, ImbotError, RetryableError

_FINISH: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


Content = str | list[dict[str, Any]]


def content_of(message: ChatMessage) -> Content:
    """A plain string, or with images the content blocks: images first, then the text
    (the order Anthropic recommends), each image inline as base64."""
    if not message.images:
        return message.content
    blocks: list[dict[str, Any]] = [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": i.media_type, "data": i.base64()},
        }
        for i in message.images
    ]
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    return blocks


def _blocks(content: Content) -> list[dict[str, Any]]:
    if isinstance(content, list):
        return content
    return [{"type": "text", "text": content}] if content else []


def merge_content(first: Content, second: Content) -> Content:
    """Two neighbouring turns of one role as one (Anthropic wants alternating turns)."""
    if isinstance(first, str) and isinstance(second, str):
        return first + "\n\n" + second
    return _blocks(first) + _blocks(second)


def build_body(
    config: AnthropicConfig, model: str, request: ChatRequest, *, stream: bool
) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    for m in request.conversation:
        if messages and messages[-1]["role"] == m.role:
            messages[-1]["content"] = merge_content(messages[-1]["content"], content_of(m))
        else:
            messages.append({"role": m.role, "content": content_of(m)})
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_output_tokens or config.default_max_tokens,
        "messages": messages,
    }
    system = request.system_prompt
    if system:
        body["system"] = system
    if request.temperature is not None:
        body["temperature"] = min(request.temperature, 1.0)
    if request.user_id:
        body["metadata"] = {"user_id": request.user_id}
    if stream:
        body["stream"] = True
    return body


def map_finish(raw: str | None) -> FinishReason:
    return "stop" if raw is None else _FINISH.get(raw, "error")


def input_tokens(usage: Mapping[str, Any]) -> int:
    return (
        as_int(usage.get("input_tokens"))
        + as_int(usage.get("cache_creation_input_tokens"))
        + as_int(usage.get("cache_read_input_tokens"))
    )


def parse_completion(headers: Mapping[str, str], body: bytes) -> Parsed:
    data = loads_object(body)
    if data is None:
        raise RetryableError("malformed message body", code="malformed_body", raw=_raw(body))
    if data.get("type") == "error":
        raise map_error_body(200, headers, data, body)
    content = data.get("content")
    if not isinstance(content, list):
        raise RetryableError("message without content", code="malformed_body", raw=_raw(body))
    text = "".join(
        b.get("text", "") for b in content if isinstance(b, dict) and b.get("type") == "text"
    )
    raw_finish = as_str(data.get("stop_reason"))
    usage = data.get("usage")
    return Parsed(
        text=text,
        finish_reason=map_finish(raw_finish),
        raw_finish_reason=raw_finish,
        usage=Usage(
            input_tokens=input_tokens(usage), output_tokens=as_int(usage.get("output_tokens"))
        )
        if isinstance(usage, dict)
        else None,
        model=as_str(data.get("model")),
        request_id=headers.get("request-id") or as_str(data.get("id")),
    )


def map_error_body(
    status: int, headers: Mapping[str, str], data: Mapping[str, Any] | None, body: bytes
) -> ImbotError:
    error = data.get("error") if data else None
    if not isinstance(error, dict):
        error = {}
    message = as_str(error.get("message")) or f"HTTP {status}"
    etype = as_str(error.get("type"))
    request_id = headers.get("request-id") or (as_str(data.get("request_id")) if data else None)
    kw: dict[str, Any] = {"code": etype, "request_id": request_id, "raw": _raw(body)}
    lowered = message.lower()
    if etype == "billing_error" or "credit balance" in lowered or "spend limit" in lowered:
        return FatalError(message, reason="billing", status=status, **kw)
    if status == 200:  # an error event inside a stream (overloaded, api_error)
        if etype in ("invalid_request_error", "request_too_large"):
            return refine_fatal(FatalError(message, reason="bad_request", status=status, **kw))
        return RetryableError(message, status=status, **kw)
    error = classify_status(status, message, headers=headers, **kw)
    if isinstance(error, RetryableError) and error.retry_after is None and status == 429:
        error.retry_after = anthropic_reset_s(headers)
    return refine_fatal(error)


class AnthropicStreamDecoder(StreamDecoder):
    def __init__(self) -> None:
        super().__init__()
        self._input = 0
        self._output = 0
        self._finish: str | None = None

    def handle(self, event: SseEvent) -> Iterable[StreamEvent]:
        data = loads_object(event.data)
        if data is None:
            raise RetryableError(
                "malformed stream frame", code="malformed_body", raw=event.data[:500]
            )
        kind = event.event or as_str(data.get("type"))
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                return (Delta(delta["text"]),)
            return ()
        if kind == "message_start":
            message = data.get("message") or {}
            self.request_id = as_str(message.get("id"))
            self.model = as_str(message.get("model"))
            usage = message.get("usage") or {}
            self._input = input_tokens(usage)
            self._output = as_int(usage.get("output_tokens"))
            return ()
        if kind == "message_delta":
            self._finish = as_str((data.get("delta") or {}).get("stop_reason"))
            usage = data.get("usage") or {}
            # Cumulative output; some compatible gateways send input only here.
            self._output = as_int(usage.get("output_tokens")) or self._output
            self._input = input_tokens(usage) or self._input
            return (UsageEvent(Usage(input_tokens=self._input, output_tokens=self._output)),)
        if kind == "message_stop":
            return (Done(map_finish(self._finish), self._finish),)
        if kind == "error":
            raise map_error_body(200, {}, data, event.data.encode())
        return ()  # ping, content_block_start/stop, unknown events


class AnthropicChatModel(HttpChatModel):
    provider = "anthropic"
    path = "/messages"
    auth_header = "x-api-key"
    auth_prefix = ""
    request_id_headers = ("request-id",)
    config: AnthropicConfig

    def fixed_headers(self) -> dict[str, str]:
        return {"anthropic-version": self.config.anthropic_version}

    def build_body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        return build_body(self.config, self.model, request, stream=stream)

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> Parsed:
        return parse_completion(headers, body)

    def map_error(self, status: int, headers: Mapping[str, str], body: bytes) -> ImbotError:
        return map_error_body(status, headers, loads_object(body), body)

    def decoder(self, headers: Mapping[str, str]) -> StreamDecoder:
        return AnthropicStreamDecoder()


def _raw(body: bytes) -> str:
    return body[:500].decode("utf-8", "replace")
