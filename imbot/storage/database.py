"""One database per process: the engine, SQLite's write lock, group commit, migrations.

Every repository of ``storage`` shares one ``Database``. Its transactions translate
SQLAlchemy's errors into ours (``storage.errors``) as they leave it. Alembic
migrations live in ``storage/migrations``; ``imbot migrate`` applies them and
``open_database`` refuses a database that is behind.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import DateTime, TextClause, bindparam, event, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from imbot.core.errors import ConfigurationError
from imbot.storage.errors import translated

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


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


def sql(statement: str, *timestamps: str) -> TextClause:
    """A write statement in the SQL both SQLite (3.35+) and PostgreSQL speak.

    Plain text on purpose: SQLAlchemy never caches the compiled form of its
    dialect-specific ``INSERT … ON CONFLICT`` constructs, and compiling them was
    most of the sender's database time. A ``text()`` statement is compiled once.
    """
    return text(statement).bindparams(
        *(bindparam(name, type_=DateTime(timezone=True)) for name in ("now", *timestamps))
    )


@contextlib.asynccontextmanager
async def _our_errors() -> AsyncIterator[None]:
    """SQLAlchemy's errors leave as ours (``StorageUnavailable`` / ``StorageError``)."""
    try:
        yield
    except SQLAlchemyError as exc:
        # Not chained: the driver's message can quote the failing row (user text).
        raise translated(exc) from None
    except Exception as exc:
        # A driver's error that SQLAlchemy let through unwrapped (asyncpg refusing a
        # new connection): ours when it says the server cannot take us now.
        ours = translated(exc)
        if ours is exc:
            raise
        raise ours from None


class Database:
    """The engine and the rules of writing to it, shared by the repositories."""

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

    @property
    def dialect(self) -> str:
        """``postgresql`` or ``sqlite``."""
        return self._dialect

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction (serialised per process on SQLite)."""
        async with _our_errors():
            if self._write_lock is None:
                async with self.engine.begin() as session:
                    yield session
                return
            async with self._write_lock, self.engine.begin() as session:
                yield session

    @contextlib.asynccontextmanager
    async def writing_one(self) -> AsyncIterator[AsyncConnection]:
        """One write statement committed by itself: one round trip, no BEGIN / COMMIT.

        For the ledger, whose rows must be durable the moment the statement returns.
        """
        async with _our_errors():
            if self._write_lock is None:
                async with self._reader.connect() as session:
                    yield session
                return
            async with self._write_lock, self._reader.connect() as session:
                yield session

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncConnection]:
        """A connection for single-statement reads (autocommit: no BEGIN / ROLLBACK)."""
        async with _our_errors(), self._reader.connect() as session:
            yield session

    async def close(self) -> None:
        await self.engine.dispose()


class GroupCommit:
    """Rows of one idempotent statement, written by as few transactions as the load allows.

    ``write`` returns once its row is committed. Rows that arrive while a commit is
    in progress go together in the next one, so under load the number of commits
    (and of waits for SQLite's single writer, shared with the sender's process) no
    longer grows with the number of rows. Alone, a row is committed at once. A
    failed commit fails every row in it; each caller retries its own.
    """

    def __init__(
        self, database: Database, statement: TextClause, *, order_by: str | None = None
    ) -> None:
        self._database = database
        self._statement = statement
        # Rows that may update an existing row are written in this key's order, so two
        # processes' batches lock the same rows in the same order (no deadlock).
        self._order_by = order_by
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
            if self._order_by is not None:
                key = self._order_by
                pairs = sorted(zip(rows, waiters, strict=True), key=lambda pair: pair[0][key])
                rows, waiters = [r for r, _ in pairs], [w for _, w in pairs]
            # A row alone is one autocommitted statement (one round trip, not three).
            writing = self._database.writing_one if len(rows) == 1 else self._database.writing
            try:
                async with writing() as session:
                    await session.execute(self._statement, rows)
            except Exception as exc:
                if len(rows) == 1:
                    _settle(waiters[0], exc)
                    continue
                # One row's failure must not fail the others with it: each is written
                # on its own, so only the rows that really fail report an error.
                for row, waiter in zip(rows, waiters, strict=True):
                    try:
                        async with self._database.writing_one() as session:
                            await session.execute(self._statement, [row])
                    except Exception as row_exc:
                        _settle(waiter, row_exc)
                    else:
                        _settle(waiter, None)
            else:
                for waiter in waiters:
                    _settle(waiter, None)


async def open_database(url: str, *, check: bool = True) -> Database:
    """The database at ``url``; unless ``check`` is off, refused (``ConfigurationError``)
    when its migrations are behind the code."""
    engine = create_engine(url)
    if check:
        try:
            await check_migrated(engine)
        except Exception:
            await engine.dispose()
            raise
    return Database(engine)


def _settle(waiter: asyncio.Future[None], error: BaseException | None) -> None:
    if waiter.done():
        return
    if error is None:
        waiter.set_result(None)
    else:
        waiter.set_exception(error)
