"""Which callIds the gateway has already seen: a replayed callback is never published.

Easemob's signature covers only ``callId + secret + timestamp``, not the body, so one
captured request could be posted again with any message in it. The timestamp window
bounds how long a signature stays usable; this memory makes each callId usable once
within it. A callId is remembered until its timestamp plus the window: after that the
window refuses it anyway.

Every signed callback's callId is remembered, not only the AI messages': otherwise the
signature of an ordinary message between people could carry a forged AI message. Only
an AI message waits for the answer (``first_use``); the others are recorded without
waiting (``remember``), since a replayed ordinary message reaches nothing.

``MemoryCallIds`` serves one replica (and SQLite development). ``DatabaseCallIds``
shares the memory between replicas through the PostgreSQL database the deployment
already has (table ``callback_ids``, migration 0004): one ``INSERT … ON CONFLICT``
round trip per AI message, the others inserted in batches, expired rows deleted
periodically.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from typing import Any, Protocol

import asyncpg

from imbot.core.errors import ConfigurationError
from imbot.core.retry import Backoff
from imbot.core.settings import Settings

log = logging.getLogger("imbot.gateway")


class ReplayStoreUnavailable(Exception):
    """The shared store could not answer (down, slow, not migrated)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class CallIds(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def first_use(self, call_id: str, expires_at_ms: int) -> bool:
        """Record ``call_id``; False when it was already recorded and has not expired.

        Raises ``ReplayStoreUnavailable`` when the store cannot answer.
        """
        ...

    def remember(self, call_id: str, expires_at_ms: int) -> None:
        """Record ``call_id`` without waiting (best effort)."""
        ...


def _now_ms() -> int:
    return int(time.time() * 1000)


class MemoryCallIds:
    """One replica's memory: a dict and a heap of expiry times."""

    def __init__(self) -> None:
        self._expiry: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def __len__(self) -> int:
        return len(self._expiry)

    def _evict(self, now: int) -> None:
        heap, expiry = self._heap, self._expiry
        while heap and heap[0][0] <= now:
            at, call_id = heapq.heappop(heap)
            if expiry.get(call_id) == at:
                del expiry[call_id]

    def record(self, call_id: str, expires_at_ms: int) -> bool:
        """``first_use`` without a coroutine: the gateway calls this directly, since
        nothing here waits (no timeout to arm per request)."""
        now = _now_ms()
        self._evict(now)
        if call_id in self._expiry:
            return False
        self._expiry[call_id] = expires_at_ms
        heapq.heappush(self._heap, (expires_at_ms, call_id))
        return True

    async def first_use(self, call_id: str, expires_at_ms: int) -> bool:
        return self.record(call_id, expires_at_ms)

    def remember(self, call_id: str, expires_at_ms: int) -> None:
        self.record(call_id, expires_at_ms)


# A row whose time has passed may be taken again (the window would refuse a replay
# of it; this keeps a longer window set later from being confused by stale rows).
_FIRST_USE = (
    "INSERT INTO callback_ids (call_id, expires_at) VALUES ($1, $2)"
    " ON CONFLICT (call_id) DO UPDATE SET expires_at = excluded.expires_at"
    " WHERE callback_ids.expires_at <= $3 RETURNING 1"
)
_REMEMBER = (
    "INSERT INTO callback_ids (call_id, expires_at)"
    " SELECT * FROM unnest($1::text[], $2::bigint[]) ON CONFLICT (call_id) DO NOTHING"
)
_PURGE = "DELETE FROM callback_ids WHERE expires_at <= $1"
_CONNECT_BACKOFF = Backoff(base=0.2, cap=5.0)  # the database down at start-up: keep trying


class DatabaseCallIds:
    """The memory in PostgreSQL, shared by every gateway replica (asyncpg, no ORM: it
    runs inside Easemob's 200 ms for every AI message)."""

    def __init__(
        self, dsn: str, *, purge_every_s: float = 60.0, flush_every_s: float = 0.05
    ) -> None:
        self.dsn = dsn
        self.purge_every_s = purge_every_s
        self.flush_every_s = flush_every_s
        self._pool: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._buffer: dict[str, int] = {}
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._connect()),
            asyncio.create_task(self._flush_loop()),
        ]

    async def _connect(self) -> None:
        attempt = 0
        while True:
            try:
                self._pool = await asyncpg.create_pool(
                    self.dsn, min_size=2, max_size=10, reset=_keep_session
                )
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                log.warning(
                    "replay store not reachable, retrying", extra={"error": type(exc).__name__}
                )
                attempt += 1
                await asyncio.sleep(_CONNECT_BACKOFF.delay(attempt))
                continue
            log.info("replay store ready")
            break
        while True:
            await asyncio.sleep(self.purge_every_s)
            with contextlib.suppress(Exception):
                await self._pool.execute(_PURGE, _now_ms())

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._buffer and self._pool is not None:
            with contextlib.suppress(Exception):
                await self._flush()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def first_use(self, call_id: str, expires_at_ms: int) -> bool:
        pool = self._pool
        if pool is None:
            raise ReplayStoreUnavailable("not_connected")
        try:
            row = await pool.fetchval(_FIRST_USE, call_id, expires_at_ms, _now_ms())
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise ReplayStoreUnavailable(type(exc).__name__) from None
        return row is not None

    def remember(self, call_id: str, expires_at_ms: int) -> None:
        self._buffer[call_id] = expires_at_ms
        self._wake.set()

    async def _flush(self) -> None:
        batch, self._buffer = self._buffer, {}
        await self._pool.execute(_REMEMBER, list(batch), list(batch.values()))

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(self.flush_every_s)  # let a batch gather
            if self._pool is None or not self._buffer:
                continue
            try:
                await self._flush()
            except Exception as exc:  # best effort: an AI message is checked on its own
                log.warning("replay store write failed", extra={"error": type(exc).__name__})


