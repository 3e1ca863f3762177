"""History and ledger access: every SQL statement the pipeline runs lives here.

One ``Store`` per process over one async engine. Writes are idempotent (keyed by
msg_id, or msg_id + part), so a stage that sees a record twice leaves one row.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import DateTime, Select, TextClause, bindparam, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.db import (
    Conversation,
    Delivery,
    Message,
    Usage,
    check_migrated,
    create_engine,
    utcnow,
)
from core.envelope import Completion, Envelope, Turn


@dataclass(frozen=True, slots=True)
class AuditEntry:
    detector: str
    rule: str
    category: str
    action: str


@dataclass(frozen=True, slots=True)
class LedgerRow:
    part: int
    status: str
    easemob_msg_id: str | None
    attempts: int
    end_offset: int | None = None
    reply_digest: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Claim:
    """A part this sender may send now (``Store.claim_part``)."""

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


def estimate_tokens(text: str) -> int:
    """Cheap token estimate for the history budget: ~1 token per CJK char, ~4 chars otherwise."""
    cjk = sum(1 for ch in text if ord(ch) > 0x2E80)
    return cjk + (len(text) - cjk + 3) // 4


def _sql(statement: str, *timestamps: str) -> TextClause:
    """A write statement in the SQL both SQLite (3.35+) and PostgreSQL speak.

    Plain text on purpose: SQLAlchemy never caches the compiled form of its
    dialect-specific ``INSERT … ON CONFLICT`` constructs, and compiling them was
    most of the sender's database time. A ``text()`` statement is compiled once.
    """
    return text(statement).bindparams(
        *(bindparam(name, type_=DateTime(timezone=True)) for name in ("now", *timestamps))
    )


def storable_text(value: str) -> str:
    """``value`` as a text column can hold it: PostgreSQL refuses NUL characters."""
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _clip(value: str | None, limit: int) -> str | None:
    return value[:limit] if isinstance(value, str) else value


def _length(column: Any) -> int:
    return int(column.type.length)


# Identifiers the sender writes after Easemob accepted a reply, and the column each goes to.
_ID_COLUMNS: tuple[tuple[str, int], ...] = (
    ("msg_id", _length(Message.__table__.c.msg_id)),
    ("conversation_id", _length(Conversation.__table__.c.id)),
    ("sender", _length(Message.__table__.c.author)),
    ("bot", _length(Conversation.__table__.c.bot)),
    ("to", _length(Delivery.__table__.c.target)),
)
_MSG_ID_MAX = _length(Message.__table__.c.msg_id)
_LEDGER_ID_MAX = _length(Delivery.__table__.c.msg_id)


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


_UPSERT_CONVERSATION = _sql(
    "INSERT INTO conversations (id, chat_type, bot, created_at, last_message_at)"
    " VALUES (:id, :chat_type, :bot, :now, :now)"
    " ON CONFLICT (id) DO UPDATE SET last_message_at = excluded.last_message_at"
)
# The question and the reply in one statement. Each row is written once, except
# that a real answer replaces the fallback apology sent while the pipeline was
# failing (the DLQ record was replayed later): the user's row never has kind
# 'fallback', and a fallback never replaces anything.
_INSERT_EXCHANGE = _sql(
    "INSERT INTO messages (msg_id, conversation_id, role, author, text, kind, reply_to,"
    " tokens, created_at) VALUES"
    " (:msg_id, :conversation_id, 'user', :sender, :user_text, :content_type, NULL,"
    " :user_tokens, :now),"
    " (:reply_id, :conversation_id, 'assistant', :bot, :reply_text, :reply_kind, :msg_id,"
    " :reply_tokens, :now)"
    " ON CONFLICT (msg_id) DO UPDATE SET text = excluded.text, kind = excluded.kind,"
    " tokens = excluded.tokens"
    " WHERE messages.kind = 'fallback' AND excluded.kind <> 'fallback'"
)
_INSERT_USAGE = _sql(
    "INSERT INTO usage (msg_id, conversation_id, model, provider, input_tokens,"
    " output_tokens, cost, currency, latency_ms, created_at) VALUES (:msg_id,"
    " :conversation_id, :model, :provider, :input_tokens, :output_tokens, :cost, :currency,"
    " :latency_ms, :now) ON CONFLICT (msg_id) DO NOTHING"
)
_INSERT_AUDIT = _sql(
    "INSERT INTO moderation_audit (msg_id, stage, detector, rule, category, action,"
    " created_at) VALUES (:msg_id, :stage, :detector, :rule, :category, :action, :now)"
    " ON CONFLICT (msg_id, stage, detector, rule) DO NOTHING"
)
# A part is claimed before it is sent: inserted as 'sending', or taken over unless it
# was sent or another sender's claim is still live. One atomic statement, so two
# senders never both hold a part. Claiming a part whose earlier claim (another
# claimant's) is still 'sending' means that claim was never resolved: its fate at
# Easemob is unknown, and the row says so (``error``).
_CLAIM = _sql(
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
_MARK_SENT = _sql(
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
# Releases the claim (``claimant``) of the attempt that failed; never touches a part
# sent, or claimed by someone else since.
_MARK_FAILED = _sql(
    "INSERT INTO deliveries (msg_id, part, parts, target_kind, target, status, attempts,"
    " error, created_at) VALUES (:msg_id, :part, :parts, :target_kind, :target, :status, 1,"
    " :error, :now) ON CONFLICT (msg_id, part) DO UPDATE SET status = excluded.status,"
    " attempts = deliveries.attempts + 1, error = excluded.error, claimed_until = NULL"
    " WHERE deliveries.status != 'sent' AND (deliveries.claimed_by IS NULL"
    " OR deliveries.claimed_by = :claimant)"
)


class _GroupCommit:
    """Rows of one idempotent statement, written by as few transactions as the load allows.

    ``write`` returns once its row is committed. Rows that arrive while a commit is
    in progress go together in the next one, so under load the number of commits
    (and of waits for SQLite's single writer, shared with the sender's process) no
    longer grows with the number of rows. Alone, a row is committed at once. A
    failed commit fails every row in it; each caller retries its own.
    """

    def __init__(self, store: Store, statement: TextClause) -> None:
        self._store = store
        self._statement = statement
        self._rows: list[dict[str, Any]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._flushing: asyncio.Task[None] | None = None

    async def write(self, row: dict[str, Any]) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._rows.append(row)
        self._waiters.append(waiter)
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._flush())
        await waiter

    async def _flush(self) -> None:
        while self._rows:
            rows, waiters = self._rows, self._waiters
            self._rows, self._waiters = [], []
            try:
                async with self._store._writing() as session:
                    await session.execute(self._statement, rows)
            except Exception as exc:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
            else:
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name
        # SQLite has one writer at a time; concurrent write transactions of this
        # process would meet in SQLite's busy handler, which sleeps up to 100 ms
        # between tries. Queue them here instead (PostgreSQL needs no such thing).
        self._write_lock = asyncio.Lock() if self._dialect == "sqlite" else None
        # Reads are single statements: without a transaction around them they are one
        # round trip to the server instead of three (BEGIN, SELECT, ROLLBACK).
        self._reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._usage = _GroupCommit(self, _INSERT_USAGE)

    @classmethod
    async def open(cls, url: str, *, check: bool = True) -> Store:
        engine = create_engine(url)
        if check:
            try:
                await check_migrated(engine)
            except Exception:
                await engine.dispose()
                raise
        return cls(engine)

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction (serialised per process on SQLite)."""
        if self._write_lock is None:
            async with self.engine.begin() as session:
                yield session
            return
        async with self._write_lock, self.engine.begin() as session:
            yield session

    @contextlib.asynccontextmanager
    async def _writing_one(self) -> AsyncIterator[AsyncConnection]:
        """One write statement committed by itself: one round trip, no BEGIN / COMMIT.

        For the ledger, whose rows must be durable the moment the statement returns.
        """
        if self._write_lock is None:
            async with self._reader.connect() as session:
                yield session
            return
        async with self._write_lock, self._reader.connect() as session:
            yield session

    async def close(self) -> None:
        await self.engine.dispose()

    # -- moderation audit ----------------------------------------------------

    async def record_audit(self, msg_id: str, stage: str, entries: Iterable[AuditEntry]) -> None:
        now = utcnow()
        rows = [
            {
                "msg_id": msg_id,
                "stage": stage,
                "detector": e.detector,
                "rule": e.rule[:120],
                "category": e.category[:64],
                "action": e.action,
                "now": now,
            }
            for e in entries
        ]
        if not rows:
            return
        async with self._writing() as session:
            await session.execute(_INSERT_AUDIT, rows)

    # -- history ---------------------------------------------------------------

    async def history_window(
        self,
        conversation_id: str,
        *,
        turns: int,
        token_budget: int,
        before_msg_id: str | None = None,
    ) -> tuple[Turn, ...]:
        """The last ``turns`` messages of a conversation that fit in ``token_budget``, oldest first.

        Only exchanges the model really answered count: a question that was blocked,
        rejected by a provider, unsupported or answered by the fallback apology is
        never sent to a model again as history, and neither is anything before a
        provider asked us to clear the history (``clear_history``).
        Uses the (conversation_id, id) index: one backward range scan.
        """
        if turns <= 0:
            return ()
        query = self.history_query(conversation_id, 2 * turns + 2)
        async with self._reader.connect() as session:
            rows = (await session.execute(query)).all()
        picked: list[Turn] = []
        skipped: set[str] = set()  # user messages whose reply was not a model answer
        used = 0
        for role, content, tokens, msg_id, kind, reply_to in rows:
            if role == "assistant" and kind != "answer":
                if reply_to:
                    skipped.add(reply_to)
                continue
            if msg_id == before_msg_id or msg_id in skipped:
                continue  # the message being answered is not its own history
            cost = tokens if tokens is not None else estimate_tokens(content)
            if used + cost > token_budget or len(picked) >= turns:
                break
            used += cost
            picked.append(
                Turn(role="assistant" if role == "assistant" else "user", content=content)
            )
        picked.reverse()
        # A window must start with the user's turn (some providers require it).
        while picked and picked[0].role == "assistant":
            picked.pop(0)
        return tuple(picked)

    @staticmethod
    def history_query(
        conversation_id: str, limit: int
    ) -> Select[tuple[str, str, int | None, str, str, str | None]]:
        """The newest ``limit`` messages of a conversation since its history was last cleared."""
        cleared = (
            select(Conversation.history_from_id)
            .where(Conversation.id == conversation_id)
            .scalar_subquery()
        )
        return (
            select(
                Message.role,
                Message.text,
                Message.tokens,
                Message.msg_id,
                Message.kind,
                Message.reply_to,
            )
            .where(
                Message.conversation_id == conversation_id,
                Message.id > func.coalesce(cleared, 0),
            )
            .order_by(Message.id.desc())
            .limit(limit)
        )

    async def clear_history(self, conversation_id: str) -> None:
        """Leave everything said so far out of future history windows (rows stay, for audit)."""
        newest = (
            select(func.max(Message.id))
            .where(Message.conversation_id == conversation_id)
            .scalar_subquery()
        )
        async with self._writing() as session:
            await session.execute(
                update(Conversation)
                .where(Conversation.id == conversation_id)
                .values(history_from_id=newest)
            )

    async def record_exchange(self, env: Envelope, reply_text: str, *, reply_kind: str) -> None:
        """Write the user's message and the reply (idempotent) and the conversation.

        Two statements, each committed by itself (two round trips instead of four with
        BEGIN and COMMIT): both are idempotent upserts, so a failure between them leaves
        only a conversation row touched, and the retry writes both again.
        """
        async with self._writing_one() as session:
            await self._record_exchange(session, env, reply_text, reply_kind)

    async def _record_exchange(
        self, session: AsyncConnection, env: Envelope, reply_text: str, reply_kind: str
    ) -> None:
        now = utcnow()
        user_text = storable_text(env.user_text)
        await session.execute(
            _UPSERT_CONVERSATION,
            {
                "id": env.conversation_id,
                "chat_type": env.chat_type.value,
                "bot": env.bot,
                "now": now,
            },
        )
        await session.execute(
            _INSERT_EXCHANGE,
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
                "now": now,
            },
        )

    async def record_usage(self, env: Envelope, c: Completion) -> None:
        """The tokens and cost of the model call that answered ``env`` (idempotent).

        Written by the model stage as soon as the call returns, so a paid call is
        accounted for even when its reply is never delivered.
        """
        await self._usage.write(
            {
                "msg_id": env.msg_id,
                "conversation_id": env.conversation_id,
                # As the provider named them: free text, clipped to what the columns hold.
                "model": _clip(c.model, _MODEL_MAX),
                "provider": _clip(c.provider, _PROVIDER_MAX),
                "input_tokens": c.input_tokens,
                "output_tokens": c.output_tokens,
                "cost": c.cost,
                "currency": _clip(c.currency, _CURRENCY_MAX),
                "latency_ms": c.latency_ms,
                "now": utcnow(),
            }
        )

    # -- delivery ledger -----------------------------------------------------

    async def ledger(self, msg_id: str) -> dict[int, LedgerRow]:
        query = select(
            Delivery.part,
            Delivery.status,
            Delivery.easemob_msg_id,
            Delivery.attempts,
            Delivery.end_offset,
            Delivery.reply_digest,
            Delivery.error,
        ).where(Delivery.msg_id == msg_id)
        async with self._reader.connect() as session:
            rows = (await session.execute(query)).all()
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
        async with self._writing_one() as session:
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
        written afterwards in its own transaction (``record_exchange``), so it can
        neither roll back nor delay this row.
        """
        values = {
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
        async with self._writing_one() as session:
            await session.execute(_MARK_SENT, values)

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
        async with self._writing_one() as session:
            await session.execute(_MARK_FAILED, values)

    async def count(self, table: type[object], **where: object) -> int:
        """Row count, for operations tooling and tests."""
        query = select(func.count()).select_from(table)
        for column, value in where.items():
            query = query.where(getattr(table, column) == value)
        async with self._reader.connect() as session:
            return int((await session.execute(query)).scalar_one())


_MODEL_MAX = _length(Usage.__table__.c.model)
_PROVIDER_MAX = _length(Usage.__table__.c.provider)
_CURRENCY_MAX = _length(Usage.__table__.c.currency)
_EASEMOB_ID_MAX = _length(Delivery.__table__.c.easemob_msg_id)

__all__ = [
    "UNCERTAIN_ANSWER",
    "UNCERTAIN_CLAIM",
    "AuditEntry",
    "Claim",
    "LedgerRow",
    "Store",
    "estimate_tokens",
    "storable_text",
    "unstorable",
]
