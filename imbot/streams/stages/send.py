"""send: the reply through the sender (Easemob REST), then history."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Self

from imbot.core import topics
from imbot.core.envelope import Envelope
from imbot.streams.boundary import Emit
from imbot.streams.metrics import SANDBOXED
from imbot.streams.stages.base import PipelineStage, Resources

if TYPE_CHECKING:  # loaded only by the workers that run these stages
    from imbot.sender.service import ReplySender


class Send(PipelineStage, stage="send"):
    def __init__(self, sender: ReplySender, *, deadline_s: float) -> None:
        self.sender = sender
        # Keep trying through an Easemob outage far longer than a model stage would:
        # the answer exists and was paid for; only delivery is waiting.
        self.deadline_s = deadline_s

    @classmethod
    def build(cls, r: Resources) -> Self:
        return cls(r.sender, deadline_s=r.settings.sender_deadline_s)

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit]:
        if env.replay is not None and env.replay.sandbox:
            # A sandboxed replay: its reply is recorded for trace, never sent to a user.
            SANDBOXED.inc()
            return [Emit(topics.SANDBOX, env.stamped(self.name))]
        delivery = await self.sender.deliver(env, deadline=deadline)
        return [Emit(self.forward, env.stamped(self.name, delivery=delivery))]
