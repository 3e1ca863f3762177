"""The moderation room's Prometheus metrics, in one list (README, "Metrics")."""

from __future__ import annotations

from prometheus_client import Counter

MODERATION_DECISIONS = Counter(
    "imbot_moderation_decisions_total",
    "Moderation decisions that were not a plain allow",
    ["stage", "category", "action"],
)
