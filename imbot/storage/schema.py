"""The SQL schema: one for SQLite and PostgreSQL, as ORM rows.

Tables: conversations, messages (the user's message and each reply, unique by
msg_id), deliveries (the ledger, unique by msg_id + part, each part's end offset),
usage (tokens and cost per reply), moderation_audit and callback_ids. Each class is
named for its row (``DeliveryRow``), not the concept the envelope carries
(``core.envelope.Delivery``). Alembic migrations live in ``storage/migrations``.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


_ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER only

# Column sizes, with margin above the longest value the gateway admits (core.limits)
# and everything derived from it: a reply's row is f"{msg_id}:reply", the fallback
# apology's ledger f"{msg_id}#fallback", a conversation "chat:" + bot + ":" + user.
# PostgreSQL refuses a longer value, and the sender writes these rows after Easemob
# accepted a reply: tests/integration/test_store_limits.py holds the schema to them.
MSG_ID_LEN = 128
ACCOUNT_ID_LEN = 128  # user, bot, group and chatroom ids
CONVERSATION_ID_LEN = 300
EASEMOB_MSG_ID_LEN = 128
MODEL_LEN = 128
PROVIDER_LEN = 64
CLAIM_ID_LEN = 64


class ConversationRow(Base):
    __tablename__ = "conversations"
    id: Mapped[str] = mapped_column(String(CONVERSATION_ID_LEN), primary_key=True)
    chat_type: Mapped[str] = mapped_column(String(16))
    bot: Mapped[str] = mapped_column(String(ACCOUNT_ID_LEN))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_message_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Messages with an id up to this one are left out of history windows (a provider
    # judged the conversation risky and asked for its history to be cleared).
    history_from_id: Mapped[int | None] = mapped_column(_ID, nullable=True)


class MessageRow(Base):
    __tablename__ = "messages"
    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    msg_id: Mapped[str] = mapped_column(String(MSG_ID_LEN), unique=True)  # or f"{msg_id}:reply"
    conversation_id: Mapped[str] = mapped_column(ForeignKey("conversations.id"))
    role: Mapped[str] = mapped_column(String(16))  # user | assistant
    author: Mapped[str] = mapped_column(String(ACCOUNT_ID_LEN))
    text: Mapped[str] = mapped_column(Text)  # user text as sent to the model (masked)
    kind: Mapped[str] = mapped_column(String(24), default="message")
    reply_to: Mapped[str | None] = mapped_column(String(MSG_ID_LEN), nullable=True)
    tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # Who wrote an answer ("demo" for the demo model, whose turns real models never see).
    provider: Mapped[str | None] = mapped_column(String(PROVIDER_LEN), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    # The router reads "the last N turns of a conversation": newest first by id. The
    # console finds a user's messages by author and counts recent ones by time.
    __table_args__ = (
        Index("ix_messages_conversation_id_id", "conversation_id", "id"),
        Index("ix_messages_author_id", "author", "id"),
        Index("ix_messages_created_at", "created_at"),
    )


class DeliveryRow(Base):
    __tablename__ = "deliveries"
    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    # The user's message being answered, or f"{msg_id}#fallback" (the apology's ledger).
    msg_id: Mapped[str] = mapped_column(String(MSG_ID_LEN))
    part: Mapped[int] = mapped_column(Integer)
    parts: Mapped[int] = mapped_column(Integer)
    target_kind: Mapped[str] = mapped_column(String(16))  # users | chatgroups | chatrooms
    target: Mapped[str] = mapped_column(String(ACCOUNT_ID_LEN))
    # sending (claimed, Easemob's answer not recorded yet) | sent | retrying | failed
    status: Mapped[str] = mapped_column(String(16))
    easemob_msg_id: Mapped[str | None] = mapped_column(String(EASEMOB_MSG_ID_LEN), nullable=True)
    # Where the part ends in the reply text (characters); the next part starts there.
    end_offset: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reply_digest: Mapped[str | None] = mapped_column(String(32), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Which sender may send this part, and until when (its lease; see sender.service).
    claimed_by: Mapped[str | None] = mapped_column(String(CLAIM_ID_LEN), nullable=True)
    claimed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        UniqueConstraint("msg_id", "part", name="uq_deliveries_msg_id_part"),
        # The feedback report finds the rated reply by the id Easemob gave its part.
        Index("ix_deliveries_easemob_msg_id", "easemob_msg_id"),
    )


class UsageRow(Base):
    __tablename__ = "usage"
    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    msg_id: Mapped[str] = mapped_column(String(MSG_ID_LEN), unique=True)
    conversation_id: Mapped[str] = mapped_column(String(CONVERSATION_ID_LEN), index=True)
    model: Mapped[str] = mapped_column(String(MODEL_LEN))  # as the provider named it (clipped)
    provider: Mapped[str] = mapped_column(String(PROVIDER_LEN))
    input_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    output_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cost: Mapped[float | None] = mapped_column(Float, nullable=True)
    currency: Mapped[str | None] = mapped_column(String(8), nullable=True)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )


class ModerationAuditRow(Base):
    __tablename__ = "moderation_audit"
    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    msg_id: Mapped[str] = mapped_column(String(MSG_ID_LEN), index=True)
    stage: Mapped[str] = mapped_column(String(16))  # input | output
    detector: Mapped[str] = mapped_column(String(24))
    rule: Mapped[str] = mapped_column(String(120))  # never the raw PII value
    category: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (
        UniqueConstraint("msg_id", "stage", "detector", "rule", name="uq_audit_decision"),
    )


class CallbackIdRow(Base):
    """A signed callback's callId, remembered by the gateways until ``expires_at``
    (ms epoch: its timestamp plus the window) so a replay of it is never published."""

    __tablename__ = "callback_ids"
    call_id: Mapped[str] = mapped_column(String(256), primary_key=True)  # limits.CALL_ID_MAX
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)


class QuotaCounterRow(Base):
    """Spend and reservations of one budget scope in one period (storage.quota)."""

    __tablename__ = "quota_counters"

    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    spent_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    spent_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    reserved_tokens: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    reserved_micros: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class QuotaReservationRow(Base):
    __tablename__ = "quota_reservations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    msg_id: Mapped[str] = mapped_column(String(MSG_ID_LEN))
    user_id: Mapped[str] = mapped_column(String(ACCOUNT_ID_LEN))
    tier: Mapped[str] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(MODEL_LEN), nullable=True)
    keys: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int] = mapped_column(BigInteger)
    micros: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    spent_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    spent_micros: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    settled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The budget lease its shared scopes were taken from (those keys are not in ``keys``).
    lease_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    __table_args__ = (
        Index("ix_quota_reservations_state_expires", "state", "expires_at"),
        Index("ix_quota_reservations_user_created", "user_id", "created_at"),
        Index("ix_quota_reservations_lease", "lease_id", "state"),
        Index("ix_quota_reservations_created", "created_at"),  # the console's spend over time
        Index("ix_quota_reservations_msg_id", "msg_id"),  # a message's trace, its rating's tier
    )


class QuotaLeaseRow(Base):
    """A slice of shared budgets taken by one model worker (storage.leases)."""

    __tablename__ = "quota_leases"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    keys: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int] = mapped_column(BigInteger)
    micros: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))  # open, closed
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # What the calls settled under it spent (written when it closes).
    spent_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    spent_micros: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    __table_args__ = (Index("ix_quota_leases_state_expires", "state", "expires_at"),)


class UserTierRow(Base):
    __tablename__ = "user_tiers"

    user_id: Mapped[str] = mapped_column(String(ACCOUNT_ID_LEN), primary_key=True)
    tier: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class FeedbackRow(Base):
    """A user's rating of one of the bot's replies (storage.feedback, docs/feedback.md):
    one row per feedback message, joined to the answer through the delivery ledger."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    msg_id: Mapped[str] = mapped_column(String(MSG_ID_LEN), unique=True)  # the feedback message
    # Easemob's msg id of the rated reply part (deliveries.easemob_msg_id).
    reply_msg_id: Mapped[str] = mapped_column(String(EASEMOB_MSG_ID_LEN), index=True)
    rating: Mapped[str] = mapped_column(String(16))  # a rating name of the policy's feedback
    user_id: Mapped[str] = mapped_column(String(ACCOUNT_ID_LEN))
    conversation_id: Mapped[str] = mapped_column(String(CONVERSATION_ID_LEN))
    # When the user gave it (Easemob's timestamp of the feedback message).
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, index=True
    )


class ModelHealthRow(Base):
    """Until when a model's circuit is open, as the model workers last saw it
    (storage.health; the route stage leaves such models out of its chains)."""

    __tablename__ = "model_health"

    model: Mapped[str] = mapped_column(String(MODEL_LEN), primary_key=True)
    open_until: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ConsoleAuditRow(Base):
    """One action an operator took in the console (storage.console): who, what, on what,
    and how it ended. ``detail`` is JSON of ids and counts, never user text."""

    __tablename__ = "console_audit"

    id: Mapped[int] = mapped_column(_ID, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    operator: Mapped[str] = mapped_column(String(ACCOUNT_ID_LEN))
    role: Mapped[str] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(32))  # requeue | replay | set-tier | …
    target: Mapped[str] = mapped_column(String(CONVERSATION_ID_LEN))
    detail: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(String(16))  # done | refused | failed
    __table_args__ = (
        Index("ix_console_audit_at", "at"),
        Index("ix_console_audit_target", "action", "target"),
    )
