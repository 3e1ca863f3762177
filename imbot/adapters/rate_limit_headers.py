"""Rate-limit headers as retry hints, for a 429 that came without Retry-After: OpenAI's
``x-ratelimit-reset-*`` (Go-style durations) and Anthropic's ``anthropic-ratelimit-*-reset``
(RFC 3339 timestamps). The bucket that ran out decides the wait. Pure: no I/O."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime

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
