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
    refuse_images,
)
from imbot.adapters.config import DemoConfig
from imbot.adapters.images import request_image_tokens
from imbot.core.tokens import estimate_tokens

LABEL = "【演示模型 demo】"
SUMMARY_CHARS = 40


def summarize(text: str, limit: int = SUMMARY_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def demo_reply(request: ChatRequest) -> str:
    last = next((m for m in reversed(request.messages) if m.role == "user"), None)
    question = last.content if last is not None else ""
    if last is not None and last.images:
        # Says what arrived (count, formats, size) so a test of the image path sees it.
        kinds = "、".join(sorted({i.media_type.removeprefix("image/") for i in last.images}))
        size_kb = sum(len(i.data) for i in last.images) / 1024
        return (
            f"{LABEL}这是演示模型的自动回复，不是真正的大模型。"
            f"我收到了 {len(last.images)} 张图片（{kinds}，共 {size_kb:.1f} KB），"
            f"但演示模型看不懂图片。你问的是：「{summarize(question)}」。"
            "配置支持图片的真实模型（vision: true）后即可获得真实回答。"
        )
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
            input_tokens=sum(estimate_tokens(m.content) for m in request.messages)
            + request_image_tokens(self.config, request),
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
        refuse_images(request, model_id=self.name, vision=self.config.vision)
        start = time.perf_counter()
        if self._delay:
            await asyncio.sleep(self._delay)
        return self._result(request, demo_reply(request), start, None)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        refuse_images(request, model_id=self.name, vision=self.config.vision)
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
