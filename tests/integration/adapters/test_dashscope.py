"""Alibaba DashScope native API against the fake: no-space SSE, moderation errors."""

from __future__ import annotations

import pytest

from core.errors import ConfigurationError, ContentRejected, FatalError, RetryableError
from tests.fakes.providers import FakeDashScope, Reply, dashscope_error, dashscope_frames
from tests.integration.adapters.conftest import PRICE_CNY, CatalogFactory
from tests.integration.adapters.helpers import REQUEST, collect, deltas


def entry(fake: FakeDashScope, **extra: object) -> dict[str, object]:
    return {
        "provider": "dashscope",
        "model": "qwen-plus",
        "base_url": fake.base_url,
        "price": PRICE_CNY,
        **extra,
    }


async def test_complete_sends_nested_input_and_parameters(
    dashscope_fake: FakeDashScope, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"qwen": entry(dashscope_fake)})
    result = await catalog.complete(["qwen"], REQUEST, deadline_s=5)
    assert result.text == "你好！有什么可以帮你？"
    assert result.finish_reason == "stop"
    assert result.provider_request_id == FakeDashScope.REQUEST_ID
    assert result.usage is not None
    assert (result.usage.input_tokens, result.usage.output_tokens) == (
        22,
        9,
    )
    sent = dashscope_fake.requests[0]
    assert sent.json["input"]["messages"][0] == {
        "role": "system",
        "content": "你是一名简洁的助手。",
    }
    assert sent.json["parameters"]["result_format"] == "message"
    assert "x-dashscope-sse" not in sent.headers


@pytest.mark.parametrize("incremental", [True, False])
async def test_stream_appends_or_replaces_by_incremental_output(
    dashscope_fake: FakeDashScope, make_catalog: CatalogFactory, incremental: bool
) -> None:
    catalog = make_catalog({"qwen": entry(dashscope_fake, incremental_output=incremental)})
    text, events, done = await collect(catalog.stream(["qwen"], REQUEST, deadline_s=5))
    assert text == "你好！有什么可以帮你？"
    assert deltas(events) == ["你好！", "有什么可以帮你？"]
    assert done.result is not None
    assert done.result.usage is not None
    assert done.result.usage.output_tokens == 9  # the last cumulative figure
    assert dashscope_fake.requests[0].headers["x-dashscope-sse"] == "enable"
    assert dashscope_fake.requests[0].json["parameters"]["incremental_output"] is incremental


async def test_moderation_mid_stream_under_200_is_content_rejected(
    dashscope_fake: FakeDashScope, make_catalog: CatalogFactory
) -> None:
    frames = dashscope_frames(
        [
            ("result", 200, dashscope_fake.result_frame("你好", "null", 1)),
            (
                "error",
                400,
                {
                    "code": "DataInspectionFailed",
                    "message": "Output data may contain inappropriate content.",
                    "request_id": "5b0c2a4e-x",
                },
            ),
        ]
    )
    dashscope_fake.push(Reply(frames=frames, content_type="text/event-stream"))
    catalog = make_catalog({"qwen": entry(dashscope_fake)})
    with pytest.raises(ContentRejected) as caught:
        async for _ in catalog.stream(["qwen"], REQUEST, deadline_s=5):
            pass
    assert caught.value.stage == "output"
    assert caught.value.status == 400
    assert caught.value.request_id == "5b0c2a4e-x"


async def test_input_moderation_400_is_rejected_without_retry(
    dashscope_fake: FakeDashScope, make_catalog: CatalogFactory
) -> None:
    dashscope_fake.push(
        dashscope_error(
            400, "DataInspectionFailed", "Input data may contain inappropriate content."
        )
    )
    catalog = make_catalog({"qwen": entry(dashscope_fake)})
    with pytest.raises(ContentRejected) as caught:
        await catalog.complete(["qwen"], REQUEST, deadline_s=5)
    assert caught.value.stage == "input"
    assert caught.value.clear_history
    assert len(dashscope_fake.requests) == 1


@pytest.mark.parametrize(
    ("status", "code", "message", "expected"),
    [
        (
            429,
            "Throttling.RateQuota",
            "Requests rate limit exceeded, please try again later.",
            RetryableError,
        ),
        (500, "InternalError.Algo", "An internal error has occured", RetryableError),
        (401, "InvalidApiKey", "Invalid API-key provided.", ConfigurationError),
        (
            400,
            "Arrearage",
            "Access denied, please make sure your account is in good standing.",
            FatalError,
        ),
        (429, "Throttling.AllocationQuota", "Free allocated quota exceeded.", FatalError),
        (400, "InvalidParameter", "Range of input length should be [1, 30720]", FatalError),
    ],
)
async def test_error_classes(
    dashscope_fake: FakeDashScope,
    make_catalog: CatalogFactory,
    status: int,
    code: str,
    message: str,
    expected: type[Exception],
) -> None:
    dashscope_fake.push(*[dashscope_error(status, code, message)] * 3)
    catalog = make_catalog({"qwen": entry(dashscope_fake)})
    with pytest.raises(expected) as caught:
        await catalog.complete(["qwen"], REQUEST, deadline_s=5)
    assert caught.value.code == code  # type: ignore[attr-defined]
    if code == "InvalidParameter":
        assert caught.value.reason == "context_length"  # type: ignore[attr-defined]


async def test_stream_that_closes_without_a_finish_reason_is_retried(
    dashscope_fake: FakeDashScope, make_catalog: CatalogFactory
) -> None:
    frames = dashscope_frames(dashscope_fake.stream_frames(True))
    dashscope_fake.push(Reply(frames=frames[:1], content_type="text/event-stream", drop_after=1))
    catalog = make_catalog({"qwen": entry(dashscope_fake)})
    with pytest.raises(RetryableError):
        await collect(catalog.stream(["qwen"], REQUEST, deadline_s=5))