def replay_store_kind(settings: Settings) -> str:
    """memory, database or off, resolving ``auto``."""
    kind = settings.callback_replay_store
    is_postgres = settings.database_url.startswith("postgresql")
    if kind == "auto":
        if settings.callback_timestamp_window_s <= 0:
            return "off"  # no window: a callId would have to be remembered forever
        kind = "database" if is_postgres else "memory"
    if kind == "database" and not is_postgres:
        raise ConfigurationError(
            "IMBOT_CALLBACK_REPLAY_STORE=database needs a PostgreSQL IMBOT_DATABASE_URL"
        )
    if kind != "off" and settings.callback_timestamp_window_s <= 0:
        raise ConfigurationError(
            "the callId replay memory needs IMBOT_CALLBACK_TIMESTAMP_WINDOW_S > 0"
            " (or IMBOT_CALLBACK_REPLAY_STORE=off)"
        )
    return kind


async def _keep_session(_connection: asyncpg.Connection) -> None:
    """A connection goes back to the pool as it is: these statements leave no session
    state behind (no locks, listeners or settings), so asyncpg's default reset (one
    more round trip, ``pg_advisory_unlock_all()`` and friends, per callback) buys
    nothing. An open transaction is still rolled back by the pool itself."""


def asyncpg_dsn(database_url: str) -> str:
    """The SQLAlchemy URL (``postgresql+asyncpg://…``) as a DSN asyncpg takes: the same
    URL with the driver left out of its scheme (no SQLAlchemy on the gateway's path)."""
    scheme, sep, rest = database_url.partition("://")
    return f"{scheme.split('+', 1)[0]}{sep}{rest}" if sep else database_url


def new_call_ids(settings: Settings) -> CallIds | None:
    kind = replay_store_kind(settings)
    if kind == "off":
        return None
    if kind == "memory":
        return MemoryCallIds()
    return DatabaseCallIds(asyncpg_dsn(settings.database_url))
