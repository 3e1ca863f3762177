"""The DLQ, seen and worked off by an operator: ``imbot dlq list|show|requeue``.

``imbot.dlq`` holds each record a stage gave up on (``core.envelope.DlqRecord``): the
original bytes, key, source topic/partition/offset, stage, error and attempts.

* ``list`` prints one line per record with what it is about and why it failed —
  never its original bytes (they are the user's message) — and counts by stage and
  reason.
* ``show`` prints whole records, original bytes included: the operator asked for them.
* ``requeue`` sends each record's original bytes, with its original key, back to the
  input topic of the stage that failed it (the pipeline table says which), exactly as
  they were: no replay mark, so the reply really reaches the user. It marks what it
  requeued with a small record on ``imbot.dlq.requeued`` keyed ``"partition:offset"`` —
  in Kafka, so every operator's machine sees the same marks — and reads every mark
  before it starts, so no record is requeued twice unless forced. A mark is written
  only after the broker acknowledged the requeued record: a tool stopped in between
  leaves a record requeued and unmarked (requeued again next time, which is harmless)
  and never one marked and not requeued (lost). Two operators requeueing the same
  records at the same moment can both send them; that is harmless too, because every
  stage is idempotent per msg_id and the sender's delivery ledger never sends a part
  twice.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from pydantic import ValidationError

from imbot.core import topics
from imbot.core.envelope import DlqRecord, now_ms
from imbot.core.errors import ConfigurationError
from imbot.core.kafka import connection_kwargs, new_producer
from imbot.core.settings import Settings
from imbot.streams.pipeline import BY_NAME
from imbot.streams.reader import (
    DEFAULT_IDLE_S,
    Bounds,
    ConsumerRecord,
    Output,
    Pacer,
    SliceReader,
    base_topic,
    connect,
    iso,
    key_text,
    needle,
    print_json,
)

# The marks of requeued DLQ records (a tools' topic: core.topics.TOOLS, not the pipeline's).
REQUEUED: Final = topics.DLQ_REQUEUED
# Longer than imbot.dlq keeps its records (28 days, deploy/kafka/topics.yaml): a mark that
# went before its record would let the record be requeued twice.
MARKER_RETENTION_MS: Final = 35 * 24 * 3600 * 1000


# -- a DLQ record -------------------------------------------------------------


def dlq_or_none(raw: bytes | None) -> DlqRecord | None:
    if raw is None:
        return None
    try:
        return DlqRecord.model_validate_json(raw)
    except ValidationError:
        return None


def dlq_payload(rec: DlqRecord) -> bytes | None:
    """The original bytes the failed stage read, or None when the record had to drop them."""
    if rec.value is not None:
        return rec.value.encode("utf-8")  # the boundary stored valid UTF-8 as text
    if rec.value_b64 is not None:
        try:
            return base64.b64decode(rec.value_b64, validate=True)
        except binascii.Error:
            return None
    return None


def failed_input(rec: DlqRecord, settings: Settings) -> str | None:
    """The base input topic of the stage that failed ``rec`` (the pipeline table's row;
    the record's own source topic for a stage the table no longer has)."""
    stage = BY_NAME.get(rec.stage)
    return stage.input if stage is not None else base_topic(rec.topic, settings)


def reason_of(rec: DlqRecord) -> str:
    """A FatalError's reason (bad_request, quota_exhausted, …), else the error's kind."""
    return rec.reason or rec.error_kind


@dataclass(frozen=True)
class DlqFilter:
    """Which DLQ records an operator means (the time and offset bounds are ``Bounds``)."""

    stage: str | None = None
    reason: str | None = None  # matches the reason or the error kind
    conversation: str | None = None
    msg_id: str | None = None

    @property
    def empty(self) -> bool:
        return not (self.stage or self.reason or self.conversation or self.msg_id)

    def matches(self, entry: DlqEntry) -> bool:
        rec = entry.record
        if rec is None:
            return self.empty  # an undecodable record matches no filter
        if self.stage is not None and rec.stage != self.stage:
            return False
        if self.reason is not None and self.reason not in (rec.reason, rec.error_kind):
            return False
        if self.msg_id is not None and rec.msg_id != self.msg_id:
            return False
        conversation = rec.conversation_id or rec.key
        return self.conversation is None or conversation == self.conversation


@dataclass(frozen=True)
class Mark:
    """That a DLQ record was requeued: the latest mark, and how many it has."""

    at: float
    run: str
    times: int = 1

    def as_json(self) -> dict[str, Any]:
        return {"at": iso(self.at), "run": self.run, "times": self.times}


@dataclass(frozen=True)
class DlqEntry:
    """One record read from the DLQ (``record`` is None when it is no DLQ record)."""

    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    raw: bytes | None
    record: DlqRecord | None

    @classmethod
    def of(cls, r: ConsumerRecord) -> DlqEntry:
        return cls(r.partition, r.offset, r.timestamp, r.key, r.value, dlq_or_none(r.value))

    @property
    def mark_key(self) -> str:
        return f"{self.partition}:{self.offset}"

    def list_line(self, mark: Mark | None) -> dict[str, Any]:
        """What ``list`` prints: ids, stage, error and counts; never the original bytes."""
        head: dict[str, Any] = {"partition": self.partition, "offset": self.offset}
        rec = self.record
        if rec is None:
            return {**head, "time": iso(self.timestamp), "undecodable": "not a DLQ record"}
        payload = dlq_payload(rec)
        return {
            **head,
            "stage": rec.stage,
            "reason": reason_of(rec),
            "error_kind": rec.error_kind,
            "error": rec.error,  # the boundary keeps user text out of it
            "status": rec.status,
            "attempts": rec.attempts,
            "msg_id": rec.msg_id,
            "conversation": rec.conversation_id or rec.key,
            "time": iso(rec.at),
            "source": {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset},
            "payload_bytes": len(payload) if payload is not None else None,
            "requeued": mark is not None,
            **({"requeue": mark.as_json()} if mark is not None else {}),
        }

    def show_line(self, mark: Mark | None) -> dict[str, Any]:
        """What ``show`` prints: the whole record, its original bytes included."""
        line = self.list_line(mark)
        if self.record is None:
            raw = self.raw or b""
            line["raw_b64"] = base64.b64encode(raw).decode()
            return line
        line["record"] = self.record.model_dump(mode="json")
        return line


# -- the marks ----------------------------------------------------------------


async def ensure_marker_topic(settings: Settings) -> None:
    """Create ``imbot.dlq.requeued`` when it is missing, like ``ensure_topics`` does the
    pipeline's (same partitions and replication), kept as long as the DLQ's records."""
    name = settings.topic(REQUEUED)
    admin = AIOKafkaAdminClient(**connection_kwargs(settings))
    await connect(admin, settings)
    try:
        if name in set(await admin.list_topics()):
            return
        topic = NewTopic(
            name=name,
            num_partitions=settings.topic_partitions,
            replication_factor=settings.topic_replication,
            topic_configs={"cleanup.policy": "delete", "retention.ms": str(MARKER_RETENTION_MS)},
        )
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([topic])
    finally:
        await admin.close()


async def read_marks(settings: Settings, *, idle_s: float = DEFAULT_IDLE_S) -> dict[str, Mark]:
    """Every mark, by ``"partition:offset"`` of the DLQ record (none when no topic yet)."""
    marks: dict[str, Mark] = {}
    names = [settings.topic(REQUEUED)]
    async with SliceReader(settings, names, Bounds(), missing_ok=True, idle_s=idle_s) as reader:
        async for batch in reader.batches():
            for record in batch:
                key = key_text(record.key)
                if key is None:
                    continue
                try:
                    data = orjson.loads(record.value or b"{}")
                except orjson.JSONDecodeError:
                    data = {}
                before = marks.get(key)
                marks[key] = Mark(
                    at=float(data.get("at", record.timestamp)),
                    run=str(data.get("run", "")),
                    times=(before.times + 1) if before else 1,
                )
    return marks


def _mark_value(entry: DlqEntry, run: str, target: str, meta: Any, forced: bool) -> bytes:
    rec = entry.record
    return orjson.dumps(
        {
            "dlq": {"partition": entry.partition, "offset": entry.offset},
            "msg_id": rec.msg_id if rec else None,
            "stage": rec.stage if rec else None,
            "target": target,
            "target_partition": meta.partition,
            "target_offset": meta.offset,
            "run": run,
            "forced": forced,
            "at": now_ms(),
        }
    )


# -- reading the DLQ ----------------------------------------------------------


async def _entries(reader: SliceReader, filt: DlqFilter) -> AsyncIterator[list[DlqEntry]]:
    id_needle = needle(filt.msg_id) if filt.msg_id is not None else None
    async for batch in reader.batches():
        entries = [
            entry
            for record in batch
            if id_needle is None or (record.value is not None and id_needle in record.value)
            if filt.matches(entry := DlqEntry.of(record))
        ]
        if entries:
            yield entries


def _dlq_reader(settings: Settings, bounds: Bounds, idle_s: float) -> SliceReader:
    return SliceReader(settings, [settings.topic(topics.DLQ)], bounds, idle_s=idle_s)


@dataclass
class ListSummary:
    records: int = 0
    requeued: int = 0
    undecodable: int = 0
    by_stage: Counter[str] = field(default_factory=Counter)
    by_reason: Counter[str] = field(default_factory=Counter)
    scanned: int = 0
    stopped: str = "end"
    unfinished: list[str] = field(default_factory=list)

    def count(self, entry: DlqEntry, mark: Mark | None) -> None:
        self.records += 1
        self.requeued += mark is not None
        if entry.record is None:
            self.undecodable += 1
            return
        self.by_stage[entry.record.stage] += 1
        self.by_reason[reason_of(entry.record)] += 1

    def as_json(self) -> dict[str, Any]:
        return {
            "summary": {
                "records": self.records,
                "by_stage": dict(sorted(self.by_stage.items())),
                "by_reason": dict(sorted(self.by_reason.items())),
                "requeued": self.requeued,
                "undecodable": self.undecodable,
                "scanned": self.scanned,
                "stopped": self.stopped,
                "unfinished": self.unfinished,
            }
        }


async def list_dlq(
    settings: Settings,
    bounds: Bounds | None = None,
    filt: DlqFilter | None = None,
    *,
    limit: int | None = None,
    out: Output = print_json,
    idle_s: float = DEFAULT_IDLE_S,
) -> ListSummary:
    """One line per DLQ record inside ``bounds`` that ``filt`` selects, then the counts."""
    _check_limit(limit)
    filt = filt or DlqFilter()
    marks = await read_marks(settings, idle_s=idle_s)
    summary = ListSummary()
    async with _dlq_reader(settings, bounds or Bounds(), idle_s) as reader:
        async for entries in _entries(reader, filt):
            for entry in entries:
                mark = marks.get(entry.mark_key)
                out(entry.list_line(mark))
                summary.count(entry, mark)
                if limit is not None and summary.records >= limit:
                    break
            if limit is not None and summary.records >= limit:
                reader.stats.stopped = "limit"
                break
        _take_stats(summary, reader)
    return summary


async def show_dlq(
    settings: Settings,
    *,
    offset: int | None = None,
    partition: int | None = None,
    msg_id: str | None = None,
    out: Output = print_json,
    idle_s: float = DEFAULT_IDLE_S,
) -> int:
    """Print the whole DLQ records at ``offset`` (on ``partition``, or on every partition
    that has one there) and/or of ``msg_id``; returns how many were printed."""
    if offset is None and msg_id is None:
        raise ConfigurationError("name a record: an OFFSET (with --partition) or --msg-id")
    bounds = Bounds(partition=partition, from_offset=offset, to_offset=offset)
    marks = await read_marks(settings, idle_s=idle_s)
    shown = 0
    async with _dlq_reader(settings, bounds, idle_s) as reader:
        async for entries in _entries(reader, DlqFilter(msg_id=msg_id)):
            for entry in entries:
                out(entry.show_line(marks.get(entry.mark_key)))
                shown += 1
    return shown


# -- requeue ------------------------------------------------------------------


@dataclass
class RequeueSummary:
    run: str
    dry_run: bool = False
    forced: bool = False
    selected: int = 0
    requeued: int = 0
    already: int = 0  # requeued before (and not forced)
    skipped: int = 0  # cannot be requeued (no payload, no target, no DLQ record)
    targets: Counter[str] = field(default_factory=Counter)
    scanned: int = 0
    stopped: str = "end"
    unfinished: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "targets"}
        return {"summary": {**data, "targets": dict(sorted(self.targets.items()))}}


