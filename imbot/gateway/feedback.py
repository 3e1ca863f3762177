"""Users' ratings of the bot's answers, caught before the "is this for the AI?" decision.

A client app rates an answer with an ordinary IM message (docs/feedback.md): a cmd
message whose ``action`` is the policy's ``feedback.cmd_action``, a custom message
whose ``customEvent`` is ``feedback.custom_event``, or any message whose ``ext`` has
``feedback.ext_key``, each naming the rated reply's Easemob msg id and a rating word.

Read leniently, like ``callback.decide``: a message that does not carry a complete,
bounded feedback (ids within ``core.limits``, printable; a rating among the configured
words; sent by a user, to a bot or in a group) is simply not feedback and goes on as
any other message would. Pure functions, no I/O; ``gateway.app`` publishes the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import orjson

from imbot.core.envelope import SCHEMA_VERSION, BodyType, ChatType, conversation_id, now_ms
from imbot.core.limits import CALL_ID_MAX, GROUP_ID_MAX, MSG_ID_MAX, USER_ID_MAX
from imbot.core.settings import Feedback, Policy
from imbot.gateway.callback import BODY_TYPES, chat_type_of

# What the record's content body names (the feedback stage reads these two keys).
REPLY_MSG_ID = "reply_msg_id"
RATING = "rating"


@dataclass(slots=True)
class FeedbackMessage:
    """A verified callback that rates a reply: what goes to ``imbot.feedback``."""

    msg_id: str  # Easemob's id of the feedback message itself
    call_id: str
    reply_msg_id: str  # Easemob's id of the rated reply (part)
    rating: str  # a rating name of the policy (never the client's word)
    conversation_id: str
    chat_type: ChatType
    sender: str
    to: str
    bot: str
    kind: BodyType  # the type of the message that carried it
    easemob_timestamp: int

    def encode(self, received_at: float | None = None) -> bytes:
        """The record: an envelope (so the stage boundary, the DLQ, replay and trace read
        it like any other record) whose content body is the rating. Never the message's
        text or ext: only the ids, the rating and the times."""
        doc: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "msg_id": self.msg_id,
            "call_id": self.call_id,
            "conversation_id": self.conversation_id,
            "chat_type": self.chat_type.value,
            "sender": self.sender,
            "to": self.to,
            "bot": self.bot,
            "content": {
                "type": self.kind,
                "body": {REPLY_MSG_ID: self.reply_msg_id, RATING: self.rating},
            },
            "received_at": now_ms() if received_at is None else received_at,
            "easemob_timestamp": self.easemob_timestamp,
            "stamps": {},
        }
        return orjson.dumps(doc)


def _id(value: Any, limit: int) -> str | None:
    """An id as the gateway admits it (``callback._id_field``'s rule), or None."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value or len(value) > limit:
        return None
    return value if value.isprintable() else None


def _body_and_ext(payload: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The message body (either payload shape) and its ext, or None when there is none."""
    ext = payload.get("ext")
    bodies = payload.get("bodies")
    if isinstance(bodies, list):
        if not bodies or not isinstance(bodies[0], dict):
            return None
        body: dict[str, Any] = bodies[0]
    else:
        body = payload
    return body, ext if isinstance(ext, dict) else {}


def _custom_exts(body: dict[str, Any]) -> dict[str, Any] | None:
    """A custom message's extension map: ``v2:customExts`` (a string map), or the legacy
    ``customExts`` (a map, or a list of one-key maps)."""
    v2 = body.get("v2:customExts")
    if isinstance(v2, dict):
        return v2
    legacy = body.get("customExts")
    if isinstance(legacy, dict):
        return legacy
    if isinstance(legacy, list) and len(legacy) <= 16:
        merged: dict[str, Any] = {}
        for item in legacy:
            if isinstance(item, dict):
                merged.update(item)
        return merged
    return None


def _nested(ext: dict[str, Any], key: str | None) -> dict[str, Any] | None:
    value = ext.get(key) if key is not None else None
    return value if isinstance(value, dict) else None


def _fields(body: dict[str, Any], ext: dict[str, Any], fb: Feedback) -> dict[str, Any] | None:
    """Where this message's feedback fields are, by the shape that marks it as feedback."""
    kind = body.get("type")
    if fb.cmd_action is not None and kind == "cmd" and body.get("action") == fb.cmd_action:
        return _nested(ext, fb.ext_key) or ext
    if (
        fb.custom_event is not None
        and kind == "custom"
        and body.get("customEvent") == fb.custom_event
    ):
        return _custom_exts(body) or _nested(ext, fb.ext_key) or ext
    return _nested(ext, fb.ext_key)


def _place(
    data: dict[str, Any], chat_type: ChatType, payload: dict[str, Any], sender: str, policy: Policy
) -> tuple[ChatType, str, str, str] | None:
    """(chat type, to, bot, conversation id): direct feedback goes to a bot; in a group
    or chatroom the conversation is the group's, whichever bot answered there."""
    if chat_type is ChatType.direct:
        to = _id(data.get("to"), USER_ID_MAX)
        if to is None or to not in policy.bot_ids:
            return None
        return chat_type, to, to, conversation_id(chat_type, bot=to, sender=sender, group_id=None)
    if chat_type is ChatType.group and payload.get("type") == "chatroom":
        chat_type = ChatType.chatroom
    raw_group = data.get("group_id")
    group = _id(raw_group if raw_group not in (None, "") else data.get("to"), GROUP_ID_MAX)
    if group is None:
        return None
    bot = policy.bots[0].id
    return chat_type, group, bot, conversation_id(chat_type, bot=bot, sender=sender, group_id=group)


def read_feedback(data: dict[str, Any], policy: Policy) -> FeedbackMessage | None:
    """The rating this verified callback carries, or None when it is not feedback."""
    fb = policy.feedback
    payload = data.get("payload")
    if not fb.enabled or not isinstance(payload, dict):
        return None
    found = _body_and_ext(payload)
    fields = _fields(*found, fb) if found is not None else None
    if fields is None:
        return None
    reply_msg_id = _id(fields.get(fb.msg_id_field), MSG_ID_MAX)
    word = fields.get(fb.rating_field)
    rating = fb.rating_of(word) if isinstance(word, str) else None
    chat_type = chat_type_of(data)
    msg_id = _id(data.get("msg_id"), MSG_ID_MAX)
    sender = _id(data.get("from"), USER_ID_MAX)
    call_id = _id(data.get("callId"), CALL_ID_MAX)
    timestamp = data.get("timestamp")
    if (
        reply_msg_id is None
        or rating is None
        or chat_type is None
        or msg_id is None
        or call_id is None
        or sender is None
        or sender in policy.bot_ids
        or not isinstance(timestamp, int)
        or isinstance(timestamp, bool)
    ):
        return None
    place = _place(data, chat_type, payload, sender, policy)
    if place is None:
        return None
    chat_type, to, bot, conversation = place
    raw_kind = found[0].get("type") if found is not None else None
    known = isinstance(raw_kind, str) and raw_kind in BODY_TYPES  # a list is unhashable
    kind = cast(BodyType, raw_kind) if known else "unknown"
    return FeedbackMessage(
        msg_id=msg_id,
        call_id=call_id,
        reply_msg_id=reply_msg_id,
        rating=rating,
        conversation_id=conversation,
        chat_type=chat_type,
        sender=sender,
        to=to,
        bot=bot,
        kind=kind,
        easemob_timestamp=timestamp,
    )
