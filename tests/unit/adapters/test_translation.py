"""Pure request building and response/stream parsing per provider (no network)."""

from __future__ import annotations

import pytest

from imbot.adapters import (
    ChatMessage,
    ChatRequest,
    Delta,
    Done,
    UsageEvent,
    anthropic,
    dashscope,
    ernie,
    ollama,
    openai,
    spark,
)
from imbot.adapters.http_model import StreamDecoder
from imbot.core.catalog import AnthropicConfig, OpenAIConfig
from imbot.core.errors import ConfigurationError, ContentRejected, FatalError, RetryableError

PRICE = {"input": 1, "output": 2, "currency": "USD"}
REQ = ChatRequest(
    messages=(
        ChatMessage(role="system", content="sys"),
        ChatMessage(role="assistant", content="stray greeting"),
        ChatMessage(role="user", content="q1"),
        ChatMessage(role="user", content="q1 again"),
        ChatMessage(role="assistant", content="a1"),
        ChatMessage(role="user", content="q2"),
    ),
    max_output_tokens=4096,
    temperature=0.0,
)


def feed(decoder: StreamDecoder, text: str) -> list[object]:
    events: list[object] = []
    for line in text.split("\n"):
        events.extend(decoder.feed(line))
    return events


def test_openai_body_uses_max_completion_tokens_and_stream_options() -> None:
    cfg = OpenAIConfig.model_validate({"provider": "openai", "price": PRICE})
    body = openai.build_body(cfg, "gpt", REQ, stream=True)
    assert body["max_completion_tokens"] == 4096
    assert body["stream_options"] == {"include_usage": True}
    assert body["messages"][0] == {"role": "system", "content": "sys"}


@pytest.mark.parametrize(
    ("raw", "finish"),
    [
        ("stop", "stop"),
        ("length", "length"),
        ("function_call", "tool_calls"),
        ("abort", "error"),
        (None, "stop"),
    ],
)
def test_openai_finish_reasons(raw: str | None, finish: str) -> None:
    assert openai.map_finish(raw) == finish


def test_openai_refusal_is_reported_as_content_filter() -> None:
    body = b'{"choices":[{"message":{"content":null,"refusal":"I can\'t help"},"finish_reason":"stop"}]}'
    parsed = openai.parse_completion({}, body)
    assert parsed.finish_reason == "content_filter"
    assert parsed.text == "I can't help"


def test_openai_stream_decoder_keeps_finish_until_done_and_reads_usage_chunk() -> None:
    decoder = openai.OpenAIStreamDecoder()
    events = feed(
        decoder,
        'data: {"id":"c1","choices":[{"delta":{"content":"hi"},"finish_reason":null}]}\n\n'
        'data: {"id":"c1","choices":[{"delta":{},"finish_reason":"length"}]}\n\n'
        'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n'
        "data: [DONE]\n\n",
    )
    assert events[0] == Delta("hi")
    assert isinstance(events[1], UsageEvent)
    assert events[1].usage.input_tokens == 3
    assert events[2] == Done("length", "length")
    assert decoder.request_id == "c1"


def test_openai_stream_malformed_frame_is_retryable() -> None:
    with pytest.raises(RetryableError):
        feed(openai.OpenAIStreamDecoder(), "data: {not json\n\n")


def test_anthropic_body_system_on_top_merged_turns_and_required_max_tokens() -> None:
    cfg = AnthropicConfig.model_validate({"provider": "anthropic", "price": PRICE})
    body = anthropic.build_body(
        cfg, "claude", ChatRequest(messages=REQ.messages, temperature=1.5), stream=False
    )
    assert body["system"] == "sys"
    assert body["max_tokens"] == 1024
    assert body["temperature"] == 1.0
    assert [m["role"] for m in body["messages"]] == ["assistant", "user", "assistant", "user"]
    assert body["messages"][1]["content"] == "q1\n\nq1 again"


