"""Database errors translated into ours at the storage edge.

Nothing above ``storage`` sees an SQLAlchemy exception: a database that cannot
answer now (a connection lost or refused, the pool exhausted, SQLite busy) is a
``StorageUnavailable`` (retryable), anything else a ``StorageError`` (fatal: a
constraint violated or an SQL error is a bug, and the record goes to the DLQ). Both
carry only the parameter-free description ``describe_db_error`` gives.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from imbot.core.errors import StorageError, StorageUnavailable


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
    if orig is None and not isinstance(exc, SQLAlchemyError):
        orig = exc  # a driver's own error, not wrapped by SQLAlchemy
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


# SQLSTATE classes of a server that cannot take us now: connection exceptions (08),
# insufficient resources (53: too many connections, out of memory or disk), operator
# intervention (57P: shutting down, starting up, cannot connect now).
_UNAVAILABLE_SQLSTATES = ("08", "53", "57P")


def _server_unavailable(error: BaseException | None) -> bool:
    sqlstate = getattr(error, "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate.startswith(_UNAVAILABLE_SQLSTATES)


def transient(exc: SQLAlchemyError) -> bool:
    """Database trouble a retry can cure: a connection lost or refused, SQLite busy,
    no pooled connection free in time, a server out of connections. Constraint
    violations and SQL errors are not."""
    if isinstance(exc, PoolTimeoutError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    driver = orig.__cause__ if orig is not None and orig.__cause__ is not None else orig
    return (
        exc.connection_invalidated
        or isinstance(exc, OperationalError | InterfaceError)
        or _server_unavailable(driver)
    )


def translated(exc: BaseException) -> BaseException:
    """``exc`` as one of our errors if it is SQLAlchemy's, else ``exc`` itself — except
    a driver's own error that escaped SQLAlchemy's wrapping (asyncpg refusing a new
    connection, ``TooManyConnectionsError``, raises through the pool as itself): a server
    that cannot take us now is ``StorageUnavailable`` too, never a bug for the DLQ."""
    if not isinstance(exc, SQLAlchemyError):
        if _server_unavailable(exc):
            return StorageUnavailable(describe_db_error(exc), error_class=type(exc).__name__)
        return exc
    kind = StorageUnavailable if transient(exc) else StorageError
    return kind(describe_db_error(exc), error_class=type(exc).__name__)
