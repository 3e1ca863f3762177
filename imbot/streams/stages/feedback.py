"""feedback: a user's rating of an answer, recorded once."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol, Self

from imbot.core.envelope import Envelope
from imbot.core.errors import ConfigurationError, FatalError
from imbot.streams.boundary import Emit
from imbot.streams.stages.base import PipelineStage, Resources

log = logging.getLogger("imbot.stages")


class FeedbackRecords(Protocol):
    """Where the feedback stage writes a rating (``storage.FeedbackLog``)."""

    async def record_feedback(
        self,
        *,
        msg_id: str,
        reply_msg_id: str,
        rating: str,
        user_id: str,
        conversation_id: str,
        at: datetime,
    ) -> bool: ...


class RecordFeedback(PipelineStage, stage="feedback"):
    """A side stage: a user's rating of an answer (docs/feedback.md), as the gateway
    published it, written to the feedback table once per feedback message (a
    redelivered record writes nothing). Nothing goes on from here, and nobody waits
    on it: a record it cannot read goes to the DLQ without a reply."""

    def __init__(self, feedback: FeedbackRecords) -> None:
        self.feedback = feedback

    @classmethod
    def build(cls, r: Resources) -> Self:
        # The feedback table is the sender process's storage (``storage.Storage``), not
        # part of what the stages before the sender use (``StageStorage``).
        feedback: FeedbackRecords | None = getattr(r.storage, "feedback", None)
        if feedback is None:
            raise ConfigurationError("the feedback stage needs a storage with the feedback table")
        return cls(feedback)

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit]:
        body = env.content.body
        reply_msg_id, rating = body.get("reply_msg_id"), body.get("rating")
        if not (isinstance(reply_msg_id, str) and reply_msg_id and isinstance(rating, str)):
            raise FatalError("a feedback record without its reply_msg_id and rating")
        at = env.easemob_timestamp if env.easemob_timestamp is not None else env.received_at
        written = await self.feedback.record_feedback(
            msg_id=env.msg_id,
            reply_msg_id=reply_msg_id,
            rating=rating,
            user_id=env.sender,
            conversation_id=env.conversation_id,
            at=datetime.fromtimestamp(at / 1000, UTC),
        )
        if not written:
            log.info("feedback recorded before", extra={"msg_id": env.msg_id})
        return []
