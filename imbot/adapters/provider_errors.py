"""What a provider's HTTP error means, and what the error may carry.

``classify_status`` is the default class of an HTTP status (when the body says nothing
more specific), ``refine_fatal`` sharpens a bad request into context length or billing by
its text, and ``redact`` removes secrets from anything an error keeps (message, raw body).
Each provider module maps its own codes first and falls back to these. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from imbot.core.errors import ConfigurationError, FatalError, ImbotError, RetryableError
from imbot.core.retry import retry_after_s

_SECRET_PATTERNS = re.compile(
    r"(sk-[A-Za-z0-9_\-*]{4,}|access_token=[^&\s\"']+|Bearer\s+[^\s\"']+|bce-v3/[^\s\"']+)"
)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove known secret values and anything shaped like a key or token."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "[redacted]")
    return _SECRET_PATTERNS.sub("[redacted]", text)


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
