"""``imbot replay`` and ``imbot trace`` against the real embedded broker.

A replay is sandboxed unless ``deliver``: every replayed envelope carries the run's
``ReplayMark``, so these tests compare what was re-produced with the original after
taking the mark off, and check the mark itself.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from imbot.core import topics
from imbot.core.envelope import (
    Completion,
    Content,
    Delivery,
    DlqRecord,
    Envelope,
    ReplayMark,
    Reply,
    RouteDecision,
    Verdict,
    decode_envelope,
    encode_envelope,
)
from imbot.core.errors import ConfigurationError
from imbot.core.kafka import ensure_topics, new_producer
from imbot.core.settings import Settings
from imbot.devtools.broker import consume_all
from imbot.streams.reader import Bounds, Progress, parse_time
from imbot.streams.replay import replay
from imbot.streams.trace import trace
from tests.envelopes import direct_envelope
from tests.integration.conftest import run_imbot


def _env(msg_id: str, user: str = "alice", **changes: Any) -> Envelope:
    return direct_envelope(user=user, msg_id=msg_id, **changes)


def _unmark(raw: bytes | None) -> tuple[Envelope, ReplayMark | None]:
    """A replayed envelope without its replay mark, and the mark."""
    env = decode_envelope(raw)
    return env.model_copy(update={"replay": None}), env.replay


def _replayed(
    records: list[tuple[bytes | None, bytes | None]],
) -> list[tuple[bytes | None, Envelope, ReplayMark | None]]:
    return [(key, *_unmark(value)) for key, value in records]


class Topics:
    """Produces to the test's prefixed topics and reads them back."""

    def __init__(self, settings: Settings, producer: AIOKafkaProducer) -> None:
        self.settings = settings
        self.producer = producer

    async def put(self, base: str, key: str, value: bytes) -> tuple[int, int]:
        meta = await self.producer.send_and_wait(self.settings.topic(base), value, key=key.encode())
        return meta.partition, meta.offset

    async def put_env(self, base: str, env: Envelope) -> tuple[int, int]:
        return await self.put(base, env.conversation_id, encode_envelope(env))

    async def read(self, base: str) -> list[tuple[bytes | None, bytes | None]]:
        """Everything on the topic (its end offsets are right: one record per batch)."""
        name = self.settings.topic(base)
        consumer = AIOKafkaConsumer(bootstrap_servers=self.settings.kafka_bootstrap)
        await consumer.start()
        try:
            await consumer.topics()
            tps = [TopicPartition(name, p) for p in consumer.partitions_for_topic(name) or ()]
            total = sum((await consumer.end_offsets(tps)).values())
        finally:
            await consumer.stop()
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


async def test_offset_range_is_replayed_with_original_keys_and_bytes(kafka: Topics) -> None:
    envs = [_env(f"m{i}") for i in range(5)]
    where = [await kafka.put_env(topics.ROUTED, e) for e in envs]
    partition = where[0][0]
    assert {p for p, _ in where} == {partition}  # one conversation, one partition

    lines: list[dict[str, Any]] = []
    summary = await replay(
        kafka.settings,
        topics.ROUTED,
        Bounds(partition=partition, from_offset=where[1][1], to_offset=where[3][1]),
        out=lines.append,
    )

    # Replayed through the stage that reads the topic: appended to the topic itself,
    # and the tool stopped at the end it started from instead of reading its own output.
    records = await kafka.read(topics.ROUTED)
    assert len(records) == 8
    assert records[:5] == [(b"chat:ai_bot:alice", encode_envelope(e)) for e in envs]
    replayed = _replayed(records[5:])
    assert [(key, env) for key, env, _ in replayed] == [
        (b"chat:ai_bot:alice", e) for e in envs[1:4]
    ]
    # Sandboxed by default: each carries this run's mark, so no user gets the reply.
    marks = [mark for _, _, mark in replayed]
    assert all(m is not None and m.sandbox for m in marks)
    assert {m.id for m in marks if m} == {summary.replay_id}
    assert summary.sandbox
    assert summary.marked == 3
    assert all(line["marked"] and line["sandbox"] for line in lines)
    assert [(line["offset"], line["msg_id"]) for line in lines] == [
        (where[i][1], f"m{i}") for i in (1, 2, 3)
    ]
    assert {line["target"] for line in lines} == {kafka.settings.topic(topics.ROUTED)}
    assert {line["stage"] for line in lines} == {"model"}
    assert [line["target_offset"] for line in lines] == [5, 6, 7]
    assert (summary.selected, summary.replayed, summary.skipped) == (3, 3, 0)
    assert summary.stopped == "end"


