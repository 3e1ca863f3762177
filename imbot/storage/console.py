"""What the operator console reads and writes (imbot/console/, docs/console.md).

``ConsoleQueries`` reads the history, the ledgers and the ratings for the console's pages;
``with_text=False`` (a viewer) leaves the text columns out of the statement itself, so a
viewer's page never had the text to leak. ``ConsoleAudit`` owns ``console_audit``: one row
per action an operator took, never user text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import DateTime, bindparam, text

from imbot.storage.database import Database, sql
from imbot.storage.schema import utcnow

SearchKind = Literal["msg_id", "conversation", "user", "group"]
SpendBy = Literal["tenant", "tier", "user", "model"]

_SINCE = bindparam("since", type_=DateTime(timezone=True))
_NOW = bindparam("now", type_=DateTime(timezone=True))


@dataclass(frozen=True, slots=True)
class HistoryMessage:
    """A message of the history; ``text`` is None unless the reader may see text."""

    msg_id: str
    conversation_id: str
    role: str
    author: str
    kind: str
    created_at: datetime
    text: str | None
    text_len: int
    tokens: int | None
    provider: str | None
    reply_to: str | None


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """What the database knows of one user message: the ledgers' rows about it."""

    msg_id: str
    message: HistoryMessage | None
    reply: HistoryMessage | None
    usage: Mapping[str, Any] | None
    deliveries: Sequence[Mapping[str, Any]]
    moderation: Sequence[Mapping[str, Any]]
    reservations: Sequence[Mapping[str, Any]]
    ratings: Sequence[Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    bucket: datetime
    key: str
    value: float


@dataclass(frozen=True, slots=True)
class Totals:
    """The database's part of the overview (indexed reads only)."""

    spent_today_micros: int
    reserved_micros: int
    reservations_in_flight: int
    messages_last_hour: int
    open_circuits: Sequence[tuple[str, datetime]]


@dataclass(frozen=True, slots=True)
class AuditRow:
    at: datetime
    operator: str
    role: str
    action: str
    target: str
    detail: Mapping[str, Any]
    outcome: str


@dataclass(frozen=True, slots=True)
class WorstRated:
    msg_id: str
    conversation_id: str | None
    model: str | None
    tier: str | None
    down: int
    up: int
    last_at: datetime


@dataclass(frozen=True, slots=True)
class RatingRow:
    bucket: datetime
    model: str
    tier: str
    rating: str
    count: int


@dataclass(frozen=True, slots=True)
class InFlight:
    id: str
    msg_id: str
    user_id: str
    tier: str
    model: str | None
    micros: int
    created_at: datetime
    expires_at: datetime


def _message(row: Any, with_text: bool) -> HistoryMessage:
    return HistoryMessage(
        msg_id=row.msg_id,
        conversation_id=row.conversation_id,
        role=row.role,
        author=row.author,
        kind=row.kind,
        created_at=as_utc(row.created_at),
        text=row.text if with_text else None,
        text_len=int(row.text_len or 0),
        tokens=row.tokens,
        provider=row.provider,
        reply_to=row.reply_to,
    )


def as_utc(value: Any) -> datetime:
    """SQLite hands timestamps back as naive UTC, PostgreSQL as aware; the console shows UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo else value.replace(tzinfo=utcnow().tzinfo)


def _top(rows: Sequence[tuple[Any, Any, Any]], top: int) -> list[SeriesPoint]:
    """(bucket, key, micros) rows as points: the ``top`` keys with the most spend by name,
    the others summed as "other"."""
    totals: dict[str, int] = {}
    for _, k, micros in rows:
        totals[str(k)] = totals.get(str(k), 0) + int(micros or 0)
    kept = set(sorted(totals, key=lambda k: -totals[k])[:top])
    points: dict[tuple[datetime, str], float] = {}
    for b, k, micros in rows:
        at = (as_utc(b), str(k) if str(k) in kept else "other")
        points[at] = points.get(at, 0.0) + int(micros or 0)
    return [SeriesPoint(b, k, v) for (b, k), v in sorted(points.items())]


def _message_columns(with_text: bool) -> str:
    # The viewer's statement never selects the text: its length is enough to show a shape.
    shown = "text" if with_text else "NULL AS text"
    return (
        f"msg_id, conversation_id, role, author, kind, created_at, {shown},"
        " length(text) AS text_len, tokens, provider, reply_to"
    )


class ConsoleQueries:
    """The console's reads over the history and the ledgers."""

    def __init__(self, database: Database) -> None:
        self._database = database

    def _bucket(self, column: str, hours: int) -> str:
        """An expression truncating ``column`` to the hour or the day, in either dialect."""
        if self._database.dialect == "postgresql":
            return f"date_trunc('{'day' if hours >= 24 else 'hour'}', {column})"
        form = "%Y-%m-%d 00:00:00" if hours >= 24 else "%Y-%m-%d %H:00:00"
        return f"strftime('{form}', {column})"

    async def _all(self, query: Any, params: Mapping[str, Any]) -> list[Any]:
        async with self._database.reading() as session:
            return list((await session.execute(query, dict(params))).all())

    # -- search, transcripts, one message -------------------------------------

    async def search(self, kind: SearchKind, term: str, *, limit: int = 50) -> list[str]:
        """Conversation ids (for ``msg_id``: the user message ids) that match ``term``."""
        if kind == "msg_id":
            base = term.removesuffix(":reply")
            rows = await self._all(
                text("SELECT msg_id FROM messages WHERE msg_id IN (:a, :b)"),
                {"a": base, "b": f"{base}:reply"},
            )
            return [base] if rows else []
        if kind == "conversation":
            query = "SELECT id FROM conversations WHERE id = :term"
        elif kind == "group":
            query = "SELECT id FROM conversations WHERE id IN ('group:' || :term, 'room:' || :term)"
        else:
            query = (
                "SELECT conversation_id FROM messages WHERE author = :term"
                " GROUP BY conversation_id ORDER BY max(id) DESC LIMIT :limit"
            )
        rows = await self._all(text(query), {"term": term, "limit": limit})
        return [str(r[0]) for r in rows]

    async def recent_conversations(self, *, limit: int = 30) -> list[tuple[str, datetime]]:
        rows = await self._all(
            text(
                "SELECT id, last_message_at FROM conversations"
                " ORDER BY last_message_at DESC LIMIT :limit"
            ),
            {"limit": limit},
        )
        return [(str(r[0]), as_utc(r[1])) for r in rows]

    async def transcript(
        self, conversation_id: str, *, with_text: bool, limit: int = 200
    ) -> list[HistoryMessage]:
        """The conversation's last ``limit`` messages, oldest first."""
        rows = await self._all(
            text(
                f"SELECT {_message_columns(with_text)} FROM messages"
                " WHERE conversation_id = :c ORDER BY id DESC LIMIT :limit"
            ),
            {"c": conversation_id, "limit": limit},
        )
        return [_message(r, with_text) for r in reversed(rows)]

    async def message_facts(self, msg_id: str, *, with_text: bool) -> MessageFacts:
        base = msg_id.removesuffix(":reply")
        ids = {"m": base, "r": f"{base}:reply", "f": f"{base}#fallback"}
        messages = await self._all(
            text(f"SELECT {_message_columns(with_text)} FROM messages WHERE msg_id IN (:m, :r)"),
            ids,
        )
        by_id = {r.msg_id: _message(r, with_text) for r in messages}
        usage = await self._all(
            text(
                "SELECT model, provider, input_tokens, output_tokens, cost, currency,"
                " latency_ms, created_at FROM usage WHERE msg_id = :m"
            ),
            ids,
        )
        deliveries = await self._all(
            text(
                "SELECT msg_id, part, parts, target_kind, status, easemob_msg_id, attempts,"
                " created_at, sent_at FROM deliveries WHERE msg_id IN (:m, :f, :s)"
                " ORDER BY msg_id, part"
            ),
            {**ids, "s": f"{base}#stream"},
        )
        moderation = await self._all(
            text(
                "SELECT stage, detector, rule, category, action, created_at"
                " FROM moderation_audit WHERE msg_id = :m ORDER BY id"
            ),
            ids,
        )
        reservations = await self._all(
            text(
                "SELECT id, tier, model, tokens, micros, state, spent_tokens, spent_micros,"
                " created_at, settled_at FROM quota_reservations WHERE msg_id = :m"
                " ORDER BY created_at"
            ),
            ids,
        )
        easemob_ids = [d.easemob_msg_id for d in deliveries if d.easemob_msg_id]
        ratings: list[Any] = []
        if easemob_ids:
            ratings = await self._all(
                text(
                    "SELECT rating, user_id, created_at FROM feedback"
                    " WHERE reply_msg_id IN :ids ORDER BY created_at"
                ).bindparams(bindparam("ids", expanding=True)),
                {"ids": easemob_ids},
            )
        return MessageFacts(
            msg_id=base,
            message=by_id.get(base),
            reply=by_id.get(f"{base}:reply"),
            usage=dict(usage[0]._mapping) if usage else None,
            deliveries=[dict(r._mapping) for r in deliveries],
            moderation=[dict(r._mapping) for r in moderation],
            reservations=[dict(r._mapping) for r in reservations],
            ratings=[dict(r._mapping) for r in ratings],
        )

    # -- now ------------------------------------------------------------------

    async def totals(self) -> Totals:
        now = utcnow()
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        spend = await self._all(
            text(
                "SELECT coalesce(sum(spent_micros), 0) FROM quota_reservations"
                " WHERE created_at >= :since AND state IN ('settled', 'expired')"
            ).bindparams(_SINCE),
            {"since": midnight},
        )
        held = await self._all(
            text(
                "SELECT count(*), coalesce(sum(micros), 0) FROM quota_reservations"
                " WHERE state = 'held' AND expires_at >= :now"
            ).bindparams(_NOW),
            {"now": now},
        )
        recent = await self._all(
            text("SELECT count(*) FROM messages WHERE created_at >= :since").bindparams(_SINCE),
            {"since": now - timedelta(hours=1)},
        )
        circuits = await self._all(
            text(
                "SELECT model, open_until FROM model_health WHERE open_until > :now ORDER BY model"
            ).bindparams(_NOW),
            {"now": now},
        )
        return Totals(
            spent_today_micros=int(spend[0][0]),
            reserved_micros=int(held[0][1]),
            reservations_in_flight=int(held[0][0]),
            messages_last_hour=int(recent[0][0]),
            open_circuits=[(str(m), as_utc(u)) for m, u in circuits],
        )

    # -- money ----------------------------------------------------------------

    async def spend(
        self, *, since: datetime, hours: int = 1, top: int = 8
    ) -> dict[SpendBy, list[SeriesPoint]]:
        """Settled spend (micros) per time bucket by tenant, tier, model and user; the
        ``top`` largest keys of each by name, the rest as "other".

        Two passes over the window instead of one per dimension: tier and model (few
        keys) in one grouping, the tenant their sum; then the top users, whose series
        come from the (user_id, created_at) index, the rest of the tenant's being "other"."""
        bucket = self._bucket("created_at", hours)
        where = " WHERE created_at >= :since AND state IN ('settled', 'expired')"
        coarse = await self._all(
            text(
                f"SELECT {bucket} AS b, tier, model, sum(spent_micros) FROM quota_reservations"
                f"{where} GROUP BY 1, 2, 3"
            ).bindparams(_SINCE),
            {"since": since},
        )
        tenant = [(b, "all", m) for b, _, _, m in coarse]
        series: dict[SpendBy, list[SeriesPoint]] = {
            "tenant": _top(tenant, top),
            "tier": _top([(b, t, m) for b, t, _, m in coarse], top),
            "model": _top([(b, k, m) for b, _, k, m in coarse], top),
        }
        leaders = await self._all(
            text(
                f"SELECT user_id FROM quota_reservations{where}"
                " GROUP BY user_id ORDER BY sum(spent_micros) DESC LIMIT :top"
            ).bindparams(_SINCE),
            {"since": since, "top": top},
        )
        users: list[tuple[Any, str, Any]] = []
        if leaders:
            users = [
                (b, str(u), m)
                for b, u, m in await self._all(
                    text(
                        f"SELECT {bucket} AS b, user_id, sum(spent_micros) FROM quota_reservations"
                        f"{where} AND user_id IN :users GROUP BY 1, 2"
                    ).bindparams(_SINCE, bindparam("users", expanding=True)),
                    {"since": since, "users": [r[0] for r in leaders]},
                )
            ]
        shown: dict[Any, int] = {}
        for b, _, m in users:
            shown[b] = shown.get(b, 0) + int(m or 0)
        everyone: dict[Any, int] = {}
        for b, _, m in tenant:
            everyone[b] = everyone.get(b, 0) + int(m or 0)
        users += [(b, "other", total - shown.get(b, 0)) for b, total in everyone.items()]
        series["user"] = _top([u for u in users if u[1] != "other" or u[2] > 0], top + 1)
        return series

    async def in_flight(self, *, limit: int = 50) -> list[InFlight]:
        rows = await self._all(
            text(
                "SELECT id, msg_id, user_id, tier, model, micros, created_at, expires_at"
                " FROM quota_reservations WHERE state = 'held'"
                " ORDER BY created_at DESC LIMIT :limit"
            ),
            {"limit": limit},
        )
        return [
            InFlight(r[0], r[1], r[2], r[3], r[4], int(r[5]), as_utc(r[6]), as_utc(r[7]))
            for r in rows
        ]

    # -- quality --------------------------------------------------------------

    # Each rating in the window with the answer it rates (through the ledger), the model
    # that answered and the user's tier (one per message: the reservations' msg_id index).
    _RATED = (
        "(SELECT f.created_at AS at, f.rating AS rating, f.conversation_id AS conversation,"
        " d.msg_id AS msg_id, u.model AS model,"
        " (SELECT max(q.tier) FROM quota_reservations q WHERE q.msg_id = d.msg_id) AS tier"
        " FROM feedback f"
        " LEFT JOIN deliveries d ON d.easemob_msg_id = f.reply_msg_id"
        " LEFT JOIN usage u ON u.msg_id = d.msg_id"
        " WHERE f.created_at >= :since) x"
    )

    async def ratings(self, *, since: datetime, hours: int = 24) -> list[RatingRow]:
        """Ratings per time bucket by the answering model, the user's tier and the rating."""
        bucket = self._bucket("x.at", hours)
        rows = await self._all(
            text(
                f"SELECT {bucket} AS b, coalesce(x.model, '?'), coalesce(x.tier, '?'),"
                f" x.rating, count(*) FROM {self._RATED} GROUP BY 1, 2, 3, 4 ORDER BY 1"
            ).bindparams(_SINCE),
            {"since": since},
        )
        return [RatingRow(as_utc(b), str(m), str(t), str(r), int(n)) for b, m, t, r, n in rows]

    async def worst_rated(self, *, since: datetime, limit: int = 20) -> list[WorstRated]:
        """The answers rated down most often (then least up), newest first among equals."""
        down = "sum(CASE WHEN x.rating = 'down' THEN 1 ELSE 0 END)"
        rows = await self._all(
            text(
                "SELECT x.msg_id, max(x.conversation), max(x.model), max(x.tier),"
                f" {down} AS down, sum(CASE WHEN x.rating = 'up' THEN 1 ELSE 0 END) AS up,"
                f" max(x.at) AS last FROM {self._RATED} WHERE x.msg_id IS NOT NULL"
                f" GROUP BY x.msg_id HAVING {down} > 0 ORDER BY 5 DESC, 6, 7 DESC LIMIT :limit"
            ).bindparams(_SINCE),
            {"since": since, "limit": limit},
        )
        return [
            WorstRated(r[0], r[1], r[2], r[3], int(r[4]), int(r[5]), as_utc(r[6])) for r in rows
        ]


_AUDIT_INSERT = sql(
    "INSERT INTO console_audit (at, operator, role, action, target, detail, outcome)"
    " VALUES (:now, :operator, :role, :action, :target, :detail, :outcome)"
)


class ConsoleAudit:
    """The console's audit log: every action, by whom, and how it ended."""

    def __init__(self, database: Database) -> None:
        self._database = database

    async def record(
        self,
        *,
        operator: str,
        role: str,
        action: str,
        target: str,
        detail: Mapping[str, Any],
        outcome: str,
    ) -> None:
        async with self._database.writing_one() as session:
            await session.execute(
                _AUDIT_INSERT,
                {
                    "now": utcnow(),
                    "operator": operator[:128],
                    "role": role,
                    "action": action,
                    "target": target[:300],
                    "detail": json.dumps(detail, ensure_ascii=False, sort_keys=True),
                    "outcome": outcome,
                },
            )

    async def done(self, action: str, target: str) -> bool:
        """Whether ``action`` on ``target`` was done before (a requeue is done once)."""
        async with self._database.reading() as session:
            row = (
                await session.execute(
                    text(
                        "SELECT 1 FROM console_audit WHERE action = :a AND target = :t"
                        " AND outcome = 'done'"
                    ),
                    {"a": action, "t": target},
                )
            ).first()
        return row is not None

    async def recent(self, *, limit: int = 50, target: str | None = None) -> list[AuditRow]:
        where = "WHERE target = :target " if target is not None else ""
        async with self._database.reading() as session:
            rows = (
                await session.execute(
                    text(
                        "SELECT at, operator, role, action, target, detail, outcome"
                        f" FROM console_audit {where}ORDER BY id DESC LIMIT :limit"
                    ),
                    {"limit": limit, "target": target},
                )
            ).all()
        return [
            AuditRow(as_utc(r[0]), r[1], r[2], r[3], r[4], json.loads(r[5]), r[6]) for r in rows
        ]
