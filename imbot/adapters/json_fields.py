"""Lenient reads of provider JSON: a body that is not an object is None, a number sent as
a string is still a number. Providers are inconsistent here (vLLM's integer codes,
Spark's string codes, HTML from a gateway), and a parser must not crash on any of it."""

from __future__ import annotations

from typing import Any

import orjson


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
