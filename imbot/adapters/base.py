"""The one small abstraction every provider sits behind.

``ChatRequest`` in, ``CompletionResult`` out (or a stream of ``StreamEvent``).
Providers translate to and from their wire format with pure functions; the
behaviour around a call (retry, fallback, circuit breaking, concurrency limits,
metrics) lives in wrappers and the catalog, never inside a provider.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from imbot.core.envelope import FinishReason, Role
from imbot.core.errors import FatalError

# The formats every vision provider we speak accepts (Anthropic's list is the narrowest).
ImageMediaType = Literal["image/jpeg", "image/png", "image/gif", "image/webp"]


class ImagePart(BaseModel):
    """One image of a user message, as bytes: an Easemob file URL needs our app token, so
    it is never handed to a provider; the image travels inline (base64) instead.

    ``width``/``height`` are what the sender reported (Easemob's ``size``), when known; they
    only sharpen the token estimate for the cost reservation."""

    # (URL-safe) base64 in JSON, so a request can be stored without breaking on binary.
    model_config = ConfigDict(frozen=True, ser_json_bytes="base64", val_json_bytes="base64")

    data: bytes = Field(min_length=1)
    media_type: ImageMediaType
    width: int | None = Field(default=None, gt=0)
    height: int | None = Field(default=None, gt=0)

    def base64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")

    def data_url(self) -> str:
        """``data:<mime>;base64,<data>``: the inline form OpenAI and DashScope take."""
        return f"data:{self.media_type};base64,{self.base64()}"

    def __repr__(self) -> str:  # never dump the bytes into a log line or a traceback
        return f"ImagePart({self.media_type}, {len(self.data)} bytes)"


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: Role
    content: str
    # Images go with user turns only; text-only callers never see this field.
    images: tuple[ImagePart, ...] = ()


class ChatRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    messages: tuple[ChatMessage, ...]
    max_output_tokens: int | None = None
    temperature: float | None = None
    # Already hashed by the caller; sent as the provider's end-user id field.
    user_id: str | None = None

    @property
    def system_prompt(self) -> str | None:
        parts = [m.content for m in self.messages if m.role == "system"]
        return "\n\n".join(parts) if parts else None

    @property
    def conversation(self) -> tuple[ChatMessage, ...]:
        """The messages without the system prompt(s)."""
        return tuple(m for m in self.messages if m.role != "system")

    @property
    def images(self) -> tuple[ImagePart, ...]:
        """Every image of the request, in order."""
        return tuple(image for m in self.messages for image in m.images)


class UnsupportedInput(FatalError):
    """The model cannot take this input (an image for a text-only model). Raised before any
    HTTP, so nothing is paid; a fatal bad request, so the catalog falls back to the next
    model of the chain and the circuit breaker does not count it against the model."""

    def __init__(self, message: str, **kw: object) -> None:
        kw.setdefault("code", "unsupported_input")
        super().__init__(message, reason="bad_request", **kw)


def refuse_images(request: ChatRequest, *, model_id: str, vision: bool) -> None:
    """Raise ``UnsupportedInput`` when the request carries images and the model is not
    declared vision-capable (``vision: true`` in its catalog entry)."""
    if not vision and request.images:
        raise UnsupportedInput(f"model {model_id} does not take images (vision is off)")


class Usage(BaseModel):
    model_config = ConfigDict(frozen=True)

    input_tokens: int
    output_tokens: int


class CompletionResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    text: str
    finish_reason: FinishReason
    raw_finish_reason: str | None
    usage: Usage | None
    provider: str
    model: str  # the model the provider says it used (or the configured one)
    provider_request_id: str | None
    latency_ms: float
    first_token_ms: float | None = None
    cost: float | None
    currency: str | None
    attempts: int = 1
    model_id: str  # the catalog key that produced this result
    safety: dict[str, object] = {}


# -- streaming events ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delta:
    """New text to append to the reply."""

    text: str


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """Token usage so far (providers report it cumulatively; keep the last)."""

    usage: Usage


@dataclass(frozen=True, slots=True)
class Done:
    """The end of a stream. ``result`` holds the assembled reply, usage and cost."""

    finish_reason: FinishReason
    raw_finish_reason: str | None = None
    result: CompletionResult | None = field(default=None, compare=False)


StreamEvent = Delta | UsageEvent | Done


@runtime_checkable
class ChatModel(Protocol):
    """One provider + model, ready to call."""

    name: str

    async def complete(self, request: ChatRequest) -> CompletionResult: ...

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]: ...
