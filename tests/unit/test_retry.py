"""The one backoff formula, the deadline, and the mark that says who owns a failure's repeats."""

from __future__ import annotations

import random

import pytest

from imbot.core.errors import RetryableError
from imbot.core.retry import Backoff, Deadline, retries_spent, spent_attempts


def test_full_jitter_grows_by_doubling_and_is_capped() -> None:
    backoff = Backoff(base=0.5, cap=8.0, rng=random.Random(1))
    assert [backoff.ceiling(n) for n in range(1, 8)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    for attempt in range(1, 9):
        draws = [backoff.delay(attempt) for _ in range(200)]
        assert all(0 <= d <= backoff.ceiling(attempt) for d in draws)
        # full jitter: the draws use the whole range, short waits included
        assert min(draws) < backoff.ceiling(attempt) / 4 < backoff.ceiling(attempt) / 2 < max(draws)


def test_equal_jitter_keeps_half_the_ceiling() -> None:
    backoff = Backoff(base=0.5, cap=8.0, jitter="equal", rng=random.Random(2))
    assert all(2.0 <= backoff.delay(4) <= 4.0 for _ in range(100))


def test_a_huge_attempt_number_stays_at_the_cap() -> None:
    assert Backoff(base=0.1, cap=10.0).ceiling(10_000) == 10.0
    assert Backoff(base=0.1, cap=10.0).ceiling(0) == 0.1  # nonsense input: the first wait


def test_the_servers_hint_is_a_floor_with_a_little_spread() -> None:
    backoff = Backoff(base=0.5, cap=1.0, rng=random.Random(3))
    waits = [backoff.delay(1, retry_after=30.0) for _ in range(100)]
    assert all(30.0 <= w <= 33.0 for w in waits)
    assert len(set(waits)) > 1
    assert backoff.delay(1, retry_after=0) <= 0.5  # no hint: the formula


def test_seeded_backoffs_repeat_their_draws() -> None:
    first = Backoff(0.2, 5.0, rng=random.Random(7))
    second = Backoff(0.2, 5.0, rng=random.Random(7))
    assert [first.delay(n) for n in range(1, 6)] == [second.delay(n) for n in range(1, 6)]


def test_deadline_remaining_and_whether_a_wait_fits() -> None:
    now = [100.0]
    deadline = Deadline.after(10.0, clock=lambda: now[0])
    assert deadline.at == 110.0
    assert deadline.remaining() == 10.0
    assert deadline.allows(9.9)
    assert not deadline.allows(10.0)
    now[0] = 110.0
    assert deadline.expired()
    assert deadline.remaining() == 0.0
    now[0] = 111.5
    assert deadline.remaining() == pytest.approx(-1.5)


def test_an_error_marked_as_retried_says_how_often() -> None:
    error = RetryableError("provider busy", status=503)
    assert spent_attempts(error) is None
    assert retries_spent(error, 6) is error
    assert spent_attempts(error) == 6
    assert isinstance(error, RetryableError)
    assert str(error) == "provider busy status=503"
