"""Circuit breaker state machine, price arithmetic, the demo reply (backoff: test_retry)."""

from __future__ import annotations

import pytest

from imbot.adapters import ChatMessage, ChatRequest, CircuitOpenError, Price
from imbot.adapters.demo import LABEL, demo_reply, summarize
from imbot.adapters.resilience import CircuitBreaker, CircuitState, counts_as_failure
from imbot.core.errors import ConfigurationError, ContentRejected, FatalError, RetryableError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state_of(breaker: CircuitBreaker) -> CircuitState:
    """The breaker's state, read through a call: after ``assert breaker.state == "closed"``
    mypy keeps the property narrowed to "closed" and would call the next check unreachable."""
    return breaker.state


def test_breaker_opens_after_threshold_then_half_opens_for_one_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker("unit-breaker", failure_threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        breaker.acquire()
        breaker.record_failure()
    assert state_of(breaker) == "closed"
    breaker.acquire()
    breaker.record_failure()
    assert state_of(breaker) == "open"
    assert not breaker.available()
    with pytest.raises(CircuitOpenError) as caught:
        breaker.acquire()
    assert caught.value.retry_after == pytest.approx(10)

    clock.now += 10
    assert state_of(breaker) == "half_open"
    assert breaker.available()
    breaker.acquire()  # the probe
    assert not breaker.available()
    with pytest.raises(CircuitOpenError):
        breaker.acquire()  # only one probe at a time
    breaker.record_success()
    assert state_of(breaker) == "closed"


def test_breaker_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker("unit-breaker-2", failure_threshold=2, cooldown_s=1, clock=Clock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert state_of(breaker) == "closed"


@pytest.mark.parametrize(
    ("error", "counts"),
    [
        (RetryableError("x"), True),
        (ConfigurationError("x"), True),
        (FatalError("x", reason="quota_exhausted"), True),
        (FatalError("x", reason="bad_request"), False),
        (FatalError("x", reason="context_length"), False),
        (ContentRejected("x"), False),
        (CircuitOpenError("x"), False),
        (TimeoutError(), True),
    ],
)
def test_what_counts_against_the_circuit(error: BaseException, counts: bool) -> None:
    assert counts_as_failure(error) is counts


def test_price_per_million_tokens() -> None:
    price = Price(input=0.15, output=0.6, currency="USD")
    assert price.cost(1_000_000, 500_000) == pytest.approx(0.45)


def test_demo_reply_is_labelled_and_summarises_the_question() -> None:
    request = ChatRequest(
        messages=(
            ChatMessage(role="user", content="旧问题"),
            ChatMessage(role="assistant", content="旧回答"),
            ChatMessage(role="user", content="  今天   天气怎么样？ " + "很长" * 40),
        )
    )
    text = demo_reply(request)
    assert text.startswith(LABEL)
    assert "今天 天气怎么样？" in text
    assert "旧问题" not in text
    assert summarize("x" * 100).endswith("…")
    assert len(summarize("x" * 100)) == 40
