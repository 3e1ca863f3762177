"""The streams room's Prometheus metrics, in one list (README, "Metrics")."""

from __future__ import annotations

from typing import get_args

from prometheus_client import Counter, Gauge, Histogram

from imbot.core.envelope import ReplyKind
from imbot.core.errors import FatalReason

REPLIES = Counter("imbot_replies_total", "Replies decided, by kind", ["kind"])

ROUTE_DECISIONS = Counter(
    "imbot_route_decisions_total",
    "Route decisions by rule (level, downgrade, quota_exhausted, fixed, vision, command_*,"
    " ignored_*, unsupported) and user tier",
    ["rule", "tier"],
)

SANDBOXED = Counter(
    "imbot_sandboxed_replies_total", "Replies of sandboxed replays kept in imbot.sandbox"
)

QUOTA_SETTLE_LOST = Counter(
    "imbot_quota_settle_failures_total",
    "Reservations whose settlement could not be written (they expire instead)",
)

USAGE_LOST = Counter(
    "imbot_usage_write_failures_total", "Model calls whose usage row could not be written"
)

PROCESSED = Counter(
    "imbot_stage_messages_total", "Records handled by a stage, by outcome", ["stage", "outcome"]
)

STAGE_RETRIES = Counter(
    "imbot_stage_retries_total", "Retries inside the boundary", ["stage", "error"]
)

STAGE_SECONDS = Histogram(
    "imbot_stage_seconds",
    "Time from a stage receiving a record to its outputs being acknowledged",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

DLQ_RECORDS = Counter(
    "imbot_dlq_records_total",
    "Records a stage gave up on, by stage and reason (the FatalError's reason, or the"
    " error kind: undecodable, retries_exhausted, database, …)",
    ["stage", "reason"],
)

IN_FLIGHT = Gauge(
    "imbot_stage_in_flight", "Records a stage is handling now (this worker)", ["stage"]
)

CONSUMER_LAG = Gauge(
    "imbot_consumer_lag",
    "Records behind the end of the stage's input topic: the end offset minus the consumer"
    " group's committed offset, per partition (every replica reports the group's figure)",
    ["stage", "partition"],
)

BUDGET_DAILY_COST = Gauge(
    "imbot_budget_daily_cost",
    "The policy's daily budget in its currency (scope tenant: the whole Easemob app), for"
    " the cost-rate alert",
    ["scope"],
)

STREAM_REVIEWS = Counter(
    "imbot_stream_reviews_total",
    "Records of answers still being written through the output review, by outcome:"
    " released (a longer prefix may be shown), held (nothing new yet), blocked (the"
    " stream ends with the configured reply)",
    ["outcome"],
)
CHUNK_RECORDS = Counter(
    "imbot_stream_chunk_records_total",
    "Records of answers still being written that the model stage published, by kind"
    " (text, typing) and outcome (published, failed: the final reply still goes out)",
    ["kind", "outcome"],
)
for _outcome in ("released", "held", "blocked"):
    STREAM_REVIEWS.labels(_outcome)
for _kind in ("text", "typing"):
    for _outcome in ("published", "failed"):
        CHUNK_RECORDS.labels(_kind, _outcome)

# Known label sets exist from the start, at zero (a series first seen at 1 has no
# earlier sample, so increase() and rate() miss its first event: the first DLQ record
# of a kind after a restart would never reach ImbotDLQRecords). ``known_stage_series``
# creates a stage's when the worker that runs it starts.
OUTCOMES = ("ok", "undecodable", "exhausted", "fatal", "error", "unpublishable")
# The DLQ reasons: a FatalError's reason, else the error's kind.
DLQ_REASONS = (
    *get_args(FatalReason),
    "UndecodableError",
    "RetryableError",
    "StorageUnavailable",
    "StorageError",
    "ConfigurationError",
    "TimeoutError",
    "ConnectionError",
    "unexpected",
)
for _kind in get_args(ReplyKind):
    REPLIES.labels(_kind)


def known_stage_series(stage: str) -> None:
    """A stage's counters at zero, before its first record."""
    for outcome in OUTCOMES:
        PROCESSED.labels(stage, outcome)
    for reason in DLQ_REASONS:
        DLQ_RECORDS.labels(stage, reason)
    STAGE_SECONDS.labels(stage)
