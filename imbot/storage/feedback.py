"""Feedback: users' ratings of the bot's replies, and how satisfied they are by model and tier.

A row per feedback message (idempotent by its msg_id). The report joins each rating to
the answer it rates through the delivery ledger: the rated reply's Easemob msg id is a
reply part's ``deliveries.easemob_msg_id``, whose ``msg_id`` is the user's message;
that message's ``usage`` row names the model that answered, and its
``quota_reservations`` the user's tier (absent when the tier had no budget to count).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime, bindparam, text

from imbot.storage.database import Database

# ``created_at`` is when the user gave the rating, not when the row was written: a
# record replayed later keeps its time.
_INSERT = text(
    "INSERT INTO feedback (msg_id, reply_msg_id, rating, user_id, conversation_id, created_at)"
    " VALUES (:msg_id, :reply_msg_id, :rating, :user_id, :conversation_id, :at)"
    " ON CONFLICT (msg_id) DO NOTHING"
).bindparams(bindparam("at", type_=DateTime(timezone=True)))

# One row per (model, tier, rating, whether the reply was found in the ledger). A reply
# part's Easemob id is unique in the ledger; the tier is one per message (every
# reservation of a message is made for the same route decision).
_REPORT = """
SELECT u.model, r.tier, f.rating, d.msg_id IS NOT NULL, count(*)
FROM feedback f
LEFT JOIN deliveries d ON d.easemob_msg_id = f.reply_msg_id
LEFT JOIN usage u ON u.msg_id = d.msg_id
LEFT JOIN (
    SELECT msg_id, max(tier) AS tier FROM quota_reservations GROUP BY msg_id
) r ON r.msg_id = d.msg_id
{where}
GROUP BY u.model, r.tier, f.rating, d.msg_id IS NOT NULL
"""


@dataclass(frozen=True, slots=True)
class Satisfaction:
    """The ratings of the answers one model gave users of one tier (None: not known —
    no usage row, no reservation, or the reply was not found in the ledger)."""

    model: str | None
    tier: str | None
    ratings: Mapping[str, int]

    @property
    def up(self) -> int:
        return self.ratings.get("up", 0)

    @property
    def down(self) -> int:
        return self.ratings.get("down", 0)

    @property
    def share(self) -> float | None:
        """The share of thumbs up among up and down; None before either."""
        rated = self.up + self.down
        return round(self.up / rated, 4) if rated else None

    def as_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "tier": self.tier,
            "up": self.up,
            "down": self.down,
            "share": self.share,
            "ratings": dict(self.ratings),
        }


@dataclass(frozen=True, slots=True)
class FeedbackReport:
    since: datetime | None
    rows: tuple[Satisfaction, ...]  # most rated first
    total: int
    unmatched: int  # ratings of a reply the delivery ledger does not know

    def as_json(self) -> dict[str, Any]:
        return {
            "since": self.since.isoformat() if self.since else None,
            "total": self.total,
            "unmatched": self.unmatched,
            "by_model_and_tier": [row.as_json() for row in self.rows],
        }


class FeedbackLog:
    """The feedback table: written by the feedback stage, read by ``imbot feedback report``."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def record_feedback(
        self,
        *,
        msg_id: str,
        reply_msg_id: str,
        rating: str,
        user_id: str,
        conversation_id: str,
        at: datetime,
    ) -> bool:
        """Write one rating once; False when ``msg_id`` (the feedback message's Easemob
        id) was recorded before, as a redelivered record is."""
        async with self._database.writing_one() as session:
            result = await session.execute(
                _INSERT,
                {
                    "msg_id": msg_id,
                    "reply_msg_id": reply_msg_id,
                    "rating": rating,
                    "user_id": user_id,
                    "conversation_id": conversation_id,
                    "at": at,
                },
            )
        return bool(result.rowcount)

    async def report(self, since: datetime | None = None) -> FeedbackReport:
        """Satisfaction by the model that answered and the user's tier, since ``since``."""
        query = text(_REPORT.format(where="WHERE f.created_at >= :since" if since else ""))
        params: dict[str, Any] = {}
        if since is not None:
            query = query.bindparams(bindparam("since", type_=DateTime(timezone=True)))
            params["since"] = since
        async with self._database.reading() as session:
            found = (await session.execute(query, params)).all()
        groups: dict[tuple[str | None, str | None], dict[str, int]] = {}
        unmatched = total = 0
        for model, tier, rating, matched, count in found:
            n = int(count)
            total += n
            if not matched:
                unmatched += n
            ratings = groups.setdefault((model, tier), {})
            ratings[str(rating)] = ratings.get(str(rating), 0) + n
        rows = sorted(
            (Satisfaction(m, t, r) for (m, t), r in groups.items()),
            key=lambda row: (-sum(row.ratings.values()), row.model or "", row.tier or ""),
        )
        return FeedbackReport(since, tuple(rows), total, unmatched)
