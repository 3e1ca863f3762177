"""The demo model: canned, clearly labelled replies for ``make dev`` and tests.

It is not a language model. Every reply starts with 【演示模型 demo】 so nobody
mistakes it for one, and echoes a short summary of the question.

With the realistic-latency knobs of ``DemoConfig`` (``first_token_ms``, ``tokens_per_s``,
``output_tokens``) it answers like a remote model would, for benchmarks and load tests:
the first token after a while, then a steady rate, a reply of a given length (the canned
text padded with labelled filler), and usage that counts those tokens so budgets and cost
see what a real call would cost. The draws come from the request's own text, so the same
request always gets the same answer and the same timing.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

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
from imbot.adapters.images import request_image_tokens
from imbot.core.catalog import DemoConfig
from imbot.core.tokens import estimate_tokens

LABEL = "【演示模型 demo】"
SUMMARY_CHARS = 40
# Pads a reply to ``output_tokens``. Every character is CJK or full-width punctuation, so
# each one is exactly one token to ``estimate_tokens``: the padded reply is as long as drawn.
FILLER = "（演示模型的填充文字，用来模拟较长的回答，不是真正的回答。）"
# Characters per streamed delta.
PIECE_CHARS = 8


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


def pad_reply(text: str, tokens: int) -> str:
    """``text`` followed by filler up to ``tokens`` tokens (never shorter than ``text``)."""
    missing = tokens - estimate_tokens(text)
    if missing <= 0:
        return text
    return text + (FILLER * (missing // len(FILLER) + 1))[:missing]


@dataclass(frozen=True, slots=True)
class Timing:
    """One call of a shaped demo model: when its first token comes, how fast the rest."""

    first_token_s: float
    tokens_per_s: float | None  # None: the whole reply at once after the first token
    text: str
    finish_reason: Literal["stop", "length"]

    @property
    def output_tokens(self) -> int:
        return estimate_tokens(self.text)

    @property
    def total_s(self) -> float:
        generating = self.output_tokens / self.tokens_per_s if self.tokens_per_s else 0.0
        return self.first_token_s + generating


def _uniform(rng: random.Random, bounds: tuple[float, float]) -> float:
    return bounds[0] if bounds[0] == bounds[1] else rng.uniform(*bounds)


def shaped_timing(config: DemoConfig, name: str, request: ChatRequest, text: str) -> Timing:
    """Draw a call's first-token delay, rate and length from the knobs of ``config``.

    Seeded with the model's name and the request's messages: a replay of the same request
    gets the same reply and the same timing, and distinct questions spread over the ranges.
    """
    seed = hashlib.sha256(name.encode())
    for message in request.messages:
        seed.update(f"\x00{message.role}\x00{message.content}".encode())
    rng = random.Random(int.from_bytes(seed.digest()[:8], "big"))
    first = _uniform(rng, config.first_token_ms) / 1000 if config.first_token_ms else 0.0
    rate = _uniform(rng, config.tokens_per_s) if config.tokens_per_s else None
    finish: Literal["stop", "length"] = "stop"
    if config.output_tokens is not None:
        tokens = round(_uniform(rng, config.output_tokens))
        # A real model stops at the request's limit (the budget reserved for that much).
        if request.max_output_tokens is not None and tokens > request.max_output_tokens:
            tokens, finish = request.max_output_tokens, "length"
        text = pad_reply(text, tokens)
    return Timing(first, rate, text, finish)


class DemoChatModel:
    provider = "demo"

    def __init__(self, name: str, config: DemoConfig) -> None:
        self.name = name
        self.config = config
        self.model = config.model or name
        self._delay = config.latency_ms / 1000

    def _result(
        self,
        request: ChatRequest,
        text: str,
        start: float,
        first: float | None,
        finish_reason: Literal["stop", "length"] = "stop",
    ) -> CompletionResult:
        usage = Usage(
            input_tokens=sum(estimate_tokens(m.content) for m in request.messages)
            + request_image_tokens(self.config, request),
            output_tokens=estimate_tokens(text),
        )
        price = self.config.price
        return CompletionResult(
            text=text,
            finish_reason=finish_reason,
            raw_finish_reason=finish_reason,
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
        if self.config.shaped:
            timing = shaped_timing(self.config, self.name, request, demo_reply(request))
            if timing.total_s:
                await asyncio.sleep(timing.total_s)
            return self._result(request, timing.text, start, None, timing.finish_reason)
        if self._delay:
            await asyncio.sleep(self._delay)
        return self._result(request, demo_reply(request), start, None)

    async def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        refuse_images(request, model_id=self.name, vision=self.config.vision)
        if self.config.shaped:
            async for event in self._shaped_stream(request):
                yield event
            return
        start = time.perf_counter()
        text = demo_reply(request)
        pieces = [text[i : i + PIECE_CHARS] for i in range(0, len(text), PIECE_CHARS)]
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

    async def _shaped_stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """The first delta after the first-token delay, the rest at the drawn rate."""
        start = time.perf_counter()
        timing = shaped_timing(self.config, self.name, request, demo_reply(request))
        text = timing.text
        generating = timing.total_s - timing.first_token_s
        loop = asyncio.get_running_loop()
        origin = loop.time() + timing.first_token_s
        first: float | None = None
        for offset in range(0, len(text), PIECE_CHARS):
            # On a schedule from the start, so the sleeps' overshoot does not add up.
            delay = origin + generating * offset / len(text) - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if first is None:
                first = (time.perf_counter() - start) * 1000
            yield Delta(text[offset : offset + PIECE_CHARS])
        delay = origin + generating - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        result = self._result(request, text, start, first, timing.finish_reason)
        assert result.usage is not None
        yield UsageEvent(result.usage)
        yield Done(timing.finish_reason, timing.finish_reason, result)

    async def aclose(self) -> None:
        return None
