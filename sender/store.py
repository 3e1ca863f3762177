"""History and ledger access: every SQL statement the pipeline runs lives here.

One ``Store`` per process over one async engine. Writes are idempotent (keyed by
msg_id, or msg_id + part), so a stage that sees a record twice leaves one row.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Select, Table, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.db import (
    Conversation,
    Delivery,
    Message,
    ModerationAudit,
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


def estimate_tokens(text: str) -> int:
    """Cheap token estimate for the history budget: ~1 token per CJK char, ~4 chars otherwise."""
    cjk = sum(1 for ch in text if ord(ch) > 0x2E80)
    return cjk + (len(text) - cjk + 3) // 4


class Store:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._dialect = engine.dialect.name
        # SQLite has one writer at a time; concurrent write transactions of this
        # process would meet in SQLite's busy handler, which sleeps up to 100 ms
        # between tries. Queue them here instead (PostgreSQL needs no such thing).
        self._write_lock = asyncio.Lock() if self._dialect == "sqlite" else None

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

    async def close(self) -> None:
        await self.engine.dispose()

    def _insert_ignore(self, table: type[object], index: Sequence[str]):  # type: ignore[no-untyped-def]
        """INSERT … ON CONFLICT DO NOTHING, in this engine's dialect."""
        if self._dialect == "postgresql":
            return postgresql.insert(table).on_conflict_do_nothing(index_elements=list(index))
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=list(index))

    # -- moderation audit ----------------------------------------------------

    async def record_audit(self, msg_id: str, stage: str, entries: Iterable[AuditEntry]) -> None:
        rows = [
            {
                "msg_id": msg_id,
                "stage": stage,
                "detector": e.detector,
                "rule": e.rule[:120],
                "category": e.category[:64],
                "action": e.action,
                "created_at": utcnow(),
            }
            for e in entries
        ]
        if not rows:
            return
        stmt = self._insert_ignore(ModerationAudit, ("msg_id", "stage", "detector", "rule"))
        async with self._writing() as session:
            await session.execute(stmt, rows)

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
        async with self.engine.connect() as session:
            rows = (await session.execute(query)).all()
        picked: list[Turn] = []
        skipped: set[str] = set()  # user messages whose reply was not a model answer
        used = 0
        for role, text, tokens, msg_id, kind, reply_to in rows:
            if role == "assistant" and kind != "answer":
                if reply_to:
                    skipped.add(reply_to)
                continue
            if msg_id == before_msg_id or msg_id in skipped:
                continue  # the message being answered is not its own history
            cost = tokens if tokens is not None else estimate_tokens(text)
            if used + cost > token_budget or len(picked) >= turns:
                break
            used += cost
            picked.append(Turn(role="assistant" if role == "assistant" else "user", content=text))
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
        """Write the user's message and the reply (idempotent) and the conversation."""
        async with self._writing() as session:
            await self._record_exchange(session, env, reply_text, reply_kind)

    async def _record_exchange(
        self, session: AsyncConnection, env: Envelope, reply_text: str, reply_kind: str
    ) -> None:
        now = utcnow()
        user_text = env.user_text
        await self._upsert_conversation(session, env, now)
        await session.execute(
            self._insert_ignore(Message, ("msg_id",)),
            [
                {
                    "msg_id": env.msg_id,
                    "conversation_id": env.conversation_id,
                    "role": "user",
                    "author": env.sender,
                    "text": user_text,
                    "kind": env.content.type,
                    "reply_to": None,
                    "tokens": estimate_tokens(user_text),
                    "created_at": now,
                }
            ],
        )
        # The reply row: written once, except that a real answer replaces the fallback
        # apology sent while the pipeline was failing (a DLQ replay answered it later).
        dialect_insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        table = Message.__table__
        assert isinstance(table, Table)
        tokens = env.completion.output_tokens if env.completion else None
        insert = dialect_insert(table).values(
            msg_id=f"{env.msg_id}:reply",
            conversation_id=env.conversation_id,
            role="assistant",
            author=env.bot,
            text=reply_text,
            kind=reply_kind,
            reply_to=env.msg_id,
            tokens=tokens,
            created_at=now,
        )
        await session.execute(
            insert.on_conflict_do_nothing(index_elements=["msg_id"])
            if reply_kind == "fallback"
            else insert.on_conflict_do_update(
                index_elements=["msg_id"],
                set_={"text": reply_text, "kind": reply_kind, "tokens": tokens},
                where=table.c.kind == "fallback",
            )
        )

    async def record_usage(self, env: Envelope, c: Completion) -> None:
        """The tokens and cost of the model call that answered ``env`` (idempotent).

        Written by the model stage as soon as the call returns, so a paid call is
        accounted for even when its reply is never delivered.
        """
        async with self._writing() as session:
            await session.execute(
                self._insert_ignore(Usage, ("msg_id",)),
                [
                    {
                        "msg_id": env.msg_id,
                        "conversation_id": env.conversation_id,
                        "model": c.model,
                        "provider": c.provider,
                        "input_tokens": c.input_tokens,
                        "output_tokens": c.output_tokens,
                        "cost": c.cost,
                        "currency": c.currency,
                        "latency_ms": c.latency_ms,
                        "created_at": utcnow(),
                    }
                ],
            )

    async def _upsert_conversation(
        self, session: AsyncConnection, env: Envelope, now: datetime
    ) -> None:
        dialect_insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        await session.execute(
            dialect_insert(Conversation)
            .values(
                id=env.conversation_id,
                chat_type=env.chat_type.value,
                bot=env.bot,
                created_at=now,
                last_message_at=now,
            )
            .on_conflict_do_update(index_elements=["id"], set_={"last_message_at": now})
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
        ).where(Delivery.msg_id == msg_id)
        async with self.engine.connect() as session:
            rows = (await session.execute(query)).all()
        return {r.part: LedgerRow(*r) for r in rows}

    def _upsert_delivery(self, values: dict[str, object], on_conflict: dict[str, object]) -> Any:
        table = Delivery.__table__
        assert isinstance(table, Table)
        dialect_insert = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        return (
            dialect_insert(table)
            .values(values)
            .on_conflict_do_update(
                index_elements=["msg_id", "part"],
                set_=on_conflict,
                where=table.c.status != "sent",  # a sent part is final
            )
        )

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

        Its own transaction, committed before anything else is written: the history
        that follows the last part must not be able to roll it back.
        """
        now = utcnow()
        stmt = self._upsert_delivery(
            {
                "msg_id": msg_id,
                "part": part,
                "parts": parts,
                "target_kind": target_kind,
                "target": target,
                "status": "sent",
                "easemob_msg_id": easemob_msg_id,
                "end_offset": end_offset,
                "reply_digest": reply_digest,
                "attempts": 1,
                "created_at": now,
                "sent_at": now,
            },
            {
                "status": "sent",
                "easemob_msg_id": easemob_msg_id,
                "end_offset": end_offset,
                "reply_digest": reply_digest,
                "attempts": Delivery.attempts + 1,
                "sent_at": now,
                "error": None,
            },
        )
        async with self._writing() as session:
            await session.execute(stmt)

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
    ) -> None:
        """Count a failed attempt (``final``: it will not be retried)."""
        status = "failed" if final else "retrying"
        stmt = self._upsert_delivery(
            {
                "msg_id": msg_id,
                "part": part,
                "parts": parts,
                "target_kind": target_kind,
                "target": target,
                "status": status,
                "attempts": 1,
                "error": error[:500],
                "created_at": utcnow(),
            },
            {"status": status, "attempts": Delivery.attempts + 1, "error": error[:500]},
        )
        async with self._writing() as session:
            await session.execute(stmt)

    async def count(self, table: type[object], **where: object) -> int:
        """Row count, for operations tooling and tests."""
        query = select(func.count()).select_from(table)
        for column, value in where.items():
            query = query.where(getattr(table, column) == value)
        async with self.engine.connect() as session:
            return int((await session.execute(query)).scalar_one())


__all__ = ["AuditEntry", "LedgerRow", "Store", "estimate_tokens"]