async def test_with_a_real_cluster_the_end_offsets_at_start_bound_the_slice(
    make_settings: Callable[..., Settings],
) -> None:
    # kafka_embedded=False takes the real-cluster path; one record per batch keeps this
    # broker's end offsets right, as a real cluster's always are.
    settings = make_settings(kafka_embedded=False, kafka_single_record_batches=True)
    await ensure_topics(settings, [topics.OUTBOUND])
    producer = new_producer(settings)
    await producer.start()
    try:
        kafka = Topics(settings, producer)
        for i in range(3):
            await kafka.put_env(topics.OUTBOUND, _env(f"m{i}"))
        summary = await replay(settings, topics.OUTBOUND, out=lambda _: None)
        assert (summary.replayed, summary.stopped) == (3, "end")
        assert len(await kafka.read(topics.OUTBOUND)) == 6
    finally:
        await producer.stop()


async def test_conversation_filter_into_another_stage(kafka: Topics) -> None:
    bob = [_env(f"b{i}", "bob") for i in range(3)]
    for i in range(3):
        await kafka.put_env(topics.COMPLETED, _env(f"a{i}", "alice"))
        await kafka.put_env(topics.COMPLETED, bob[i])

    lines: list[dict[str, Any]] = []
    summary = await replay(
        kafka.settings,
        topics.COMPLETED,
        conversation="chat:ai_bot:bob",
        to_stage="route",
        out=lines.append,
    )

    moderated = _replayed(await kafka.read(topics.MODERATED))
    assert [(key, env) for key, env, _ in moderated] == [(b"chat:ai_bot:bob", e) for e in bob]
    assert all(mark and mark.sandbox and mark.id == summary.replay_id for *_, mark in moderated)
    assert [line["msg_id"] for line in lines] == ["b0", "b1", "b2"]
    assert summary.targets == {kafka.settings.topic(topics.MODERATED): 3}
    assert len(await kafka.read(topics.COMPLETED)) == 6  # the source is untouched


async def test_dlq_records_go_back_to_the_failed_stage_with_the_original_bytes(
    kafka: Topics,
) -> None:
    s = kafka.settings
    failed = encode_envelope(_env("m-model"))
    poison = b"\xff\xfe not utf-8"

    def dlq(stage: str, source: str, key: str, **fields: Any) -> bytes:
        record = DlqRecord(
            stage=stage,
            topic=s.topic(source),
            partition=0,
            offset=7,
            key=key,
            error_kind="FatalError",
            error="boom",
            attempts=3,
            **fields,
        )
        return record.model_dump_json().encode()

    await kafka.put(
        topics.DLQ,
        "chat:ai_bot:alice",
        dlq(
            "model",
            topics.ROUTED,
            "chat:ai_bot:alice",
            value=failed.decode(),
            msg_id="m-model",
            conversation_id="chat:ai_bot:alice",
        ),
    )
    await kafka.put(
        topics.DLQ,
        "group:g1",
        dlq(
            "send",
            topics.OUTBOUND,
            "group:g1",
            value=None,
            value_b64=base64.b64encode(poison).decode(),
        ),
    )
    await kafka.put(
        topics.DLQ, "chat:ai_bot:carol", dlq("route", topics.MODERATED, "x", value=None)
    )

    lines: list[dict[str, Any]] = []
    summary = await replay(s, topics.DLQ, out=lines.append)

    [(key, env, mark)] = _replayed(await kafka.read(topics.ROUTED))
    assert (key, encode_envelope(env)) == (b"chat:ai_bot:alice", failed)
    assert mark is not None
    assert mark.sandbox
    # Bytes that are no envelope go back byte for byte, unmarked, and are counted.
    assert await kafka.read(topics.OUTBOUND) == [(b"group:g1", poison)]
    assert await kafka.read(topics.MODERATED) == []
    by_stage = {line["stage"]: line for line in lines}  # keys on 3 partitions: any order
    assert sorted(by_stage) == ["model", "route", "send"]
    assert by_stage["model"]["msg_id"] == "m-model"
    assert by_stage["model"]["target"] == s.topic(topics.ROUTED)
    assert by_stage["send"]["target"] == s.topic(topics.OUTBOUND)
    assert "skipped" not in by_stage["model"]
    assert "skipped" not in by_stage["send"]
    assert "no payload" in by_stage["route"]["skipped"]
    assert (summary.replayed, summary.skipped) == (2, 1)
    assert (summary.marked, summary.unmarked) == (1, 1)
    assert by_stage["send"]["marked"] is False

    # --to-stage overrides where a DLQ record goes.
    await replay(s, topics.DLQ, msg_id="m-model", to_stage="moderate-out", out=lambda _: None)
    [(key, env, _)] = _replayed(await kafka.read(topics.COMPLETED))
    assert (key, encode_envelope(env)) == (b"chat:ai_bot:alice", failed)


