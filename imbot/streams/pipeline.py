"""The pipeline, declared once: read the table top to bottom.

Each row is one stage: its name, the topic it reads, what it needs to run, whether
a fatal failure gets the waiting user the fallback reply, and which process runs it
(``imbot worker`` or ``imbot sender``). A stage's main output is the next row's
input (the last row names its own); a stage that decides the final answer early
also writes to the sender's input (``early``).

Beside the chain, ``SIDE`` holds side rows: a stage that reads a topic of its own
(fed from outside the chain: the gateway's feedback records, the model stage's chunks
of an answer being written) and writes on, if at all, only to another side row's
input. ``ROWS`` is both, the chain first.

Everything else is derived from these rows: the CLI's stage names, the worker's
default stage list, the resources a worker opens, replay's stage-to-topic map,
trace's topic order, and (checked by tests) ``core.topics.ALL`` and the Kubernetes
Deployments. Adding a stage is one row here and one class in ``streams.stages``.

This module imports only ``core.topics``, so the CLI's parser can read it without
loading the stream machinery.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Final, Literal

from imbot.core import topics

Resource = Literal["moderator", "catalog", "sender", "storage", "easemob"]
Process = Literal["worker", "sender"]


@dataclass(frozen=True, slots=True)
class StageSpec:
    name: str
    input: str  # base topic (core.topics) the stage reads
    needs: frozenset[Resource]
    answers_on_failure: bool  # a fatal failure sends the waiting user the fallback reply
    process: Process = "worker"  # the command that runs it: imbot worker, or imbot sender
    early: tuple[str, ...] = ()  # topics besides ``forward``: an answer decided early
    forward: str = field(default="")  # the next row's input (set by ``_chained``); "" on a side row

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.forward, *self.early) if self.forward else self.early


def _row(
    name: str,
    input: str,
    *,
    needs: tuple[Resource, ...],
    answers_on_failure: bool = True,
    process: Process = "worker",
    early: tuple[str, ...] = (),
    forward: str = "",
) -> StageSpec:
    return StageSpec(
        name, input, frozenset(needs), answers_on_failure, process, early, forward=forward
    )


def _chained(*rows: StageSpec) -> tuple[StageSpec, ...]:
    """Each row's ``forward`` is the next row's input; the last row must name its own."""
    chained = [replace(row, forward=after.input) for row, after in pairwise(rows)]
    if not rows[-1].forward:
        raise ValueError(f"the last stage {rows[-1].name!r} must name its output topic")
    for row in rows[:-1]:
        if row.forward:
            raise ValueError(f"stage {row.name!r}: its output is the next stage's input")
    chained.append(rows[-1])
    return _distinct(tuple(chained))


def _side(*rows: StageSpec) -> tuple[StageSpec, ...]:
    """Rows off the chain: each reads its own topic and writes nothing on (nothing
    early), except forward to another side row's input, so no chain row's input
    depends on them."""
    inputs = {row.input for row in rows}
    for row in rows:
        if row.early or (row.forward and row.forward not in inputs):
            raise ValueError(
                f"side stage {row.name!r} writes nothing on: nothing early, forward only"
                " to another side row"
            )
    return rows


def _distinct(rows: tuple[StageSpec, ...]) -> tuple[StageSpec, ...]:
    """Unique names, one reader per topic, and early outputs that some row reads."""
    names = [row.name for row in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"stage names must be unique: {names}")
    inputs = {row.input for row in rows}
    if len(inputs) != len(rows):
        raise ValueError("every stage reads its own topic")
    for row in rows:
        if not set(row.early) <= inputs:
            raise ValueError(f"stage {row.name!r} writes early to a topic no stage reads")
    return rows


PIPELINE: Final = _chained(
    _row("moderate-in", topics.INBOUND, needs=("moderator", "storage"), early=(topics.OUTBOUND,)),
    _row("route", topics.MODERATED, needs=("storage",), early=(topics.OUTBOUND,)),
    # easemob: the image messages' files, downloaded for a vision model.
    _row("model", topics.ROUTED, needs=("catalog", "storage", "easemob"), early=(topics.OUTBOUND,)),
    _row("moderate-out", topics.COMPLETED, needs=("moderator", "storage")),
    # No fallback: it would go through this very stage.
    _row(
        "send",
        topics.OUTBOUND,
        needs=("sender",),  # the sender brings its own storage: the delivery ledger
        answers_on_failure=False,
        process="sender",
        forward=topics.DELIVERED,
    ),
)

SIDE: Final = _side(
    # Users' ratings of answers (docs/feedback.md): the gateway publishes them, this
    # records them in the feedback table. Nobody waits on it, so no fallback reply.
    _row(
        "feedback",
        topics.FEEDBACK,
        needs=("storage",),
        answers_on_failure=False,
        process="sender",
    ),
    # The answer as it is written (docs/streaming.md): the model stage publishes the text
    # so far; the output review releases what may be shown; the sender streams it. Each
    # record stands alone (the whole text so far), and the final envelope on the chain
    # finishes the stream, so nobody waits on these rows: no fallback reply.
    _row(
        "review-stream",
        topics.CHUNKS,
        needs=("moderator",),
        answers_on_failure=False,
        forward=topics.CHUNKS_REVIEWED,
    ),
    _row(
        "send-stream",
        topics.CHUNKS_REVIEWED,
        needs=("sender",),
        answers_on_failure=False,
        process="sender",
    ),
)

ROWS: Final = _distinct((*PIPELINE, *SIDE))
BY_NAME: Final = {row.name: row for row in ROWS}
STAGE_NAMES: Final = tuple(BY_NAME)
# What ``imbot worker`` runs without ``--stage``.
PROCESSING_STAGES: Final = tuple(row.name for row in ROWS if row.process == "worker")
# What ``imbot sender`` runs.
SENDER_STAGES: Final = tuple(row.name for row in ROWS if row.process == "sender")
# Every topic of the pipeline in the order a message meets them, then the sandbox (where
# the send stage puts a sandboxed replay's reply instead of delivering it), the side
# rows' inputs, the DLQ last.
TOPICS: Final = (
    *dict.fromkeys(t for row in PIPELINE for t in (row.input, row.forward)),
    topics.SANDBOX,
    *(row.input for row in SIDE),
    topics.DLQ,
)


def spec(name: str) -> StageSpec:
    return BY_NAME[name]


def stage_reading(base_topic: str) -> str | None:
    """The stage whose input ``base_topic`` is, if any."""
    for row in ROWS:
        if row.input == base_topic:
            return row.name
    return None


def needs_of(names: Iterable[str]) -> frozenset[Resource]:
    """What the stages ``names`` need between them (what their worker opens)."""
    return frozenset(r for name in names for r in BY_NAME[name].needs)
