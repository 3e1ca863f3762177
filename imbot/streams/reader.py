"""Reading a slice of our topics once, for the operator tools (replay, trace, dlq).

``SliceReader`` reads some topics' records inside ``Bounds`` (partition, offset range,
time range) with a plain consumer — no consumer group, no commits: it assigns
partitions and seeks — so a tool never disturbs the stages' groups.

Where a slice ends. Without ``to_offset``/``until`` it ends where the partition was
when the tool started: a real cluster's end offsets say so; the embedded broker's do
not (they are too low after multi-record batches, see the embedded-kafka reference),
so there a partition ends when the consumer has caught up with the high-water mark
reported by its fetches, or at the first record written after the tool started
(which also keeps a replay from reading its own output, on a busy topic too). A poll
that brings nothing for ``idle_s`` ends the read whatever the state; the stats name
the partitions that were not finished.

Also here: what every tool needs to look at a record (our base topic names, the
envelope when there is one, the JSON form of an id to match raw bytes), and how fast
and how far a tool works through a slice (``Pacer``, ``Progress``).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from imbot.core.envelope import Envelope, decode_envelope
from imbot.core.errors import ConfigurationError, UndecodableError
from imbot.core.kafka import consumer_kwargs
from imbot.core.settings import Settings
from imbot.streams.pipeline import TOPICS

DEFAULT_IDLE_S = 2.0
_POLL_MS = 100

ConsumerRecord = Any  # aiokafka.structs.ConsumerRecord (aiokafka ships no type hints)
Output = Callable[[dict[str, Any]], None]


def print_json(line: dict[str, Any]) -> None:
    print(orjson.dumps(line).decode(), flush=True)


def iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


# -- the slice ----------------------------------------------------------------

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, *, now_ms: float | None = None) -> int:
    """A point in time as ms epoch: ISO 8601 (local time without an offset),
    ms epoch digits, or an age such as ``15m``, ``2h``, ``1d`` (before now)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    if match := _RELATIVE.fullmatch(text):
        now = time.time() * 1000 if now_ms is None else now_ms
        return int(now - float(match[1]) * _UNIT_S[match[2]] * 1000)
    try:
        return int(datetime.fromisoformat(text).timestamp() * 1000)
    except ValueError:
        raise ConfigurationError(
            f"not a time: {text!r} (ISO 8601, ms epoch, or an age like 15m / 2h)"
        ) from None


@dataclass(frozen=True)
class Bounds:
    """Which records of a topic to read. Offsets are inclusive, times are [since, until)."""

    partition: int | None = None
    from_offset: int | None = None
    to_offset: int | None = None
    since_ms: int | None = None
    until_ms: int | None = None

    def __post_init__(self) -> None:
        if self.from_offset is not None and self.from_offset < 0:
            raise ConfigurationError("--from-offset must be >= 0")
        if (
            self.from_offset is not None
            and self.to_offset is not None
            and self.to_offset < self.from_offset
        ):
            raise ConfigurationError("--to-offset is before --from-offset")
        if (
            self.since_ms is not None
            and self.until_ms is not None
            and self.until_ms <= self.since_ms
        ):
            raise ConfigurationError("--until is not after --since")


async def connect(client: Any, settings: Settings) -> None:
    """Start a Kafka client; an unreachable broker is the operator's configuration error."""
    try:
        await client.start()
    except KafkaError as exc:
        with contextlib.suppress(Exception):
            await client.stop()
        raise ConfigurationError(
            f"cannot reach Kafka at {settings.kafka_bootstrap} (IMBOT_KAFKA_BOOTSTRAP): {exc}"
        ) from None


@dataclass
class _Partition:
    tp: TopicPartition
    stop_offset: int | None  # exclusive
    start: int = 0
    end_at_start: int = 0  # the broker's end offset when the tool started (a hint only)
    done: bool = False


@dataclass
class ReadStats:
    read: int = 0  # records fetched inside the bounds
    scanned: int = 0  # records fetched, inside the bounds or skipped as older than `since`
    stopped: str = "end"  # end | idle | limit
    unfinished: list[str] = field(default_factory=list)  # "topic/partition" left by idle