def test_ernie_messages_are_odd_alternating_and_start_with_user() -> None:
    body = ernie.build_body(REQ, stream=False)
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["system"] == "sys"
    assert body["temperature"] == 0.01
    assert body["max_output_tokens"] == 2048


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (2, RetryableError),
        (18, RetryableError),
        (336501, RetryableError),
        (17, FatalError),
        (336003, FatalError),
        (336103, FatalError),
        (100, ConfigurationError),
        (336005, ConfigurationError),
    ],
)
def test_ernie_error_codes(code: int, kind: type[Exception]) -> None:
    assert type(ernie.map_error_code(code, "m", None, "")) is kind


def test_ernie_alternative_error_spelling_is_accepted() -> None:
    with pytest.raises(RetryableError):
        ernie.parse_completion({}, b'{"code": 336501, "msg": "Rate limit reached for RPM"}')


def test_ernie_flag_marks_content_filter_with_safety_details() -> None:
    parsed = ernie.parse_completion(
        {}, b'{"id":"as-1","result":"**","flag":1,"ban_round":-1,"finish_reason":"normal"}'
    )
    assert parsed.finish_reason == "content_filter"
    assert parsed.safety == {"flag": 1, "ban_round": -1}


def test_ernie_token_refusal_is_configuration() -> None:
    with pytest.raises(ConfigurationError, match="unknown client id"):
        ernie.parse_token(
            200, b'{"error":"invalid_client","error_description":"unknown client id"}'
        )
    assert ernie.parse_token(200, b'{"access_token":"24.x","expires_in":100}') == ("24.x", 100.0)


def test_dashscope_non_incremental_stream_passes_only_new_text() -> None:
    decoder = dashscope.DashScopeStreamDecoder(incremental=False)
    frame = 'id:{n}\nevent:result\n:HTTP_STATUS/200\ndata:{{"output":{{"choices":[{{"message":{{"content":"{t}"}},"finish_reason":"{f}"}}]}},"usage":{{"input_tokens":5,"output_tokens":{n}}},"request_id":"r1"}}\n\n'
    events = feed(
        decoder, frame.format(n=1, t="你好", f="null") + frame.format(n=2, t="你好！", f="stop")
    )
    assert [e.text for e in events if isinstance(e, Delta)] == ["你好", "！"]
    assert events[-1] == Done("stop", "stop")
    assert decoder.request_id == "r1"


def test_dashscope_text_result_format_and_null_finish() -> None:
    parsed = dashscope.parse_completion(
        {}, b'{"output":{"text":"hi","finish_reason":"null"},"request_id":"r"}'
    )
    assert parsed.text == "hi"
    assert parsed.finish_reason == "stop"
    assert parsed.raw_finish_reason is None


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (10013, ContentRejected),
        (10014, ContentRejected),
        (10019, ContentRejected),
        (10007, RetryableError),
        (10907, FatalError),
        (11200, ConfigurationError),
    ],
)
def test_spark_codes(code: int, kind: type[Exception]) -> None:
    assert type(spark.map_code(code, "m", "sid", "", 200)) is kind


def test_spark_10019_asks_to_clear_history() -> None:
    error = spark.map_code(10019, "m", "sid", "", 200)
    assert isinstance(error, ContentRejected)
    assert error.clear_history


def test_ollama_decoder_ndjson_and_unknown_done_reason() -> None:
    decoder = ollama.OllamaStreamDecoder()
    events = feed(
        decoder,
        '{"model":"m","message":{"content":"a"},"done":false}\n'
        '{"model":"m","message":{"content":""},"done":true,"done_reason":"unload","eval_count":2}\n',
    )
    assert events[0] == Delta("a")
    assert isinstance(events[1], UsageEvent)
    assert events[1].usage.input_tokens == 0
    assert events[2] == Done("stop", "unload")


def test_openai_stream_refusal_deltas_are_the_reply_and_mark_content_filter() -> None:
    decoder = openai.OpenAIStreamDecoder()
    events = feed(
        decoder,
        'data: {"id":"c2","choices":[{"delta":{"role":"assistant","content":null,"refusal":""}}]}\n\n'
        'data: {"id":"c2","choices":[{"delta":{"refusal":"No."},"finish_reason":null}]}\n\n'
        'data: {"id":"c2","choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
        "data: [DONE]\n\n",
    )
    assert events == [Delta("No."), Done("content_filter", "stop")]
    assert decoder.safety == {"refusal": True}


