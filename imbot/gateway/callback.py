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

import re
import time
from dataclasses import dataclass
from typing import Any

import orjson

from imbot.core.envelope import (
    SCHEMA_VERSION,
    BodyType,
    ChatType,
    Content,
    Envelope,
    conversation_id,
    now_ms,
)
from imbot.core.limits import CALL_ID_MAX, GROUP_ID_MAX, MSG_ID_MAX, USER_ID_MAX
from imbot.core.settings import Policy
from imbot.core.signature import verify_signature

_CHAT_TYPES = {
    "chat": ChatType.direct,
    "group": ChatType.group,
    "groupchat": ChatType.group,
    "chatroom": ChatType.chatroom,
}
BODY_TYPES: frozenset[str] = frozenset(
    ("txt", "img", "audio", "video", "file", "loc", "cmd", "custom", "combine", "unknown")
)
_C0 = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")
# How deep ``ext`` and a body may nest objects and arrays. orjson reads 1,024 levels
# but writes at most 254, and the envelope adds its own (envelope > content > body);
# Easemob's own ext keys nest two or three levels.
MAX_NESTING = 32


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


def _id_field(data: dict[str, Any], field: str, limit: int) -> str:
    """An id the pipeline stores and derives other ids from: present, short, printable.

    Integers are kept as their decimal string (orjson reads at most 64-bit ones, so
    at most 20 characters). ``str.isprintable`` refuses NUL and every other control
    character, separators other than the space, and lone surrogates (which orjson
    already refuses when it reads the body).
    """
    value = _require_str(data, field)
    if len(value) > limit:
        raise CallbackRejected(
            400, "field_too_long", f"field {field!r} is longer than {limit} characters"
        )
    if not value.isprintable():
        raise CallbackRejected(
            400, "invalid_field", f"field {field!r} must be printable text (no control characters)"
        )
    return value


def verify(data: Any, secrets: list[str], *, window_s: float, now: float | None = None) -> None:
    """Check the signature (and the timestamp window when one is configured).

    Only the signature fields are required of every callback; the rest is checked
    by ``decide`` once the message is known to be for the AI.
    """
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


def _body_kind(body: dict[str, Any], has_bodies: bool) -> BodyType | None:
    """The body's message type; None when the payload names none (flat shape)."""
    raw_type = body.get("type")
    if body.get("subType") == "sub_combine" or (raw_type is None and "combineLevel" in body):
        return "combine"
    if isinstance(raw_type, str) and raw_type in BODY_TYPES:
        return raw_type  # type: ignore[return-value]
    if raw_type is None and not has_bodies:
        return None
    return "unknown"


def storable_text(text: str) -> str:
    """``text`` without NUL and the other C0 control characters but tab, LF and CR.

    PostgreSQL cannot store NUL in text, and the others are terminal escapes and
    the like that mean nothing in a chat message; removing them (rather than
    replacing them with U+FFFD) keeps what the model and the history see clean.
    """
    if _C0.search(text) is None:
        return text
    return _C0.sub("", text)


def normalise_content(payload: Any) -> tuple[MessageBody | None, dict[str, Any]]:
    """Accept both payload shapes; returns (body or None when empty, ext).

    Any JSON value in any field gives either a body or a ``CallbackRejected``.
    """
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
    kind = _body_kind(body, bodies is not None)
    if kind is None:
        raise CallbackRejected(400, "bad_payload", "payload has neither 'bodies' nor a body 'type'")
    text: str | None = None
    if kind in ("txt", "combine"):
        msg = body.get("msg")
        text = msg if isinstance(msg, str) else None
        if kind == "txt" and text is None:
            raise CallbackRejected(400, "bad_payload", "text body without a 'msg' string")
    elif kind == "loc":
        addr = body.get("addr")
        text = addr if isinstance(addr, str) else None
    if text is not None:
        text = storable_text(text)
    raw_body = {} if kind == "txt" else {k: v for k, v in body.items() if k != "msg"}
    return MessageBody(kind, text, raw_body), ext


def _within_depth(value: Any, levels: int) -> bool:
    """True when ``value`` nests at most ``levels`` objects/arrays deep (stops early)."""
    if isinstance(value, dict):
        if levels == 0:
            return False
        return all(_within_depth(v, levels - 1) for v in value.values())
    if isinstance(value, list):
        if levels == 0:
            return False
        return all(_within_depth(v, levels - 1) for v in value)
    return True


