"""moderate-in: the user's message through the input moderation."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Self

from imbot.core.envelope import Envelope, Verdict
from imbot.core.settings import Policy
from imbot.storage import AuditLog
from imbot.streams.boundary import Emit
from imbot.streams.stages.base import PipelineStage, Resources, answer, record_verdict

if TYPE_CHECKING:  # loaded only by the workers that run these stages
    from imbot.moderation import Moderator


log = logging.getLogger("imbot.stages")


class ModerateIn(PipelineStage, stage="moderate-in"):
    def __init__(self, policy: Policy, moderator: Moderator, audit: AuditLog) -> None:
        self.replies = policy.replies
        self.moderator = moderator
        self.audit = audit

    @classmethod
    def build(cls, r: Resources) -> Self:
        return cls(r.policy, r.moderator, r.storage.audit)

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit]:
        text = env.content.text
        if env.content.type != "txt" or not text:
            return [
                Emit(self.forward, env.stamped(self.name, moderation_in=Verdict(action="allow")))
            ]
        result = self.moderator.check_input(text)
        await record_verdict(self.audit, env, "input", result)
        verdict = result.as_verdict()
        if result.action == "block":
            return [
                answer(
                    env,
                    self.name,
                    self.replies.blocked_input,
                    "blocked_input",
                    moderation_in=verdict,
                )
            ]
        return [Emit(self.forward, env.stamped(self.name, moderation_in=verdict))]