@dataclass
class _Plan:
    entry: DlqEntry
    target: str | None = None  # the full topic name
    payload: bytes | None = None
    skip: str | None = None
    already: Mark | None = None

    def line(self) -> dict[str, Any]:
        rec = self.entry.record
        line: dict[str, Any] = {
            "partition": self.entry.partition,
            "offset": self.entry.offset,
            "stage": rec.stage if rec else None,
            "msg_id": rec.msg_id if rec else None,
            "conversation": (rec.conversation_id or rec.key) if rec else None,
            "target": self.target,
        }
        if self.already is not None:
            line["skipped"] = "already requeued (--force requeues it again)"
            line["requeue"] = self.already.as_json()
        elif self.skip is not None:
            line["skipped"] = self.skip
        return line


def _plan(entry: DlqEntry, settings: Settings, marks: dict[str, Mark], force: bool) -> _Plan:
    rec = entry.record
    if rec is None:
        return _Plan(entry, skip="not a DLQ record")
    target = failed_input(rec, settings)
    if target is None:
        return _Plan(entry, skip=f"unknown stage {rec.stage!r} and topic {rec.topic!r}")
    plan = _Plan(entry, target=settings.topic(target), payload=dlq_payload(rec))
    if plan.payload is None:
        plan.skip = (
            "the DLQ record holds no payload (too large, or the original had no value);"
            f" the original is at {rec.topic}/{rec.partition}@{rec.offset}: imbot replay it"
        )
    elif not force:
        plan.already = marks.get(entry.mark_key)
    return plan