def _mentions(ext: dict[str, Any]) -> tuple[set[str], bool]:
    at = ext.get("em_at_list")
    if isinstance(at, str):
        return set(), at.lower() == "all"
    if isinstance(at, list):
        return {a for a in at if isinstance(a, str)}, False
    return set(), False


def _as_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _addressed_bot(
    chat_type: ChatType, to: Any, ext: dict[str, Any], policy: Policy
) -> tuple[str | None, str]:
    """Which bot the message asks (or None), and why: from lenient reads only."""
    bots = policy.bot_ids
    ai = policy.ai
    if chat_type is ChatType.direct:
        to_text = _as_text(to)
        if ai.direct_to_bot and to_text is not None and to_text in bots:
            return to_text, "direct"
    elif ai.group_mention:
        mentioned, at_all = _mentions(ext)
        hit = sorted(mentioned & bots)
        if hit:
            return hit[0], "mention"
        if at_all and ai.mention_all:
            return policy.bots[0].id, "mention_all"
    if ai.ext_flag and ext.get(ai.ext_flag) is True:
        wanted = ext.get(ai.ext_bot_key)
        bot = wanted if isinstance(wanted, str) and wanted in bots else policy.bots[0].id
        return bot, "ext_flag"
    return None, "not_ai"


def chat_type_of(data: dict[str, Any]) -> ChatType | None:
    """The conversation type a callback names (every spelling of §1.4), or None for the
    post-send event types (recall, read_ack, edit, …) and anything unknown."""
    raw = data.get("chat_type")
    return _CHAT_TYPES.get(raw) if isinstance(raw, str) else None


def decide(data: dict[str, Any], policy: Policy) -> Decision:
    """Is this verified callback an AI conversation? Build the message to publish if so.

    Whether it is for the AI is read leniently (``chat_type``, ``to``, ``from``, the
    payload's mentions and type): a missing or odd value there means "not for the
    AI", answered ``{"valid": true}``, so an ordinary message between people never
    gets a 400 that a "block" fail policy would turn into a blocked message. Only a
    message for the AI must be complete and storable; otherwise it is a 400.
    """
    chat_type = chat_type_of(data)
    if chat_type is None:
        # recall, read_ack, edit, … and anything unknown: not ours, let it through.
        return Decision(None, "chat_type")
    payload = data.get("payload")
    if not isinstance(payload, dict):
        payload = None
    if chat_type is ChatType.group and payload is not None and payload.get("type") == "chatroom":
        # `groupchat` covers chatrooms in older documents; payload.type may tell.
        chat_type = ChatType.chatroom
    if chat_type.value not in policy.ai.chat_types:
        return Decision(None, "chat_type_off")
    bots = policy.bot_ids
    if _as_text(data.get("from")) in bots:
        return Decision(None, "from_bot")
    ext = payload.get("ext") if payload is not None else None
    bot, reason = _addressed_bot(
        chat_type, data.get("to"), ext if isinstance(ext, dict) else {}, policy
    )
    if bot is None:
        return Decision(None, reason)

    # For the AI from here on: what is published must be complete and storable.
    content, ext = normalise_content(payload if payload is not None else data.get("payload"))
    if content is None or content.type == "cmd":
        return Decision(None, "no_content")
    if content.type not in policy.ai.body_types:
        return Decision(None, "body_type")
    msg_id = _id_field(data, "msg_id", MSG_ID_MAX)
    sender = _id_field(data, "from", USER_ID_MAX)
    call_id = _id_field(data, "callId", CALL_ID_MAX)
    direct = chat_type is ChatType.direct
    to = _id_field(data, "to", USER_ID_MAX if direct else GROUP_ID_MAX)
    group = to
    if not direct and data.get("group_id") not in (None, ""):
        group = _id_field(data, "group_id", GROUP_ID_MAX)
    if not (_within_depth(ext, MAX_NESTING) and _within_depth(content.fields, MAX_NESTING)):
        raise CallbackRejected(
            400, "too_deep", f"payload nests objects or arrays more than {MAX_NESTING} levels deep"
        )
    timestamp = data.get("timestamp")
    message = AiMessage(
        msg_id=msg_id,
        call_id=call_id,
        conversation_id=conversation_id(chat_type, bot=bot, sender=sender, group_id=group),
        chat_type=chat_type,
        sender=sender,
        to=to if direct else group,
        bot=bot,
        body=content,
        ext=ext,
        easemob_timestamp=timestamp
        if isinstance(timestamp, int) and not isinstance(timestamp, bool)
        else None,
    )
    return Decision(message, reason)
