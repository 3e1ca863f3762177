"""``imbot replay``: re-produce a slice of a topic through a stage, sandboxed by default.

It reads a slice of one pipeline topic (by partition, offset range, time range,
conversation or msg_id; ``streams.reader``) and re-produces each selected record with
its original key to the input topic of a stage: by default the topic itself (the stage
that reads it runs again); for a DLQ record, the original bytes it holds go to the
input of the stage that failed it.

Sandboxed unless ``deliver``. Every stage's input leads to the sender (moderate-in and
the model stage can answer early, the others pass the message on), so every replay can
reach a real user. Each replayed envelope therefore carries a ``ReplayMark`` (this run's
id, ``sandbox=not deliver``); the send stage puts a sandboxed record's reply on
``imbot.sandbox`` (``imbot trace`` shows it) instead of sending it. ``deliver`` keeps
the mark (so trace can tell a replayed record) with ``sandbox=False``: a real
delivery, which the operator asks for explicitly. A record that is no decodable
envelope (a DLQ record's original bytes can be anything) is replayed byte for byte,
unmarked, and counted (``unmarked``): the stage will fail it again, into the DLQ, and
never reach the sender with it.

Replaying with delivery is still safe: every stage is idempotent per msg_id and the
sender's delivery ledger never sends a part twice, nor a second, different reply to a
message the user already has an answer for (so a replay after a fallback reply is
recorded, not delivered). Sandboxed or not, a replay through the model stage calls the
model again, and pays for it.

``rate`` paces the records produced (``reader.Pacer``); ``progress`` gets a line with
the records done of the slice, the rate and an ETA (``reader.Progress``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from imbot.core import topics
from imbot.core.envelope import Envelope, ReplayMark, encode_envelope
from imbot.core.errors import ConfigurationError
from imbot.core.kafka import new_producer
from imbot.core.settings import Settings
from imbot.streams.dlq import dlq_or_none, dlq_payload, failed_input
from imbot.streams.pipeline import BY_NAME, STAGE_NAMES, TOPICS, stage_reading
from imbot.streams.reader import (
    DEFAULT_IDLE_S,
    Bounds,
    ConsumerRecord,
    Output,
    Pacer,
    Progress,
    SliceReader,
    base_topic,
    connect,
    envelope_or_none,
    key_text,
    needle,
    print_json,
)


@dataclass
class ReplaySummary:
    topic: str
    replay_id: str = ""
    sandbox: bool = True  # replayed envelopes' replies go to imbot.sandbox, not to users
    read: int = 0
    selected: int = 0
    replayed: int = 0
    marked: int = 0  # envelopes replayed with this run's ReplayMark
    unmarked: int = 0  # records that are no envelope, replayed byte for byte
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
    envelope: Envelope | None = None  # ``value`` decoded, when it is an envelope


@dataclass(frozen=True)
class _Run:
    """What one replay does to every record it re-produces."""

    settings: Settings
    mark: ReplayMark
    pacer: Pacer

    def payload(self, picked: _Selected) -> bytes | None:
        """The envelope with this run's mark, or the bytes as they were (no envelope)."""
        if picked.envelope is None:
            return picked.value
        return encode_envelope(picked.envelope.model_copy(update={"replay": self.mark}))


def _check(settings: Settings, topic: str, to_stage: str | None, limit: int | None) -> str:
    """The base topic; every operator mistake is a ConfigurationError before any read."""
    base = base_topic(topic, settings)
    if base is None:
        raise ConfigurationError(f"unknown topic {topic!r}; one of: {', '.join(TOPICS)}")
    if to_stage is not None and to_stage not in BY_NAME:
        raise ConfigurationError(f"unknown stage {to_stage!r}; one of: {', '.join(STAGE_NAMES)}")
    if limit is not None and limit < 1:
        raise ConfigurationError("--limit must be at least 1")
    if to_stage is None and base != topics.DLQ and stage_reading(base) is None:
        raise ConfigurationError(f"no stage reads {base}; choose one with --to-stage")
    return base


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
    deliver: bool = False,
    rate: float | None = None,
    progress: Progress | None = None,
    out: Output = print_json,
    idle_s: float = DEFAULT_IDLE_S,
) -> ReplaySummary:
    """Re-produce the selected records of ``topic`` (a base name) to a stage's input.

    Prints (``out``) one line per replayed or unreplayable selected record and
    returns the summary. ``to_stage`` overrides the default target: the topic
    itself (replayed through the stage that reads it), or for a DLQ record the
    input of the stage that failed it. Sandboxed unless ``deliver`` (module docstring).
    """
    base = _check(settings, topic, to_stage, limit)
    run_id = f"replay-{uuid.uuid4().hex[:12]}"
    run = _Run(settings, ReplayMark(id=run_id, sandbox=not deliver), Pacer(rate))
    forced = BY_NAME[to_stage].input if to_stage is not None else None
    summary = ReplaySummary(
        topic=settings.topic(base), replay_id=run_id, sandbox=not deliver, dry_run=dry_run
    )
    select = _selector(settings, base, forced, conversation, msg_id)
    producer = None if dry_run else new_producer(settings)
    if producer is not None:
        await connect(producer, settings)
    try:
        names = [settings.topic(base)]
        async with SliceReader(settings, names, bounds or Bounds(), idle_s=idle_s) as reader:
            if progress is not None:
                total, exact = reader.estimated_total()
                progress.start(total, exact=exact)
            async for batch in reader.batches():
                chosen = _choose(batch, select, msg_id, limit, summary)
                await _produce(producer, run, chosen, summary, out)
                if progress is not None:
                    progress.update(reader.stats.scanned, summary.replayed)
                if limit is not None and summary.replayed >= limit:
                    reader.stats.stopped = "limit"
                    break
            summary.read = reader.stats.read
            summary.stopped = reader.stats.stopped
            summary.unfinished = reader.stats.unfinished
            if progress is not None:
                progress.update(reader.stats.scanned, summary.replayed, final=True)
    finally:
        if producer is not None:
            await producer.stop()
    return summary


