"""The error boundary with a real producer on the real broker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from imbot.core import topics
from imbot.core.envelope import (
    DlqRecord,
    Envelope,
    Reply,
    decode_envelope,
    encode_envelope,
)
from imbot.core.errors import FatalError, RetryableError
from imbot.core.kafka import ensure_topics, new_producer
from imbot.core.settings import Settings
from imbot.devtools.broker import consume_all
from imbot.streams.boundary import AfterPublish, Boundary, Emit, Outputs
from tests.envelopes import direct_envelope


def _env() -> Envelope:
    return direct_envelope(user="alice", msg_id="1290000000000000001")


class ScriptedStage:
    """A stage whose handle() fails as scripted, then succeeds."""

    name = "scripted"
    input_topic = topics.ROUTED
    deadline_s: float | None = None  # None: the boundary uses the settings' deadline

    def __init__(self, failures: Sequence[Exception]) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit | AfterPublish]:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return [Emit(topics.COMPLETED, env.stamped(self.name))]

    def fallback(self, env: Envelope, error: BaseException) -> Emit | None:
        return Emit(
            topics.OUTBOUND, env.stamped(self.name, reply=Reply(text="稍后再试", kind="fallback"))
        )


@pytest.fixture
async def outputs(make_settings: Callable[..., Settings]) -> AsyncIterator[Outputs]:
    settings = make_settings(stage_deadline_s=2.0, stage_retry_base_s=0.01, stage_retry_max_s=0.05)
    await ensure_topics(settings)
    producer = new_producer(settings)
    await producer.start()
    yield Outputs(settings, producer)
    await producer.stop()


async def _read(outputs: Outputs, base: str, n: int = 1, timeout: float = 3.0) -> list[bytes]:
    records = await consume_all(
        outputs.settings.kafka_bootstrap, outputs.settings.topic(base), n, timeout
    )
    return [v for _, v in records if v is not None]


async def test_retryable_failures_are_retried_then_published(outputs: Outputs) -> None:
    stage = ScriptedStage([RetryableError("429"), RetryableError("503")])
    outcome = await Boundary(stage, outputs, outputs.settings).process(
        b"k", encode_envelope(_env()), "t", 0, 7
    )
    assert (outcome, stage.calls) == ("ok", 3)
    [value] = await _read(outputs, topics.COMPLETED)
    assert "scripted" in decode_envelope(value).stamps


async def test_retries_stop_at_the_deadline_then_dlq_and_fallback(outputs: Outputs) -> None:
    stage = ScriptedStage([RetryableError("down")] * 10_000)
    outcome = await Boundary(stage, outputs, outputs.settings).process(
        b"k", encode_envelope(_env()), "t", 0, 7
    )
    assert outcome == "exhausted"
    [dlq] = await _read(outputs, topics.DLQ)
    record = DlqRecord.model_validate_json(dlq)
    assert (record.stage, record.error_kind, record.offset) == ("scripted", "RetryableError", 7)
    assert record.attempts > 1
    [fallback] = await _read(outputs, topics.OUTBOUND)
    assert decode_envelope(fallback).reply == Reply(text="稍后再试", kind="fallback")


async def test_fatal_goes_to_dlq_once_without_retry(outputs: Outputs) -> None:
    stage = ScriptedStage([FatalError("bad request", reason="bad_request")])
    outcome = await Boundary(stage, outputs, outputs.settings).process(
        b"k", encode_envelope(_env()), "t", 0, 1
    )
    assert (outcome, stage.calls) == ("fatal", 1)
    [dlq] = await _read(outputs, topics.DLQ)
    assert DlqRecord.model_validate_json(dlq).error_kind == "FatalError"


async def test_a_bug_in_a_stage_is_contained(outputs: Outputs) -> None:
    stage = ScriptedStage([ZeroDivisionError("oops")])
    outcome = await Boundary(stage, outputs, outputs.settings).process(
        b"k", encode_envelope(_env()), "t", 0, 1
    )
    assert outcome == "error"
    [dlq] = await _read(outputs, topics.DLQ)
    assert DlqRecord.model_validate_json(dlq).error_kind == "ZeroDivisionError"


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe not utf-8",
        b"[1, 2]",
        b'{"schema_version": 99}',
        b'{"schema_version": 1, "msg_id": 5}',
        None,
    ],
)
async def test_undecodable_records_keep_their_bytes_in_the_dlq(
    outputs: Outputs, raw: bytes | None
) -> None:
    stage = ScriptedStage([])
    outcome = await Boundary(stage, outputs, outputs.settings).process(b"k", raw, "t", 2, 9)
    assert (outcome, stage.calls) == ("undecodable", 0)
    [dlq] = await _read(outputs, topics.DLQ)
    record = DlqRecord.model_validate_json(dlq)
    assert (record.error_kind, record.partition, record.offset) == ("UndecodableError", 2, 9)
    if raw == b"\xff\xfe not utf-8":
        assert record.value_b64 is not None
    elif raw is not None:
        assert record.value == raw.decode()


@pytest.mark.parametrize(
    "error",
    [
        OperationalError("SELECT 1", {}, Exception("database is locked")),
        ConnectionRefusedError(111, "Connect call failed"),
    ],
)
async def test_a_database_that_is_briefly_unavailable_is_retried(
    outputs: Outputs, error: Exception
) -> None:
    stage = ScriptedStage([error])
    outcome = await Boundary(stage, outputs, outputs.settings).process(
        b"k", encode_envelope(_env()), "t", 0, 3
    )
    assert (outcome, stage.calls) == ("ok", 2)


async def test_a_constraint_violation_is_a_bug_not_a_retry(outputs: Outputs) -> None:
    stage = ScriptedStage([IntegrityError("INSERT", {}, Exception("duplicate key"))])
    outcome = await Boundary(stage, outputs, outputs.settings).process(
        b"k", encode_envelope(_env()), "t", 0, 4
    )
    assert (outcome, stage.calls) == ("fatal", 1)
    [dlq] = await _read(outputs, topics.DLQ)
    assert DlqRecord.model_validate_json(dlq).error_kind == "IntegrityError"


async def test_a_stage_deadline_of_its_own_overrides_the_setting(outputs: Outputs) -> None:
    stage = ScriptedStage([RetryableError("easemob down")] * 10_000)
    stage.deadline_s = 0.3
    started = asyncio.get_running_loop().time()
    outcome = await Boundary(stage, outputs, outputs.settings).process(
        b"k", encode_envelope(_env()), "t", 0, 5
    )
    assert outcome == "exhausted"
    assert asyncio.get_running_loop().time() - started < 1.5  # not the settings' 2 s


async def test_after_publish_work_runs_once_the_outputs_are_out(outputs: Outputs) -> None:
    seen_on_topic: list[int] = []

    class StageWithEffect(ScriptedStage):
        async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit | AfterPublish]:
            async def effect() -> None:
                seen_on_topic.append(len(await _read(outputs, topics.COMPLETED)))

            return [Emit(topics.COMPLETED, env.stamped(self.name)), AfterPublish(effect)]

    outcome = await Boundary(StageWithEffect([]), outputs, outputs.settings).process(
        b"k", encode_envelope(_env()), "t", 0, 6
    )
    assert outcome == "ok"
    assert seen_on_topic == [1]  # the output was already published when the effect ran
