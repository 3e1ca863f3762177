"""The stages' common parts: the worker's ``Resources``, ``PipelineStage`` and the
registry of stage classes by name (``STAGES``)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Self

from imbot.adapters import ModelCatalog
from imbot.core import topics
from imbot.core.envelope import Envelope, Reply, ReplyKind
from imbot.core.errors import ConfigurationError
from imbot.core.settings import Policy, Replies, Settings
from imbot.moderation.metrics import MODERATION_DECISIONS
from imbot.storage import AuditEntry, AuditLog, StageStorage
from imbot.streams import pipeline
from imbot.streams.boundary import AfterPublish, Emit, Outputs
from imbot.streams.metrics import REPLIES
from imbot.streams.pipeline import StageSpec

if TYPE_CHECKING:  # loaded only by the workers that run these stages
    from imbot.moderation import ModerationResult, Moderator
    from imbot.sender.easemob import EasemobClient
    from imbot.sender.service import ReplySender


log = logging.getLogger("imbot.stages")


class Resources:
    """What the stages of one worker share, opened once by the worker for the rows it
    runs (``StageSpec.needs``). Asking for a part no selected row declared is a
    configuration error, so a row's ``needs`` cannot fall behind its class."""

    def __init__(
        self,
        settings: Settings,
        *,
        storage: StageStorage | None = None,
        moderator: Moderator | None = None,
        catalog: ModelCatalog | None = None,
        sender: ReplySender | None = None,
        easemob: EasemobClient | None = None,
        outputs: Outputs | None = None,
    ) -> None:
        self.settings = settings
        self.policy: Policy = settings.policy
        # Where a stage publishes records of its own while it works (the model stage's
        # chunks of an answer being written); None in a process that publishes none.
        self.outputs = outputs
        self._parts: dict[pipeline.Resource, Any] = {
            "storage": storage,
            "moderator": moderator,
            "catalog": catalog,
            "sender": sender,
            "easemob": easemob,
        }

    def _part(self, name: pipeline.Resource) -> Any:
        part = self._parts[name]
        if part is None:
            raise ConfigurationError(f"no {name} opened: the stage's row must name it in needs")
        return part

    @property
    def storage(self) -> StageStorage:
        part: StageStorage = self._part("storage")
        return part

    @property
    def moderator(self) -> Moderator:
        part: Moderator = self._part("moderator")
        return part

    @property
    def catalog(self) -> ModelCatalog:
        part: ModelCatalog = self._part("catalog")
        return part

    @property
    def sender(self) -> ReplySender:
        part: ReplySender = self._part("sender")
        return part

    @property
    def easemob(self) -> EasemobClient:
        part: EasemobClient = self._part("easemob")
        return part


def answer(env: Envelope, stage: str, text: str, kind: ReplyKind, **changes: object) -> Emit:
    REPLIES.labels(kind).inc()
    reply = Reply(text=text, kind=kind)
    return Emit(topics.OUTBOUND, env.stamped(stage, reply=reply, **changes))


async def record_verdict(
    audit: AuditLog, env: Envelope, stage: str, result: ModerationResult
) -> None:
    if result.action == "allow":
        return
    entries = [AuditEntry(f.detector, f.rule, f.category, f.action) for f in result.findings]
    for f in result.findings:
        MODERATION_DECISIONS.labels(stage, f.category, f.action).inc()
    await audit.record_audit(env.msg_id, stage, entries)


class PipelineStage:
    """A stage class; ``class Route(PipelineStage, stage="route")`` binds it to its row
    of ``streams.pipeline.PIPELINE`` and registers it in ``STAGES``."""

    spec: StageSpec
    name: str
    input_topic: str
    forward: str  # where its main output goes: the next row's input
    replies: Replies  # the policy's replies (a stage whose row answers on failure sets it)

    def __init_subclass__(cls, *, stage: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if stage not in pipeline.BY_NAME:
            raise TypeError(f"no row {stage!r} in streams.pipeline.PIPELINE: add it there")
        if stage in STAGES:
            raise TypeError(f"stage {stage!r} has two classes")
        cls.spec = pipeline.spec(stage)
        cls.name = cls.spec.name
        cls.input_topic = cls.spec.input
        cls.forward = cls.spec.forward
        STAGES[stage] = cls

    @classmethod
    def build(cls, r: Resources) -> Self:
        """The stage over the parts of ``r`` its row names in ``needs``."""
        raise NotImplementedError

    async def handle(self, env: Envelope, *, deadline: float) -> Sequence[Emit | AfterPublish]:
        raise NotImplementedError

    def fallback(self, env: Envelope, error: BaseException) -> Emit | None:
        """What the user gets when this stage fails for good; None when its row says
        nobody is waiting on it (``StageSpec.answers_on_failure``)."""
        return self._fallback(env) if self.spec.answers_on_failure else None

    def _fallback(self, env: Envelope) -> Emit:
        return answer(env, self.name, self.replies.fallback, "fallback")


STAGES: dict[str, type[PipelineStage]] = {}
"""The class of each row of ``streams.pipeline.PIPELINE``, by stage name."""
