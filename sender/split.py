"""Split long replies below Easemob's per-message size limit.

Easemob limits a message body plus ``ext`` to about 5 KB of UTF-8 (reference
§3.8). Parts are measured in UTF-8 bytes and cut only between characters, at
the best boundary available: a paragraph break, then a sentence end, then a
comma or space, then anywhere. Whitespace policy: nothing is dropped or added —
the separator stays at the end of the part it closes, so ``"".join(parts)``
is exactly the original text.
"""

from __future__ import annotations

_PARAGRAPH = ("\n\n", "\n")
_SENTENCE = ("。", "！", "？", "!", "?", ".", "；", ";", "…")
_SOFT = ("，", ",", "、", "：", ":", " ", "\t")


def _cut_index(text: str, limit_chars: int) -> int:
    """Best place to cut ``text[:limit_chars]`` (an index into ``text``)."""
    window = text[:limit_chars]
    floor = limit_chars // 2  # don't make tiny parts just to end on a nice boundary
    for group in (_PARAGRAPH, _SENTENCE, _SOFT):
        best = max(
            (window.rfind(sep) + len(sep) for sep in group if window.rfind(sep) >= 0), default=-1
        )
        if best > floor:
            return best
    return limit_chars


def _chars_within(text: str, max_bytes: int) -> int:
    """How many leading characters of ``text`` fit in ``max_bytes`` of UTF-8."""
    used = 0
    for i, ch in enumerate(text):
        used += len(ch.encode("utf-8"))
        if used > max_bytes:
            return i
    return len(text)


def split_reply(text: str, max_bytes: int = 3000) -> list[str]:
    if max_bytes < 4:
        raise ValueError("max_bytes must hold at least one UTF-8 character")
    parts: list[str] = []
    rest = text
    while len(rest.encode("utf-8")) > max_bytes:
        fit = _chars_within(rest, max_bytes)
        cut = _cut_index(rest, fit)
        parts.append(rest[:cut])
        rest = rest[cut:]
    if rest or not parts:
        parts.append(rest)
    return parts
