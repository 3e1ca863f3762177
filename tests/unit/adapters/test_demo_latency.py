"""The demo model's realistic-latency knobs: reply length, usage, stream shape, timing plan.

What is checked is what a caller sees: the reply's token count, the usage it is billed
for, the deltas a stream yields. Time is asserted only from below (a sleep never ends
early), never from above: the machine may be busy.
"""

from __future__ import annotations

import math
import time

import pytest
from pydantic import ValidationError

from imbot.adapters.base import ChatMessage, ChatRequest, Delta, Done, UsageEvent
from imbot.adapters.demo import FILLER, LABEL, PIECE_CHARS, DemoChatModel, shaped_timing
from imbot.core.catalog import DemoConfig
from imbot.core.tokens import estimate_tokens


def _request(question: str, max_output_tokens: int | None = None) -> ChatRequest:
    return ChatRequest(
        messages=(
            ChatMessage(role="system", content="你是助手。"),
            ChatMessage(role="user", content=question),
        ),
        max_output_tokens=max_output_tokens,
    )


def _model(**knobs: object) -> DemoChatModel:
    return DemoChatModel("demo-pro", DemoConfig.model_validate({"provider": "demo", **knobs}))


async def test_the_reply_is_as_long_as_drawn_labelled_and_billed_for_it() -> None:
    model = _model(output_tokens=[300, 300], price={"input": 20, "output": 60, "currency": "CNY"})
    result = await model.complete(_request("How does a B-tree index work?"))
    assert result.text.startswith(LABEL)
    assert FILLER[:6] in result.text  # the padding says what it is too
    assert estimate_tokens(result.text) == 300
    assert result.usage is not None
    assert result.usage.output_tokens == 300
    assert result.cost == pytest.approx((result.usage.input_tokens * 20 + 300 * 60) / 1_000_000)
    assert result.finish_reason == "stop"


async def test_lengths_spread_over_the_range_and_repeat_for_the_same_request() -> None:
    model = _model(output_tokens=[200, 600])
    questions = [f"第{n}个问题：为什么天空是蓝色的？" for n in range(20)]
    lengths = [(await model.complete(_request(q))).usage for q in questions]
    counts = [u.output_tokens for u in lengths if u is not None]
    assert all(200 <= c <= 600 for c in counts)
    assert len(set(counts)) > 10  # drawn per request, not one length for all
    again = await model.complete(_request(questions[3]))
    assert again.usage is not None
    assert again.usage.output_tokens == counts[3]


async def test_a_reply_stops_at_the_requests_limit() -> None:
    result = await _model(output_tokens=[500, 500]).complete(_request("写一篇文章", 120))
    assert estimate_tokens(result.text) == 120
    assert result.finish_reason == "length"


async def test_a_stream_yields_the_drawn_reply_in_pieces_then_usage_then_done() -> None:
    model = _model(first_token_ms=[5, 5], tokens_per_s=[20_000, 20_000], output_tokens=[80, 80])
    events = [e async for e in model.stream(_request("Compare TCP and UDP."))]
    deltas = [e for e in events if isinstance(e, Delta)]
    text = "".join(d.text for d in deltas)
    assert estimate_tokens(text) == 80
    assert len(deltas) == math.ceil(len(text) / PIECE_CHARS)
    assert isinstance(events[-2], UsageEvent)
    assert events[-2].usage.output_tokens == 80
    done = events[-1]
    assert isinstance(done, Done)
    assert done.result is not None
    assert done.result.text == text
    assert done.result.first_token_ms is not None
    assert done.result.first_token_ms >= 4  # the first-token delay came first


def test_the_timing_plan_is_first_token_then_tokens_at_the_rate() -> None:
    config = DemoConfig.model_validate(
        {"provider": "demo", "first_token_ms": 300, "tokens_per_s": 50, "output_tokens": 200}
    )
    timing = shaped_timing(config, "demo", _request("hi"), "【演示模型 demo】hi")
    assert timing.output_tokens == 200
    assert timing.total_s == pytest.approx(0.3 + 200 / 50)


async def test_complete_waits_at_least_the_planned_time() -> None:
    model = _model(first_token_ms=[20, 20], tokens_per_s=[1000, 1000], output_tokens=[60, 60])
    start = time.perf_counter()
    result = await model.complete(_request("你好"))
    assert time.perf_counter() - start >= 0.9 * (0.02 + 60 / 1000)
    assert result.latency_ms >= 0.9 * 80


async def test_without_knobs_the_demo_model_is_unchanged() -> None:
    model = _model()
    assert not model.config.shaped
    result = await model.complete(_request("你好"))
    assert result.text.startswith(LABEL)
    assert FILLER[:6] not in result.text
    assert result.usage is not None
    assert result.usage.output_tokens == estimate_tokens(result.text)


@pytest.mark.parametrize(
    ("knobs", "error"),
    [
        ({"first_token_ms": [2000, 300]}, "low <= high"),
        ({"output_tokens": [-1, 5]}, "low <= high"),
        ({"tokens_per_s": 0}, "above 0"),
        ({"latency_ms": 100, "first_token_ms": [300, 2000]}, "not both"),
    ],
)
def test_bad_knobs_are_refused_at_load(knobs: dict[str, object], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        DemoConfig.model_validate({"provider": "demo", **knobs})


def test_one_number_is_a_fixed_value() -> None:
    config = DemoConfig.model_validate({"provider": "demo", "tokens_per_s": 40})
    assert config.tokens_per_s == (40, 40)
    assert config.shaped
