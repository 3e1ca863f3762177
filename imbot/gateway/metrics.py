"""The gateway room's Prometheus metrics, in one list (README, "Metrics")."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

CALLBACKS = Counter(
    "imbot_gateway_callbacks_total", "Before-send callbacks by outcome", ["outcome"]
)

CALLBACK_SECONDS = Histogram(
    "imbot_gateway_callback_seconds",
    "Time to answer a callback, by outcome",
    ["outcome"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)

PUBLISH_FAILURES = Counter(
    "imbot_gateway_publish_failures_total", "Publishes that missed the deadline or failed", ["why"]
)

REPLAY_STORE_FAILURES = Counter(
    "imbot_gateway_replay_store_failures_total",
    "AI messages answered by the fail policy because the callId store did not answer",
    ["why"],
)

LATE_ACKS = Counter(
    "imbot_gateway_late_acks_total",
    "Records acked after their deadline: answered by the fail policy, yet on the topic",
)

# Named for what it counts, not the room it is counted in: the dashboard's and the
# alerts' satisfaction figures (deploy/monitoring) read it as it is.
FEEDBACK = Counter(
    "imbot_feedback_total",
    "Users' ratings of the bot's answers, published to imbot.feedback, by rating",
    ["rating"],
)

# Known label sets exist from the start, at zero: a series that first appears at 1 has
# no earlier sample, so rate() and increase() would miss that first event (the first
# publish failure after a restart would never reach an alert).
OUTCOMES = (
    "published",
    "not_ai",
    "duplicate",
    "blocked",
    "feedback",
    "replayed",
    "client_gone",
    "bad_json",
    "bad_body",
    "body_timeout",
    "too_large",
    "internal_error",
    "publish_failed",
    "replay_store_failed",
)
for _outcome in OUTCOMES:
    CALLBACKS.labels(_outcome)
    CALLBACK_SECONDS.labels(_outcome)
for _why in ("timeout", "kafka_error", "not_connected", "cancelled"):
    PUBLISH_FAILURES.labels(_why)
for _why in ("timeout", "not_connected"):
    REPLAY_STORE_FAILURES.labels(_why)
for _rating in ("up", "down"):
    FEEDBACK.labels(_rating)