@pytest.mark.parametrize(
    ("status", "code", "etype"),
    [
        (400, "invalid_model", "invalid_request_error"),
        (401, "no_parameter_permission", "access_denied"),
        (401, "invalid_model", "invalid_request_error"),
    ],
)
def test_qianfan_v2_model_and_permission_errors_are_configuration(
    status: int, code: str, etype: str
) -> None:
    body = b'{"error":{"code":"%s","message":"m","type":"%s"},"id":"as-1"}' % (
        code.encode(),
        etype.encode(),
    )
    error = openai.map_error(status, {}, body)
    assert type(error) is ConfigurationError
    assert error.request_id == "as-1"


def test_openai_429_without_retry_after_uses_the_ratelimit_reset() -> None:
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"}
    error = openai.map_error(429, headers, b'{"error":{"code":"rate_limit_exceeded"}}')
    assert isinstance(error, RetryableError)
    assert error.retry_after == 2.0
    both = {**headers, "retry-after": "5"}
    error = openai.map_error(429, both, b'{"error":{"code":"rate_limit_exceeded"}}')
    assert isinstance(error, RetryableError)
    assert error.retry_after == 5.0  # an explicit Retry-After wins


@pytest.mark.parametrize(
    ("code", "message", "kind", "reason"),
    [
        (11200, "AppIdNoAuthError (sid: cha000a9999@dx19)", ConfigurationError, None),
        (11200, "tokens exhausted: volume over limit", FatalError, "quota_exhausted"),
        # Spark's own wording names both causes: left to the operator as configuration.
        (
            11200,
            "授权错误：该appId没有相关功能的授权 或者 业务量超过限制",
            ConfigurationError,
            None,
        ),
        (10016, "app id not authorised for this version", ConfigurationError, None),
        (10016, "token quota exhausted", FatalError, "quota_exhausted"),
        (10016, "tokens余量不足", FatalError, "quota_exhausted"),
    ],
)
def test_spark_auth_or_quota_codes_are_split_by_message(
    code: int, message: str, kind: type[Exception], reason: str | None
) -> None:
    error = spark.map_code(code, message, "sid", "", 200)
    assert type(error) is kind
    if reason is not None:
        assert isinstance(error, FatalError)
        assert error.reason == reason


def test_dashscope_allocation_quota_carries_the_suggested_wait() -> None:
    body = {"code": "Throttling.AllocationQuota", "message": "Allocated quota exceeded."}
    error = dashscope.map_error_body(429, body, "", {}, allocation_wait_s=8.0)
    assert isinstance(error, RetryableError)
    assert error.retry_after == 8.0
    rate = dashscope.map_error_body(
        429, {"code": "Throttling.RateQuota", "message": "m"}, "", {}, allocation_wait_s=8.0
    )
    assert isinstance(rate, RetryableError)
    assert rate.retry_after is None
    free = dashscope.map_error_body(
        429,
        {"code": "Throttling.AllocationQuota", "message": "Free allocated quota exceeded."},
        "",
        {},
        allocation_wait_s=8.0,
    )
    assert isinstance(free, FatalError)
    assert free.reason == "quota_exhausted"


def test_ernie_need_clear_history_is_a_rejection_carrying_ban_round() -> None:
    with pytest.raises(ContentRejected) as caught:
        ernie.parse_completion(
            {},
            b'{"id":"as-2","result":"sorry","need_clear_history":true,"ban_round":-1,"flag":0}',
        )
    error = caught.value
    assert (error.stage, error.clear_history, error.code) == ("input", True, "need_clear_history")
    assert error.request_id == "as-2"
    assert "ban_round=-1" in error.message
    assert error.raw == '{"id":"as-2","need_clear_history":true,"ban_round":-1}'
