"""OpenAI chat completions, and every server that speaks it (vLLM, Qianfan v2,
DashScope compatible mode, Ollama /v1): the translation is tolerant of their
variations (vLLM's flat error shape and integer codes, Qianfan's ``flag``,
DashScope's ``data_inspection_failed``).
"""

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
from imbot.adapters.rate_limit_headers import openai_reset_s
from imbot.adapters.sse import SseEvent
from imbot.core.catalog import OpenAIConfig
from imbot.core.envelope import FinishReason
from imbot.core.errors import (
    ConfigurationError,
    ContentRejected,
    FatalError,
    ImbotError,
    RejectionStage,
    RetryableError,
)

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content_filter",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}
# Codes that name an operator problem whatever the status (Qianfan v2 answers an
# unknown model with 400 invalid_model; OpenAI's model_not_found comes with 404).
_CONFIG_CODES = frozenset(
    {"invalid_model", "model_not_found", "no_parameter_permission", "access_denied"}
)


def message_of(message: ChatMessage, *, detail: str = "auto") -> dict[str, Any]:
    """One message; with images, ``content`` becomes a list of text and image_url parts
    (the image inline as a data URL: the Easemob URL needs our token)."""
    if not message.images:
        return {"role": message.role, "content": message.content}
    parts: list[dict[str, Any]] = []
    if message.content:
        parts.append({"type": "text", "text": message.content})
    for image in message.images:
        image_url: dict[str, str] = {"url": image.data_url()}
        if detail != "auto":  # auto is the default; compatible servers need not know it
            image_url["detail"] = detail
        parts.append({"type": "image_url", "image_url": image_url})
    return {"role": message.role, "content": parts}


def build_body(
    config: OpenAIConfig, model: str, request: ChatRequest, *, stream: bool
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [message_of(m, detail=config.image_detail) for m in request.messages],
    }
    if request.max_output_tokens is not None:
        body[config.max_tokens_field] = request.max_output_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.user_id and config.user_field:
        body[config.user_field] = request.user_id
    if stream:
        body["stream"] = True
        if config.stream_usage:
            body["stream_options"] = {"include_usage": True}
    return body


def map_finish(raw: str | None) -> FinishReason:
    if raw is None:
        return "stop"
    return _FINISH.get(raw, "error")


def parse_usage(data: object) -> Usage | None:
    if not isinstance(data, dict):
        return None
    return Usage(
        input_tokens=as_int(data.get("prompt_tokens")),
        output_tokens=as_int(data.get("completion_tokens")),
    )


def apply_flag(choice: Mapping[str, Any], safety: dict[str, object]) -> None:
    """Qianfan v2 safety flags on a choice: 1 low risk; ≥2 content_filter."""
    flag = choice.get("flag")
    if isinstance(flag, int) and flag:
        safety["flag"] = max(flag, as_int(safety.get("flag", 0)))
        if "ban_round" in choice:
            safety["ban_round"] = choice["ban_round"]


def flagged_finish(finish: FinishReason, safety: Mapping[str, object]) -> FinishReason:
    return "content_filter" if as_int(safety.get("flag", 0)) >= 2 else finish


def reject_undeliverable(safety: Mapping[str, object], request_id: str | None) -> None:
    """Qianfan flag 3 (must not be shown) and 4 (retract): the text is never delivered."""
    if as_int(safety.get("flag", 0)) >= 3:
        raise ContentRejected(
            "provider flagged the reply as not deliverable",
            stage="output",
            clear_history=True,
            code=f"flag_{safety['flag']}",
            request_id=request_id,
        )


def parse_completion(headers: Mapping[str, str], body: bytes) -> Parsed:
    data = loads_object(body)
    if data is None:
        raise RetryableError("malformed completion body", code="malformed_body", raw=_raw(body))
    if "error" in data or data.get("object") == "error":
        raise map_error_body(200, headers, data, body)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RetryableError("completion without choices", code="malformed_body", raw=_raw(body))
    choice = choices[0]
    message = choice.get("message") or {}
    text = message.get("content") or message.get("refusal") or ""
    raw_finish = as_str(choice.get("finish_reason"))
    finish = map_finish(raw_finish)
    safety: dict[str, object] = {}
    if message.get("refusal"):
        finish = "content_filter"
        safety["refusal"] = True
    apply_flag(choice, safety)
    request_id = headers.get("x-request-id") or as_str(data.get("id"))
    reject_undeliverable(safety, request_id)
    return Parsed(
        text=text if isinstance(text, str) else str(text),
        finish_reason=flagged_finish(finish, safety),
        raw_finish_reason=raw_finish,
        usage=parse_usage(data.get("usage")),
        model=as_str(data.get("model")),
        request_id=request_id,
        safety=safety,
    )


