"""``imbot trace``: every record of one msg_id on every topic, in time order.

It scans every pipeline topic, the sandbox and the DLQ for one msg_id (raw bytes are
matched before anything is decoded, so a busy topic costs a scan, not a decode per
record) and returns each stage's view of the message in time order: no user text,
only its shape and the decisions taken. A record that a replay re-produced carries the
replay's mark (``replay``: the run's id and whether it was sandboxed), and a sandboxed
replay's answer is found on ``imbot.sandbox``, where the send stage put it instead of
sending it; the summary counts both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imbot.core import topics
from imbot.core.envelope import DlqRecord, Envelope
from imbot.core.settings import Settings
from imbot.streams.dlq import dlq_or_none, dlq_payload
from imbot.streams.pipeline import TOPICS
from imbot.streams.reader import (
    DEFAULT_IDLE_S,
    Bounds,
    ConsumerRecord,
    SliceReader,
    base_topic,
    envelope_or_none,
    iso,
    key_text,
    needle,
)


def _verdict(v: Any) -> dict[str, Any]:
    return {"action": v.action, "categories": list(v.categories), "rules": list(v.rules)}


def envelope_view(env: Envelope) -> dict[str, Any]:
    """What a stage knew about the message: no user text, only its shape and decisions."""
    view: dict[str, Any] = {
        "msg_id": env.msg_id,
        "conversation": env.conversation_id,
        "content": {"type": env.content.type, "text_len": len(env.content.text or "")},
        "received_at": iso(env.received_at),
        "stamps": {stage: iso(ms) for stage, ms in env.stamps.items()},
    }
    if env.replay is not None:
        view["replay"] = {
            "id": env.replay.id,
            "sandbox": env.replay.sandbox,
            "at": iso(env.replay.at),
        }
    if env.moderation_in is not None:
        view["moderation_in"] = _verdict(env.moderation_in)
    if env.route is not None:
        r = env.route
        # Why these models: the rule, the tier, the complexity score and its features,
        # the budgets' standing and the reservation (never the prompt or the history).
        view["route"] = {
            "route": r.route,
            "models": list(r.models),
            "history_turns": len(r.history),
            "rule": r.rule,
            "tier": r.tier,
            "level": r.level,
            "score": r.score,
            "features": {k: v for k, v in r.features.items() if v},
            "quota": r.quota.model_dump(mode="json"),
            "images": len(r.images),
            "stream": r.stream,
            "live": r.live,
        }
    if (p := env.partial) is not None:
        # A chunk record of the answer being written (docs/streaming.md): its size only.
        view["chunk"] = {"kind": p.kind, "seq": p.seq, "text_len": len(p.text)}
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
    payload = dlq_payload(rec)
    view: dict[str, Any] = {
        "dlq": {
            "stage": rec.stage,
            "error_kind": rec.error_kind,
            "error": rec.error,
            "attempts": rec.attempts,
            "source": {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset},
            "at": iso(rec.at),
            "payload_bytes": len(payload) if payload is not None else None,
        },
        "msg_id": rec.msg_id,
        "conversation": rec.conversation_id,
    }
    original = envelope_or_none(payload)
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
        sandbox = [v for v in self.views if v.get("sandboxed_reply")]
        return {
            "summary": {
                "msg_id": self.msg_id,
                "records": len(self.views),
                "replayed": sum(1 for v in self.views if "replay" in v),
                "sandbox": len(sandbox),
                "replays": sorted({v["replay"]["id"] for v in self.views if "replay" in v}),
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
    partition: int | None = None,
    idle_s: float = DEFAULT_IDLE_S,
) -> TraceResult:
    """Every record of ``msg_id`` on every pipeline topic, sandbox and DLQ included,
    in time order. ``partition``: only that partition of each topic (every record of a
    message is keyed by its conversation, so one partition holds them all when the
    topics have as many partitions)."""
    id_needle = needle(msg_id)
    order = {settings.topic(base): i for i, base in enumerate(TOPICS)}
    found: list[tuple[tuple[int, float, int, int, int], dict[str, Any]]] = []
    bounds = Bounds(partition=partition, since_ms=since_ms, until_ms=until_ms)
    names = [settings.topic(base) for base in TOPICS]
    async with SliceReader(settings, names, bounds, missing_ok=True, idle_s=idle_s) as reader:
        async for batch in reader.batches():
            for record in batch:
                raw: bytes | None = record.value
                if raw is None or id_needle not in raw:
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
        "time": iso(record.timestamp),
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": key_text(record.key),
    }
    where = base_topic(record.topic, settings)
    if where == topics.DLQ:
        rec = dlq_or_none(raw)
        if rec is None:
            return record.timestamp, {**head, "undecodable": "not a DLQ record"}
        view = dlq_view(rec)
        if view["msg_id"] == msg_id:
            return rec.at, {**head, **view}
        if view["msg_id"] is None:
            # The failed bytes were no envelope: the id only appears in them.
            return rec.at, {**head, **view, "match": "bytes"}
        return None
    env = envelope_or_none(raw)
    if env is None:
        return record.timestamp, {**head, "undecodable": "not an envelope"}
    if env.msg_id != msg_id:
        return None
    view = envelope_view(env)
    view["since_received_ms"] = round(record.timestamp - env.received_at, 1)
    if where == topics.SANDBOX:
        view["sandboxed_reply"] = True  # what the send stage kept instead of delivering
    return max(env.stamps.values(), default=env.received_at), {**head, **view}
