"""Easemob before-send callback: validation, normalisation, "is this for the AI?".

Pure functions, no I/O: the aiohttp handler in ``gateway.app`` calls them.
See the Easemob reference §1 for the request format: two payload shapes (a
``bodies`` list or a flat body), ``chat_type`` values that differ between
documentation revisions, and a signature over ``callId + secret + timestamp``.

This runs for every callback, so it builds plain objects and writes the envelope's
JSON with orjson instead of validating a pydantic ``Envelope`` (that was the largest
single cost of a request); ``AiMessage.envelope`` builds the model when one is
wanted, and a unit test holds the two encodings equal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from core.envelope import (
    SCHEMA_VERSION,
    BodyType,
    ChatType,
    Content,
    Envelope,
    conversation_id,
    now_ms,
)
from core.settings import Policy
from core.signature import verify_signature

_CHAT_TYPES = {
    "chat": ChatType.direct,
    "group": ChatType.group,
    "groupchat": ChatType.group,
    "chatroom": ChatType.chatroom,
}
_BODY_TYPES: frozenset[str] = frozenset(
    ("txt", "img", "audio", "video", "file", "loc", "cmd", "custom", "combine", "unknown")
)


class CallbackRejected(Exception):
    """The request is not a valid signed callback; answered with a 4xx."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail

    def body(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.detail}


# Not frozen: a frozen dataclass pays an object.__setattr__ per field on every
# callback. Treat these as immutable all the same.
@dataclass(slots=True)
class MessageBody:
    """The message body, normalised from either payload shape (``Content`` without pydantic)."""

    type: BodyType
    text: str | None  # txt: msg; combine: fallback text; loc: addr
    fields: dict[str, Any]  # the raw body without ``msg``, for non-text types

    def content(self) -> Content:
        return Content(type=self.type, text=self.text, body=self.fields)


@dataclass(slots=True)
class AiMessage:
    """A verified callback that belongs to an AI conversation: what gets published."""

    msg_id: str
    call_id: str | None
    conversation_id: str
    chat_type: ChatType
    sender: str
    to: str  # bot id (direct) or group / chatroom id
    bot: str
    body: MessageBody
    ext: dict[str, Any]
    easemob_timestamp: int | None

    def encode(self, received_at: float | None = None) -> bytes:
        """The JSON of ``self.envelope(received_at)``, as ``encode_envelope`` writes it."""
        body = self.body
        content: dict[str, Any] = {"type": body.type}
        if body.text is not None:
            content["text"] = body.text
        content["body"] = body.fields
        doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "msg_id": self.msg_id}
        if self.call_id is not None:
            doc["call_id"] = self.call_id
        doc["conversation_id"] = self.conversation_id
        doc["chat_type"] = self.chat_type.value
        doc["sender"] = self.sender
        doc["to"] = self.to
        doc["bot"] = self.bot
        doc["content"] = content
        doc["ext"] = self.ext
        doc["received_at"] = now_ms() if received_at is None else received_at
        if self.easemob_timestamp is not None:
            doc["easemob_timestamp"] = self.easemob_timestamp
        doc["stamps"] = {}
        return orjson.dumps(doc)

    def envelope(self, received_at: float | None = None) -> Envelope:
        return Envelope(
            msg_id=self.msg_id,
            call_id=self.call_id,
            conversation_id=self.conversation_id,
            chat_type=self.chat_type,
            sender=self.sender,
            to=self.to,
            bot=self.bot,
            content=self.body.content(),
            ext=self.ext,
            received_at=now_ms() if received_at is None else received_at,
            easemob_timestamp=self.easemob_timestamp,
        )


@dataclass(slots=True)
class Decision:
    """What to do with a verified callback: publish ``message``, or just let it pass."""

    message: AiMessage | None
    reason: str  # why it is (or is not) an AI message, for metrics


def _require_str(data: dict[str, Any], field: str) -> str:
    value = data.get(field)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value:
        raise CallbackRejected(400, "missing_field", f"field {field!r} must be a non-empty string")
    return value


def verify(data: Any, secrets: list[str], *, window_s: float, now: float | None = None) -> None:
    """Check the signature (and the timestamp window when one is configured)."""
    if not isinstance(data, dict):
        raise CallbackRejected(400, "bad_json", "body must be a JSON object")
    call_id = _require_str(data, "callId")
    timestamp = data.get("timestamp")
    if not isinstance(timestamp, int) or isinstance(timestamp, bool):
        raise CallbackRejected(400, "missing_field", "field 'timestamp' must be an integer")
    security = data.get("security")
    if not isinstance(security, str) or not security:
        raise CallbackRejected(400, "missing_field", "field 'security' must be a non-empty string")
    if not secrets:
        raise CallbackRejected(401, "bad_signature", "no callback secret is configured")
    if not verify_signature(call_id, timestamp, security, secrets):
        raise CallbackRejected(
            401, "bad_signature", "signature does not match any configured secret"
        )
    if window_s > 0:
        skew = abs((now if now is not None else time.time()) - timestamp / 1000.0)
        if skew > window_s:
            raise CallbackRejected(
                401,
                "stale_timestamp",
                f"timestamp is {skew:.0f}s from now (window {window_s:.0f}s)",
            )