async def requeue(
    settings: Settings,
    bounds: Bounds | None = None,
    filt: DlqFilter | None = None,
    *,
    force: bool = False,
    dry_run: bool = False,
    rate: float | None = None,
    limit: int | None = None,
    out: Output = print_json,
    idle_s: float = DEFAULT_IDLE_S,
) -> RequeueSummary:
    """Send the selected DLQ records' original bytes back to their failed stage's input
    and mark them; prints one line per selected record and returns the summary."""
    _check_limit(limit)
    pacer = Pacer(rate)  # checks the rate before anything is opened
    filt = filt or DlqFilter()
    summary = RequeueSummary(run=f"requeue-{uuid.uuid4().hex[:12]}", dry_run=dry_run, forced=force)
    marks = await read_marks(settings, idle_s=idle_s)
    producer = None
    if not dry_run:
        await ensure_marker_topic(settings)
        producer = new_producer(settings)
        await connect(producer, settings)
    requeuer = _Requeuer(settings, producer, summary, marks, pacer, out)
    try:
        async with _dlq_reader(settings, bounds or Bounds(), idle_s) as reader:
            async for entries in _entries(reader, filt):
                plans = [_plan(e, settings, marks, force) for e in entries]
                if limit is not None:
                    plans = _within_limit(plans, limit - summary.requeued)
                await requeuer.batch(plans)
                if limit is not None and summary.requeued >= limit:
                    reader.stats.stopped = "limit"
                    break
            _take_stats(summary, reader)
    finally:
        if producer is not None:
            await producer.stop()
    return summary


