"""Build signed Easemob before-send callback bodies (reference §1.3–1.7).

``build_callback`` is pure apart from fresh ids and the clock (both overridable),
so tests and benchmarks build exactly what the simulator fires.
"""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any, Literal

from imbot.core.signature import expected_security

ChatType = Literal["chat", "group", "groupchat", "chatroom"]
Shape = Literal["bodies", "flat"]

# Snowflake-like ids: milliseconds at start-up << 22, then counting. Long decimal
# strings like Easemob's (19 digits), unique across restarts of the simulator.
_ids = itertools.count(int(time.time() * 1000) << 22)


def new_message_id() -> str:
    """A fresh Easemob-style message id: a long decimal string."""
    return str(next(_ids))


def build_callback(
    *,
    sender: str,
    to: str,
    text: str,
    secret: str,
    org: str = "demo-org",
    app: str = "demo-app",
    chat_type: ChatType = "chat",
    group_id: str | None = None,
    mention: list[str] | None = None,
    shape: Shape = "bodies",
    msg_id: str | None = None,
    ext: dict[str, Any] | None = None,
    timestamp: int | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A before-send callback body, signed with ``secret`` as Easemob signs it.

    ``callId`` is ``{org}#{app}_{uuid}``, ``timestamp`` milliseconds since the epoch,
    ``msg_id`` a long decimal string, ``security`` = md5(callId + secret + timestamp).
    For groups and chatrooms pass the group id as ``to`` (Easemob's ``to`` is the
    group); ``group_id`` defaults to it. ``mention`` goes to ``ext.em_at_list``.
    ``shape``: ``bodies`` (``payload.bodies[0]`` + ``payload.ext``, the history/REST
    format) or ``flat`` (the message fields directly in ``payload``). ``body``
    replaces the text body (other message types).
    """
    if shape not in ("bodies", "flat"):
        raise ValueError(f"shape must be 'bodies' or 'flat', not {shape!r}")
    call_id = f"{org}#{app}_{uuid.uuid4()}"
    timestamp = timestamp if timestamp is not None else int(time.time() * 1000)
    message_ext: dict[str, Any] = dict(ext or {})
    if mention:
        message_ext["em_at_list"] = mention
    message_body = body if body is not None else {"type": "txt", "msg": text}
    payload: dict[str, Any]
    if shape == "bodies":
        payload = {"bodies": [message_body], "ext": message_ext, "from": sender, "to": to}
    else:
        payload = dict(message_body)
        if message_ext:
            payload["ext"] = message_ext
    data: dict[str, Any] = {
        "callId": call_id,
        "timestamp": timestamp,
        "chat_type": chat_type,
        "from": sender,
        "to": to,
        "msg_id": msg_id or new_message_id(),
        "payload": payload,
        "security": expected_security(call_id, secret, timestamp),
    }
    if chat_type != "chat" or group_id is not None:
        data["group_id"] = group_id or to
    return data
