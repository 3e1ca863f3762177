"""``imbot dlq list|show|requeue`` against the real embedded broker.

The DLQ holds what the boundary writes (``DlqRecord``); these tests write such records
themselves, for several stages, reasons and conversations, plus bytes that are no DLQ
record at all, and look at what an operator sees and what reaches the stages' inputs.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from imbot.core import topics
from imbot.core.envelope import DlqRecord, encode_envelope
from imbot.core.errors import ConfigurationError
from imbot.core.kafka import ensure_topics, new_producer
from imbot.core.settings import Settings
from imbot.devtools.broker import consume_all
from imbot.streams.dlq import REQUEUED, DlqFilter, list_dlq, read_marks, requeue, show_dlq
from imbot.streams.reader import Bounds
from tests.envelopes import direct_envelope
from tests.integration.conftest import run_imbot

SECRET_TEXT = "我的银行卡密码是123456"  # the user's message: never in list's output


class Topics:
    """Produces to the test's prefixed topics and reads them back."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer) -> None:
        self.settings = settings
        self.producer = producer

    async def put(self, base: str, key: str, value: bytes) -> tuple[int, int]:
        meta = await self.producer.send_and_wait(self.settings.topic(base), value, key=key.encode())
        return meta.partition, meta.offset

    async def read(self, base: str) -> list[tuple[bytes | None, bytes | None]]:
        """Everything on the topic (its end offsets are right: one record per batch)."""
        name = self.settings.topic(base)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap)
        await consumer.start()
        try:
            await consumer.topics()
            tps = [TopicPartition(name, p) for p in consumer.partitions_for_topic(name) or ()]
            total = sum((await consumer.end_offsets(tps)).values()) if tps else 0
        finally:
            await consumer.stop()
        if not total:
            return []
        records = await consume_all(self.settings.kafka_bootstrap, name, total, timeout=5.0)
        assert len(records) == total
        return records


@pytest.fixture
async def kafka(make_settings: Callable[..., Settings]) -> AsyncIterator[Topics]:
    settings = make_settings()
    await ensure_topics(settings)
    producer = new_producer(settings)
    await producer.start()
    try:
        yield Topics(settings, producer)
    finally:
        await producer.stop()


@dataclass(frozen=True)
class Failed:
    """One DLQ record the test wrote, and the original bytes it holds."""

    partition: int
    offset: int
    key: bytes
    original: bytes | None


async def put_failure(
    kafka: Topics,
    stage: str,
    source: str,
    *,
    user: str = "alice",
    msg_id: str | None = None,
    original: bytes | None = None,
    error_kind: str = "RetryableError",
    reason: str | None = None,
) -> Failed:
    """A DLQ record like the boundary writes: an envelope's bytes as text, any other
    bytes as base64, none at all when ``original`` is None."""
    key = f"chat:ai_bot:{user}"
    text: str | None = None
    b64: str | None = None
    if original is not None:
        try:
            text = original.decode("utf-8")
        except UnicodeDecodeError:
            b64 = base64.b64encode(original).decode()
    record = DlqRecord(
        stage=stage,
        topic=kafka.settings.topic(source),
        partition=0,
        offset=11,
        key=key,
        value=text,
        value_b64=b64,
        error_kind=error_kind,
        error="upstream answered 503" if reason is None else f"fatal: {reason}",
        reason=reason,
        status=503,
        attempts=4,
        msg_id=msg_id,
        conversation_id=key if msg_id else None,
    )
    partition, offset = await kafka.put(topics.DLQ, key, record.model_dump_json().encode())
    return Failed(partition, offset, key.encode(), original)


def _envelope(msg_id: str, user: str = "alice") -> bytes:
    return encode_envelope(direct_envelope(SECRET_TEXT, user=user, msg_id=msg_id))


async def _five_failures(kafka: Topics) -> dict[str, Failed]:
    """Model (retryable, and a fatal quota), send, route, and one with no payload."""
    return {
        "model-retry": await put_failure(
            kafka, "model", topics.ROUTED, msg_id="m1", original=_envelope("m1")
        ),
        "model-quota": await put_failure(
            kafka,
            "model",
            topics.ROUTED,
            user="bob",
            msg_id="m2",
            original=_envelope("m2", "bob"),
            error_kind="FatalError",
            reason="quota_exhausted",
        ),
        "send": await put_failure(
            kafka, "send", topics.OUTBOUND, msg_id="m3", original=_envelope("m3")
        ),
        "route": await put_failure(
            kafka, "route", topics.MODERATED, user="carol", msg_id="m4", original=_envelope("m4")
        ),
        "empty": await put_failure(kafka, "moderate-in", topics.INBOUND, user="dave"),
    }