async def test_time_and_msg_id_filters_select_exactly_and_dry_run_produces_nothing(
    kafka: Topics,
) -> None:
    s = kafka.settings
    for i in range(3):
        await kafka.put_env(topics.INBOUND, _env(f"early{i}", f"u{i}"))
    await asyncio.sleep(0.05)
    cut = int(time.time() * 1000)
    await asyncio.sleep(0.05)
    for i in range(3):
        await kafka.put_env(topics.INBOUND, _env(f"late{i}", f"u{i}"))

    async def ids(**kw: Any) -> list[str]:
        lines: list[dict[str, Any]] = []
        summary = await replay(s, topics.INBOUND, dry_run=True, out=lines.append, **kw)
        assert all(line["dry_run"] for line in lines)
        assert summary.replayed == len(lines)
        return sorted(line["msg_id"] for line in lines)

    assert await ids(bounds=Bounds(since_ms=cut)) == ["late0", "late1", "late2"]
    assert await ids(bounds=Bounds(until_ms=cut)) == ["early0", "early1", "early2"]
    assert await ids(msg_id="late1") == ["late1"]
    assert await ids(msg_id="late1", bounds=Bounds(until_ms=cut)) == []
    assert await ids(conversation="chat:ai_bot:u2") == ["early2", "late2"]
    assert len(await ids(limit=4)) == 4
    assert len(await kafka.read(topics.INBOUND)) == 6  # nothing was produced


async def test_reads_past_the_embedded_brokers_wrong_end_offsets(kafka: Topics) -> None:
    s = kafka.settings
    batching = AIOKafkaProducer(bootstrap_servers=s.kafka_bootstrap, linger_ms=100)
    await batching.start()
    try:
        sent = [
            await batching.send(
                s.topic(topics.ROUTED), encode_envelope(_env(f"m{i}")), key=b"k", partition=0
            )
            for i in range(10)
        ]
        await asyncio.gather(*sent)
    finally:
        await batching.stop()
    consumer = AIOKafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(s.topic(topics.ROUTED), 0)
        assert (await consumer.end_offsets([tp]))[tp] < 10  # the defect this guards against
    finally:
        await consumer.stop()

    lines: list[dict[str, Any]] = []
    summary = await replay(s, topics.ROUTED, dry_run=True, out=lines.append)
    assert [line["offset"] for line in lines] == list(range(10))
    assert summary.stopped == "end"


async def test_operator_mistakes_are_configuration_errors(kafka: Topics) -> None:
    s = kafka.settings
    with pytest.raises(ConfigurationError, match="no stage reads"):
        await replay(s, topics.DELIVERED)
    with pytest.raises(ConfigurationError, match="unknown topic"):
        await replay(s, "imbot.nope")
    with pytest.raises(ConfigurationError, match="no partition 9"):
        await replay(s, topics.ROUTED, Bounds(partition=9), dry_run=True)
    with pytest.raises(ConfigurationError, match="before --from-offset"):
        Bounds(from_offset=5, to_offset=2)
    with pytest.raises(ConfigurationError, match="--rate must be above 0"):
        await replay(s, topics.ROUTED, rate=0)


async def test_replay_command_line(kafka: Topics) -> None:
    s = kafka.settings
    original = encode_envelope(_env("m-cli"))
    record = DlqRecord(
        stage="route",
        topic=s.topic(topics.MODERATED),
        partition=1,
        offset=3,
        key="chat:ai_bot:alice",
        value=original.decode(),
        error_kind="RetryableError",
        error="database gone",
        attempts=9,
        msg_id="m-cli",
        conversation_id="chat:ai_bot:alice",
    )
    await kafka.put(topics.DLQ, "chat:ai_bot:alice", record.model_dump_json().encode())

    done = await asyncio.to_thread(
        run_imbot, s, "replay", "--topic", "imbot.dlq", "--msg-id", "m-cli"
    )

    assert done.returncode == 0, done.stderr
    lines = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert lines[0]["target"] == s.topic(topics.MODERATED)
    summary = lines[-1]["summary"]
    assert (summary["replayed"], summary["sandbox"]) == (1, True)
    [(key, env, mark)] = _replayed(await kafka.read(topics.MODERATED))
    assert (key, encode_envelope(env)) == (b"chat:ai_bot:alice", original)
    assert mark is not None
    assert mark == ReplayMark(id=summary["replay_id"], sandbox=True, at=mark.at)

    # --deliver is explicit, and really delivers: the mark says the record is no sandbox.
    done = await asyncio.to_thread(
        run_imbot, s, "replay", "--topic", "imbot.dlq", "--msg-id", "m-cli", "--deliver"
    )
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout.splitlines()[-1])["summary"]["sandbox"] is False
    [_, (_, env, mark)] = _replayed(await kafka.read(topics.MODERATED))
    assert mark is not None
    assert mark.sandbox is False
    assert encode_envelope(env) == original


