"""The pipeline table (streams.pipeline) is the one place the stages are declared: the
classes, the worker's resources, the CLI, replay and the topic list all follow it."""

from __future__ import annotations

from itertools import combinations, pairwise
from typing import get_args

import pytest

from imbot.cli.main import build_parser
from imbot.core import topics
from imbot.core.envelope import Envelope
from imbot.core.errors import ConfigurationError, FatalError
from imbot.core.settings import DEFAULT_POLICY_FILE, Settings, load_settings
from imbot.streams import pipeline
from imbot.streams.pipeline import (
    PIPELINE,
    PROCESSING_STAGES,
    ROWS,
    SENDER_STAGES,
    SIDE,
    STAGE_NAMES,
    Resource,
)
from imbot.streams.stages import STAGES, PipelineStage, Route
from imbot.streams.worker import OPENERS, Runtime
from tests.envelopes import direct_envelope


@pytest.fixture
def settings(sqlite_url: str) -> Settings:
    return load_settings(
        policy_file=DEFAULT_POLICY_FILE, callback_secrets="unit-secret", database_url=sqlite_url
    )


def _env() -> Envelope:
    return direct_envelope()


def test_the_table_reads_as_the_pipeline_top_to_bottom() -> None:
    assert [row.name for row in PIPELINE] == [
        "moderate-in",
        "route",
        "model",
        "moderate-out",
        "send",
    ]
    assert STAGE_NAMES == (
        "moderate-in",
        "route",
        "model",
        "moderate-out",
        "send",
        "feedback",
        "review-stream",
        "send-stream",
    )
    assert [(row.input, row.forward) for row in PIPELINE] == [
        (topics.INBOUND, topics.MODERATED),
        (topics.MODERATED, topics.ROUTED),
        (topics.ROUTED, topics.COMPLETED),
        (topics.COMPLETED, topics.OUTBOUND),
        (topics.OUTBOUND, topics.DELIVERED),
    ]
    assert PROCESSING_STAGES == ("moderate-in", "route", "model", "moderate-out", "review-stream")
    assert SENDER_STAGES == ("send", "feedback", "send-stream")


def test_side_rows_read_their_own_topic_and_write_on_only_to_side_rows() -> None:
    """The feedback row: fed by the gateway, not by the chain, run by the sender. The
    streaming rows: fed by the model stage's chunk records, reviewed, then sent."""
    assert [(row.name, row.input, row.forward) for row in SIDE] == [
        ("feedback", topics.FEEDBACK, ""),
        ("review-stream", topics.CHUNKS, topics.CHUNKS_REVIEWED),
        ("send-stream", topics.CHUNKS_REVIEWED, ""),
    ]
    feedback, review, send = SIDE
    assert (review.process, review.needs, review.answers_on_failure) == (
        "worker",
        frozenset({"moderator"}),
        False,
    )
    assert (send.process, send.needs, send.answers_on_failure) == (
        "sender",
        frozenset({"sender"}),
        False,
    )
    assert (feedback.forward, feedback.early, feedback.outputs) == ("", (), ())
    assert (feedback.process, feedback.needs, feedback.answers_on_failure) == (
        "sender",
        frozenset({"storage"}),
        False,
    )
    assert pipeline.ROWS[: len(PIPELINE)] == PIPELINE  # the chain first
    assert pipeline.ROWS[len(PIPELINE) :] == SIDE
    chain_topics = {t for row in PIPELINE for t in (row.input, *row.outputs)}
    assert topics.FEEDBACK not in chain_topics  # no chain row writes or reads it
    assert pipeline.stage_reading(topics.FEEDBACK) == "feedback"


def test_a_side_row_that_writes_on_or_shares_a_topic_is_refused() -> None:
    forward = pipeline.StageSpec("s", "t.s", frozenset(), answers_on_failure=False, forward="t.x")
    with pytest.raises(ValueError, match="writes nothing on"):
        pipeline._side(forward)
    onto_chain = pipeline.StageSpec(
        "s", "t.s", frozenset(), answers_on_failure=False, forward=topics.OUTBOUND
    )
    with pytest.raises(ValueError, match="writes nothing on"):
        pipeline._side(onto_chain)
    reader = pipeline.StageSpec("r", "t.x", frozenset(), answers_on_failure=False)
    assert pipeline._side(forward, reader) == (forward, reader)  # to another side row
    early = pipeline.StageSpec("s", "t.s", frozenset(), answers_on_failure=False, early=("t.x",))
    with pytest.raises(ValueError, match="writes nothing on"):
        pipeline._side(early)
    twin = pipeline.StageSpec("s", topics.OUTBOUND, frozenset(), answers_on_failure=False)
    with pytest.raises(ValueError, match="its own topic"):
        pipeline._distinct((*PIPELINE, *pipeline._side(twin)))
    named = pipeline.StageSpec("send", "t.s", frozenset(), answers_on_failure=False)
    with pytest.raises(ValueError, match="unique"):
        pipeline._distinct((*PIPELINE, *pipeline._side(named)))


