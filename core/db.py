"""The SQL schema (one for SQLite and PostgreSQL), engines and migration checks.

Tables: conversations, messages (the user's message and each reply, unique by
msg_id), deliveries (the ledger, unique by msg_id + part, each part's end offset), usage (tokens and
cost per reply) and moderation_audit. Alembic migrations live in
``core/migrations``; ``imbot migrate`` applies them and services refuse to start
on a database that is behind.
"""

from __future__ import annotations

import concurrent.futures
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
    event,
)
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from core.errors import ConfigurationError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


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


class Conversation(Base):
    __tablename__ = "conversations"
    id: Mapped[str] = mapped_column(String(CONVERSATION_ID_LEN), primary_key=True)
    chat_type: Mapped[str] = mapped_column(String(16))
    bot: Mapped[str] = mapped_column(String(ACCOUNT_ID_LEN))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_message_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Messages with an id up to this one are left out of history windows (a provider
    # judged the conversation risky and asked for its history to be cleared).
    history_from_id: Mapped[int | None] = mapped_column(_ID, nullable=True)


class Message(Base):
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
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    # The router reads "the last N turns of a conversation": newest first by id.
    __table_args__ = (Index("ix_messages_conversation_id_id", "conversation_id", "id"),)


class Delivery(Base):
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

    __table_args__ = (UniqueConstraint("msg_id", "part", name="uq_deliveries_msg_id_part"),)


class Usage(Base):
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
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModerationAudit(Base):
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


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: readers never block the writer, and a commit appends to the log instead
    # of rewriting pages; synchronous=NORMAL fsyncs at checkpoints, not every commit
    # (a power cut can lose the last commits, never corrupt the database — fine for
    # the embedded default; production runs PostgreSQL).
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def create_engine(url: str) -> AsyncEngine:
    """An engine whose errors never carry bound parameters (``hide_parameters``): the
    parameters are user questions and bot answers, and error messages end up in logs
    and DLQ records."""
    if url.startswith("sqlite"):
        # One writer at a time; wait rather than fail when another process writes.
        engine = create_async_engine(url, connect_args={"timeout": 30}, hide_parameters=True)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    # No pool_pre_ping: it costs a round trip on every checkout. A connection that
    # went stale fails its statement instead, the pool drops it (SQLAlchemy
    # invalidates on disconnect errors) and the stage boundary retries the record.
    return create_async_engine(
        url, pool_size=10, max_overflow=10, pool_recycle=1800, hide_parameters=True
    )


def describe_db_error(exc: BaseException) -> str:
    """A description of a database error for logs and DLQ records, free of user data.

    ``hide_parameters`` keeps the bound parameters out of SQLAlchemy's message, but
    the server's own message can still quote them (PostgreSQL: "Failing row
    contains (…)", "invalid input for query argument $1: '…'"). So this keeps
    only names: the error classes, the SQLSTATE / SQLite error name, the table,
    column and constraint the server names, and the start of our SQL statement.
    """
    parts = [type(exc).__name__]
    orig = getattr(exc, "orig", None)
    driver = orig.__cause__ if orig is not None and orig.__cause__ is not None else orig
    if driver is not None:
        parts.append(f"({type(driver).__module__.split('.')[0]}.{type(driver).__name__})")
        for label, attr in (
            ("sqlstate", "sqlstate"),
            ("sqlite", "sqlite_errorname"),
            ("table", "table_name"),
            ("column", "column_name"),
            ("constraint", "constraint_name"),
        ):
            value = getattr(driver, attr, None)
            if isinstance(value, str) and value:
                parts.append(f"{label}={value}")
    statement = getattr(exc, "statement", None)
    if isinstance(statement, str) and statement:
        parts.append(f"in: {' '.join(statement.split())[:200]}")
    return " ".join(parts)


def alembic_config(url: str) -> object:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str) -> None:
    """Apply every migration (``imbot migrate``)."""
    from alembic import command
    from alembic.config import Config

    cfg = alembic_config(url)
    assert isinstance(cfg, Config)
    # Alembic's env runs its own event loop; a thread keeps that working when the
    # caller is itself inside one (tests, tools).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(command.upgrade, cfg, "head").result()


async def check_migrated(engine: AsyncEngine) -> None:
    """Refuse to run against a database whose schema is behind the code."""
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = alembic_config(str(engine.url))
    assert isinstance(cfg, Config)
    head = ScriptDirectory.from_config(cfg).get_current_head()
    async with engine.connect() as conn:
        current = await conn.run_sync(
            lambda sync_conn: MigrationContext.configure(sync_conn).get_current_revision()
        )
    if current != head:
        raise ConfigurationError(
            f"database {engine.url.render_as_string(hide_password=True)} is at migration"
            f" {current or 'none'}, the code needs {head}: run `imbot migrate` first"
        )


class CallbackId(Base):
    """A signed callback's callId, remembered by the gateways until ``expires_at``
    (ms epoch: its timestamp plus the window) so a replay of it is never published."""

    __tablename__ = "callback_ids"
    call_id: Mapped[str] = mapped_column(String(256), primary_key=True)  # limits.CALL_ID_MAX
    expires_at: Mapped[int] = mapped_column(BigInteger, index=True)