def normalise_content(payload: Any) -> tuple[MessageBody | None, dict[str, Any]]:
    """Accept both payload shapes; returns (body or None when empty, ext)."""
    if not isinstance(payload, dict):
        raise CallbackRejected(400, "missing_field", "field 'payload' must be an object")
    ext = payload.get("ext")
    ext = ext if isinstance(ext, dict) else {}
    bodies = payload.get("bodies")
    if isinstance(bodies, list):
        if not bodies:
            return None, ext
        body = bodies[0]
        if not isinstance(body, dict):
            raise CallbackRejected(400, "bad_payload", "payload.bodies[0] must be an object")
    else:
        body = payload
    raw_type = body.get("type")
    if body.get("subType") == "sub_combine" or (raw_type is None and "combineLevel" in body):
        kind: BodyType = "combine"
    elif raw_type in _BODY_TYPES:
        kind = raw_type
    elif raw_type is None and bodies is None:
        raise CallbackRejected(400, "bad_payload", "payload has neither 'bodies' nor a body 'type'")
    else:
        kind = "unknown"
    text: str | None = None
    if kind in ("txt", "combine"):
        msg = body.get("msg")
        text = msg if isinstance(msg, str) else None
        if kind == "txt" and text is None:
            raise CallbackRejected(400, "bad_payload", "text body without a 'msg' string")
    elif kind == "loc":
        addr = body.get("addr")
        text = addr if isinstance(addr, str) else None
    raw_body = {} if kind == "txt" else {k: v for k, v in body.items() if k != "msg"}
    return MessageBody(kind, text, raw_body), ext


def _mentions(ext: dict[str, Any]) -> tuple[set[str], bool]:
    at = ext.get("em_at_list")
    if isinstance(at, str):
        return set(), at.lower() == "all"
    if isinstance(at, list):
        return {a for a in at if isinstance(a, str)}, False
    return set(), False


def decide(data: dict[str, Any], policy: Policy) -> Decision:
    """Is this verified callback an AI conversation? Build the message to publish if so."""
    raw_chat_type = data.get("chat_type")
    chat_type = _CHAT_TYPES.get(raw_chat_type) if isinstance(raw_chat_type, str) else None
    if chat_type is None:
        # recall, read_ack, edit, … and anything unknown: not ours, let it through.
        return Decision(None, "chat_type")
    sender = _require_str(data, "from")
    to = _require_str(data, "to")
    msg_id = _require_str(data, "msg_id")
    content, ext = normalise_content(data.get("payload"))
    if chat_type is ChatType.group:
        # `groupchat` covers chatrooms in older documents; payload.type may tell.
        payload = data.get("payload")
        if isinstance(payload, dict) and payload.get("type") == "chatroom":
            chat_type = ChatType.chatroom
    if content is None or content.type == "cmd":
        return Decision(None, "no_content")
    if content.type not in policy.ai.body_types:
        return Decision(None, "body_type")
    if chat_type.value not in policy.ai.chat_types:
        return Decision(None, "chat_type_off")
    bots = policy.bot_ids
    if sender in bots:
        return Decision(None, "from_bot")

    bot: str | None = None
    reason = "not_ai"
    if chat_type is ChatType.direct:
        if policy.ai.direct_to_bot and to in bots:
            bot, reason = to, "direct"
    elif policy.ai.group_mention:
        mentioned, at_all = _mentions(ext)
        hit = sorted(mentioned & bots)
        if hit:
            bot, reason = hit[0], "mention"
        elif at_all and policy.ai.mention_all:
            bot, reason = policy.bots[0].id, "mention_all"
    if bot is None and policy.ai.ext_flag and ext.get(policy.ai.ext_flag) is True:
        wanted = ext.get(policy.ai.ext_bot_key)
        bot = wanted if isinstance(wanted, str) and wanted in bots else policy.bots[0].id
        reason = "ext_flag"
    if bot is None:
        return Decision(None, reason)

    group_id = data.get("group_id")
    group = group_id if isinstance(group_id, str) and group_id else to
    timestamp = data.get("timestamp")
    call_id = data.get("callId")
    message = AiMessage(
        msg_id=msg_id,
        call_id=call_id if isinstance(call_id, str) else None,
        conversation_id=conversation_id(chat_type, bot=bot, sender=sender, group_id=group),
        chat_type=chat_type,
        sender=sender,
        to=to if chat_type is ChatType.direct else group,
        bot=bot,
        body=content,
        ext=ext,
        easemob_timestamp=timestamp
        if isinstance(timestamp, int) and not isinstance(timestamp, bool)
        else None,
    )
    return Decision(message, reason)
