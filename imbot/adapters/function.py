"""A ``ChatModel`` whose replies come from a Python function (pydantic-ai's ``FunctionModel``).

For tests of the catalog and of stage logic without HTTP: the function gets the
``ChatRequest`` and returns the reply text or a ``FunctionReply`` (text, usage, finish
reason), sync or async; raising one of ``core.errors`` is how a test makes the model fail
(``RetryableError`` to be retried, ``FatalError`` to fall back, ``ContentRejected`` to
stop the chain). Streaming replays the answer in small pieces, or asks a stream function
that yields text pieces (and optionally ``Usage``), sync or async, and may fail midway.

Nothing registers it: a test builds the models and ``function_catalog(*models)``, which
wraps them exactly as ``build_catalog`` wraps a provider (metrics, circuit breaker,
concurrency limit), so the catalog's retry, fallback and circuit logic run unchanged.

    flaky = FunctionModel(fail_twice_then("ok"), name="flaky")
    backup = FunctionModel(lambda request: "backup", name="backup")
    catalog = function_catalog(flaky, backup)
    result = await catalog.complete(["flaky", "backup"], request, deadline_s=5)
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from pydantic import Field

from imbot.adapters.base import (
    ChatRequest,
    CompletionResult,
    Delta,
    Done,
    StreamEvent,
    Usage,
    UsageEvent,
    refuse_images,
)
from imbot.adapters.catalog import ModelCatalog, catalog_entry
from imbot.adapters.images import request_image_tokens
from imbot.core.catalog import Price, _ModelEntry
from imbot.core.envelope import FinishReason
from imbot.core.tokens import estimate_tokens

PROVIDER: Final = "function"


class FunctionConfig(_ModelEntry):
    """A function model's catalog settings: retry, circuit, timeouts, vision, price, as for
    any entry. Not part of the policy file's ``ModelConfig`` (tests only)."""

    provider: Literal["function"] = PROVIDER
    price: Price = Price(input=0, output=0, currency="CNY")
    # Small chunks, so a streamed reply has several events.
    stream_chunk_chars: int = Field(default=8, ge=1)


@dataclass(frozen=True, slots=True)
class FunctionReply:
    """A reply with what a provider would report. ``usage=None`` estimates it from the
    text (as the demo model does); pass a ``Usage`` to control tokens and cost exactly."""

    text: str
    usage: Usage | None = None
    finish_reason: FinishReason = "stop"


Answer = str | FunctionReply
AnswerFunction = Callable[[ChatRequest], Answer | Awaitable[Answer]]
StreamPiece = str | Usage
StreamFunction = Callable[[ChatRequest], Iterable[StreamPiece] | AsyncIterable[StreamPiece]]


@dataclass
class FunctionModel:
    """A ``ChatModel`` answering with ``function`` (and streaming with ``stream_function``
    when given, else the function's answer in pieces). ``calls`` keeps every request it
    got, so a test can count attempts and see what was sent."""

    function: AnswerFunction
    stream_function: StreamFunction | None = None
    name: str = PROVIDER
    config: FunctionConfig = field(default_factory=FunctionConfig)
    calls: list[ChatRequest] = field(default_factory=list)

    provider = PROVIDER

    async def complete(self, request: ChatRequest) -> CompletionResult:
        refuse_images(request, model_id=self.name, vision=self.config.vision)
        start = time.perf_counter()
        self.calls.append(request)
        reply = _as_reply(await _resolved(self.function(request)))
        return self._result(request, reply, start, first_token_ms=None)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        refuse_images(request, model_id=self.name, vision=self.config.vision)
        start = time.perf_counter()
        self.calls.append(request)
        parts: list[str] = []
        usage: Usage | None = None
        first_token_ms: float | None = None
        async for piece in self._pieces(request):
            if isinstance(piece, Usage):
                usage = piece
                yield UsageEvent(piece)
                continue
            if first_token_ms is None:
                first_token_ms = (time.perf_counter() - start) * 1000
            parts.append(piece)
            yield Delta(piece)
        reply = FunctionReply("".join(parts), usage)
        result = self._result(request, reply, start, first_token_ms=first_token_ms)
        yield Done(result.finish_reason, result.raw_finish_reason, result)

    async def aclose(self) -> None:
        return None

    async def _pieces(self, request: ChatRequest) -> AsyncIterator[StreamPiece]:
        if self.stream_function is None:
            reply = _as_reply(await _resolved(self.function(request)))
            size = self.config.stream_chunk_chars
            for i in range(0, len(reply.text), size):
                yield reply.text[i : i + size]
            if reply.usage is not None:
                yield reply.usage
            return
        pieces = self.stream_function(request)
        if isinstance(pieces, AsyncIterable):
            async for piece in pieces:
                yield piece
        else:
            for piece in pieces:
                yield piece

    def _result(
        self,
        request: ChatRequest,
        reply: FunctionReply,
        start: float,
        *,
        first_token_ms: float | None,
    ) -> CompletionResult:
        usage = reply.usage or Usage(
            input_tokens=sum(estimate_tokens(m.content) for m in request.messages)
            + request_image_tokens(self.config, request),
            output_tokens=estimate_tokens(reply.text),
        )
        price = self.config.price
        return CompletionResult(
            text=reply.text,
            finish_reason=reply.finish_reason,
            raw_finish_reason=reply.finish_reason,
            usage=usage,
            provider=PROVIDER,
            model=self.name,
            provider_request_id=None,
            latency_ms=(time.perf_counter() - start) * 1000,
            first_token_ms=first_token_ms,
            cost=price.cost(usage.input_tokens, usage.output_tokens),
            currency=price.currency,
            model_id=self.name,
        )


def function_catalog(*models: FunctionModel, seed: int | None = None) -> ModelCatalog:
    """A catalog of function models, keyed by their names, each wrapped as ``build_catalog``
    wraps a provider (its ``config`` gives retry, circuit, timeout and concurrency)."""
    entries = {m.name: catalog_entry(m.name, m.config, m, PROVIDER) for m in models}
    if len(entries) != len(models):
        raise ValueError("function models in one catalog need distinct names")
    return ModelCatalog(entries, seed=seed)


async def _resolved(value: Answer | Awaitable[Answer]) -> Answer:
    return await value if inspect.isawaitable(value) else value


def _as_reply(answer: Answer) -> FunctionReply:
    return FunctionReply(answer) if isinstance(answer, str) else answer
