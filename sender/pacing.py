"""An asyncio token bucket that keeps REST calls under Easemob's rate limit."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import Counter

PACING_WAIT = Counter(
    "imbot_easemob_pacing_wait_seconds_total", "Time spent waiting for the rate limit"
)


class Pacer:
    """``await acquire()`` returns when a call may be made.

    ``rate`` calls per second sustained, bursts of up to ``burst`` calls. Waiters
    are served in order (one lock), so the sustained rate never exceeds ``rate``.
    """

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 10)
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens >= 1:
                self._tokens -= 1
                return
            wait = (1 - self._tokens) / self.rate
            PACING_WAIT.inc(wait)
            await asyncio.sleep(wait)
            # The token that accrued by now + wait is spent; time the sleep
            # overshot keeps accruing (resetting the clock here would lose it).
            self._tokens = 0.0
            self._last = now + wait
