"""send-stream: the reviewed answer so far, streamed to the user (docs/streaming.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Self

from imbot.core import topics
from imbot.core.envelope import Envelope
from imbot.core.errors import FatalError
from imbot.streams.boundary import Emit
from imbot.streams.metrics import SANDBOXED
from imbot.streams.stages.base import PipelineStage, Resources

if TYPE_CHECKING:  # loaded only by the workers that run these stages
    from imbot.sender.service import ReplySender


class SendStream(PipelineStage, stage="send-stream"):
    """Each record adds to the stream what the ledger says is not shown yet
    (``sender.stream``). A chunk is worth little once the next one (or the final
    reply) is there, so a record is not retried for long."""

    deadline_s = 30.0  # Easemob's own limit between two chunks of a stream

    def __init__(self, sender: ReplySender) -> None:
        self.sender = sender

    @classmethod
    def build(cls, r: Resources) -> Self:
        return cls(r.sender)

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit]:
        if env.partial is None:
            raise FatalError("a chunk record without its text so far", reason="bad_request")
        if env.replay is not None and env.replay.sandbox:
            # A sandboxed replay streams to the sandbox topic, never to a user.
            SANDBOXED.inc()
            return [Emit(topics.SANDBOX, env.stamped(self.name))]
        await self.sender.streams.chunk(env)
        return []
