"""An asyncio token bucket that keeps REST calls under Easemob's rate limit.

Easemob allows about 100 REST calls per second per app (reference §3.8) and
answers 429 above that. Pacing ourselves is cheaper than being told off: a
paced sender never sees a 429 in steady state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from imbot.sender.metrics import PACING_WAIT

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class Pacer:
    """``await pacer.acquire()`` returns when one more call may be made.

    ``rate`` calls per second sustained, bursts of up to ``burst`` calls (default
    1: no burst at all). Over any interval of length T at most ``burst + rate * T``
    calls pass, so the sustained rate never exceeds ``rate``. Waiters are served
    in arrival order (one lock), so a busy sender cannot starve a quiet one.
    ``rate=None`` means unpaced: ``acquire`` returns at once.

    ``clock`` and ``sleep`` default to the running event loop's clock and
    ``asyncio.sleep``; tests pass a virtual clock to check the arithmetic without
    waiting.
    """

    def __init__(
        self,
        rate: float | None,
        burst: float | None = None,
        *,
        clock: Clock | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive (or None for no pacing)")
        if burst is not None and burst < 1:
            raise ValueError("burst must be at least 1")
        self.rate = rate
        self.burst = float(burst) if burst is not None else 1.0
        self._clock = clock
        self._sleep: Sleep = sleep or asyncio.sleep
        self._tokens = self.burst
        self._last: float | None = None  # clock reading the bucket was last filled up to
        self._lock = asyncio.Lock()

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    async def acquire(self) -> None:
        if self.rate is None:
            return
        rate = self.rate
        started = self._now()
        async with self._lock:
            now = self._now()
            if self._last is not None:
                self._tokens = min(self.burst, self._tokens + (now - self._last) * rate)
            self._last = now
            if self._tokens >= 1:
                self._tokens -= 1
            else:
                wait = (1 - self._tokens) / rate
                await self._sleep(wait)
                # The token that accrued by now + wait is spent. The time the sleep
                # overshot keeps accruing: resetting the clock to the wake-up time
                # would lose it and pace below the rate.
                self._tokens = 0.0
                self._last = now + wait
        PACING_WAIT.observe(max(0.0, self._now() - started))
