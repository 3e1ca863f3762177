"""The pipeline's stages: each one a plain async function from an envelope to outputs.

moderate-in → route → model → moderate-out → send. A stage that decides the final
answer early (input blocked, unsupported message type, content rejected by the
provider) emits straight to ``imbot.outbound`` with ``reply`` set; the sender
delivers whatever reaches it. Agents (``streams.worker``) only decode, call
``handle`` inside the error boundary, and publish.

Each class names its row of the pipeline table (``streams.pipeline``), from which
it takes its name, its input topic, the topic its main output goes to (the next
row's input) and whether a fatal failure answers the user. Its constructor takes
exactly what it uses; ``build`` picks that out of the worker's ``Resources``. One
module per stage; the route decision's pure parts (budgets, tiers, open circuits)
are in ``imbot.routing``.
"""

from __future__ import annotations

from imbot.streams import pipeline
from imbot.streams.stages.base import STAGES, PipelineStage, Resources
from imbot.streams.stages.feedback import RecordFeedback
from imbot.streams.stages.model import CallModel, Files, chat_request
from imbot.streams.stages.moderate_in import ModerateIn
from imbot.streams.stages.moderate_out import ModerateOut
from imbot.streams.stages.review_stream import ReviewStream
from imbot.streams.stages.route import Route
from imbot.streams.stages.send import Send
from imbot.streams.stages.send_stream import SendStream

__all__ = [
    "STAGES",
    "CallModel",
    "Files",
    "ModerateIn",
    "ModerateOut",
    "PipelineStage",
    "RecordFeedback",
    "Resources",
    "ReviewStream",
    "Route",
    "Send",
    "SendStream",
    "chat_request",
]

# In the pipeline's order, whatever order the modules were imported in.
_ordered = {name: STAGES[name] for name in pipeline.STAGE_NAMES if name in STAGES}
_unbound = set(pipeline.STAGE_NAMES) ^ set(STAGES)
STAGES.clear()
STAGES.update(_ordered)
if _unbound:  # a row without its class, or a class without its row
    raise ImportError(f"streams.pipeline and streams.stages disagree on {sorted(_unbound)}")
