"""The delivery ledger and the history it writes once a reply is delivered.

One row per reply part, keyed by (msg_id, part), claimed before it is sent and marked
sent the moment Easemob accepts it (see ``sender.service``); then the question, the
reply and the conversation. Every write is idempotent, so a sender that sees a
record twice leaves one row.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import String, bindparam, select

from imbot.core.envelope import Envelope
from imbot.core.tokens import estimate_tokens
from imbot.storage.database import Database, GroupCommit, sql
from imbot.storage.schema import ConversationRow, DeliveryRow, MessageRow, utcnow


@dataclass(frozen=True, slots=True)
class LedgerRow:
    part: int
    status: str
    easemob_msg_id: str | None
    attempts: int
    end_offset: int | None = None
    reply_digest: str | None = None
    error: str | None = None
    parts: int | None = None  # how many parts the reply had when this one was written


@dataclass(frozen=True, slots=True)
class Claim:
    """A part this sender may send now (``DeliveryLedger.claim_part``)."""

    attempt: int  # 1 for the first try of the part
    # An earlier claim of the part was never resolved: a sender died (or lost its
    # database) between claiming it and recording Easemob's answer, so Easemob may
    # already have shown it. Sending it again may show it twice.
    uncertain: bool


# ``deliveries.error`` of a part claimed again after an unresolved claim (kept once the
# part is sent: the ledger shows which parts the user may have seen twice).
UNCERTAIN_CLAIM = "uncertain: an earlier claim was never resolved; sent again"
# ``deliveries.error`` prefix of an attempt whose answer from Easemob was lost.
UNCERTAIN_ANSWER = "uncertain: "


def storable_text(value: str) -> str:
    """``value`` as a text column can hold it: PostgreSQL refuses NUL characters."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _length(column: Any) -> int:
    return int(column.type.length)


# Identifiers the sender writes after Easemob accepted a reply, and the column each goes to.
_ID_COLUMNS: tuple[tuple[str, int], ...] = (
    ("msg_id", _length(MessageRow.__table__.c.msg_id)),
    ("conversation_id", _length(ConversationRow.__table__.c.id)),
    ("sender", _length(MessageRow.__table__.c.author)),
    ("bot", _length(ConversationRow.__table__.c.bot)),
    ("to", _length(DeliveryRow.__table__.c.target)),
)
_MSG_ID_MAX = _length(MessageRow.__table__.c.msg_id)
_LEDGER_ID_MAX = _length(DeliveryRow.__table__.c.msg_id)


def unstorable(env: Envelope, ledger_id: str) -> str | None:
    """Which identifier of ``env`` the database cannot hold, if any (None: all fit).

    Checked before anything is sent: every row the sender writes after Easemob
    accepted a part (ledger, history) must be writable, or a replay would send the
    reply again. The gateway refuses such values (core.limits); this catches a
    record that got past it (an older gateway, a hand-made replay).
    """
    for field, limit in _ID_COLUMNS:
        value: str = getattr(env, field)
        if len(value) > limit or "\x00" in value:
            return field
    if len(f"{env.msg_id}:reply") > _MSG_ID_MAX or len(ledger_id) > _LEDGER_ID_MAX:
        return "msg_id"
    return None


