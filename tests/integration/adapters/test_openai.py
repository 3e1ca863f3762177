"""OpenAI chat completions (and compatible servers) against the fake over real HTTP."""

from __future__ import annotations

import time

import pytest

from imbot.adapters import Delta, StreamEvent, UsageEvent
from imbot.core.errors import ConfigurationError, ContentRejected, FatalError, RetryableError
from tests.fakes.providers import FakeOpenAI, Reply, json_reply, openai_error, sse
from tests.integration.adapters.conftest import ENV, PRICE_USD, CatalogFactory
from tests.integration.adapters.helpers import REQUEST, collect, drain


def entry(fake: FakeOpenAI, **extra: object) -> dict[str, object]:
    return {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "base_url": fake.base_url,
        "api_key_env": "OPENAI_API_KEY",
        "price": PRICE_USD,
        **extra,
    }


async def test_complete_returns_text_usage_cost_and_sends_the_documented_request(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"gpt": entry(openai_fake)})
    result = await catalog.complete(["gpt"], REQUEST, deadline_s=5)

    assert result.text == "你好！有什么可以帮你？"
    assert result.finish_reason == "stop"
    assert result.usage is not None
    assert result.usage.input_tokens == 21
    assert result.usage.output_tokens == 9
    assert result.cost == pytest.approx((21 * 0.15 + 9 * 0.6) / 1e6)
    assert result.currency == "USD"
    assert result.provider == "openai"
    assert result.model_id == "gpt"
    assert result.provider_request_id is not None
    assert result.provider_request_id.startswith("req_")
    assert result.attempts == 1
    assert result.latency_ms > 0

    sent = openai_fake.requests[0]
    assert sent.headers["authorization"] == f"Bearer {ENV['OPENAI_API_KEY']}"
    assert sent.json == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "你是一名简洁的助手。"},
            {"role": "user", "content": "你好"},
        ],
        "max_completion_tokens": 512,
        "temperature": 0.7,
        "safety_identifier": "u_3f9a1c",
    }


async def test_stream_assembles_deltas_and_reads_usage_from_the_last_chunk(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"gpt": entry(openai_fake)})
    text, events, done = await collect(catalog.stream(["gpt"], REQUEST, deadline_s=5))

    assert text == "你好！有什么可以帮你？"
    assert openai_fake.requests[0].json["stream_options"] == {"include_usage": True}
    assert any(isinstance(e, UsageEvent) for e in events)
    assert done.finish_reason == "stop"
    assert done.result is not None
    assert done.result.text == text
    assert done.result.usage is not None
    assert done.result.usage.output_tokens == 9
    assert done.result.cost is not None
    assert done.result.cost > 0
    assert done.result.first_token_ms is not None


async def test_stream_without_usage_gives_no_cost(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"gpt": entry(openai_fake, stream_usage=False)})
    text, _, done = await collect(catalog.stream(["gpt"], REQUEST, deadline_s=5))
    assert text == "你好！有什么可以帮你？"
    assert done.result is not None
    assert done.result.usage is None
    assert done.result.cost is None


