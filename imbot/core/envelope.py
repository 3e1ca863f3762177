"""The versioned message envelope that travels through every topic.

One record tells the whole story of a message: what the user sent (as Easemob
reported it), and what each stage added — the input verdict, the route, the
completion with usage and cost, the output review, the delivery — with the time
each stage finished. Topic values are the JSON bytes of an ``Envelope``;
``decode_envelope``/``encode_envelope`` are the only way in and out, so a bad
payload becomes an ``UndecodableError`` at the stage boundary.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imbot.core.errors import UndecodableError

SCHEMA_VERSION = 1


def now_ms() -> float:
    return time.time() * 1000.0


class ChatType(StrEnum):
    direct = "chat"
    group = "group"
    chatroom = "chatroom"


# What a model call ended with, and who speaks in a conversation: shared by the
# envelope and the adapters (one definition each).
FinishReason = Literal["stop", "length", "content_filter", "tool_calls", "error"]
Role = Literal["system", "user", "assistant"]

BodyType = Literal[
    "txt", "img", "audio", "video", "file", "loc", "cmd", "custom", "combine", "unknown"
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Content(_Model):
    """The user's message body, normalised from either Easemob payload shape."""

    type: BodyType
    text: str | None = None  # txt: msg; combine: fallback text; loc: addr
    body: dict[str, Any] = Field(default_factory=dict)  # the raw body, for non-text types


class Verdict(_Model):
    """A moderation decision (moderate-in or moderate-out)."""

    action: Literal["allow", "mask", "block", "flag"]
    categories: tuple[str, ...] = ()
    rules: tuple[str, ...] = ()
    text: str | None = None  # the text after masking (what goes on)
    score: float = 0.0


class ImageRef(_Model):
    """An image attachment as Easemob describes it: fetched only by the model stage,
    with the app token and the body's share secret, never stored in a record."""

    url: str
    secret: str | None = None
    filename: str | None = None


class Turn(_Model):
    role: Role
    content: str


class QuotaView(_Model):
    """Where the user's budgets stood when the route was chosen (the share of the fullest
    one) and, once the model stage reserved, the reservation."""

    state: Literal["unlimited", "ok", "near", "exhausted"] = "unlimited"
    share: float = 0.0  # of the fullest budget, reservations in flight included
    scope: str | None = None  # the fullest (or refusing) budget's label
    reservation: str | None = None
    reserved_tokens: int | None = None
    reserved_micros: int | None = None


class RouteDecision(_Model):
    route: str  # name of the route (the bot's persona) that matched
    models: tuple[str, ...]  # model ids to try in order (fallback chain)
    system_prompt: str | None = None
    history: tuple[Turn, ...] = ()
    max_output_tokens: int | None = None
    # Why these models (imbot trace and replays show it):
    rule: str = "fixed"  # fixed | level | downgrade | vision | …
    tier: str | None = None  # the user's tier (from the server side only)
    level: str | None = None  # the complexity level the score fell in
    score: float | None = None
    features: dict[str, float] = Field(default_factory=dict)
    quota: QuotaView = QuotaView()
    images: tuple[ImageRef, ...] = ()  # images to fetch and show a vision model
    stream: bool = False  # call the model as a stream (routes.<name>.stream)
    # Show the answer as it is written (policy ``streaming``): an Easemob stream message
    # fed by the model stage's chunks; else "typing" (a typing indicator while the model
    # runs) or "" (neither).
    live: Literal["stream", "typing", ""] = ""
    skipped: tuple[str, ...] = ()  # left out of the chain: their circuit was open


class Completion(_Model):
    text: str
    finish_reason: FinishReason
    model: str
    provider: str
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost: float | None = None
    currency: str | None = None
    latency_ms: float = 0.0
    first_token_ms: float | None = None  # a streamed call's first words, from its start
    provider_request_id: str | None = None
    attempts: int = 1


ReplyKind = Literal[
    "answer",
    "blocked_input",
    "blocked_output",
    "fallback",
    "rejected",
    "unsupported",
    "quota",  # the budget is spent: no model was called
    "command",  # a reset or help command, answered without a model
]


class Reply(_Model):
    """What the sender delivers. Set by the stage that decides the final answer."""

    text: str
    kind: ReplyKind = "answer"


