"""Where a reply goes, and how the delivery ledger recognises a reply's text."""

from __future__ import annotations

import hashlib

from imbot.core.envelope import ChatType, Envelope
from imbot.sender.easemob import TargetKind

_KINDS: dict[ChatType, TargetKind] = {
    ChatType.direct: "users",
    ChatType.group: "chatgroups",
    ChatType.chatroom: "chatrooms",
}


def reply_target(env: Envelope) -> tuple[TargetKind, str]:
    """Who receives the reply: the asker in 1:1, the group or chatroom otherwise."""
    kind = _KINDS[env.chat_type]
    return kind, env.sender if kind == "users" else env.to


def reply_digest(text: str) -> str:
    """Identifies a reply's text in the ledger (not a secret: a checksum)."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()