def map_error_body(
    status: int, headers: Mapping[str, str], data: Mapping[str, Any] | None, body: bytes
) -> ImbotError:
    """One place that classifies every OpenAI-style error (nested or vLLM's flat shape)."""
    error: Mapping[str, Any] = {}
    if data is not None:
        nested = data.get("error")
        if isinstance(nested, dict):
            error = nested
        elif isinstance(nested, str):
            error = {"message": nested}
        elif data.get("object") == "error":
            error = data
    message = as_str(error.get("message")) or f"HTTP {status}"
    code = as_str(error.get("code"))
    etype = as_str(error.get("type"))
    request_id = (
        headers.get("x-request-id")
        or (as_str(data.get("request_id")) if data else None)
        or as_str(error.get("request_id"))
        or (as_str(data.get("id")) if data else None)
    )
    label = code or etype
    kw: dict[str, Any] = {"code": label, "request_id": request_id, "raw": _raw(body)}
    lowered = f"{code} {etype} {message}".lower()
    if "data_inspection_failed" in lowered or "datainspectionfailed" in lowered:
        stage: RejectionStage = "output" if "output" in message.lower() else "input"
        return ContentRejected(message, stage=stage, clear_history=True, status=status, **kw)
    if code == "insufficient_quota" or etype == "insufficient_quota":
        return FatalError(message, reason="quota_exhausted", status=status, **kw)
    if code in _CONFIG_CODES or etype in _CONFIG_CODES:
        return ConfigurationError(message, status=status, **kw)
    if status == 200:  # an error frame inside a stream / 200 body
        return RetryableError(message, status=status, **kw)
    classified = classify_status(status, message, headers=headers, **kw)
    if isinstance(classified, RetryableError) and classified.retry_after is None and status == 429:
        # No Retry-After: the rate-limit headers say when the bucket refills.
        classified.retry_after = openai_reset_s(headers)
    return refine_fatal(classified)


def map_error(status: int, headers: Mapping[str, str], body: bytes) -> ImbotError:
    return map_error_body(status, headers, loads_object(body), body)


class OpenAIStreamDecoder(StreamDecoder):
    """``data: {json}`` frames ended by ``data: [DONE]``; usage on a last chunk with no choices."""

    def __init__(self) -> None:
        super().__init__()
        self._finish: str | None = None

    def handle(self, event: SseEvent) -> Iterable[StreamEvent]:
        data = event.data
        if data == "[DONE]":
            return (self._done(),)
        chunk = loads_object(data)
        if chunk is None:
            raise RetryableError("malformed stream frame", code="malformed_body", raw=data[:500])
        return self.chunk_events(chunk)

    def chunk_events(self, chunk: Mapping[str, Any]) -> list[StreamEvent]:
        if "error" in chunk:
            raise map_error_body(200, {}, chunk, b"")
        if self.request_id is None:
            self.request_id = as_str(chunk.get("id"))
            self.model = as_str(chunk.get("model"))
        events: list[StreamEvent] = []
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            choice = choices[0]
            delta = choice.get("delta")
            if isinstance(delta, dict):
                content = delta.get("content")
                if content:
                    events.append(Delta(content))
                refusal = delta.get("refusal")
                if refusal:
                    # Streamed like content; the reply is the model's refusal.
                    self.safety["refusal"] = True
                    events.append(Delta(str(refusal)))
            finish = choice.get("finish_reason")
            if finish:
                self._finish = as_str(finish)
            apply_flag(choice, self.safety)
        usage = parse_usage(chunk.get("usage"))
        if usage is not None:
            events.append(UsageEvent(usage))
        return events

    def _done(self) -> Done:
        reject_undeliverable(self.safety, self.request_id)
        finish = flagged_finish(map_finish(self._finish), self.safety)
        if self.safety.get("refusal"):
            finish = "content_filter"
        return Done(finish, self._finish)


class OpenAIChatModel(HttpChatModel):
    provider = "openai"
    path = "/chat/completions"
    request_id_headers = ("x-request-id",)
    config: OpenAIConfig

    def build_body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        return build_body(self.config, self.model, request, stream=stream)

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> Parsed:
        return parse_completion(headers, body)

    def map_error(self, status: int, headers: Mapping[str, str], body: bytes) -> ImbotError:
        return map_error(status, headers, body)

    def decoder(self, headers: Mapping[str, str]) -> StreamDecoder:
        return OpenAIStreamDecoder()


def _raw(body: bytes) -> str:
    return body[:500].decode("utf-8", "replace")
