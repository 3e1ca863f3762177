"""Wire-level helpers shared by the providers: SSE framing, error classification
by HTTP status, Retry-After parsing and redaction of secrets.

Everything here is pure (no I/O) so it is unit-tested without a network.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from imbot.core.errors import ConfigurationError, FatalError, ImbotError, RetryableError
from imbot.core.retry import retry_after_s

# -- redaction ----------------------------------------------------------------

_SECRET_PATTERNS = re.compile(
    r"(sk-[A-Za-z0-9_\-*]{4,}|access_token=[^&\s\"']+|Bearer\s+[^\s\"']+|bce-v3/[^\s\"']+)"
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove known secret values and anything shaped like a key or token."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return _SECRET_PATTERNS.sub("[redacted]", text)


# -- JSON ---------------------------------------------------------------------


def loads_object(body: bytes | str) -> dict[str, Any] | None:
    """Parse a JSON object; None when the body is not one (malformed, HTML, empty)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def as_int(value: object) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return 0
    return 0


def as_str(value: object) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


# -- retry hints --------------------------------------------------------------


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|h|m|s))+")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def duration_s(value: str) -> float | None:
    """A Go-style duration as OpenAI sends it (``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s``),
    or bare seconds, in seconds. None when it is neither."""
    value = value.strip()
    try:
        return float(value)
    except ValueError:
        pass
    if not _DURATION.fullmatch(value):
        return None
    return sum(float(n) * _UNIT_S[unit] for n, unit in _DURATION_PART.findall(value))


def _bucket_reset(values: Mapping[str, tuple[float | None, bool]]) -> float | None:
    """The wait for the bucket that ran out (remaining 0), else the longest one."""
    exhausted = [v for v, empty in values.values() if v is not None and v > 0 and empty]
    known = [v for v, _ in values.values() if v is not None and v > 0]
    pick = exhausted or known
    return max(pick) if pick else None


def openai_reset_s(headers: Mapping[str, str]) -> float | None:
    """``x-ratelimit-reset-requests|tokens`` (durations) as a retry hint, for a 429
    that came without Retry-After."""
    values: dict[str, tuple[float | None, bool]] = {}
    for kind in ("requests", "tokens"):
        raw = headers.get(f"x-ratelimit-reset-{kind}")
        if raw:
            empty = headers.get(f"x-ratelimit-remaining-{kind}") == "0"
            values[kind] = (duration_s(raw), empty)
    return _bucket_reset(values)


def anthropic_reset_s(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """``anthropic-ratelimit-*-reset`` (RFC 3339 timestamps) as a retry hint."""
    current = time.time() if now is None else now
    values: dict[str, tuple[float | None, bool]] = {}
    for kind in ("requests", "tokens", "input-tokens", "output-tokens"):
        raw = headers.get(f"anthropic-ratelimit-{kind}-reset")
        if not raw:
            continue
        try:
            at = datetime.fromisoformat(raw.strip())
        except ValueError:
            continue
        if at.tzinfo is None:
            at = at.replace(tzinfo=UTC)
        empty = headers.get(f"anthropic-ratelimit-{kind}-remaining") == "0"
        values[kind] = (at.timestamp() - current, empty)
    return _bucket_reset(values)


def classify_status(
    status: int,
    message: str,
    *,
    provider: str | None = None,
    code: str | None = None,
    request_id: str | None = None,
    raw: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> ImbotError:
    """The default class of an HTTP error when the body says nothing more specific.

    Mirrors the official SDKs: retry 408, 409, 429 and 5xx (incl. Anthropic's 529)
    unless the server says ``x-should-retry: false``; auth, permission and unknown
    model are configuration; everything else in 4xx is fatal.
    """
    kw: dict[str, Any] = {
        "provider": provider,
        "status": status,
        "code": code,
        "request_id": request_id,
        "raw": raw,
    }
    hdrs = headers or {}
    should_retry = hdrs.get("x-should-retry")
    retryable = status in (408, 409, 429) or status >= 500
    if should_retry == "true":
        retryable = True
    elif should_retry == "false":
        retryable = False
    if retryable:
        return RetryableError(message, retry_after=retry_after_s(hdrs), **kw)
    if status in (401, 403, 404):
        return ConfigurationError(message, **kw)
    if status == 402:
        return FatalError(message, reason="billing", **kw)
    return FatalError(message, reason="bad_request", **kw)


_CONTEXT_PHRASES = (
    "context_length",
    "maximum context length",
    "context window",
    "prompt is too long",
    "too many tokens",
    "tokens_too_long",
    "characters_too_long",
    "range of input length",
)
_BILLING_PHRASES = ("credit balance is too low", "spend limit", "billing")


def refine_fatal(error: ImbotError) -> ImbotError:
    """Sharpen a bad-request FatalError into context-length or billing by its text."""
    if isinstance(error, FatalError) and error.reason in ("bad_request", "other"):
        text = f"{error.code or ''} {error.message}".lower()
        if any(p in text for p in _CONTEXT_PHRASES):
            error.reason = "context_length"
        elif any(p in text for p in _BILLING_PHRASES):
            error.reason = "billing"
    return error


# -- Server-Sent Events -------------------------------------------------------


@dataclass(slots=True)
class SseEvent:
    data: str = ""
    event: str | None = None
    id: str | None = None
    comments: list[str] = field(default_factory=list)
    # A line that is not SSE at all (ERNIE sends bare JSON errors inside a stream).
    bare: bool = False


class SseParser:
    """Line-by-line SSE parser, tolerant of ``data:`` with or without the space."""

    __slots__ = ("_comments", "_data", "_event", "_id")

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event: str | None = None
        self._id: str | None = None
        self._comments: list[str] = []

    def feed(self, line: str) -> SseEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith("data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(" ") else value)
            return None
        if line[0] == ":":
            self._comments.append(line[1:])
            return None
        if line[0] in "{[":
            return SseEvent(data=line, bare=True)
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None

    def flush(self) -> SseEvent | None:
        """The last event when the stream closed without a blank line after it."""
        return self._dispatch()

    def _dispatch(self) -> SseEvent | None:
        if not self._data and self._event is None:
            self._comments.clear()
            return None
        event = SseEvent(
            data="\n".join(self._data), event=self._event, id=self._id, comments=self._comments
        )
        self._data = []
        self._event = None
        self._comments = []
        return event
