"""One retry policy: a backoff formula, a deadline, and who owns a failure's repeats.

Every loop that waits before trying again (the stage boundary, the model catalog,
publishing to Kafka, the gateway's connections, the usage write) takes its delay
from a ``Backoff`` and its stop from a ``Deadline`` or a number of tries, with its
own base and cap as parameters.

The jitter is *full* jitter (a uniform draw in ``[0, ceiling]``): of the usual
choices it spreads many clients retrying the same outage best and does the least
total work (AWS Architecture Blog, "Exponential Backoff and Jitter"). A server's
Retry-After is honoured as a floor, never shortened, with up to 10 % added so
the clients it throttled at once do not all return at the same instant.

Repeats have one owner (arq's ``max_tries``): a layer that has already spent its
own attempts on a failure marks it with ``retries_spent``, and an outer layer that
sees the mark does not run the work again. The model catalog marks the error it
raises after calling a provider, so the boundary does not buy the same answer
again (docs/models.md states the resulting worst case of paid calls).
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

Jitter = Literal["full", "equal"]

_SPENT = "_imbot_retries_spent"


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff: attempt ``n`` (1 = the first retry) waits up to
    ``min(cap, base * 2 ** (n - 1))``, drawn with full jitter."""

    base: float
    cap: float
    jitter: Jitter = "full"
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def ceiling(self, attempt: int) -> float:
        """The longest wait before retry number ``attempt`` (1-based)."""
        exponent = min(max(attempt, 1) - 1, 62)  # 2**62 * base exceeds any cap
        return float(min(self.cap, self.base * 2.0**exponent))

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt``; a positive
        ``retry_after`` (the server's hint) replaces the formula."""
        if retry_after is not None and retry_after > 0:
            return retry_after * (1 + 0.1 * self.rng.random())
        ceiling = self.ceiling(attempt)
        if self.jitter == "equal":
            return ceiling / 2 + self.rng.uniform(0, ceiling / 2)
        return self.rng.uniform(0, ceiling)


@dataclass(frozen=True, slots=True)
class Deadline:
    """A point on the monotonic clock after which no new attempt starts."""

    at: float
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)

    @classmethod
    def after(cls, seconds: float, clock: Callable[[], float] = time.monotonic) -> Deadline:
        return cls(clock() + seconds, clock)

    def remaining(self) -> float:
        """Seconds left (negative once passed)."""
        return self.at - self.clock()

    def expired(self) -> bool:
        return self.remaining() <= 0

    def allows(self, delay: float) -> bool:
        """Whether waiting ``delay`` seconds still leaves time for another attempt."""
        return self.clock() + delay < self.at


def retries_spent(error: BaseException, attempts: int) -> BaseException:
    """Mark ``error`` as one whose repeats were already made (``attempts`` tries) by
    the layer that raises it; returns it, for ``raise retries_spent(exc, n)``."""
    setattr(error, _SPENT, attempts)
    return error


def spent_attempts(error: BaseException) -> int | None:
    """The tries already made for ``error`` by an inner owner, or None if unmarked."""
    value = getattr(error, _SPENT, None)
    return value if isinstance(value, int) else None


def retry_after_s(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms`` first, then ``retry-after``
    (seconds or an HTTP date). None when absent, unparsable or not positive."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000
        except ValueError:
            value = 0.0
        if value > 0:
            return value
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        value = parsed.timestamp() - (time.time() if now is None else now)
    return value if value > 0 else None
