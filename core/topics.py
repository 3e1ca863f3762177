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

ALL: Final = (INBOUND, MODERATED, ROUTED, COMPLETED, OUTBOUND, DELIVERED, DLQ)


def named(base: str, prefix: str) -> str:
    """Topic name under an optional prefix (tests isolate themselves with one)."""
    return f"{prefix}{base}" if prefix else base
