"""Kafka topic names. Every topic is keyed by conversation id."""

from __future__ import annotations

from typing import Final

INBOUND: Final = "imbot.inbound"
MODERATED: Final = "imbot.moderated"
ROUTED: Final = "imbot.routed"
COMPLETED: Final = "imbot.completed"
OUTBOUND: Final = "imbot.outbound"
DELIVERED: Final = "imbot.delivered"
DLQ: Final = "imbot.dlq"
# Replies of sandboxed replays (``imbot replay`` without --deliver): recorded, never delivered.
SANDBOX: Final = "imbot.sandbox"
# Users' ratings of the bot's answers, caught by the gateway (docs/feedback.md): read by
# the feedback side stage, which records them; no stage writes on from there.
FEEDBACK: Final = "imbot.feedback"

# The answer as it is written (docs/streaming.md): the model stage's text so far, and the
# part of it the output review released, which the sender streams to the user.
CHUNKS: Final = "imbot.chunks"
CHUNKS_REVIEWED: Final = "imbot.chunks.reviewed"

# What ``ensure_topics`` creates, in the order a message meets them. The stages that
# read and write them are declared in streams.pipeline (core imports nothing above it),
# and tests/unit/test_pipeline_table.py checks this list against that table. A topic
# name under a prefix is ``Settings.topic``.
ALL: Final = (
    INBOUND,
    MODERATED,
    ROUTED,
    COMPLETED,
    OUTBOUND,
    DELIVERED,
    SANDBOX,
    FEEDBACK,
    CHUNKS,
    CHUNKS_REVIEWED,
    DLQ,
)

# Topics of the operator tools, not of the pipeline: the marks ``imbot dlq requeue`` leaves
# (one per requeued DLQ record), so no record is requeued twice by two operators. Created
# with the pipeline's topics (``ensure_topics``) and declared in deploy/kafka.
DLQ_REQUEUED: Final = "imbot.dlq.requeued"
TOOLS: Final = (DLQ_REQUEUED,)
