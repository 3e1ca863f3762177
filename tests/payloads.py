"""Easemob before-send callback bodies for tests (the simulator's builder, test defaults)."""

from __future__ import annotations

import itertools
from typing import Any

from imbot.simulator.callbacks import build_callback

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
    return build_callback(
        sender=sender,
        to=to,
        text=text,
        secret=secret,
        org="myorg",
        app="myapp",
        # also the post-send event types (recall, read_ack, ...) the simulator's ChatType
        # does not name: the gateway must pass those through untouched
        chat_type=chat_type,  # type: ignore[arg-type]
        group_id=group_id,
        shape=shape,  # type: ignore[arg-type]  # parametrized gateway tests pass a plain str
        msg_id=msg_id or str(next(_ids)),
        ext=ext,
        timestamp=timestamp,
        body=body,
    )
