"""The demo model: canned, clearly labelled replies for ``make dev`` and tests.

It is not a language model. Every reply starts with 【演示模型 demo】 so nobody
mistakes it for one, and echoes a short summary of the question.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from imbot.adapters.base import (
    ChatRequest,
    CompletionResult,
    Delta,
    Done,
    StreamEvent,
    Usage,
    UsageEvent,
)
from imbot.adapters.config import DemoConfig
from imbot.core.tokens import estimate_tokens

LABEL = "【演示模型 demo】"
SUMMARY_CHARS = 40


def summarize(text: str, limit: int = SUMMARY_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def demo_reply(request: ChatRequest) -> str:
    question = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
    return (
        f"{LABEL}这是演示模型的自动回复，不是真正的大模型。"
        f"你问的是：「{summarize(question)}」。配置真实模型后即可获得真实回答。"
    )


class DemoChatModel:
    provider = "demo"

    def __init__(self, name: str, config: DemoConfig) -> None:
        self.name = name
        self.config = config
        self.model = config.model or name
        self._delay = config.latency_ms / 1000

    def _result(
        self, request: ChatRequest, text: str, start: float, first: float | None
    ) -> CompletionResult:
        usage = Usage(
            input_tokens=sum(estimate_tokens(m.content) for m in request.messages),
            output_tokens=estimate_tokens(text),
        )
        price = self.config.price
        return CompletionResult(
            text=text,
            finish_reason="stop",
            raw_finish_reason="stop",
            usage=usage,
            provider=self.provider,
            model=self.model,
            provider_request_id=None,
            latency_ms=(time.perf_counter() - start) * 1000,
            first_token_ms=first,
            cost=price.cost(usage.input_tokens, usage.output_tokens),
            currency=price.currency,
            model_id=self.name,
        )

    async def complete(self, request: ChatRequest) -> CompletionResult:
        start = time.perf_counter()
        if self._delay:
            await asyncio.sleep(self._delay)
        return self._result(request, demo_reply(request), start, None)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        start = time.perf_counter()
        text = demo_reply(request)
        pieces = [text[i : i + 8] for i in range(0, len(text), 8)]
        first: float | None = None
        for piece in pieces:
            if self._delay:
                await asyncio.sleep(self._delay / len(pieces))
            if first is None:
                first = (time.perf_counter() - start) * 1000
            yield Delta(piece)
        result = self._result(request, text, start, first)
        assert result.usage is not None
        yield UsageEvent(result.usage)
        yield Done("stop", "stop", result)

    async def aclose(self) -> None:
        return None