def _choose(
    batch: Sequence[ConsumerRecord],
    select: Any,
    msg_id: str | None,
    limit: int | None,
    summary: ReplaySummary,
) -> list[_Selected]:
    """The batch's selected records, up to the one that reaches ``limit`` replays."""
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
    return chosen


def _selector(
    settings: Settings,
    base: str,
    forced: str | None,
    conversation: str | None,
    msg_id: str | None,
) -> Any:
    """A function from a record to what to replay of it (None: not selected)."""
    conv_key = conversation.encode() if conversation is not None else None
    id_needle = needle(msg_id) if msg_id is not None else None

    def select(record: ConsumerRecord) -> _Selected | None:
        raw: bytes | None = record.value
        if conv_key is not None and record.key != conv_key:
            return None  # every topic is keyed by conversation id (DLQ: the original key)
        if id_needle is not None and (raw is None or id_needle not in raw):
            return None
        if base == topics.DLQ:
            return _select_dlq(record, settings, forced)
        env = envelope_or_none(raw)
        if msg_id is not None and (env is None or env.msg_id != msg_id):
            return None
        target = forced or base
        return _Selected(
            record,
            msg_id=env.msg_id if env else None,
            conversation=env.conversation_id if env else key_text(record.key),
            value=raw,
            target=target,
            stage=stage_reading(target),
            envelope=env,
        )

    return select


def _select_dlq(record: ConsumerRecord, settings: Settings, forced: str | None) -> _Selected:
    rec = dlq_or_none(record.value)
    if rec is None:
        return _Selected(record, None, None, None, None, None, skip="not a DLQ record")
    value = dlq_payload(rec)
    original = envelope_or_none(value)
    msg_id = rec.msg_id or (original.msg_id if original else None)
    conversation = rec.conversation_id or (original.conversation_id if original else rec.key)
    target = forced or failed_input(rec, settings)
    skip = None
    if target is None:
        skip = f"unknown stage {rec.stage!r} and topic {rec.topic!r}"
    elif value is None:
        skip = "the DLQ record holds no payload (too large, or the original had no value)"
    stage_name = stage_reading(target) if target else None
    return _Selected(
        record, msg_id, conversation, value, target, stage_name, skip=skip, envelope=original
    )


async def _produce(
    producer: Any,
    run: _Run,
    chosen: Sequence[_Selected],
    summary: ReplaySummary,
    out: Output,
) -> None:
    # Send the batch before waiting for acks (order per partition is kept), then report.
    settings = run.settings
    pending: list[tuple[_Selected, asyncio.Future[Any] | None]] = []
    for picked in chosen:
        future = None
        if producer is not None and picked.skip is None and picked.target is not None:
            await run.pacer.wait()
            future = await producer.send(
                settings.topic(picked.target), run.payload(picked), key=picked.record.key
            )
        pending.append((picked, future))
    for picked, future in pending:
        line = _line(picked, settings)
        if picked.skip is not None:
            summary.skipped += 1
            line["skipped"] = picked.skip
        else:
            _count(picked, summary, line)
            if future is None:
                line["dry_run"] = True
            else:
                meta = await future
                line["target_partition"] = meta.partition
                line["target_offset"] = meta.offset
        out(line)


def _line(picked: _Selected, settings: Settings) -> dict[str, Any]:
    record = picked.record
    return {
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "msg_id": picked.msg_id,
        "conversation": picked.conversation,
        "target": settings.topic(picked.target) if picked.target else None,
        "stage": picked.stage,
    }


def _count(picked: _Selected, summary: ReplaySummary, line: dict[str, Any]) -> None:
    target = line["target"]
    summary.targets[target] = summary.targets.get(target, 0) + 1
    marked = picked.envelope is not None
    line["marked"] = marked
    if marked:
        summary.marked += 1
        line["sandbox"] = summary.sandbox
    else:
        summary.unmarked += 1