class SliceReader:
    """Reads ``bounds`` of some topics once, with no consumer group and no commits."""

    def __init__(
        self,
        settings: Settings,
        topic_names: Sequence[str],
        bounds: Bounds,
        *,
        missing_ok: bool = False,
        idle_s: float = DEFAULT_IDLE_S,
    ) -> None:
        self.settings = settings
        self.topic_names = tuple(topic_names)
        self.bounds = bounds
        self.missing_ok = missing_ok
        self.idle_s = idle_s
        self.stats = ReadStats()
        # A record stamped after this millisecond was written after the tool started.
        self._after_start_ms = int(time.time() * 1000) + 1
        self._consumer = AIOKafkaConsumer(
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id="imbot-replay",
            **consumer_kwargs(settings),
        )
        self._parts: dict[TopicPartition, _Partition] = {}

    async def __aenter__(self) -> SliceReader:
        await connect(self._consumer, self.settings)
        try:
            await self._assign()
        except BaseException:
            await self._consumer.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    def estimated_total(self) -> tuple[int, bool]:
        """How many records the slice holds, and whether that is exact (ask before reading).

        Exact on a real cluster without time bounds (the end offsets at start bound it);
        an estimate otherwise: ``until`` may end a partition earlier, and the embedded
        broker's end offsets may be too low (a count that passes it only grows).
        """
        total = 0
        for part in self._parts.values():
            if part.done:
                continue
            stop = part.stop_offset if part.stop_offset is not None else part.end_at_start
            total += max(0, stop - part.start)
        exact = not self.settings.kafka_embedded and self.bounds.until_ms is None
        return total, exact

    async def _assign(self) -> None:
        consumer, bounds = self._consumer, self.bounds
        existing = await consumer.topics()
        tps: list[TopicPartition] = []
        for name in self.topic_names:
            if name not in existing:
                if self.missing_ok:
                    continue
                raise ConfigurationError(f"topic {name} does not exist")
            partitions = sorted(consumer.partitions_for_topic(name) or ())
            if bounds.partition is not None:
                if bounds.partition not in partitions:
                    raise ConfigurationError(
                        f"topic {name} has no partition {bounds.partition} (it has {len(partitions)})"
                    )
                partitions = [bounds.partition]
            tps.extend(TopicPartition(name, p) for p in partitions)
        if not tps:
            return
        consumer.assign(tps)
        beginning = await consumer.beginning_offsets(tps)
        end = await consumer.end_offsets(tps)
        by_time: dict[TopicPartition, Any] = {}
        if bounds.since_ms is not None:
            by_time = await consumer.offsets_for_times({tp: bounds.since_ms for tp in tps})
        for tp in tps:
            self._parts[tp] = part = self._plan(tp, beginning[tp], end[tp], by_time.get(tp))
            if not part.done:
                consumer.seek(tp, part.start)
        done = [p.tp for p in self._parts.values() if p.done]
        if done:
            consumer.pause(*done)

    def _plan(self, tp: TopicPartition, beginning: int, end: int, found: Any) -> _Partition:
        """Where to start reading one partition and where to stop."""
        bounds = self.bounds
        start = beginning
        if bounds.from_offset is not None:
            start = max(start, bounds.from_offset)
        part = _Partition(tp, stop_offset=None, end_at_start=end)
        if bounds.since_ms is not None:
            # No record at or after `since`: aiokafka says None; the embedded broker
            # answers offset 0 with timestamp -1 instead.
            if found is None or found.timestamp < 0:
                part.done = True
            else:
                start = max(start, found.offset)
        stops = []
        if bounds.to_offset is not None:
            stops.append(bounds.to_offset + 1)
        if not self.settings.kafka_embedded:
            stops.append(end)  # trustworthy on a real cluster: where it was at start
        part.stop_offset = min(stops) if stops else None
        part.start = start
        if part.stop_offset is not None and start >= part.stop_offset:
            part.done = True
        return part

    @property
    def _ts_stop(self) -> int | None:
        """Records stamped at or after this end their partition."""
        stops = [self.bounds.until_ms] if self.bounds.until_ms is not None else []
        if self.settings.kafka_embedded:
            stops.append(self._after_start_ms)  # end offsets cannot be trusted there
        return min(stops) if stops else None

    async def batches(self) -> AsyncIterator[list[ConsumerRecord]]:
        """Records inside the bounds, one list per poll, each partition in offset order."""
        consumer = self._consumer
        idle_since = time.monotonic()
        while True:
            active = [p for p in self._parts.values() if not p.done]
            if not active:
                self.stats.stopped = "end"
                return
            fetched = await consumer.getmany(*(p.tp for p in active), timeout_ms=_POLL_MS)
            out: list[ConsumerRecord] = []
            for tp, records in fetched.items():
                out.extend(self._inside(self._parts[tp], records))
            for part in active:
                if not part.done and await self._caught_up(part):
                    self._finish(part)
            self.stats.read += len(out)
            if fetched:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.idle_s:
                self.stats.stopped = "idle"
                self.stats.unfinished = [
                    f"{p.tp.topic}/{p.tp.partition}" for p in self._parts.values() if not p.done
                ]
                return
            if out:
                yield out

    def _inside(self, part: _Partition, records: list[ConsumerRecord]) -> list[ConsumerRecord]:
        """The fetched records inside the bounds; the first one past them ends ``part``."""
        since, ts_stop = self.bounds.since_ms, self._ts_stop
        kept: list[ConsumerRecord] = []
        for record in records:
            if (part.stop_offset is not None and record.offset >= part.stop_offset) or (
                ts_stop is not None and record.timestamp >= ts_stop
            ):
                self._finish(part)
                break
            self.stats.scanned += 1
            if since is not None and record.timestamp < since:
                continue  # an older record after the first one at `since`
            kept.append(record)
        return kept

    async def _caught_up(self, part: _Partition) -> bool:
        position = await self._consumer.position(part.tp)
        highwater = self._consumer.highwater(part.tp)  # from a fetch made after we started
        return (part.stop_offset is not None and position >= part.stop_offset) or (
            highwater is not None and position >= highwater
        )

    def _finish(self, part: _Partition) -> None:
        part.done = True
        self._consumer.pause(part.tp)