_UPSERT_CONVERSATION = sql(
    "INSERT INTO conversations (id, chat_type, bot, created_at, last_message_at)"
    " VALUES (:id, :chat_type, :bot, :now, :now)"
    " ON CONFLICT (id) DO UPDATE SET last_message_at = excluded.last_message_at"
)
# The question and the reply in one statement. Each row is written once, except
# that a real answer replaces the fallback apology sent while the pipeline was
# failing (the DLQ record was replayed later): the user's row never has kind
# 'fallback', and a fallback never replaces anything.
_INSERT_EXCHANGE = sql(
    "INSERT INTO messages (msg_id, conversation_id, role, author, text, kind, reply_to,"
    " tokens, provider, created_at) VALUES"
    " (:msg_id, :conversation_id, 'user', :sender, :user_text, :content_type, NULL,"
    " :user_tokens, NULL, :now),"
    " (:reply_id, :conversation_id, 'assistant', :bot, :reply_text, :reply_kind, :msg_id,"
    " :reply_tokens, :provider, :now)"
    " ON CONFLICT (msg_id) DO UPDATE SET text = excluded.text, kind = excluded.kind,"
    " tokens = excluded.tokens, provider = excluded.provider"
    " WHERE messages.kind = 'fallback' AND excluded.kind <> 'fallback'"
)
# A part is claimed before it is sent: inserted as 'sending', or taken over unless it
# was sent or another sender's claim is still live. One atomic statement, so two
# senders never both hold a part. Claiming a part whose earlier claim (another
# claimant's) is still 'sending' means that claim was never resolved: its fate at
# Easemob is unknown, and the row says so (``error``).
_CLAIM = sql(
    "INSERT INTO deliveries (msg_id, part, parts, target_kind, target, status, attempts,"
    " claimed_by, claimed_until, created_at) VALUES (:msg_id, :part, :parts, :target_kind,"
    " :target, 'sending', 0, :claimant, :until, :now) ON CONFLICT (msg_id, part) DO UPDATE"
    " SET status = 'sending', parts = excluded.parts, claimed_by = excluded.claimed_by,"
    " claimed_until = excluded.claimed_until,"
    " error = CASE WHEN deliveries.status = 'sending'"
    " AND deliveries.claimed_by <> excluded.claimed_by THEN :uncertain"
    " WHEN deliveries.error LIKE 'uncertain:%' THEN deliveries.error ELSE NULL END"
    " WHERE deliveries.status <> 'sent' AND (deliveries.claimed_until IS NULL"
    " OR deliveries.claimed_until < excluded.created_at"
    " OR deliveries.claimed_by = excluded.claimed_by)"
    " RETURNING attempts, error",
    "until",
)
# A sent part is final: no later statement changes it.
_MARK_SENT = sql(
    "INSERT INTO deliveries (msg_id, part, parts, target_kind, target, status,"
    " easemob_msg_id, end_offset, reply_digest, attempts, created_at, sent_at) VALUES"
    " (:msg_id, :part, :parts, :target_kind, :target, 'sent', :easemob_msg_id, :end_offset,"
    " :reply_digest, 1, :now, :now) ON CONFLICT (msg_id, part) DO UPDATE SET status = 'sent',"
    " easemob_msg_id = excluded.easemob_msg_id, end_offset = excluded.end_offset,"
    " reply_digest = excluded.reply_digest, attempts = deliveries.attempts + 1,"
    " sent_at = excluded.sent_at, claimed_until = NULL,"
    " error = CASE WHEN deliveries.error LIKE 'uncertain:%' THEN deliveries.error END"
    " WHERE deliveries.status != 'sent'"
)
# A part recorded as sent unless the part has a row already (claimed or sent): one
# statement, so nobody can claim it in between. Returns the part when written.
_SENT_IF_ABSENT = sql(
    "INSERT INTO deliveries (msg_id, part, parts, target_kind, target, status,"
    " easemob_msg_id, end_offset, reply_digest, attempts, created_at, sent_at) VALUES"
    " (:msg_id, :part, :parts, :target_kind, :target, 'sent', :easemob_msg_id, :end_offset,"
    " :reply_digest, 0, :now, :now) ON CONFLICT (msg_id, part) DO NOTHING RETURNING part"
)
# Releases the claim (``claimant``) of the attempt that failed; never touches a part
# sent, or claimed by someone else since.
_MARK_FAILED = sql(
    "INSERT INTO deliveries (msg_id, part, parts, target_kind, target, status, attempts,"
    " error, created_at) VALUES (:msg_id, :part, :parts, :target_kind, :target, :status, 1,"
    " :error, :now) ON CONFLICT (msg_id, part) DO UPDATE SET status = excluded.status,"
    " attempts = deliveries.attempts + 1, claimed_until = NULL,"
    # A part whose fate at Easemob is unknown stays marked so: a later send of it is the
    # documented duplicate, not an unexplained one (the failure is in the logs).
    " error = CASE WHEN deliveries.error LIKE 'uncertain:%' THEN deliveries.error"
    " ELSE excluded.error END"
    " WHERE deliveries.status != 'sent' AND (deliveries.claimed_by IS NULL"
    " OR deliveries.claimed_by = :claimant)"
)


_EASEMOB_ID_MAX = _length(DeliveryRow.__table__.c.easemob_msg_id)


def _sent(
    msg_id: str,
    part: int,
    easemob_msg_id: str,
    *,
    end_offset: int,
    reply_digest: str,
    parts: int,
    target_kind: str,
    target: str,
) -> dict[str, object]:
    """The values of a part's row recorded as sent."""
    return {
        "msg_id": msg_id,
        "part": part,
        "parts": parts,
        "target_kind": target_kind,
        "target": target,
        "easemob_msg_id": easemob_msg_id[:_EASEMOB_ID_MAX],
        "end_offset": end_offset,
        "reply_digest": reply_digest,
        "now": utcnow(),
    }


# Every part of one ledger (built once: a statement and its cache key cost more than
# running it).
_LEDGER = select(
    DeliveryRow.part,
    DeliveryRow.status,
    DeliveryRow.easemob_msg_id,
    DeliveryRow.attempts,
    DeliveryRow.end_offset,
    DeliveryRow.reply_digest,
    DeliveryRow.error,
    DeliveryRow.parts,
).where(DeliveryRow.msg_id == bindparam("msg_id", type_=String))