async def test_trace_tells_the_story_of_one_msg_id_in_time_order(kafka: Topics) -> None:
    s = kafka.settings
    base = _env("m-42")
    inbound = base
    moderated = inbound.stamped(
        "moderate-in", moderation_in=Verdict(action="mask", categories=("pii",), text="你好")
    )
    routed = moderated.stamped("route", route=RouteDecision(route="default", models=("demo",)))
    completed = routed.stamped(
        "model",
        completion=Completion(
            text="回答" * 5,
            finish_reason="stop",
            model="demo",
            provider="demo",
            input_tokens=3,
            output_tokens=7,
        ),
    )
    outbound = completed.stamped(
        "moderate-out", moderation_out=Verdict(action="allow"), reply=Reply(text="回答" * 5)
    )

    async def put(base: str, key: str, value: bytes) -> None:
        await asyncio.sleep(0.002)  # one hop takes a few ms: no two records in one ms
        await kafka.put(base, key, value)

    # Noise: other messages, one whose text mentions the id (raw-byte match, not the msg_id).
    noise = _env("m-1", content=Content(type="txt", text="m-42"))
    await put(topics.INBOUND, noise.conversation_id, encode_envelope(noise))
    # A poison copy that is no envelope: found by its bytes only.
    broken = DlqRecord(
        stage="moderate-in",
        topic=s.topic(topics.INBOUND),
        partition=0,
        offset=0,
        key=base.conversation_id,
        value='{"msg_id": "m-42", truncated',
        error_kind="UndecodableError",
        error="record is not JSON",
        attempts=1,
    )
    await put(topics.DLQ, base.conversation_id, broken.model_dump_json().encode())
    for topic, env in [
        (topics.INBOUND, inbound),
        (topics.MODERATED, moderated),
        (topics.ROUTED, routed),
        (topics.COMPLETED, completed),
        (topics.OUTBOUND, outbound),
    ]:
        await put(topic, env.conversation_id, encode_envelope(env))
        await kafka.put_env(topics.INBOUND, _env("m-43"))
    await asyncio.sleep(0.01)
    cut = int(time.time() * 1000)
    await asyncio.sleep(0.01)
    failure = DlqRecord(
        stage="send",
        topic=s.topic(topics.OUTBOUND),
        partition=0,
        offset=0,
        key=base.conversation_id,
        value=encode_envelope(outbound).decode(),
        error_kind="RetryableError",
        error="easemob 503",
        attempts=4,
        msg_id="m-42",
        conversation_id=base.conversation_id,
    )
    await put(topics.DLQ, base.conversation_id, failure.model_dump_json().encode())
    # The retried delivery succeeds later.
    delivered = outbound.stamped("send", delivery=Delivery(parts=1, easemob_msg_ids=("e1",)))
    await put(topics.DELIVERED, delivered.conversation_id, encode_envelope(delivered))

    result = await trace(s, "m-42")

    assert [v["topic"] for v in result.views] == [
        s.topic(t)
        for t in (
            topics.DLQ,
            topics.INBOUND,
            topics.MODERATED,
            topics.ROUTED,
            topics.COMPLETED,
            topics.OUTBOUND,
            topics.DLQ,
            topics.DELIVERED,
        )
    ]
    views = {v["topic"]: v for v in result.views}
    assert views[s.topic(topics.MODERATED)]["moderation_in"]["action"] == "mask"
    assert views[s.topic(topics.ROUTED)]["route"]["models"] == ["demo"]
    assert views[s.topic(topics.COMPLETED)]["completion"]["output_tokens"] == 7
    assert views[s.topic(topics.OUTBOUND)]["reply"] == {"kind": "answer", "text_len": 10}
    assert result.views[0]["match"] == "bytes"
    assert result.views[0]["dlq"]["error_kind"] == "UndecodableError"
    assert result.views[6]["dlq"]["error"] == "easemob 503"
    assert result.views[6]["dlq"]["stage"] == "send"
    assert result.views[6]["reply"]["kind"] == "answer"  # the failed record's own view
    last = views[s.topic(topics.DELIVERED)]
    assert last["delivery"]["easemob_msg_ids"] == ["e1"]
    assert list(last["stamps"]) == ["moderate-in", "route", "model", "moderate-out", "send"]
    assert all("你好" not in orjson.dumps(v).decode() for v in result.views)  # no user text
    assert result.summary()["summary"]["records"] == 8
    assert result.scanned > 8

    later = await trace(s, "m-42", since_ms=cut)
    assert [v["topic"] for v in later.views] == [s.topic(topics.DLQ), s.topic(topics.DELIVERED)]
    assert (await trace(s, "m-404")).views == []

    # The command line prints the same story and a summary.
    done = await asyncio.to_thread(run_imbot, s, "trace", "m-42")
    assert done.returncode == 0, done.stderr
    lines = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert [line["topic"] for line in lines[:-1]] == [v["topic"] for v in result.views]
    assert lines[-1]["summary"]["records"] == 8
    assert (await asyncio.to_thread(run_imbot, s, "trace", "m-404")).returncode == 1


