"""review-stream: the output review of an answer still being written (docs/streaming.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Self

from imbot.core.envelope import Envelope, Reply
from imbot.core.errors import FatalError
from imbot.core.settings import Policy
from imbot.moderation.release import release_point
from imbot.streams.boundary import Emit
from imbot.streams.metrics import STREAM_REVIEWS
from imbot.streams.stages.base import PipelineStage, Resources

if TYPE_CHECKING:  # loaded only by the workers that run these stages
    from imbot.moderation import Moderator


class ReviewStream(PipelineStage, stage="review-stream"):
    """Each record is the model's text so far. The whole of it is reviewed, so a word
    split across the model's tokens (or across chunks) is still caught; what may be
    shown is the masked text up to the release point (``moderation.release``): whole
    sentences (or the clauses of a long one), never where a lexicon word could begin
    and go on into text not written yet. A block ends the stream: the record goes on
    with the configured reply and no text.

    Stateless: a record stands alone (the text so far, not a delta), so a redelivered
    or late one is harmless (the sender sends only what its ledger has not). The final
    envelope still goes through moderate-out, which audits the verdict."""

    def __init__(self, policy: Policy, moderator: Moderator) -> None:
        self.replies = policy.replies
        self.streaming = policy.streaming
        self.moderator = moderator

    @classmethod
    def build(cls, r: Resources) -> Self:
        return cls(r.policy, r.moderator)

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit]:
        part = env.partial
        if part is None:
            raise FatalError("a chunk record without its text so far", reason="bad_request")
        if part.kind == "typing":
            return [Emit(self.forward, env)]
        prompt = env.route.system_prompt if env.route else None
        if self.moderator.check_output(part.text, system_prompt=prompt).action == "block":
            return [self._blocked(env)]
        text = part.text
        cut = release_point(
            text,
            max_hold_chars=self.streaming.max_hold_chars,
            safe=lambda at: not self.moderator.word_may_span(text[:at], text[at:]),
        )
        if cut == 0:
            STREAM_REVIEWS.labels("held").inc()
            return []
        shown = self.moderator.check_output(part.text[:cut], system_prompt=prompt)
        if shown.action == "block":
            return [self._blocked(env)]
        STREAM_REVIEWS.labels("released").inc()
        released = part.model_copy(update={"text": shown.text})
        return [Emit(self.forward, env.model_copy(update={"partial": released}))]

    def _blocked(self, env: Envelope) -> Emit:
        """The stream ends here: the sender finishes it with the configured reply."""
        STREAM_REVIEWS.labels("blocked").inc()
        assert env.partial is not None
        reply = Reply(text=self.replies.blocked_output, kind="blocked_output")
        ended = env.partial.model_copy(update={"text": ""})
        return Emit(self.forward, env.model_copy(update={"partial": ended, "reply": reply}))
