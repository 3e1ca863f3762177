"""Build signed Easemob before-send callback bodies (reference §1.3–1.7)."""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any, Literal

from core.signature import expected_security

_msg_ids = itertools.count(int(time.time() * 1000) * 10**5)


def build_callback(
    *,
    sender: str,
    to: str,
    text: str,
    secret: str,
    org: str = "demo-org",
    app: str = "demo-app",
    chat_type: Literal["chat", "group", "groupchat", "chatroom"] = "chat",
    group_id: str | None = None,
    mention: list[str] | None = None,
    shape: Literal["bodies", "flat"] = "bodies",
    msg_id: str | None = None,
    ext: dict[str, Any] | None = None,
    timestamp: int | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A callback body signed with ``secret``; ``body`` replaces the text body (other types)."""
    call_id = f"{org}#{app}_{uuid.uuid4()}"
    timestamp = timestamp if timestamp is not None else int(time.time() * 1000)
    message_ext: dict[str, Any] = dict(ext or {})
    if mention:
        message_ext["em_at_list"] = mention
    body = body if body is not None else {"type": "txt", "msg": text}
    payload: dict[str, Any]
    if shape == "bodies":
        payload = {"bodies": [body], "ext": message_ext, "from": sender, "to": to}
    else:
        payload = dict(body)
        if message_ext:
            payload["ext"] = message_ext
    data: dict[str, Any] = {
        "callId": call_id,
        "timestamp": timestamp,
        "chat_type": chat_type,
        "from": sender,
        "to": to,
        "msg_id": msg_id or str(next(_msg_ids)),
        "payload": payload,
        "security": expected_security(call_id, secret, timestamp),
    }
    if chat_type != "chat" or group_id is not None:
        data["group_id"] = group_id or to
    return data
