"""The history window: which earlier turns of a conversation a model is shown."""

from __future__ import annotations

from sqlalchemy import Integer, Select, String, bindparam, func, select, update

from imbot.core.envelope import Turn
from imbot.core.tokens import estimate_tokens
from imbot.storage.database import Database
from imbot.storage.schema import ConversationRow, MessageRow

# The newest ``limit`` messages of a conversation since its history was last cleared.
# Built once: building it and its cache key for every message cost 0.2 ms of CPU.
_HISTORY = (
    select(
        MessageRow.role,
        MessageRow.text,
        MessageRow.tokens,
        MessageRow.msg_id,
        MessageRow.kind,
        MessageRow.reply_to,
        MessageRow.provider,
    )
    .where(
        MessageRow.conversation_id == bindparam("conversation_id", type_=String),
        MessageRow.id
        > func.coalesce(
            select(ConversationRow.history_from_id)
            .where(ConversationRow.id == bindparam("conversation_id", type_=String))
            .scalar_subquery(),
            0,
        ),
    )
    .order_by(MessageRow.id.desc())
    .limit(bindparam("limit", type_=Integer))
)


class HistoryWindow:
    """Reads the window the router sends with a question; clears it on a provider's request."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def history_window(
        self,
        conversation_id: str,
        *,
        turns: int,
        token_budget: int,
        before_msg_id: str | None = None,
        skip_providers: frozenset[str] = frozenset(),
    ) -> tuple[Turn, ...]:
        """The last ``turns`` messages of a conversation that fit in ``token_budget``, oldest first.

        Only exchanges the model really answered count: a question that was blocked,
        rejected by a provider, unsupported or answered by the fallback apology is
        never sent to a model again as history, and neither is anything before a
        provider asked us to clear the history (``clear_history``). Answers written by
        ``skip_providers`` (the demo model, when a real one is asked) are left out with
        their questions.
        Uses the (conversation_id, id) index: one backward range scan.
        """
        if turns <= 0:
            return ()
        async with self._database.reading() as session:
            rows = (
                await session.execute(
                    _HISTORY, {"conversation_id": conversation_id, "limit": 2 * turns + 2}
                )
            ).all()
        picked: list[Turn] = []
        skipped: set[str] = set()  # user messages whose reply was not a model answer
        used = 0
        for role, content, tokens, msg_id, kind, reply_to, provider in rows:
            if role == "assistant" and (kind != "answer" or provider in skip_providers):
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
    ) -> Select[tuple[str, str, int | None, str, str, str | None, str | None]]:
        """The newest ``limit`` messages of a conversation since its history was last
        cleared: the statement ``history_window`` runs, with its values bound."""
        return _HISTORY.params(conversation_id=conversation_id, limit=limit)

    async def clear_history(self, conversation_id: str) -> None:
        """Leave everything said so far out of future history windows (rows stay, for audit)."""
        newest = (
            select(func.max(MessageRow.id))
            .where(MessageRow.conversation_id == conversation_id)
            .scalar_subquery()
        )
        async with self._database.writing() as session:
            await session.execute(
                update(ConversationRow)
                .where(ConversationRow.id == conversation_id)
                .values(history_from_id=newest)
            )
