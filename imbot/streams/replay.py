"""Operator tools: replay a slice of a topic through a stage; trace one msg_id everywhere.

``imbot replay`` reads a slice of one pipeline topic (by partition, offset range,
time range, conversation or msg_id) with a plain consumer — no consumer group, no
commits: it assigns partitions and seeks — and re-produces each selected record
with its original key to the input topic of a stage. A DLQ record goes back, as
the original bytes it holds, to the input of the stage that failed it. Replaying
is safe because every stage is idempotent per msg_id and the sender's delivery
ledger never sends a part twice, nor a second, different reply to a message the
user already has an answer for (so a replay after a fallback reply is recorded,
not delivered). Replaying through the model stage does call the model again.

``imbot trace`` scans every pipeline topic for one msg_id (raw bytes are matched
before anything is decoded, so a busy topic costs a scan, not a decode per
record) and returns each stage's view of the message in time order.

Where a slice ends. Without ``--to-offset``/``--until`` it ends where the
partition was when the tool started: a real cluster's end offsets say so; the
embedded broker's do not (they are too low after multi-record batches, see the
embedded-kafka reference), so there a partition ends when the consumer has caught
up with the high-water mark reported by its fetches, or at the first record
written after the tool started (which also keeps a replay from reading its own
output, on a busy topic too). A poll that brings nothing for ``idle_s`` ends the
read whatever the state; the summary names partitions that were not finished.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from imbot.core import topics
from imbot.core.envelope import DlqRecord, Envelope, decode_envelope
from imbot.core.errors import ConfigurationError, UndecodableError
from imbot.core.kafka import consumer_kwargs, new_producer
from imbot.core.settings import Settings
from imbot.streams.pipeline import BY_NAME, STAGE_NAMES, TOPICS, stage_reading

DEFAULT_IDLE_S = 2.0
_POLL_MS = 100

ConsumerRecord = Any  # aiokafka.structs.ConsumerRecord (aiokafka ships no type hints)
Output = Callable[[dict[str, Any]], None]


def print_json(line: dict[str, Any]) -> None:
    print(orjson.dumps(line).decode(), flush=True)


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


async def _connect(client: Any, settings: Settings) -> None:
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
    done: bool = False


@dataclass
class ReadStats:
    read: int = 0  # records fetched inside the bounds
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
        await _connect(self._consumer, self.settings)
        try:
            await self._assign()
        except BaseException:
            await self._consumer.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

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
            start = beginning[tp]
            if bounds.from_offset is not None:
                start = max(start, bounds.from_offset)
            part = _Partition(tp, stop_offset=None)
            if bounds.since_ms is not None:
                found = by_time.get(tp)
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
                stops.append(end[tp])  # trustworthy on a real cluster: where it was at start
            part.stop_offset = min(stops) if stops else None
            if part.stop_offset is not None and start >= part.stop_offset:
                part.done = True
            self._parts[tp] = part
            if not part.done:
                consumer.seek(tp, start)
        done = [p.tp for p in self._parts.values() if p.done]
        if done:
            consumer.pause(*done)

    @property
    def _ts_stop(self) -> int | None:
        """Records stamped at or after this end their partition."""
        stops = [self.bounds.until_ms] if self.bounds.until_ms is not None else []
        if self.settings.kafka_embedded:
            stops.append(self._after_start_ms)  # end offsets cannot be trusted there
        return min(stops) if stops else None

    async def batches(self) -> AsyncIterator[list[ConsumerRecord]]:
        """Records inside the bounds, one list per poll, each partition in offset order."""
        consumer, since, ts_stop = self._consumer, self.bounds.since_ms, self._ts_stop
        idle_since = time.monotonic()
        while True:
            active = [p for p in self._parts.values() if not p.done]
            if not active:
                self.stats.stopped = "end"
                return
            fetched = await consumer.getmany(*(p.tp for p in active), timeout_ms=_POLL_MS)
            out: list[ConsumerRecord] = []
            for tp, records in fetched.items():
                part = self._parts[tp]
                for record in records:
                    if (part.stop_offset is not None and record.offset >= part.stop_offset) or (
                        ts_stop is not None and record.timestamp >= ts_stop
                    ):
                        self._finish(part)
                        break
                    if since is not None and record.timestamp < since:
                        continue  # an older record after the first one at `since`
                    out.append(record)
            for part in active:
                if part.done:
                    continue
                position = await consumer.position(part.tp)
                highwater = consumer.highwater(part.tp)  # from a fetch made after we started
                if (part.stop_offset is not None and position >= part.stop_offset) or (
                    highwater is not None and position >= highwater
                ):
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

    def _finish(self, part: _Partition) -> None:
        part.done = True
        self._consumer.pause(part.tp)


# -- replay -------------------------------------------------------------------


@dataclass
class ReplaySummary:
    topic: str
    read: int = 0
    selected: int = 0
    replayed: int = 0
    skipped: int = 0
    dry_run: bool = False
    targets: dict[str, int] = field(default_factory=dict)
    stopped: str = "end"
    unfinished: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"summary": asdict(self)}


@dataclass(frozen=True)
class _Selected:
    record: ConsumerRecord
    msg_id: str | None
    conversation: str | None
    value: bytes | None  # what to re-produce (a DLQ record's original bytes)
    target: str | None  # base topic, None when it cannot be replayed
    stage: str | None  # the stage that reads `target`
    skip: str | None = None


def _base_topic(name: str, settings: Settings) -> str | None:
    """``imbot.routed`` for ``imbot.routed`` or ``<prefix>imbot.routed``; None if not ours."""
    prefix = settings.topic_prefix
    if prefix and name.startswith(prefix) and name[len(prefix) :] in TOPICS:
        return name[len(prefix) :]
    return name if name in TOPICS else None


def _dlq_payload(rec: DlqRecord) -> bytes | None:
    if rec.value is not None:
        return rec.value.encode("utf-8")  # the boundary stored valid UTF-8 as text
    if rec.value_b64 is not None:
        try:
            return base64.b64decode(rec.value_b64, validate=True)
        except binascii.Error:
            return None
    return None


def _envelope_or_none(raw: bytes | None) -> Envelope | None:
    try:
        return decode_envelope(raw)
    except UndecodableError:
        return None


def _dlq_or_none(raw: bytes | None) -> DlqRecord | None:
    if raw is None:
        return None
    try:
        return DlqRecord.model_validate_json(raw)
    except ValidationError:
        return None


def _needle(text: str) -> bytes:
    """``text`` as JSON writes it inside a string. An id with no quote or backslash in it
    (Easemob's are digits) reads the same when a DLQ record nests the envelope once more."""
    return orjson.dumps(text)[1:-1]


async def replay(
    settings: Settings,
    topic: str,
    bounds: Bounds | None = None,
    *,
    conversation: str | None = None,
    msg_id: str | None = None,
    to_stage: str | None = None,
    dry_run: bool = False,
    limit: int | None = None,
    out: Output = print_json,
    idle_s: float = DEFAULT_IDLE_S,
) -> ReplaySummary:
    """Re-produce the selected records of ``topic`` (a base name) to a stage's input.

    Prints (``out``) one line per replayed or unreplayable selected record and
    returns the summary. ``to_stage`` overrides the default target: the topic
    itself (replayed through the stage that reads it), or for a DLQ record the
    input of the stage that failed it.
    """
    base = _base_topic(topic, settings)
    if base is None:
        raise ConfigurationError(f"unknown topic {topic!r}; one of: {', '.join(TOPICS)}")
    if to_stage is not None and to_stage not in BY_NAME:
        raise ConfigurationError(f"unknown stage {to_stage!r}; one of: {', '.join(STAGE_NAMES)}")
    if limit is not None and limit < 1:
        raise ConfigurationError("--limit must be at least 1")
    forced = BY_NAME[to_stage].input if to_stage is not None else None
    if forced is None and base != topics.DLQ and stage_reading(base) is None:
        raise ConfigurationError(f"no stage reads {base}; choose one with --to-stage")
    summary = ReplaySummary(topic=settings.topic(base), dry_run=dry_run)
    conv_key = conversation.encode() if conversation is not None else None
    id_needle = _needle(msg_id) if msg_id is not None else None

    def select(record: ConsumerRecord) -> _Selected | None:
        raw: bytes | None = record.value
        if conv_key is not None and record.key != conv_key:
            return None  # every topic is keyed by conversation id (DLQ: the original key)
        if id_needle is not None and (raw is None or id_needle not in raw):
            return None
        if base == topics.DLQ:
            return _select_dlq(record, settings, forced)
        env = _envelope_or_none(raw)
        if msg_id is not None and (env is None or env.msg_id != msg_id):
            return None
        target = forced or base
        return _Selected(
            record,
            msg_id=env.msg_id if env else None,
            conversation=env.conversation_id if env else _key_text(record.key),
            value=raw,
            target=target,
            stage=stage_reading(target),
        )

    producer = None if dry_run else new_producer(settings)
    if producer is not None:
        await _connect(producer, settings)
    try:
        names = [settings.topic(base)]
        async with SliceReader(settings, names, bounds or Bounds(), idle_s=idle_s) as reader:
            async for batch in reader.batches():
                chosen: list[_Selected] = []
                for record in batch:
                    picked = select(record)
                    if picked is None or (msg_id is not None and picked.msg_id != msg_id):
                        continue
                    chosen.append(picked)
                    if picked.skip is None:
                        summary.replayed += 1
                        if limit is not None and summary.replayed >= limit:
                            break
                summary.selected += len(chosen)
                await _produce(producer, settings, chosen, summary, out)
                if limit is not None and summary.replayed >= limit:
                    reader.stats.stopped = "limit"
                    break
            summary.read = reader.stats.read
            summary.stopped = reader.stats.stopped
            summary.unfinished = reader.stats.unfinished
    finally:
        if producer is not None:
            await producer.stop()
    return summary


def _select_dlq(record: ConsumerRecord, settings: Settings, forced: str | None) -> _Selected:
    rec = _dlq_or_none(record.value)
    if rec is None:
        return _Selected(record, None, None, None, None, None, skip="not a DLQ record")
    value = _dlq_payload(rec)
    original = _envelope_or_none(value)
    msg_id = rec.msg_id or (original.msg_id if original else None)
    conversation = rec.conversation_id or (original.conversation_id if original else rec.key)
    target = forced
    if target is None:
        stage = BY_NAME.get(rec.stage)
        target = stage.input if stage is not None else _base_topic(rec.topic, settings)
    skip = None
    if target is None:
        skip = f"unknown stage {rec.stage!r} and topic {rec.topic!r}"
    elif value is None:
        skip = "the DLQ record holds no payload (too large, or the original had no value)"
    stage_name = stage_reading(target) if target else None
    return _Selected(record, msg_id, conversation, value, target, stage_name, skip=skip)


def _key_text(key: bytes | None) -> str | None:
    return key.decode("utf-8", "replace") if key is not None else None


async def _produce(
    producer: Any,
    settings: Settings,
    chosen: Sequence[_Selected],
    summary: ReplaySummary,
    out: Output,
) -> None:
    # Send the batch before waiting for acks (order per partition is kept), then report.
    pending: list[tuple[_Selected, asyncio.Future[Any] | None]] = []
    for picked in chosen:
        future = None
        if producer is not None and picked.skip is None and picked.target is not None:
            future = await producer.send(
                settings.topic(picked.target), picked.value, key=picked.record.key
            )
        pending.append((picked, future))
    for picked, future in pending:
        record = picked.record
        line: dict[str, Any] = {
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "msg_id": picked.msg_id,
            "conversation": picked.conversation,
            "target": settings.topic(picked.target) if picked.target else None,
            "stage": picked.stage,
        }
        if picked.skip is not None:
            summary.skipped += 1
            line["skipped"] = picked.skip
        else:
            assert picked.target is not None
            target = settings.topic(picked.target)
            summary.targets[target] = summary.targets.get(target, 0) + 1
            if future is None:
                line["dry_run"] = True
            else:
                meta = await future
                line["target_partition"] = meta.partition
                line["target_offset"] = meta.offset
        out(line)


# -- trace --------------------------------------------------------------------


def _iso(ms: float) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _verdict(v: Any) -> dict[str, Any]:
    return {"action": v.action, "categories": list(v.categories), "rules": list(v.rules)}


def envelope_view(env: Envelope) -> dict[str, Any]:
    """What a stage knew about the message: no user text, only its shape and decisions."""
    view: dict[str, Any] = {
        "msg_id": env.msg_id,
        "conversation": env.conversation_id,
        "content": {"type": env.content.type, "text_len": len(env.content.text or "")},
        "received_at": _iso(env.received_at),
        "stamps": {stage: _iso(ms) for stage, ms in env.stamps.items()},
    }
    if env.moderation_in is not None:
        view["moderation_in"] = _verdict(env.moderation_in)
    if env.route is not None:
        view["route"] = {
            "route": env.route.route,
            "models": list(env.route.models),
            "history_turns": len(env.route.history),
        }
    if (c := env.completion) is not None:
        view["completion"] = {
            "model": c.model,
            "provider": c.provider,
            "finish_reason": c.finish_reason,
            "input_tokens": c.input_tokens,
            "output_tokens": c.output_tokens,
            "cost": c.cost,
            "currency": c.currency,
            "latency_ms": c.latency_ms,
            "attempts": c.attempts,
            "text_len": len(c.text),
        }
    if env.moderation_out is not None:
        view["moderation_out"] = _verdict(env.moderation_out)
    if env.reply is not None:
        view["reply"] = {"kind": env.reply.kind, "text_len": len(env.reply.text)}
    if (d := env.delivery) is not None:
        view["delivery"] = {
            "parts": d.parts,
            "duplicate": d.duplicate,
            "easemob_msg_ids": list(d.easemob_msg_ids),
        }
    return view


def dlq_view(rec: DlqRecord) -> dict[str, Any]:
    payload = _dlq_payload(rec)
    view: dict[str, Any] = {
        "dlq": {
            "stage": rec.stage,
            "error_kind": rec.error_kind,
            "error": rec.error,
            "attempts": rec.attempts,
            "source": {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset},
            "at": _iso(rec.at),
            "payload_bytes": len(payload) if payload is not None else None,
        },
        "msg_id": rec.msg_id,
        "conversation": rec.conversation_id,
    }
    original = _envelope_or_none(payload)
    if original is not None:
        view.update(envelope_view(original))
    return view


@dataclass
class TraceResult:
    msg_id: str
    views: list[dict[str, Any]]
    scanned: int
    stopped: str
    unfinished: list[str]

    def summary(self) -> dict[str, Any]:
        return {
            "summary": {
                "msg_id": self.msg_id,
                "records": len(self.views),
                "scanned": self.scanned,
                "stopped": self.stopped,
                "unfinished": self.unfinished,
            }
        }


async def trace(
    settings: Settings,
    msg_id: str,
    *,
    since_ms: int | None = None,
    until_ms: int | None = None,
    idle_s: float = DEFAULT_IDLE_S,
) -> TraceResult:
    """Every record of ``msg_id`` on every pipeline topic, DLQ included, in time order."""
    needle = _needle(msg_id)
    order = {settings.topic(base): i for i, base in enumerate(TOPICS)}
    found: list[tuple[tuple[int, float, int, int, int], dict[str, Any]]] = []
    bounds = Bounds(since_ms=since_ms, until_ms=until_ms)
    names = [settings.topic(base) for base in TOPICS]
    async with SliceReader(settings, names, bounds, missing_ok=True, idle_s=idle_s) as reader:
        async for batch in reader.batches():
            for record in batch:
                raw: bytes | None = record.value
                if raw is None or needle not in raw:
                    continue
                seen = _trace_view(record, raw, msg_id, settings)
                if seen is not None:
                    written, view = seen
                    where = (order[record.topic], record.partition, record.offset)
                    found.append(((record.timestamp, written, *where), view))
    found.sort(key=lambda item: item[0])
    stats = reader.stats
    return TraceResult(msg_id, [v for _, v in found], stats.read, stats.stopped, stats.unfinished)


def _trace_view(
    record: ConsumerRecord, raw: bytes, msg_id: str, settings: Settings
) -> tuple[float, dict[str, Any]] | None:
    """The record's view and when its writer made it (orders records stamped in one ms)."""
    head: dict[str, Any] = {
        "time": _iso(record.timestamp),
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": _key_text(record.key),
    }
    if _base_topic(record.topic, settings) == topics.DLQ:
        rec = _dlq_or_none(raw)
        if rec is None:
            return record.timestamp, {**head, "undecodable": "not a DLQ record"}
        view = dlq_view(rec)
        if view["msg_id"] == msg_id:
            return rec.at, {**head, **view}
        if view["msg_id"] is None:
            # The failed bytes were no envelope: the id only appears in them.
            return rec.at, {**head, **view, "match": "bytes"}
        return None
    env = _envelope_or_none(raw)
    if env is None:
        return record.timestamp, {**head, "undecodable": "not an envelope"}
    if env.msg_id != msg_id:
        return None
    view = envelope_view(env)
    view["since_received_ms"] = round(record.timestamp - env.received_at, 1)
    return max(env.stamps.values(), default=env.received_at), {**head, **view}
