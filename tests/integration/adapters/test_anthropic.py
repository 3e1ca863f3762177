"""Anthropic Messages API against the fake."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from imbot.core.errors import RetryableError
from tests.fakes.providers import FakeAnthropic, Reply, anthropic_error, anthropic_frames
from tests.integration.adapters.conftest import ENV, PRICE_USD, CatalogFactory
from tests.integration.adapters.helpers import REQUEST, collect


def entry(fake: FakeAnthropic, **extra: object) -> dict[str, object]:
    return {
        "provider": "anthropic",
        "model": "claude-haiku-4-5",
        "base_url": fake.base_url,
        "price": PRICE_USD,
        **extra,
    }


async def test_complete_puts_the_system_prompt_on_top_and_counts_cache_tokens(
    anthropic_fake: FakeAnthropic, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"claude": entry(anthropic_fake)})
    result = await catalog.complete(["claude"], REQUEST, deadline_s=5)
    assert result.text == "你好！有什么可以帮你？"
    assert result.finish_reason == "stop"
    assert result.raw_finish_reason == "end_turn"
    assert result.usage is not None
    assert result.usage.input_tokens == 18 + 2 + 3
    assert result.usage.output_tokens == 12
    assert result.provider_request_id == "req_018EeWyXxfu5pfWkrYcMdjWG"
    sent = anthropic_fake.requests[0]
    assert sent.headers["x-api-key"] == ENV["ANTHROPIC_API_KEY"]
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.json["system"] == "你是一名简洁的助手。"
    assert sent.json["messages"] == [{"role": "user", "content": "你好"}]
    assert sent.json["max_tokens"] == 512
    assert sent.json["metadata"] == {"user_id": "u_3f9a1c"}


async def test_stream_ignores_pings_and_takes_usage_from_start_and_delta(
    anthropic_fake: FakeAnthropic, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"claude": entry(anthropic_fake)})
    text, _, done = await collect(catalog.stream(["claude"], REQUEST, deadline_s=5))
    assert text == "你好！有什么可以帮你？"
    assert done.result is not None
    assert done.result.usage is not None
    assert (done.result.usage.input_tokens, done.result.usage.output_tokens) == (18, 12)
    # The header, as for complete(); msg_… in message_start is the message's id.
    assert done.result.provider_request_id == FakeAnthropic.REQUEST_ID


async def test_overloaded_529_is_retried(
    anthropic_fake: FakeAnthropic, make_catalog: CatalogFactory
) -> None:
    anthropic_fake.push(anthropic_error(529, "overloaded_error", "Overloaded"))
    catalog = make_catalog({"claude": entry(anthropic_fake)})
    result = await catalog.complete(["claude"], REQUEST, deadline_s=5)
    assert result.attempts == 2


async def test_rate_limit_carries_retry_after(
    anthropic_fake: FakeAnthropic, make_catalog: CatalogFactory
) -> None:
    anthropic_fake.push(
        anthropic_error(
            429,
            "rate_limit_error",
            "Number of requests has exceeded your rate limit",
            headers={"retry-after": "30"},
        )
    )
    catalog = make_catalog(
        {"claude": entry(anthropic_fake, retry={"max_attempts": 2, "max_retry_after_s": 5})}
    )
    with pytest.raises(RetryableError) as caught:
        await catalog.complete(["claude"], REQUEST, deadline_s=5)
    assert caught.value.retry_after == 30
    assert caught.value.code == "rate_limit_error"
    assert caught.value.request_id == "req_018E"


async def test_error_event_mid_stream_is_raised(
    anthropic_fake: FakeAnthropic, make_catalog: CatalogFactory
) -> None:
    events = anthropic_fake.stream_events("claude-haiku-4-5")[:4]
    events.append(
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    )
    anthropic_fake.push(
        Reply(
            frames=anthropic_frames(events),
            content_type="text/event-stream",
            headers={"request-id": "req_011mid"},
        )
    )
    catalog = make_catalog({"claude": entry(anthropic_fake)})
    with pytest.raises(RetryableError, match="Overloaded") as caught:
        await collect(catalog.stream(["claude"], REQUEST, deadline_s=5))
    assert caught.value.code == "overloaded_error"
    # The error frame has no id of its own: the response header's is attached.
    assert caught.value.request_id == "req_011mid"


async def test_rate_limit_without_retry_after_waits_for_the_ratelimit_reset(
    anthropic_fake: FakeAnthropic, make_catalog: CatalogFactory
) -> None:
    reset = datetime.now(UTC) + timedelta(seconds=0.3)
    anthropic_fake.push(
        anthropic_error(
            429,
            "rate_limit_error",
            "Number of requests has exceeded your rate limit",
            headers={
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-requests-reset": reset.isoformat().replace("+00:00", "Z"),
                "anthropic-ratelimit-tokens-remaining": "9000",
                "anthropic-ratelimit-tokens-reset": (reset + timedelta(seconds=30)).isoformat(),
            },
        )
    )
    catalog = make_catalog({"claude": entry(anthropic_fake)})
    started = time.monotonic()
    result = await catalog.complete(["claude"], REQUEST, deadline_s=5)
    assert result.attempts == 2
    # Waited for the exhausted bucket (requests), not the 30 s of the tokens one.
    assert 0.2 <= time.monotonic() - started < 2


async def test_refusal_and_max_tokens_stop_reasons(
    anthropic_fake: FakeAnthropic, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"claude": entry(anthropic_fake)})
    anthropic_fake.stop_reason = "refusal"
    refused = await catalog.complete(["claude"], REQUEST, deadline_s=5)
    anthropic_fake.stop_reason = "max_tokens"
    _, _, done = await collect(catalog.stream(["claude"], REQUEST, deadline_s=5))
    assert refused.finish_reason == "content_filter"
    assert done.finish_reason == "length"
    assert done.raw_finish_reason == "max_tokens"


async def test_stream_cut_before_message_stop_is_retried(
    anthropic_fake: FakeAnthropic, make_catalog: CatalogFactory
) -> None:
    frames = anthropic_frames(anthropic_fake.stream_events("claude-haiku-4-5"))
    anthropic_fake.push(Reply(frames=frames, content_type="text/event-stream", drop_after=2))
    catalog = make_catalog({"claude": entry(anthropic_fake)})
    text, _, done = await collect(catalog.stream(["claude"], REQUEST, deadline_s=5))
    assert text == "你好！有什么可以帮你？"
    assert done.result is not None
    assert done.result.attempts == 2
