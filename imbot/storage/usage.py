"""Usage: the tokens and cost of each model call, one row per answered message."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

from imbot.core.envelope import Completion, Envelope
from imbot.storage.database import Database, GroupCommit, sql
from imbot.storage.schema import UsageRow, utcnow


def _length(column: Any) -> int:
    return int(column.type.length)


def _clip(value: str | None, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else value


_MODEL_MAX = _length(UsageRow.__table__.c.model)
_PROVIDER_MAX = _length(UsageRow.__table__.c.provider)
_CURRENCY_MAX = _length(UsageRow.__table__.c.currency)

_INSERT_USAGE = sql(
    "INSERT INTO usage (msg_id, conversation_id, model, provider, input_tokens,"
    " output_tokens, cost, currency, latency_ms, created_at) VALUES (:msg_id,"
    " :conversation_id, :model, :provider, :input_tokens, :output_tokens, :cost, :currency,"
    " :latency_ms, :now) ON CONFLICT (msg_id) DO NOTHING"
)


_ANSWERED = text("SELECT 1 FROM usage WHERE msg_id = :msg_id")


class UsageLedger:
    """One usage row per paid model call, group-committed (see ``GroupCommit``)."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._usage = GroupCommit(database, _INSERT_USAGE)

    async def answered(self, msg_id: str) -> bool:
        """Whether a model call answered ``msg_id`` and its completion went on (the row
        is written once the completion is published): a copy of the message seen again
        (at-least-once delivery) needs no second call and no second answer."""
        async with self._database.reading() as session:
            row = (await session.execute(_ANSWERED, {"msg_id": msg_id})).first()
        return row is not None

    async def record_usage(self, env: Envelope, c: Completion) -> None:
        """The tokens and cost of the model call that answered ``env`` (idempotent).

        Written by the model stage as soon as the call returns, so a paid call is
        accounted for even when its reply is never delivered.
        """
        await self._usage.write(
            {
                "msg_id": env.msg_id,
                "conversation_id": env.conversation_id,
                # As the provider named them: free text, clipped to what the columns hold.
                "model": _clip(c.model, _MODEL_MAX),
                "provider": _clip(c.provider, _PROVIDER_MAX),
                "input_tokens": c.input_tokens,
                "output_tokens": c.output_tokens,
                "cost": c.cost,
                "currency": _clip(c.currency, _CURRENCY_MAX),
                "latency_ms": c.latency_ms,
                "now": utcnow(),
            }
        )
