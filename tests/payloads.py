"""Easemob before-send callback bodies for tests, built from the documented field lists."""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

from core.signature import expected_security

_ids = itertools.count(1290012345678900000)


def callback(
    text: str = "今天天气怎么样？",
    *,
    sender: str = "alice",
    to: str = "ai_bot",
    chat_type: str = "chat",
    group_id: str | None = None,
    shape: str = "bodies",
    ext: dict[str, Any] | None = None,
    secret: str = "test-secret",
    msg_id: str | None = None,
    timestamp: int | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    call_id = f"myorg#myapp_{uuid.uuid4()}"
    ts = timestamp if timestamp is not None else int(time.time() * 1000)
    message_body = body if body is not None else {"type": "txt", "msg": text}
    if shape == "bodies":
        payload: dict[str, Any] = {"bodies": [message_body], "ext": ext or {}}
    else:
        payload = dict(message_body)
        if ext:
            payload["ext"] = ext
    data: dict[str, Any] = {
        "callId": call_id,
        "timestamp": ts,
        "chat_type": chat_type,
        "from": sender,
        "to": to,
        "msg_id": msg_id or str(next(_ids)),
        "payload": payload,
        "security": expected_security(call_id, secret, ts),
    }
    if group_id is not None:
        data["group_id"] = group_id
    return data
