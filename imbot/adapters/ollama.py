"""Local models through Ollama's native ``/api/chat``: NDJSON streaming (one JSON
object per line, the last with ``done: true``), usage as ``prompt_eval_count`` /
``eval_count``, errors as ``{"error": "…"}`` (also as a line mid-stream)."""

from __future__ import annotations

import uuid
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
from imbot.adapters.sse import SseEvent
from imbot.core.catalog import OllamaConfig
from imbot.core.envelope import FinishReason
from imbot.core.errors import ConfigurationError, ImbotError, RetryableError


def message_of(message: ChatMessage) -> dict[str, Any]:
    """Ollama takes a message's images as a list of bare base64 strings beside its text."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.images:
        out["images"] = [image.base64() for image in message.images]
    return out


def build_body(
    config: OllamaConfig, model: str, request: ChatRequest, *, stream: bool
) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if request.temperature is not None:
        options["temperature"] = request.temperature
    if request.max_output_tokens is not None:
        options["num_predict"] = request.max_output_tokens
    if config.num_ctx is not None:
        options["num_ctx"] = config.num_ctx
    body: dict[str, Any] = {
        "model": model,
        "messages": [message_of(m) for m in request.messages],
        "stream": stream,  # Ollama streams unless told otherwise
    }
    if options:
        body["options"] = options
    if config.keep_alive is not None:
        body["keep_alive"] = config.keep_alive
    return body


def map_finish(raw: str | None) -> FinishReason:
    return "length" if raw == "length" else "stop"


def usage_of(data: Mapping[str, Any]) -> Usage:
    return Usage(
        input_tokens=as_int(data.get("prompt_eval_count")),
        output_tokens=as_int(data.get("eval_count")),
    )


def map_error_body(status: int, data: Mapping[str, Any] | None, raw: str) -> ImbotError:
    message = (as_str(data.get("error")) if data else None) or f"HTTP {status}"
    if status == 200:
        return RetryableError(message, raw=raw, status=status)
    if status == 404:
        return ConfigurationError(message, raw=raw, status=status, code="model_not_found")
    return refine_fatal(classify_status(status, message, raw=raw))


def parse_completion(body: bytes) -> Parsed:
    raw = body[:500].decode("utf-8", "replace")
    data = loads_object(body)
    if data is None:
        raise RetryableError("malformed Ollama body", code="malformed_body", raw=raw)
    if "error" in data:
        raise map_error_body(200, data, raw)
    message = data.get("message")
    if not isinstance(message, dict):
        raise RetryableError("Ollama body without message", code="malformed_body", raw=raw)
    raw_finish = as_str(data.get("done_reason"))
    return Parsed(
        text=as_str(message.get("content")) or "",
        finish_reason=map_finish(raw_finish),
        raw_finish_reason=raw_finish,
        usage=usage_of(data),
        model=as_str(data.get("model")),
        request_id=f"local-{uuid.uuid4().hex[:16]}",
    )


class OllamaStreamDecoder(StreamDecoder):
    """NDJSON, not SSE: every non-empty line is one JSON object."""

    def __init__(self) -> None:
        super().__init__()
        self.request_id = f"local-{uuid.uuid4().hex[:16]}"
        self._done = False

    def feed(self, line: str) -> Iterable[StreamEvent]:
        if not line.strip():
            return ()
        data = loads_object(line)
        if data is None:
            raise RetryableError("malformed Ollama line", code="malformed_body", raw=line[:500])
        if "error" in data:
            raise map_error_body(200, data, line[:500])
        self.model = self.model or as_str(data.get("model"))
        events: list[StreamEvent] = []
        message = data.get("message")
        if isinstance(message, dict) and message.get("content"):
            events.append(Delta(str(message["content"])))
        if data.get("done"):
            raw_finish = as_str(data.get("done_reason"))
            events.append(UsageEvent(usage_of(data)))
            events.append(Done(map_finish(raw_finish), raw_finish))
        return events

    def handle(self, event: SseEvent) -> Iterable[StreamEvent]:  # pragma: no cover - not SSE
        return ()

    def end(self) -> Iterable[StreamEvent]:
        raise RetryableError("Ollama stream ended before done", code="incomplete_stream")


class OllamaChatModel(HttpChatModel):
    provider = "ollama"
    path = "/api/chat"
    api_key_required = False  # local; a key only for an auth proxy in front
    config: OllamaConfig

    def build_body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        return build_body(self.config, self.model, request, stream=stream)

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> Parsed:
        return parse_completion(body)

    def map_error(self, status: int, headers: Mapping[str, str], body: bytes) -> ImbotError:
        return map_error_body(status, loads_object(body), body[:500].decode("utf-8", "replace"))

    def decoder(self, headers: Mapping[str, str]) -> StreamDecoder:
        return OllamaStreamDecoder()