class DeliveryLedger:
    """The ledger of reply parts and the history writes of a delivered reply."""

    def __init__(self, database: Database) -> None:
        self._database = database
        # The history of delivered replies is group-committed like usage rows: under
        # load the sender's commits no longer grow with its deliveries.
        self._conversations = GroupCommit(database, _UPSERT_CONVERSATION, order_by="id")
        self._exchanges = GroupCommit(database, _INSERT_EXCHANGE, order_by="msg_id")

    async def ledger(self, msg_id: str) -> dict[int, LedgerRow]:
        async with self._database.reading() as session:
            rows = (await session.execute(_LEDGER, {"msg_id": msg_id})).all()
        return {r.part: LedgerRow(*r) for r in rows}

    async def claim_part(
        self,
        msg_id: str,
        part: int,
        claimant: str,
        *,
        lease_s: float,
        parts: int,
        target_kind: str,
        target: str,
    ) -> Claim | None:
        """Claim a part before sending it; None when it is sent or another live claim holds it.

        The claim lasts ``lease_s`` seconds: a sender that died holding it stops
        blocking the part then. Committed on its own before the call to Easemob.
        """
        now = utcnow()
        values = {
            "msg_id": msg_id,
            "part": part,
            "parts": parts,
            "target_kind": target_kind,
            "target": target,
            "claimant": claimant,
            "until": now + timedelta(seconds=lease_s),
            "uncertain": UNCERTAIN_CLAIM,
            "now": now,
        }
        async with self._database.writing_one() as session:
            row = (await session.execute(_CLAIM, values)).first()
        if row is None:
            return None
        return Claim(attempt=int(row.attempts) + 1, uncertain=row.error == UNCERTAIN_CLAIM)

    async def mark_sent(
        self,
        msg_id: str,
        part: int,
        easemob_msg_id: str,
        *,
        end_offset: int,
        reply_digest: str,
        parts: int,
        target_kind: str,
        target: str,
    ) -> None:
        """Record a part Easemob accepted — the ledger entry that stops any resend.

        One statement committed by itself (one round trip): the window in which a
        crash leaves a part sent but unrecorded is this statement's. The history is
        written afterwards, group-committed apart from it (``record_exchange``), so it
        can neither roll back nor delay this row.
        """
        values = _sent(
            msg_id, part, easemob_msg_id, end_offset=end_offset, reply_digest=reply_digest,
            parts=parts, target_kind=target_kind, target=target,
        )  # fmt: skip
        async with self._database.writing_one() as session:
            await session.execute(_MARK_SENT, values)

    async def sent_if_absent(
        self,
        msg_id: str,
        part: int,
        *,
        end_offset: int,
        reply_digest: str,
        parts: int,
        target_kind: str,
        target: str,
    ) -> bool:
        """Record ``part`` as sent with nothing sent to Easemob (a ledger closed before it
        was opened), unless the part has a row already; True when written."""
        values = _sent(
            msg_id, part, "", end_offset=end_offset, reply_digest=reply_digest,
            parts=parts, target_kind=target_kind, target=target,
        )  # fmt: skip
        async with self._database.writing_one() as session:
            return (await session.execute(_SENT_IF_ABSENT, values)).first() is not None

    async def mark_failed(
        self,
        msg_id: str,
        part: int,
        error: str,
        *,
        parts: int,
        target_kind: str,
        target: str,
        final: bool,
        claimant: str | None = None,
    ) -> None:
        """Count a failed attempt (``final``: it will not be retried) and release its claim."""
        values = {
            "msg_id": msg_id,
            "part": part,
            "parts": parts,
            "target_kind": target_kind,
            "target": target,
            "status": "failed" if final else "retrying",
            "error": storable_text(error[:500]),
            "claimant": claimant,
            "now": utcnow(),
        }
        async with self._database.writing_one() as session:
            await session.execute(_MARK_FAILED, values)

    async def record_exchange(self, env: Envelope, reply_text: str, *, reply_kind: str) -> None:
        """Write the user's message and the reply (idempotent) and the conversation.

        Two idempotent upserts, each group-committed with those of the deliveries
        finishing at the same time (``GroupCommit``): the conversation first (the
        messages refer to it), then the question and the reply. A failure between them
        leaves only a conversation row touched, and the retry writes both again.
        """
        now = utcnow()
        user_text = storable_text(env.user_text)
        await self._conversations.write(
            {
                "id": env.conversation_id,
                "chat_type": env.chat_type.value,
                "bot": env.bot,
                "now": now,
            }
        )
        await self._exchanges.write(
            {
                "msg_id": env.msg_id,
                "conversation_id": env.conversation_id,
                "sender": env.sender,
                "user_text": user_text,
                "content_type": env.content.type,
                "user_tokens": estimate_tokens(user_text),
                "reply_id": f"{env.msg_id}:reply",
                "bot": env.bot,
                "reply_text": storable_text(reply_text),
                "reply_kind": reply_kind,
                "reply_tokens": env.completion.output_tokens if env.completion else None,
                "provider": env.completion.provider[:64] if env.completion else None,
                "now": now,
            }
        )
