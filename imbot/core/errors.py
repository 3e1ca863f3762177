"""The error types every part of imbot raises and the stage boundary catches.

The taxonomy decides what happens to a message: a ``RetryableError`` is tried
again with backoff until the stage's deadline, a ``FatalError`` goes to the DLQ
(and the user gets a polite fallback), ``ContentRejected`` means a provider's
safety system refused the text (never retried; the user gets a polite answer),
``UndecodableError`` marks a record that is not a valid envelope at all, and
``ConfigurationError`` is an operator mistake that no retry can fix.

Messages and attributes never carry a secret: adapters pass bodies through
``redact`` before they attach them.
"""

from __future__ import annotations

from typing import Literal

FatalReason = Literal[
    "bad_request", "context_length", "quota_exhausted", "billing", "not_found", "other"
]
RejectionStage = Literal["input", "output", "unknown"]


class ImbotError(Exception):
    """Base of every error imbot raises on purpose.

    ``provider``/``status``/``code``/``request_id`` describe the remote party
    when there is one (a model provider, Easemob), for logs and metrics.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        status: int | None = None,
        code: str | None = None,
        request_id: str | None = None,
        raw: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.status = status
        self.code = code
        self.request_id = request_id
        self.raw = raw[:500] if raw else raw

    @property
    def kind(self) -> str:
        """Short name used as a metric label and in DLQ records."""
        return type(self).__name__

    def __str__(self) -> str:
        parts = [self.message]
        if self.provider:
            parts.append(f"provider={self.provider}")
        if self.status is not None:
            parts.append(f"status={self.status}")
        if self.code:
            parts.append(f"code={self.code}")
        if self.request_id:
            parts.append(f"request_id={self.request_id}")
        return " ".join(parts)


class RetryableError(ImbotError):
    """Transient: rate limits, 5xx, overload, timeouts, dropped connections."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.retry_after = retry_after if retry_after and retry_after > 0 else None


class FatalError(ImbotError):
    """Will not succeed by trying again (bad request, context too long, quota gone)."""

    def __init__(self, message: str, *, reason: FatalReason = "other", **kw: object) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.reason: FatalReason = reason


class ContentRejected(ImbotError):
    """A provider's safety system refused the input or the output."""

    def __init__(
        self,
        message: str,
        *,
        stage: RejectionStage = "unknown",
        clear_history: bool = False,
        **kw: object,
    ) -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.stage: RejectionStage = stage
        self.clear_history = clear_history


class ConfigurationError(ImbotError):
    """Operator mistake: bad key, unknown model, missing secret, bad YAML."""


class UndecodableError(ImbotError):
    """A record that is not a valid envelope (poison message)."""


class StorageUnavailable(RetryableError):
    """The database cannot answer now: a connection lost or refused, the pool exhausted,
    SQLite busy. Raised by ``storage`` in place of the driver's error.

    ``message`` is the parameter-free description of the error (never a bound
    parameter: those are user questions and bot answers); ``kind`` names the
    driver-level error class (``OperationalError``), as logs and DLQ records did.
    """

    def __init__(self, message: str, *, error_class: str) -> None:
        super().__init__(message)
        self.error_class = error_class

    @property
    def kind(self) -> str:
        return self.error_class


class StorageError(FatalError):
    """A database error no retry cures (a constraint violated, an SQL error): a bug,
    so the record goes to the DLQ. Raised by ``storage`` in place of the driver's error;
    ``message`` and ``kind`` as for ``StorageUnavailable``."""

    def __init__(self, message: str, *, error_class: str) -> None:
        super().__init__(message)
        self.error_class = error_class

    @property
    def kind(self) -> str:
        return self.error_class
