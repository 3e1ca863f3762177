"""Pure wire helpers (adapters.sse, .rate_limit_headers, .provider_errors): SSE framing,
Retry-After, status classes, redaction."""

from __future__ import annotations

import pytest

from imbot.adapters.provider_errors import classify_status, redact, refine_fatal
from imbot.adapters.rate_limit_headers import anthropic_reset_s, duration_s, openai_reset_s
from imbot.adapters.sse import SseParser
from imbot.core.errors import ConfigurationError, FatalError, RetryableError
from imbot.core.retry import retry_after_s


def parse_all(text: str) -> list[tuple[str | None, str, list[str]]]:
    parser = SseParser()
    out = []
    for line in text.split("\n"):
        event = parser.feed(line)
        if event is not None:
            out.append((event.event, event.data, event.comments))
    last = parser.flush()
    if last is not None:
        out.append((last.event, last.data, last.comments))
    return out


def test_sse_openai_frames_with_space_and_done() -> None:
    assert parse_all('data: {"a":1}\n\ndata: [DONE]\n\n') == [
        (None, '{"a":1}', []),
        (None, "[DONE]", []),
    ]


def test_sse_dashscope_frames_without_spaces_and_status_comment() -> None:
    text = 'id:1\nevent:error\n:HTTP_STATUS/400\ndata:{"code":"DataInspectionFailed"}\n\n'
    assert parse_all(text) == [("error", '{"code":"DataInspectionFailed"}', ["HTTP_STATUS/400"])]


def test_sse_anthropic_event_lines_and_unterminated_last_frame() -> None:
    text = (
        'event: ping\ndata: {"type":"ping"}\n\nevent: message_stop\ndata: {"type":"message_stop"}'
    )
    assert [e for e, _, _ in parse_all(text)] == ["ping", "message_stop"]


def test_sse_bare_json_line_is_reported_as_its_own_event() -> None:
    parser = SseParser()
    event = parser.feed('{"error_code":336100}')
    assert event is not None
    assert event.bare
    assert event.data == '{"error_code":336100}'


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": "0"}, None),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_s(headers) == expected


def test_retry_after_http_date() -> None:
    value = retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, now=1445412500.0)
    assert value == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("250ms", 0.25),
        ("6m0s", 360.0),
        ("1h2m3.5s", 3723.5),
        ("2.5", 2.5),
        ("soon", None),
        ("1x", None),
        ("", None),
    ],
)
def test_go_durations(text: str, seconds: float | None) -> None:
    assert duration_s(text) == seconds


def test_openai_reset_prefers_the_exhausted_bucket() -> None:
    headers = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "120ms",
        "x-ratelimit-remaining-tokens": "5000",
        "x-ratelimit-reset-tokens": "6m0s",
    }
    assert openai_reset_s(headers) == pytest.approx(0.12)
    # Neither marked empty: wait for the longer one, to be safe.
    assert (
        openai_reset_s({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "3s"}) == 3
    )
    assert openai_reset_s({"x-ratelimit-reset-requests": "garbage"}) is None
    assert openai_reset_s({}) is None


def test_anthropic_reset_reads_rfc3339_timestamps() -> None:
    headers = {
        "anthropic-ratelimit-tokens-remaining": "0",
        "anthropic-ratelimit-tokens-reset": "2026-11-24T08:00:12Z",
        "anthropic-ratelimit-requests-remaining": "40",
        "anthropic-ratelimit-requests-reset": "2026-11-24T08:00:59+00:00",
    }
    now = 1795507200.0  # 2026-11-24T08:00:00Z
    assert anthropic_reset_s(headers, now=now) == pytest.approx(12.0)
    assert anthropic_reset_s({"anthropic-ratelimit-tokens-reset": "yesterday"}, now=now) is None
    past = {"anthropic-ratelimit-tokens-reset": "2026-11-24T07:59:00Z"}
    assert anthropic_reset_s(past, now=now) is None


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (408, RetryableError),
        (409, RetryableError),
        (429, RetryableError),
        (500, RetryableError),
        (529, RetryableError),
        (401, ConfigurationError),
        (403, ConfigurationError),
        (404, ConfigurationError),
        (400, FatalError),
        (402, FatalError),
    ],
)
def test_status_classes(status: int, expected: type[Exception]) -> None:
    assert type(classify_status(status, "m")) is expected


def test_x_should_retry_overrides_the_status() -> None:
    assert isinstance(classify_status(400, "m", headers={"x-should-retry": "true"}), RetryableError)
    assert isinstance(classify_status(503, "m", headers={"x-should-retry": "false"}), FatalError)


def test_refine_fatal_reads_context_length_from_the_text() -> None:
    error = refine_fatal(FatalError("This model's maximum context length is 2048 tokens"))
    assert isinstance(error, FatalError)
    assert error.reason == "context_length"


def test_redact_removes_known_secrets_and_key_shapes() -> None:
    text = "key sk-abcdef123456 token access_token=24.abc.def&x=1 auth Bearer xyz plain-secret"
    cleaned = redact(text, ["plain-secret"])
    assert "sk-abcdef" not in cleaned
    assert "24.abc" not in cleaned
    assert "xyz" not in cleaned
    assert "plain-secret" not in cleaned
    assert cleaned.count("[redacted]") == 4
