"""The replay tools' pacing (``Pacer``) and progress line (``Progress``), on a clock the
test drives: no Kafka, no real waiting."""

from __future__ import annotations

import io

import pytest

from imbot.core.errors import ConfigurationError
from imbot.streams.reader import Pacer, Progress


class Clock:
    """A monotonic clock that moves only when something sleeps on it."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_pacer_spaces_records_one_slot_apart() -> None:
    clock = Clock()
    pacer = Pacer(4, clock=clock, sleep=clock.sleep)

    for _ in range(5):
        await pacer.wait()

    assert clock.slept == pytest.approx([0.25] * 4)  # the first goes at once
    assert clock.now == pytest.approx(101.0)


async def test_pacer_lets_a_slow_producer_go_without_waiting() -> None:
    clock = Clock()
    pacer = Pacer(10, clock=clock, sleep=clock.sleep)
    await pacer.wait()
    clock.now += 1.0  # the tool was busy longer than a slot
    await pacer.wait()
    await pacer.wait()
    assert clock.slept == pytest.approx([0.1])  # no burst saved up: one slot, then pace


async def test_no_rate_never_waits() -> None:
    clock = Clock()
    pacer = Pacer(None, clock=clock, sleep=clock.sleep)
    for _ in range(100):
        await pacer.wait()
    assert clock.slept == []


@pytest.mark.parametrize("rate", [0, -1])
def test_a_rate_must_be_positive(rate: float) -> None:
    with pytest.raises(ConfigurationError, match="--rate"):
        Pacer(rate)


def test_progress_line_names_done_total_rate_and_eta() -> None:
    clock = Clock()
    stream = io.StringIO()
    progress = Progress("replay", stream=stream, interval_s=0, clock=clock)
    progress.start(1000, exact=True)
    clock.now += 2.0

    progress.update(250, 240)

    assert stream.getvalue() == (
        "replay: 250/1000 records  25%  125.0/s  ETA 0:00:06  240 produced\n"
    )


def test_an_estimated_total_is_marked_and_grows_with_what_was_read() -> None:
    clock = Clock()
    progress = Progress("replay", stream=io.StringIO(), clock=clock)
    progress.start(10, exact=False)
    # The embedded broker's end offsets can be too low: the count passes the estimate.
    assert (
        progress.render(12, 12, elapsed=1.0) == "replay: 12/~12 records  100%  12.0/s  12 produced"
    )
    progress.start(3601, exact=False)
    assert "1/~3601 records  0%  1.0/s  ETA 1:00:00" in progress.render(1, 0, elapsed=1.0)


def test_progress_is_throttled_and_rewrites_one_line_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    clock = Clock()
    stream = Terminal()
    progress = Progress("replay", stream=stream, interval_s=0.5, clock=clock)
    progress.start(100, exact=True)
    for _ in range(10):
        clock.now += 0.1
        progress.update(10, 10)
    progress.update(100, 100, final=True)

    text = stream.getvalue()
    assert progress.lines == 3  # the first, one half a second later, and the final one
    assert text.count("\r") == 3
    assert "\n" not in text[:-1]  # one line, rewritten in place …
    assert text.endswith("100 produced\n")  # … ended when the replay ends