async def _listed(settings: Settings, **kw: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    bounds = kw.pop("bounds", None)
    limit = kw.pop("limit", None)
    summary = await list_dlq(settings, bounds, DlqFilter(**kw), limit=limit, out=lines.append)
    return lines, summary.as_json()["summary"]


async def test_list_shows_every_record_without_user_text_and_counts_them(kafka: Topics) -> None:
    s = kafka.settings
    failed = await _five_failures(kafka)
    await kafka.put(topics.DLQ, "junk", b"\x00 no DLQ record")

    lines, summary = await _listed(s)

    assert len(lines) == 6
    assert SECRET_TEXT not in orjson.dumps(lines).decode()  # never the original bytes
    by_msg = {line.get("msg_id"): line for line in lines}
    quota = by_msg["m2"]
    where = failed["model-quota"]
    assert (quota["partition"], quota["offset"]) == (where.partition, where.offset)
    assert (quota["stage"], quota["reason"], quota["error_kind"]) == (
        "model",
        "quota_exhausted",
        "FatalError",
    )
    assert (quota["attempts"], quota["conversation"]) == (4, "chat:ai_bot:bob")
    assert quota["requeued"] is False
    assert quota["payload_bytes"] == len(where.original or b"")
    assert by_msg["m1"]["reason"] == "RetryableError"  # no fatal reason: the error's kind
    assert [line["undecodable"] for line in lines if "undecodable" in line] == ["not a DLQ record"]
    assert summary["records"] == 6
    assert summary["undecodable"] == 1
    assert summary["by_stage"] == {"model": 2, "moderate-in": 1, "route": 1, "send": 1}
    assert summary["by_reason"] == {"RetryableError": 4, "quota_exhausted": 1}


async def test_list_filters_by_stage_reason_conversation_time_and_limit(kafka: Topics) -> None:
    s = kafka.settings
    await _five_failures(kafka)
    await asyncio.sleep(0.05)
    cut = int(time.time() * 1000)
    await asyncio.sleep(0.05)
    await put_failure(kafka, "model", topics.ROUTED, msg_id="late", original=_envelope("late"))

    async def ids(**kw: Any) -> list[str | None]:
        lines, summary = await _listed(s, **kw)
        assert summary["records"] == len(lines)
        return sorted(line["msg_id"] or "-" for line in lines)

    assert await ids(stage="model") == ["late", "m1", "m2"]
    assert await ids(reason="quota_exhausted") == ["m2"]
    assert await ids(reason="FatalError") == ["m2"]  # the error kind matches too
    assert await ids(stage="model", reason="RetryableError") == ["late", "m1"]
    assert await ids(conversation="chat:ai_bot:carol") == ["m4"]
    assert await ids(conversation="chat:ai_bot:dave") == ["-"]  # no msg_id: by its key
    assert await ids(bounds=Bounds(since_ms=cut)) == ["late"]
    assert await ids(bounds=Bounds(until_ms=cut), stage="model") == ["m1", "m2"]
    assert await ids(msg_id="m3") == ["m3"]
    assert len(await ids(limit=2)) == 2


async def test_show_prints_the_whole_record_with_its_original_bytes(kafka: Topics) -> None:
    s = kafka.settings
    failed = await _five_failures(kafka)
    where = failed["route"]

    lines: list[dict[str, Any]] = []
    shown = await show_dlq(s, offset=where.offset, partition=where.partition, out=lines.append)

    assert shown == 1
    [line] = lines
    assert line["record"]["stage"] == "route"
    assert line["record"]["value"].encode() == where.original  # the operator asked for it
    assert SECRET_TEXT in line["record"]["value"]

    by_id: list[dict[str, Any]] = []
    assert await show_dlq(s, msg_id="m2", out=by_id.append) == 1
    assert by_id[0]["record"]["reason"] == "quota_exhausted"
    anywhere: list[dict[str, Any]] = []  # no --partition: that offset on every partition
    assert await show_dlq(s, offset=where.offset, out=anywhere.append) >= 1
    assert (where.partition, where.offset) in {(x["partition"], x["offset"]) for x in anywhere}
    assert {x["offset"] for x in anywhere} == {where.offset}
    assert await show_dlq(s, offset=999, out=lambda _: None) == 0
    with pytest.raises(ConfigurationError, match="name a record"):
        await show_dlq(s)


async def test_requeue_sends_the_original_bytes_back_once_unless_forced(kafka: Topics) -> None:
    s = kafka.settings
    failed = await _five_failures(kafka)

    lines: list[dict[str, Any]] = []
    first = await requeue(s, filt=DlqFilter(stage="model"), out=lines.append)

    # The originals, unchanged (no replay mark: a requeue really delivers), original keys.
    routed = await kafka.read(topics.ROUTED)
    assert sorted(routed) == sorted(
        (failed[n].key, failed[n].original) for n in ("model-retry", "model-quota")
    )
    assert (first.requeued, first.already, first.skipped) == (2, 0, 0)
    assert first.targets == {s.topic(topics.ROUTED): 2}
    assert len(lines) == 2
    assert all(line["target"] == s.topic(topics.ROUTED) for line in lines)
    assert all(isinstance(line["target_offset"], int) for line in lines)
    assert await kafka.read(topics.OUTBOUND) == []  # the other stages' records stayed

    # The marks are in Kafka, keyed partition:offset, and every later run reads them.
    marks = await read_marks(s)
    assert set(marks) == {
        f"{failed[n].partition}:{failed[n].offset}" for n in ("model-retry", "model-quota")
    }
    assert {m.run for m in marks.values()} == {first.run}

    again: list[dict[str, Any]] = []
    second = await requeue(s, filt=DlqFilter(stage="model"), out=again.append)
    assert (second.requeued, second.already) == (0, 2)
    assert all("already requeued" in line["skipped"] for line in again)
    assert len(await kafka.read(topics.ROUTED)) == 2  # nothing sent the second time

    listed, summary = await _listed(s, stage="model")
    assert all(line["requeued"] for line in listed)
    assert summary["requeued"] == 2

    forced = await requeue(s, filt=DlqFilter(msg_id="m1"), force=True, out=lambda _: None)
    assert (forced.requeued, forced.already) == (1, 0)
    assert len(await kafka.read(topics.ROUTED)) == 3
    where = failed["model-retry"]
    assert (await read_marks(s))[f"{where.partition}:{where.offset}"].times == 2


async def test_requeue_of_every_stage_garbage_byte_for_byte_and_no_payload_skipped(
    kafka: Topics,
) -> None:
    s = kafka.settings
    garbage = b"\xff\xfe\x00 not utf-8, not JSON"
    poisoned = await put_failure(kafka, "moderate-in", topics.INBOUND, original=garbage)
    sent = await put_failure(kafka, "send", topics.OUTBOUND, msg_id="m3", original=_envelope("m3"))
    empty = await put_failure(kafka, "route", topics.MODERATED, user="dave")
    await kafka.put(topics.DLQ, "junk", b"no DLQ record")

    dry: list[dict[str, Any]] = []
    planned = await requeue(s, dry_run=True, out=dry.append)
    assert (planned.requeued, planned.skipped) == (2, 2)
    assert all(line.get("dry_run") for line in dry if "skipped" not in line)
    assert await kafka.read(topics.INBOUND) == []  # a dry run produces nothing …
    assert await read_marks(s) == {}  # … and marks nothing

    lines: list[dict[str, Any]] = []
    summary = await requeue(s, out=lines.append)

    assert await kafka.read(topics.INBOUND) == [(poisoned.key, garbage)]
    assert await kafka.read(topics.OUTBOUND) == [(sent.key, sent.original)]
    assert await kafka.read(topics.MODERATED) == []
    assert (summary.requeued, summary.skipped, summary.already) == (2, 2, 0)
    skipped = {line["offset"]: line["skipped"] for line in lines if "skipped" in line}
    assert "no payload" in skipped[empty.offset]
    assert f"{s.topic(topics.MODERATED)}/0@11" in skipped[empty.offset]  # where it still is
    assert "not a DLQ record" in skipped.values()


async def test_requeue_rate_paces_the_records(kafka: Topics) -> None:
    s = kafka.settings
    for i in range(6):
        await put_failure(kafka, "model", topics.ROUTED, msg_id=f"r{i}", original=_envelope("x"))

    started = time.monotonic()
    summary = await requeue(s, rate=10, out=lambda _: None)
    took = time.monotonic() - started

    assert summary.requeued == 6
    assert took >= 0.4  # 6 records at 10/s: five waits of 0.1 s (loosely)
    with pytest.raises(ConfigurationError, match="--rate"):
        await requeue(s, rate=0)


def _json_lines(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert done.returncode == 0, done.stderr
    return [orjson.loads(line) for line in done.stdout.splitlines()]


async def test_dlq_command_line(kafka: Topics) -> None:
    s = kafka.settings
    failed = await _five_failures(kafka)

    listed = _json_lines(await asyncio.to_thread(run_imbot, s, "dlq", "list", "--stage", "model"))
    assert sorted(line["msg_id"] for line in listed[:-1]) == ["m1", "m2"]
    assert listed[-1]["summary"]["by_stage"] == {"model": 2}
    assert SECRET_TEXT not in orjson.dumps(listed).decode()

    where = failed["send"]
    shown = _json_lines(
        await asyncio.to_thread(
            run_imbot, s, "dlq", "show", str(where.offset), "--partition", str(where.partition)
        )
    )
    assert shown[0]["record"]["value"].encode() == where.original

    args = ("dlq", "requeue", "--reason", "quota_exhausted")
    done = _json_lines(await asyncio.to_thread(run_imbot, s, *args))
    assert done[-1]["summary"]["requeued"] == 1
    assert done[0]["target"] == s.topic(topics.ROUTED)
    # Another operator (another process) sees the mark and requeues nothing.
    again = _json_lines(await asyncio.to_thread(run_imbot, s, *args))
    assert (again[-1]["summary"]["requeued"], again[-1]["summary"]["already"]) == (0, 1)
    relisted = _json_lines(await asyncio.to_thread(run_imbot, s, "dlq", "list", "--msg-id", "m2"))
    assert relisted[0]["requeued"] is True
    assert len(await kafka.read(REQUEUED)) == 1

    missing = await asyncio.to_thread(run_imbot, s, "dlq", "show", "999")
    assert missing.returncode == 1