def test_core_topics_are_the_tables_topics_in_its_order() -> None:
    """core.topics.ALL (what ensure_topics creates) cannot import streams: checked here."""
    assert pipeline.TOPICS == topics.ALL


def test_a_stage_writes_forward_to_the_next_rows_input() -> None:
    for row, after in pairwise(PIPELINE):
        assert row.forward == after.input
        assert row.outputs[0] == after.input


def test_every_row_has_its_class_bound_to_it() -> None:
    assert list(STAGES) == list(STAGE_NAMES)
    for row in ROWS:
        cls = STAGES[row.name]
        assert (cls.name, cls.input_topic, cls.forward) == (row.name, row.input, row.forward)


def test_a_class_binds_to_a_row_of_the_table_and_only_one_class_does() -> None:
    with pytest.raises(TypeError, match="no row 'review'"):

        class Review(PipelineStage, stage="review"):
            pass

    with pytest.raises(TypeError, match="two classes"):

        class OtherRoute(PipelineStage, stage="route"):
            pass

    assert STAGES["route"] is Route


def test_a_table_that_breaks_the_chain_is_refused() -> None:
    row = pipeline.StageSpec("a", "t.a", frozenset(), answers_on_failure=True)
    with pytest.raises(ValueError, match="must name its output"):
        pipeline._chained(row)
    last = pipeline.StageSpec("b", "t.b", frozenset(), answers_on_failure=False, forward="t.c")
    with pytest.raises(ValueError, match="unique"):
        pipeline._chained(row, row, last)
    early = pipeline.StageSpec("c", "t.c", frozenset(), answers_on_failure=True, early=("t.x",))
    with pytest.raises(ValueError, match="early"):
        pipeline._chained(early, last)


def test_the_worker_can_open_every_resource_a_row_may_name() -> None:
    assert set(OPENERS) == set(get_args(Resource))


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
async def test_a_stage_builds_from_exactly_the_resources_its_row_names(
    settings: Settings, row: pipeline.StageSpec
) -> None:
    runtime = Runtime(settings, [row.name])
    try:
        stage = STAGES[row.name].build(await runtime.open_resources(row.needs))
        assert stage.name == row.name
        for fewer in combinations(sorted(row.needs), len(row.needs) - 1):
            with pytest.raises(ConfigurationError, match="needs"):
                STAGES[row.name].build(await runtime.open_resources(fewer))
    finally:
        await runtime.close()


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
async def test_a_fatal_failure_answers_the_user_exactly_where_the_table_says(
    settings: Settings, row: pipeline.StageSpec
) -> None:
    runtime = Runtime(settings, [row.name])
    try:
        stage = STAGES[row.name].build(await runtime.open_resources(row.needs))
        emit = stage.fallback(_env(), FatalError("broken"))
        if not row.answers_on_failure:
            assert emit is None
        else:
            assert emit is not None
            assert emit.topic == topics.OUTBOUND
            assert emit.envelope.reply is not None
            assert emit.envelope.reply.kind == "fallback"
            assert emit.envelope.reply.text == settings.policy.replies.fallback
    finally:
        await runtime.close()


def test_the_worker_opens_only_what_its_stages_need() -> None:
    assert "sender" not in pipeline.needs_of(PROCESSING_STAGES)
    assert pipeline.needs_of(["send"]) == {"sender"}
    assert pipeline.needs_of(SENDER_STAGES) == {"sender", "storage"}  # the feedback table
    assert pipeline.needs_of(["review-stream"]) == {"moderator"}
    assert pipeline.needs_of(["route"]) == {"storage"}


def test_the_cli_offers_the_tables_stages() -> None:
    parser = build_parser()
    assert parser.parse_args(["worker", "--stage", "model"]).stage == ["model"]
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--stage", "no-such-stage"])
    assert (
        parser.parse_args(["replay", "--topic", "imbot.dlq", "--to-stage", "send"]).to_stage
        == "send"
    )