def test_times_are_iso_ms_epoch_or_an_age() -> None:
    assert parse_time("2025-03-01T08:00:00+08:00") == 1740787200000
    assert parse_time("2025-03-01T00:00:00Z") == 1740787200000
    assert parse_time("1740787200000") == 1740787200000
    assert parse_time("15m", now_ms=1740787200000) == 1740787200000 - 15 * 60_000
    with pytest.raises(ConfigurationError, match="not a time"):
        parse_time("yesterday")


async def test_rate_paces_a_replay_and_progress_reports_it(kafka: Topics) -> None:
    s = kafka.settings
    for i in range(8):
        await kafka.put_env(topics.MODERATED, _env(f"r{i}", f"u{i}"))

    stream = io.StringIO()
    progress = Progress("replay", stream=stream, interval_s=0)
    started = time.monotonic()
    summary = await replay(s, topics.MODERATED, rate=10, progress=progress, out=lambda _: None)
    took = time.monotonic() - started

    assert summary.replayed == 8
    assert took >= 0.5  # 8 records at 10/s: seven waits of 0.1 s (loosely)
    assert len(await kafka.read(topics.MODERATED)) == 16
    lines = stream.getvalue().splitlines()  # not a terminal: one line per update
    assert lines
    assert lines[-1].startswith("replay: 8/~8 records  100%")
    assert lines[-1].endswith("8 produced")
    assert "/s" in lines[-1]


async def test_progress_on_the_command_line(kafka: Topics) -> None:
    s = kafka.settings
    for i in range(3):
        await kafka.put_env(topics.ROUTED, _env(f"p{i}"))

    args = ("replay", "--topic", "imbot.routed", "--dry-run")
    shown = await asyncio.to_thread(run_imbot, s, *args, "--progress")
    quiet = await asyncio.to_thread(run_imbot, s, *args)

    assert shown.returncode == 0, shown.stderr
    assert "replay: 3/~3 records" in shown.stderr
    assert "replay:" not in quiet.stderr  # stderr is no terminal here: no line by default
    assert orjson.loads(shown.stdout.splitlines()[-1])["summary"]["replayed"] == 3


async def test_trace_shows_a_sandboxed_replay_and_its_answer(kafka: Topics) -> None:
    s = kafka.settings
    original = _env("m-77")
    await kafka.put_env(topics.ROUTED, original)
    summary = await replay(s, topics.ROUTED, msg_id="m-77", out=lambda _: None)
    [(_, replayed)] = (await kafka.read(topics.ROUTED))[1:]
    # What the send stage does with a sandboxed record: its reply goes to imbot.sandbox.
    sandboxed = decode_envelope(replayed).stamped("send", reply=Reply(text="好的"))
    await kafka.put_env(topics.SANDBOX, sandboxed)

    result = await trace(s, "m-77")

    assert [v["topic"] for v in result.views] == [
        s.topic(topics.ROUTED),
        s.topic(topics.ROUTED),
        s.topic(topics.SANDBOX),
    ]
    first, again, answer = result.views
    assert "replay" not in first
    assert again["replay"]["id"] == summary.replay_id
    assert again["replay"]["sandbox"] is True
    assert answer["sandboxed_reply"] is True
    assert answer["reply"] == {"kind": "answer", "text_len": 2}
    counts = result.summary()["summary"]
    assert (counts["replayed"], counts["sandbox"]) == (2, 1)
    assert counts["replays"] == [summary.replay_id]
