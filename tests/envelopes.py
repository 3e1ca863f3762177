"""One builder of test envelopes: a direct message from a user to the bot ``ai_bot``.

Tests name only what their case is about (the text, the user, a route or a reply);
everything else is the ordinary 1:1 text message.
"""

from __future__ import annotations

import uuid
from typing import Any

from imbot.core.envelope import ChatType, Content, Envelope


def direct_envelope(
    text: str = "你好", *, user: str | None = None, msg_id: str | None = None, **changes: Any
) -> Envelope:
    """A 1:1 text message to ``ai_bot``; ``changes`` set any other envelope field."""
    user = user or f"u{uuid.uuid4().hex[:8]}"
    env = Envelope(
        msg_id=msg_id or uuid.uuid4().hex,
        conversation_id=f"chat:ai_bot:{user}",
        chat_type=ChatType.direct,
        sender=user,
        to="ai_bot",
        bot="ai_bot",
        content=Content(type="txt", text=text),
    )
    return env.model_copy(update=changes) if changes else env
