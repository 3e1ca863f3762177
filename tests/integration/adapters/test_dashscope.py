"""Alibaba DashScope native API against the fake: no-space SSE, moderation errors."""

from __future__ import annotations

import pytest

from imbot.adapters import StreamEvent
from imbot.core.errors import ContentRejected, RetryableError
from tests.fakes.providers import FakeDashScope, Reply, dashscope_error, dashscope_frames
from tests.integration.adapters.conftest import PRICE_CNY, CatalogFactory
from tests.integration.adapters.helpers import REQUEST, collect, deltas, drain


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


async def test_stream_that_closes_after_text_without_a_finish_reason_raises_to_the_caller(
    dashscope_fake: FakeDashScope, make_catalog: CatalogFactory
) -> None:
    """DashScope has no sentinel: a clean close before a frame with a finish reason is
    an incomplete reply. Text was already passed on, so it is not retried silently."""
    frames = dashscope_frames(dashscope_fake.stream_frames(True))
    dashscope_fake.push(Reply(frames=frames[:2], content_type="text/event-stream"))
    catalog = make_catalog({"qwen": entry(dashscope_fake)})
    received: list[StreamEvent] = []
    with pytest.raises(RetryableError) as caught:
        await drain(catalog.stream(["qwen"], REQUEST, deadline_s=5), received)
    assert caught.value.code == "incomplete_stream"
    assert deltas(received) == ["你好！", "有什么可以帮你？"]
    assert len(dashscope_fake.requests) == 1


async def test_allocation_quota_suggests_the_longest_backoff(
    dashscope_fake: FakeDashScope, make_catalog: CatalogFactory
) -> None:
    """A period (TPM) quota refills in the next window: the hint is retry.max_delay_s."""
    dashscope_fake.push(
        dashscope_error(429, "Throttling.AllocationQuota", "Allocated quota exceeded.")
    )
    catalog = make_catalog(
        {"qwen": entry(dashscope_fake, retry={"max_attempts": 1, "max_delay_s": 2.5})}
    )
    with pytest.raises(RetryableError) as caught:
        await catalog.complete(["qwen"], REQUEST, deadline_s=5)
    assert caught.value.retry_after == 2.5
    assert caught.value.code == "Throttling.AllocationQuota"
    assert caught.value.request_id == "5b0c2a4e-err"


async def test_rate_quota_leaves_the_wait_to_the_normal_backoff(
    dashscope_fake: FakeDashScope, make_catalog: CatalogFactory
) -> None:
    dashscope_fake.push(dashscope_error(429, "Throttling.RateQuota", "Requests rate limit"))
    catalog = make_catalog({"qwen": entry(dashscope_fake, retry={"max_attempts": 1})})
    with pytest.raises(RetryableError) as caught:
        await catalog.complete(["qwen"], REQUEST, deadline_s=5)
    assert caught.value.retry_after is None


async def test_allocation_quota_mid_stream_also_carries_the_hint(
    dashscope_fake: FakeDashScope, make_catalog: CatalogFactory
) -> None:
    frames = dashscope_frames(
        [
            (
                "error",
                429,
                {"code": "Throttling.AllocationQuota", "message": "Allocated quota exceeded."},
            )
        ]
    )
    dashscope_fake.push(
        Reply(
            frames=frames,
            content_type="text/event-stream",
            headers={"x-request-id": "5b0c2a4e-hdr"},
        )
    )
    catalog = make_catalog(
        {"qwen": entry(dashscope_fake, retry={"max_attempts": 1, "max_delay_s": 1.5})}
    )
    with pytest.raises(RetryableError) as caught:
        await collect(catalog.stream(["qwen"], REQUEST, deadline_s=5))
    assert caught.value.status == 429
    assert caught.value.retry_after == 1.5
    assert caught.value.request_id == "5b0c2a4e-hdr"