def _within_limit(plans: list[_Plan], room: int) -> list[_Plan]:
    """The plans up to the one that fills ``room`` requeues (skipped ones cost nothing)."""
    kept: list[_Plan] = []
    for plan in plans:
        if room <= 0:
            break
        kept.append(plan)
        room -= plan.skip is None and plan.already is None
    return kept


@dataclass
class _Requeuer:
    """One requeue run's batches: the originals first, every one of them acknowledged,
    then their marks (the module docstring says why in that order)."""

    settings: Settings
    producer: Any  # None on a dry run
    summary: RequeueSummary
    marks: dict[str, Mark]
    pacer: Pacer
    out: Output

    async def batch(self, plans: Sequence[_Plan]) -> None:
        todo = [plan for plan in plans if self._take(plan)]
        acked = await self._send_originals(todo)
        await self._write_marks(acked)
        for plan, meta in acked:
            self._report(plan, meta)

    def _take(self, plan: _Plan) -> bool:
        """Count ``plan``; a skipped one is reported at once, and not sent."""
        self.summary.selected += 1
        if plan.skip is None and plan.already is None:
            return True
        self.summary.skipped += plan.skip is not None
        self.summary.already += plan.already is not None
        self.out(plan.line())
        return False

    async def _send_originals(self, plans: Sequence[_Plan]) -> list[tuple[_Plan, Any]]:
        if self.producer is None:
            return [(plan, None) for plan in plans]
        futures = []
        for plan in plans:
            await self.pacer.wait()
            futures.append(await self.producer.send(plan.target, plan.payload, key=plan.entry.key))
        return [(plan, await future) for plan, future in zip(plans, futures, strict=True)]

    async def _write_marks(self, acked: Sequence[tuple[_Plan, Any]]) -> None:
        if self.producer is None:
            return
        topic, run, forced = self.settings.topic(REQUEUED), self.summary.run, self.summary.forced
        futures = [
            await self.producer.send(
                topic,
                _mark_value(plan.entry, run, plan.target or "", meta, forced),
                key=plan.entry.mark_key.encode(),
            )
            for plan, meta in acked
        ]
        for future in futures:
            await future
        for plan, _ in acked:
            before = self.marks.get(plan.entry.mark_key)
            self.marks[plan.entry.mark_key] = Mark(now_ms(), run, before.times + 1 if before else 1)

    def _report(self, plan: _Plan, meta: Any) -> None:
        line = plan.line()
        if meta is None:
            line["dry_run"] = True
        else:
            line["target_partition"], line["target_offset"] = meta.partition, meta.offset
        self.summary.requeued += 1
        self.summary.targets[plan.target or ""] += 1
        self.out(line)


def _check_limit(limit: int | None) -> None:
    if limit is not None and limit < 1:
        raise ConfigurationError("--limit must be at least 1")


def _take_stats(summary: ListSummary | RequeueSummary, reader: SliceReader) -> None:
    summary.scanned = reader.stats.read
    summary.stopped = reader.stats.stopped
    summary.unfinished = reader.stats.unfinished
