"""The one small abstraction every provider sits behind.

``ChatRequest`` in, ``CompletionResult`` out (or a stream of ``StreamEvent``).
Providers translate to and from their wire format with pure functions; the
behaviour around a call (retry, fallback, circuit breaking, concurrency limits,
metrics) lives in wrappers and the catalog, never inside a provider.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from imbot.core.envelope import FinishReason, Role


class ChatMessage(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: Role
    content: str


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