class Delivery(_Model):
    parts: int
    easemob_msg_ids: tuple[str, ...] = ()
    duplicate: bool = False  # every part had already been sent before


class ReplayMark(_Model):
    """Set by ``imbot replay`` on the records it re-produces. ``sandbox``: the reply goes
    to ``imbot.sandbox`` instead of to the user (the default; ``--deliver`` turns it off)."""

    id: str  # the replay run
    sandbox: bool = True
    at: float = Field(default_factory=now_ms)


class Partial(_Model):
    """A record of ``imbot.chunks`` / ``imbot.chunks.reviewed``: the answer so far.

    ``text`` is the whole text so far, never a delta: a chunk record stands alone, so a
    redelivered, late or lost one changes nothing (the review and the sender need no
    state of their own, and the sender sends only what its ledger has not). On
    ``imbot.chunks`` it is the model's raw text; on ``imbot.chunks.reviewed`` the part
    the output review released. ``typing``: no text, show that the bot is typing."""

    kind: Literal["text", "typing"] = "text"
    text: str = ""
    seq: int = 0  # the model stage's count of chunk records of this call


class Envelope(_Model):
    schema_version: int = SCHEMA_VERSION
    msg_id: str  # Easemob's id of the user's message: the idempotency key end to end
    call_id: str | None = None
    conversation_id: str
    chat_type: ChatType
    sender: str  # Easemob user id of the person who wrote the message
    to: str  # bot id (direct) or group / chatroom id
    bot: str  # the bot account that answers
    content: Content
    ext: dict[str, Any] = Field(default_factory=dict)
    received_at: float = Field(default_factory=now_ms)  # ms epoch, at the gateway
    easemob_timestamp: int | None = None
    stamps: dict[str, float] = Field(default_factory=dict)  # stage -> ms epoch when done
    moderation_in: Verdict | None = None
    route: RouteDecision | None = None
    completion: Completion | None = None
    moderation_out: Verdict | None = None
    reply: Reply | None = None
    delivery: Delivery | None = None
    replay: ReplayMark | None = None
    partial: Partial | None = None  # only on the chunk topics

    def stamped(self, stage: str, **changes: Any) -> Envelope:
        """A copy with ``changes`` applied and ``stage``'s completion time recorded."""
        stamps = dict(self.stamps)
        stamps[stage] = now_ms()
        return self.model_copy(update={**changes, "stamps": stamps})

    @property
    def user_text(self) -> str:
        """The text the model should see: masked by moderation when it was."""
        if self.moderation_in is not None and self.moderation_in.text is not None:
            return self.moderation_in.text
        return self.content.text or ""


def conversation_id(chat_type: ChatType, *, bot: str, sender: str, group_id: str | None) -> str:
    if chat_type is ChatType.direct:
        return f"chat:{bot}:{sender}"
    prefix = "group" if chat_type is ChatType.group else "room"
    return f"{prefix}:{group_id}"


def encode_envelope(env: Envelope) -> bytes:
    return env.__pydantic_serializer__.to_json(env, exclude_none=True)


def decode_envelope(raw: bytes | None) -> Envelope:
    if raw is None:
        raise UndecodableError("record has no value")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise UndecodableError(f"record is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UndecodableError("record is not a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise UndecodableError(f"unsupported schema_version {version!r}")
    try:
        return Envelope.model_validate(data)
    except ValidationError as exc:
        raise UndecodableError(
            f"record is not a valid envelope: {exc.error_count()} errors"
        ) from None


class DlqRecord(_Model):
    """What ``imbot.dlq`` holds: enough to understand and replay a failure."""

    stage: str
    topic: str
    partition: int
    offset: int
    key: str | None
    value: str | None  # the raw bytes, decoded as UTF-8 with replacement
    value_b64: str | None = None  # set when the bytes were not valid UTF-8
    error_kind: str
    error: str
    reason: str | None = None  # FatalError's reason: bad_request, not_found, quota_exhausted, …
    status: int | None = None  # the remote party's HTTP status, when there was one
    attempts: int
    msg_id: str | None = None
    conversation_id: str | None = None
    at: float = Field(default_factory=now_ms)
