"""Alibaba Tongyi via the DashScope native API: nested ``input``/``parameters``,
SSE without spaces plus ``:HTTP_STATUS/NNN`` comments, cumulative usage on every
frame, the string ``"null"`` as an unfinished finish reason, and content
moderation as an error (``DataInspectionFailed``) even mid-stream under HTTP 200.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

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
from imbot.core.catalog import DashScopeConfig
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
    "tool_calls": "tool_calls",
    "content_filter": "content_filter",
}


def multimodal_message(message: ChatMessage) -> dict[str, Any]:
    """The multimodal endpoint's message: content is a list of ``{"image": data URL}`` and
    ``{"text": …}`` parts (images first, as in DashScope's examples), for every role."""
    parts: list[dict[str, str]] = [{"image": image.data_url()} for image in message.images]
    parts.append({"text": message.content})
    return {"role": message.role, "content": parts}


def build_body(
    config: DashScopeConfig, model: str, request: ChatRequest, *, stream: bool
) -> dict[str, Any]:
    # The multimodal endpoint only answers in the message format; it takes no result_format.
    parameters: dict[str, Any] = {} if config.vision else {"result_format": "message"}
    if request.max_output_tokens is not None:
        parameters["max_tokens"] = request.max_output_tokens
    if request.temperature is not None:
        parameters["temperature"] = min(request.temperature, 1.99)
    if stream:
        parameters["incremental_output"] = config.incremental_output
    if config.vision:
        messages = [multimodal_message(m) for m in request.messages]
    else:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
    return {"model": model, "input": {"messages": messages}, "parameters": parameters}


def text_of(content: object) -> str:
    """A message's text: a string (text endpoint) or the ``text`` parts of a list
    (multimodal endpoint)."""
    if isinstance(content, list):
        return "".join(as_str(part.get("text")) or "" for part in content if isinstance(part, dict))
    return as_str(content) or ""


def map_error_body(
    status: int,
    data: Mapping[str, Any] | None,
    raw: str,
    headers: Mapping[str, str],
    *,
    allocation_wait_s: float | None = None,
) -> ImbotError:
    """One place for DashScope's error codes. ``allocation_wait_s`` is the wait to
    suggest for ``Throttling.AllocationQuota`` (a TPM/period quota: it refills in
    the next window, so retrying at the short end of the backoff only burns attempts).
    """
    code = as_str(data.get("code")) if data else None
    message = (as_str(data.get("message")) if data else None) or f"HTTP {status}"
    request_id = (as_str(data.get("request_id")) if data else None) or headers.get("x-request-id")
    kw: dict[str, Any] = {"code": code, "request_id": request_id, "raw": raw, "status": status}
    text = f"{code or ''} {message}"
    if "DataInspectionFailed" in text:
        stage: RejectionStage = "output" if "output" in message.lower() else "input"
        # The offending turn would be rejected again with every later request.
        return ContentRejected(message, stage=stage, clear_history=True, **kw)
    if code == "Arrearage":
        return FatalError(message, reason="billing", **kw)
    if code and code.startswith("Throttling"):
        if "free allocated quota" in message.lower():
            return FatalError(message, reason="quota_exhausted", **kw)
        wait = allocation_wait_s if code == "Throttling.AllocationQuota" else None
        return RetryableError(message, retry_after=wait, **kw)
    if code == "InvalidApiKey":
        return ConfigurationError(message, **kw)
    if code == "invalid_parameter_error" and "stream" in message.lower():
        return ConfigurationError(message, **kw)
    if code and code.startswith("InternalError"):
        return RetryableError(message, **kw)
    if status == 200:
        return RetryableError(message, **kw)
    kw.pop("status")
    return refine_fatal(classify_status(status, message, headers=headers, **kw))


def _choice(data: Mapping[str, Any]) -> tuple[str, str | None]:
    """(text, raw finish reason) from either result format; "null" means not finished."""
    output = data.get("output")
    if not isinstance(output, dict):
        raise RetryableError("DashScope body without output", code="malformed_body")
    choices = output.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message") or {}
        text = text_of(message.get("content"))
        raw = as_str(choices[0].get("finish_reason"))
    else:
        text = as_str(output.get("text")) or ""
        raw = as_str(output.get("finish_reason"))
    if raw in (None, "null", ""):
        raw = None
    return text, raw


def map_finish(raw: str | None) -> FinishReason:
    return "stop" if raw is None else _FINISH.get(raw, "error")


def usage_of(data: Mapping[str, Any]) -> Usage | None:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    return Usage(
        input_tokens=as_int(usage.get("input_tokens")),
        output_tokens=as_int(usage.get("output_tokens")),
    )


def parse_completion(headers: Mapping[str, str], body: bytes) -> Parsed:
    raw = body[:500].decode("utf-8", "replace")
    data = loads_object(body)
    if data is None:
        raise RetryableError("malformed DashScope body", code="malformed_body", raw=raw)
    if "code" in data and data.get("code") and "output" not in data:
        raise map_error_body(200, data, raw, headers)
    text, finish = _choice(data)
    return Parsed(
        text=text,
        finish_reason=map_finish(finish),
        raw_finish_reason=finish,
        usage=usage_of(data),
        request_id=as_str(data.get("request_id")) or headers.get("x-request-id"),
    )


class DashScopeStreamDecoder(StreamDecoder):
    def __init__(self, *, incremental: bool, allocation_wait_s: float | None = None) -> None:
        super().__init__()
        self._incremental = incremental
        self._allocation_wait_s = allocation_wait_s
        self._so_far = ""

    def handle(self, event: SseEvent) -> Iterable[StreamEvent]:
        data = loads_object(event.data)
        if event.event == "error" or (
            data is not None and data.get("code") and "output" not in data
        ):
            status = 200
            for comment in event.comments:
                if comment.startswith("HTTP_STATUS/"):
                    status = as_int(comment.split("/", 1)[1]) or 200
            raise map_error_body(
                status, data, event.data[:500], {}, allocation_wait_s=self._allocation_wait_s
            )
        if data is None:
            raise RetryableError(
                "malformed DashScope frame", code="malformed_body", raw=event.data[:500]
            )
        self.request_id = as_str(data.get("request_id")) or self.request_id
        text, finish = _choice(data)
        events: list[StreamEvent] = []
        if self._incremental:
            piece = text
        elif text.startswith(self._so_far):
            # Whole text so far in every frame: pass on only what is new.
            piece = text[len(self._so_far) :]
        else:
            raise RetryableError(
                "DashScope rewrote earlier text in a non-incremental stream",
                code="non_incremental_rewrite",
            )
        if piece:
            self._so_far += piece
            events.append(Delta(piece))
        usage = usage_of(data)
        if usage is not None:
            events.append(UsageEvent(usage))
        if finish is not None:
            events.append(Done(map_finish(finish), finish))
        return events


class DashScopeChatModel(HttpChatModel):
    provider = "dashscope"
    stream_headers: ClassVar[Mapping[str, str]] = {
        "x-dashscope-sse": "enable",
        "accept": "text/event-stream",
    }
    request_id_headers = ("x-request-id",)
    config: DashScopeConfig

    def endpoint(self) -> str:
        return self.config.multimodal_path if self.config.vision else self.config.path

    def fixed_headers(self) -> dict[str, str]:
        workspace = self.config.workspace
        return {"x-dashscope-workspace": workspace} if workspace else {}

    @property
    def _allocation_wait_s(self) -> float | None:
        """ "Longer backoff" for a period quota: the longest wait this model's retry policy
        allows (a value over max_retry_after_s would skip to the fallback)."""
        return self.config.retry.max_delay_s or None

    def build_body(self, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        return build_body(self.config, self.model, request, stream=stream)

    def parse(self, status: int, headers: Mapping[str, str], body: bytes) -> Parsed:
        return parse_completion(headers, body)

    def map_error(self, status: int, headers: Mapping[str, str], body: bytes) -> ImbotError:
        return map_error_body(
            status,
            loads_object(body),
            body[:500].decode("utf-8", "replace"),
            headers,
            allocation_wait_s=self._allocation_wait_s,
        )

    def stream_error_body(self, headers: Mapping[str, str]) -> bool:
        return "application/json" in headers.get("content-type", "")

    def decoder(self, headers: Mapping[str, str]) -> StreamDecoder:
        return DashScopeStreamDecoder(
            incremental=self.config.incremental_output,
            allocation_wait_s=self._allocation_wait_s,
        )
