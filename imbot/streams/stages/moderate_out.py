"""moderate-out: the answer through the output review."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Self

from imbot.core.envelope import Envelope
from imbot.core.settings import Policy
from imbot.storage import AuditLog
from imbot.streams.boundary import Emit
from imbot.streams.stages.base import PipelineStage, Resources, answer, record_verdict

if TYPE_CHECKING:  # loaded only by the workers that run these stages
    from imbot.moderation import Moderator


log = logging.getLogger("imbot.stages")


class ModerateOut(PipelineStage, stage="moderate-out"):
    def __init__(self, policy: Policy, moderator: Moderator, audit: AuditLog) -> None:
        self.replies = policy.replies
        self.moderator = moderator
        self.audit = audit

    @classmethod
    def build(cls, r: Resources) -> Self:
        return cls(r.policy, r.moderator, r.storage.audit)

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit]:
        completion = env.completion
        if completion is None:
            return [self._fallback(env)]
        result = self.moderator.check_output(
            completion.text,
            finish_reason=completion.finish_reason,
            system_prompt=env.route.system_prompt if env.route else None,
        )
        await record_verdict(self.audit, env, "output", result)
        verdict = result.as_verdict()
        if result.action == "block" or not result.text.strip():
            return [
                answer(
                    env,
                    self.name,
                    self.replies.blocked_output,
                    "blocked_output",
                    moderation_out=verdict,
                )
            ]
        # Its row's main output is the sender's input: the answer goes to the user.
        return [answer(env, self.name, result.text, "answer", moderation_out=verdict)]