# -- looking at a record ------------------------------------------------------


def base_topic(name: str, settings: Settings) -> str | None:
    """``imbot.routed`` for ``imbot.routed`` or ``<prefix>imbot.routed``; None if not ours."""
    prefix = settings.topic_prefix
    if prefix and name.startswith(prefix) and name[len(prefix) :] in TOPICS:
        return name[len(prefix) :]
    return name if name in TOPICS else None


def envelope_or_none(raw: bytes | None) -> Envelope | None:
    try:
        return decode_envelope(raw)
    except UndecodableError:
        return None


def needle(text: str) -> bytes:
    """``text`` as JSON writes it inside a string. An id with no quote or backslash in it
    (Easemob's are digits) reads the same when a DLQ record nests the envelope once more."""
    return orjson.dumps(text)[1:-1]


def key_text(key: bytes | None) -> str | None:
    return key.decode("utf-8", "replace") if key is not None else None


# -- how fast, how far --------------------------------------------------------


class Pacer:
    """At most ``rate`` records per second: a token bucket holding one token.

    An operator replaying into a live pipeline limits what the stages (and the model
    provider behind them) get on top of real traffic. The first record goes at once;
    each next one waits for its slot, so N records take about (N - 1) / rate seconds.
    """

    def __init__(
        self,
        rate: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        if rate is not None and rate <= 0:
            raise ConfigurationError("--rate must be above 0 (records per second)")
        self.rate = rate
        self._clock = clock
        self._sleep = sleep
        self._next: float | None = None

    async def wait(self) -> None:
        if self.rate is None:
            return
        now = self._clock()
        if self._next is not None and self._next > now:
            await self._sleep(self._next - now)
            now = self._next
        self._next = now + 1 / self.rate


class Progress:
    """One progress line on a stream (stderr): records done of the slice, rate, ETA.

    On a terminal the line is rewritten in place (a carriage return); elsewhere
    (``--progress`` into a log) it is one line per ``interval_s``. It never names a
    record's content, only counts.
    """

    def __init__(
        self,
        label: str,
        *,
        stream: TextIO | None = None,
        interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self._clock = clock
        self._started = clock()
        self._last = float("-inf")
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total: int | None = None
        self.exact = False
        self.lines = 0

    def start(self, total: int, *, exact: bool) -> None:
        self.total, self.exact = total, exact
        self._started = self._clock()

    def update(self, done: int, produced: int, *, final: bool = False) -> None:
        now = self._clock()
        if not final and now - self._last < self.interval_s:
            return
        self._last = now
        text = self.render(done, produced, elapsed=now - self._started)
        if self._tty:
            self.stream.write(f"\r\x1b[2K{text}" + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self.lines += 1

    def render(self, done: int, produced: int, *, elapsed: float) -> str:
        rate = done / elapsed if elapsed > 0 else 0.0
        total = max(self.total or 0, done)
        approx = "" if self.exact else "~"
        parts = [f"{self.label}: {done}/{approx}{total} records"]
        if total:
            parts.append(f"{100 * done / total:.0f}%")
        parts.append(f"{rate:.1f}/s")
        remaining = total - done
        if remaining > 0 and rate > 0:
            parts.append(f"ETA {_clock_text(remaining / rate)}")
        parts.append(f"{produced} produced")
        return "  ".join(parts)


def _clock_text(seconds: float) -> str:
    whole = int(seconds + 0.5)
    hours, rest = divmod(whole, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