async def test_rate_limit_is_retried_after_the_servers_hint(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(
        openai_error(
            429,
            "Rate limit reached for requests",
            "requests",
            "rate_limit_exceeded",
            headers={"retry-after-ms": "150"},
        )
    )
    catalog = make_catalog({"gpt": entry(openai_fake)})
    started = time.monotonic()
    result = await catalog.complete(["gpt"], REQUEST, deadline_s=5)
    assert result.text == "你好！有什么可以帮你？"
    assert result.attempts == 2
    assert time.monotonic() - started >= 0.15  # waited as told
    assert len(openai_fake.requests) == 2


async def test_insufficient_quota_is_fatal_and_not_retried(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(
        openai_error(
            429, "You exceeded your current quota", "insufficient_quota", "insufficient_quota"
        )
    )
    catalog = make_catalog({"gpt": entry(openai_fake)})
    with pytest.raises(FatalError) as caught:
        await catalog.complete(["gpt"], REQUEST, deadline_s=5)
    assert caught.value.reason == "quota_exhausted"
    assert caught.value.status == 429
    assert len(openai_fake.requests) == 1


async def test_context_length_is_fatal_with_its_reason(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(
        openai_error(
            400,
            "This model's maximum context length is 128000 tokens.",
            "invalid_request_error",
            "context_length_exceeded",
        )
    )
    catalog = make_catalog({"gpt": entry(openai_fake)})
    with pytest.raises(FatalError) as caught:
        await catalog.complete(["gpt"], REQUEST, deadline_s=5)
    assert caught.value.reason == "context_length"
    assert caught.value.code == "context_length_exceeded"


async def test_bad_key_is_a_configuration_error_that_never_shows_the_key(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    key = ENV["OPENAI_API_KEY"]
    openai_fake.push(
        openai_error(
            401,
            f"Incorrect API key provided: {key}. You can find your API key at …",
            "invalid_request_error",
            "invalid_api_key",
        )
    )
    catalog = make_catalog({"gpt": entry(openai_fake)})
    with pytest.raises(ConfigurationError) as caught:
        await catalog.complete(["gpt"], REQUEST, deadline_s=5)
    error = caught.value
    assert error.status == 401
    assert error.code == "invalid_api_key"
    assert key not in str(error)
    assert key not in (error.raw or "")
    assert "[redacted]" in str(error)


async def test_server_errors_are_retried_until_attempts_run_out(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(*[openai_error(503, "engine overloaded", "server_error", None)] * 3)
    catalog = make_catalog({"gpt": entry(openai_fake)})
    with pytest.raises(RetryableError) as caught:
        await catalog.complete(["gpt"], REQUEST, deadline_s=5)
    assert caught.value.status == 503
    assert len(openai_fake.requests) == 3


async def test_malformed_body_is_retryable_and_the_retry_succeeds(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(Reply(body=b"<html>502 Bad Gateway</html>", content_type="text/html"))
    catalog = make_catalog({"gpt": entry(openai_fake)})
    result = await catalog.complete(["gpt"], REQUEST, deadline_s=5)
    assert result.text == "你好！有什么可以帮你？"
    assert result.attempts == 2


async def test_connection_dropped_mid_body_is_retried(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(Reply(body=openai_fake.completion_body("gpt-4o-mini"), drop_after=0))
    catalog = make_catalog({"gpt": entry(openai_fake)})
    result = await catalog.complete(["gpt"], REQUEST, deadline_s=5)
    assert result.attempts == 2
    assert result.text == "你好！有什么可以帮你？"


async def test_stream_dropped_before_the_first_token_is_retried(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    frames = openai_fake.stream_frames("gpt-4o-mini", include_usage=True)
    openai_fake.push(Reply(frames=frames, content_type="text/event-stream", drop_after=1))
    catalog = make_catalog({"gpt": entry(openai_fake)})
    text, _, done = await collect(catalog.stream(["gpt"], REQUEST, deadline_s=5))
    assert text == "你好！有什么可以帮你？"
    assert done.result is not None
    assert done.result.attempts == 2


async def test_stream_dropped_after_text_was_sent_raises_to_the_caller(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    frames = openai_fake.stream_frames("gpt-4o-mini", include_usage=True)
    openai_fake.push(Reply(frames=frames, content_type="text/event-stream", drop_after=3))
    catalog = make_catalog({"gpt": entry(openai_fake)})
    received: list[StreamEvent] = []
    with pytest.raises(RetryableError):
        await drain(catalog.stream(["gpt"], REQUEST, deadline_s=5), received)
    assert any(
        isinstance(e, Delta) for e in received
    )  # the caller had partial text, so no silent retry
    assert len(openai_fake.requests) == 1


async def test_error_frame_inside_a_200_stream_is_raised(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    frames = sse(
        [{"error": {"message": "The server had an error", "type": "server_error", "code": None}}],
        done=False,
    )
    openai_fake.push(*[Reply(frames=frames, content_type="text/event-stream")] * 3)
    catalog = make_catalog({"gpt": entry(openai_fake)})
    with pytest.raises(RetryableError, match="The server had an error"):
        await collect(catalog.stream(["gpt"], REQUEST, deadline_s=5))


async def test_slow_response_hits_the_deadline(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(*[Reply(body=openai_fake.completion_body("m"), delay_s=3)] * 3)
    catalog = make_catalog({"gpt": entry(openai_fake)})
    started = time.monotonic()
    with pytest.raises(RetryableError) as caught:
        await catalog.complete(["gpt"], REQUEST, deadline_s=0.3)
    assert time.monotonic() - started < 1.0
    assert caught.value.code == "timeout"


async def test_per_model_timeout_bounds_one_attempt(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    # The first answer would come after 10 s: the attempt is cut at the model's 1.5 s and
    # the second one answers at once (1.5 s leaves room for a busy machine: a second
    # attempt cut short too would make three).
    openai_fake.push(Reply(body=openai_fake.completion_body("m"), delay_s=10))
    catalog = make_catalog({"gpt": entry(openai_fake, timeout_s=1.5)})
    started = time.monotonic()
    result = await catalog.complete(["gpt"], REQUEST, deadline_s=20)
    assert result.attempts == 2
    assert time.monotonic() - started < 9  # not the 10 s answer
    assert result.latency_ms < 1500


async def test_content_filter_finish_is_reported_not_raised(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.finish_reason = "content_filter"
    catalog = make_catalog({"gpt": entry(openai_fake)})
    result = await catalog.complete(["gpt"], REQUEST, deadline_s=5)
    assert result.finish_reason == "content_filter"
    assert result.raw_finish_reason == "content_filter"


async def test_dashscope_compatible_moderation_is_content_rejected_at_once(
    openai_fake: FakeOpenAI, openai_fake2: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(
        openai_error(
            400,
            "<400> InternalError.Algo.DataInspectionFailed: Input text data may contain inappropriate content.",
            "data_inspection_failed",
            "data_inspection_failed",
            extra={"id": "chatcmpl-0f1e", "request_id": "0f1e2d3c-4b5a"},
        )
    )
    catalog = make_catalog(
        {"qwen": entry(openai_fake, model="qwen-plus"), "backup": entry(openai_fake2)}
    )
    with pytest.raises(ContentRejected) as caught:
        await catalog.complete(["qwen", "backup"], REQUEST, deadline_s=5)
    assert caught.value.stage == "input"
    assert caught.value.clear_history
    assert caught.value.request_id == "0f1e2d3c-4b5a"
    assert len(openai_fake.requests) == 1
    assert openai_fake2.requests == []


async def test_vllm_flat_error_shape_with_integer_code(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(
        json_reply(
            {
                "object": "error",
                "message": "This model's maximum context length is 2048 tokens. However, you requested 2723 tokens",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            },
            400,
        )
    )
    catalog = make_catalog({"local": entry(openai_fake, api_key_env=None, user_field=None)})
    with pytest.raises(FatalError) as caught:
        await catalog.complete(["local"], REQUEST, deadline_s=5)
    assert caught.value.reason == "context_length"
    assert "authorization" not in openai_fake.requests[0].headers
    assert "safety_identifier" not in openai_fake.requests[0].json


async def test_qianfan_v2_flag_3_is_never_delivered(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(
        json_reply(
            {
                "id": "as-qsp8w7ppnv",
                "object": "chat.completion",
                "created": 1764000000,
                "model": "ernie-4.0-turbo-8k",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "不该显示"},
                        "finish_reason": "stop",
                        "flag": 3,
                        "ban_round": -1,
                    }
                ],
                "usage": {"prompt_tokens": 11, "completion_tokens": 15, "total_tokens": 26},
            }
        )
    )
    catalog = make_catalog(
        {"qianfan": entry(openai_fake, max_tokens_field="max_tokens", user_field="user")}
    )
    with pytest.raises(ContentRejected) as caught:
        await catalog.complete(["qianfan"], REQUEST, deadline_s=5)
    assert caught.value.stage == "output"
    sent = openai_fake.requests[0].json
    assert sent["max_tokens"] == 512
    assert sent["user"] == "u_3f9a1c"


async def test_streamed_refusal_is_the_reply_with_content_filter(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    def chunk(delta: dict[str, object], finish: str | None) -> dict[str, object]:
        return {
            "id": "chatcmpl-R1",
            "object": "chat.completion.chunk",
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    frames = sse(
        [
            chunk({"role": "assistant", "content": None, "refusal": ""}, None),
            chunk({"refusal": "I'm sorry, "}, None),
            chunk({"refusal": "I can't help with that."}, None),
            chunk({}, "stop"),
        ]
    )
    openai_fake.push(Reply(frames=frames, content_type="text/event-stream"))
    catalog = make_catalog({"gpt": entry(openai_fake)})
    text, _, done = await collect(catalog.stream(["gpt"], REQUEST, deadline_s=5))
    assert text == "I'm sorry, I can't help with that."
    assert done.finish_reason == "content_filter"
    assert done.raw_finish_reason == "stop"
    assert done.result is not None
    assert done.result.safety == {"refusal": True}


async def test_rate_limit_without_retry_after_waits_for_the_ratelimit_reset(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(
        openai_error(
            429,
            "Rate limit reached for requests",
            "requests",
            "rate_limit_exceeded",
            headers={
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": "250ms",
                "x-ratelimit-remaining-tokens": "149000",
                "x-ratelimit-reset-tokens": "6m0s",
            },
        )
    )
    catalog = make_catalog({"gpt": entry(openai_fake)})
    started = time.monotonic()
    result = await catalog.complete(["gpt"], REQUEST, deadline_s=5)
    assert result.attempts == 2
    # The exhausted bucket (requests) says 250 ms; the tokens bucket's 6 min is not ours.
    assert 0.25 <= time.monotonic() - started < 2


async def test_ratelimit_reset_beyond_max_retry_after_falls_back_at_once(
    openai_fake: FakeOpenAI, openai_fake2: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(
        openai_error(
            429,
            "Rate limit reached for tokens",
            "tokens",
            "rate_limit_exceeded",
            headers={"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"},
        )
    )
    catalog = make_catalog({"gpt": entry(openai_fake), "backup": entry(openai_fake2)})
    started = time.monotonic()
    result = await catalog.complete(["gpt", "backup"], REQUEST, deadline_s=5)
    assert result.model_id == "backup"
    assert len(openai_fake.requests) == 1
    assert time.monotonic() - started < 1


async def test_qianfan_v2_invalid_model_is_a_configuration_error(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    openai_fake.push(
        openai_error(
            400,
            "model ernie-9 not found",
            "invalid_request_error",
            "invalid_model",
            extra={"id": "as-bad0model"},
        )
    )
    catalog = make_catalog({"qianfan": entry(openai_fake, max_tokens_field="max_tokens")})
    with pytest.raises(ConfigurationError) as caught:
        await catalog.complete(["qianfan"], REQUEST, deadline_s=5)
    assert caught.value.code == "invalid_model"
    assert caught.value.status == 400
    assert caught.value.request_id == "as-bad0model"


async def test_stream_request_id_comes_from_the_header_like_complete(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    reply = openai_fake.success(stream=True)
    reply.headers = {"x-request-id": "req_stream42"}
    openai_fake.push(reply)
    catalog = make_catalog({"gpt": entry(openai_fake)})
    _, _, done = await collect(catalog.stream(["gpt"], REQUEST, deadline_s=5))
    assert done.result is not None
    assert done.result.provider_request_id == "req_stream42"  # not the body's chatcmpl-…
