"""The token bucket, checked on a virtual clock (exact arithmetic, no waiting) and on the loop clock."""

from __future__ import annotations

import asyncio
import time

import pytest

from imbot.sender.pacing import Pacer

SECOND = 1.0 - 1e-9


class VirtualClock:
    """A clock that moves only when someone sleeps; ``overshoot`` models a late wake-up."""

    def __init__(self, overshoot: float = 0.0) -> None:
        self.now = 0.0
        self.overshoot = overshoot
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds + self.overshoot
        await asyncio.sleep(0)


async def _stamps(pacer: Pacer, clock: VirtualClock, n: int, concurrency: int = 8) -> list[float]:
    stamps: list[float] = []
    remaining = iter(range(n))

    async def caller() -> None:
        for _ in remaining:
            await pacer.acquire()
            stamps.append(clock())

    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return sorted(stamps)


def _busiest(stamps: list[float], window: float) -> int:
    """Most calls in any closed window of ``window`` seconds.

    A token bucket bounds it by ``burst + rate * window``; windows a hair shorter
    than a second (``SECOND``) therefore hold at most ``rate`` calls with burst 1.
    """
    best, j = 0, 0
    for i, t in enumerate(stamps):
        while stamps[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


async def test_sustained_rate_holds_and_no_window_exceeds_it() -> None:
    clock = VirtualClock()
    pacer = Pacer(rate=100, burst=1, clock=clock, sleep=clock.sleep)
    stamps = await _stamps(pacer, clock, 2001)
    assert stamps[-1] - stamps[0] == pytest.approx(20.0)  # 2,000 intervals of 10 ms
    assert _busiest(stamps, SECOND) <= 100
    assert _busiest(stamps, 1.0) <= 1 + 100
    assert _busiest(stamps, 0.1 - 1e-9) <= 10


async def test_late_wake_ups_do_not_pace_below_the_rate() -> None:
    # Each sleep overshoots by 3 ms (30% of the 10 ms interval): the bucket keeps
    # the overshoot, so the next wait is shorter and the long-run rate still holds.
    clock = VirtualClock(overshoot=0.003)
    pacer = Pacer(rate=100, burst=1, clock=clock, sleep=clock.sleep)
    stamps = await _stamps(pacer, clock, 1001)
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    assert 97 <= rate <= 100.0001
    assert _busiest(stamps, SECOND) <= 100


async def test_burst_passes_at_once_then_the_rate_applies() -> None:
    clock = VirtualClock()
    pacer = Pacer(rate=10, burst=5, clock=clock, sleep=clock.sleep)
    stamps = await _stamps(pacer, clock, 25, concurrency=1)
    assert stamps[:5] == [0.0] * 5
    assert stamps[5] == pytest.approx(0.1)
    assert stamps[-1] == pytest.approx(2.0)
    # burst + rate * T bounds every window
    assert _busiest(stamps, 1.0) <= 5 + 10


async def test_idle_time_refills_the_bucket_only_up_to_the_burst() -> None:
    clock = VirtualClock()
    pacer = Pacer(rate=10, burst=3, clock=clock, sleep=clock.sleep)
    await _stamps(pacer, clock, 3, concurrency=1)
    clock.now += 60  # a minute idle
    start = clock.now
    stamps = await _stamps(pacer, clock, 6, concurrency=1)
    assert [round(s - start, 6) for s in stamps] == [0, 0, 0, 0.1, 0.2, 0.3]


async def test_unpaced_never_waits() -> None:
    clock = VirtualClock()
    pacer = Pacer(rate=None, clock=clock, sleep=clock.sleep)
    await asyncio.gather(*(pacer.acquire() for _ in range(10_000)))
    assert clock.sleeps == 0


async def test_a_cancelled_waiter_does_not_spend_a_token() -> None:
    clock = VirtualClock()
    gate = asyncio.Event()

    async def slow_sleep(seconds: float) -> None:
        await gate.wait()
        clock.now += seconds

    pacer = Pacer(rate=10, burst=1, clock=clock, sleep=slow_sleep)
    await pacer.acquire()  # the burst token
    waiter = asyncio.create_task(pacer.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    clock.now += 0.1  # one token accrued
    gate.set()
    await pacer.acquire()  # gets it at once: the cancelled waiter did not take it
    assert clock.now == pytest.approx(0.1)


async def test_on_the_event_loop_clock_calls_are_spaced_by_the_rate() -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(rate=200, burst=1)
    stamps: list[float] = []

    async def call() -> None:
        await pacer.acquire()
        stamps.append(loop.time())

    await asyncio.gather(*(call() for _ in range(41)))
    stamps.sort()
    # asyncio may wake this much early (its loops take their resolution from this clock)
    resolution = time.get_clock_info("monotonic").resolution
    assert stamps[-1] - stamps[0] >= 40 / 200 - 40 * resolution
    assert stamps[-1] - stamps[0] < 40 / 200 + 0.5  # and not much slower, even on a busy box


@pytest.mark.parametrize(("rate", "burst"), [(0, None), (-1, None), (10, 0.5)])
def test_nonsense_settings_are_refused(rate: float, burst: float | None) -> None:
    with pytest.raises(ValueError, match=r"rate|burst"):
        Pacer(rate=rate, burst=burst)
