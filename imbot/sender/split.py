"""Split long replies below Easemob's per-message size limit.

Easemob limits a message body plus ``ext`` to 5 KB (reference §3.8); older
documentation says 3-4 KB for some targets. A part's ``msg`` is kept to
``max_bytes`` of UTF-8 (3,000 by default, about 1,000 CJK characters), which
leaves room for ``ext`` and for JSON escaping of quotes and newlines.

Where a part ends, best first (the last such place that fits wins, as long as
the part stays at least half the limit, so a late boundary never produces a
tiny part):

1. a paragraph break (a blank line),
2. a line break,
3. a sentence end: ``。！？!?；;…`` anywhere, ``.`` only before whitespace (so
   ``3.14`` and ``example.com`` are not sentence ends),
4. a comma, colon or space: ``，,、：:`` and whitespace,
5. anywhere between two characters: never inside a UTF-8 sequence, and not
   before a combining mark, a variation selector or a zero-width joiner, so an
   accented letter or a composed emoji stays in one part when it can.

Whitespace policy: nothing is dropped, added or moved. A part is an exact slice
of the text; the separator and any whitespace and closing quotes or brackets
right after it stay at the end of the part they close (so the next part starts
with the next word, not with a space or a stray ``”``). Hence
``"".join(split_reply(text)) == text`` always, and a part may end with
whitespace such as ``"\\n\\n"``. Only a run of whitespace longer than a whole
part can give a part that is whitespace only. The empty text is one empty part.
"""

from __future__ import annotations

import re
import unicodedata

# Candidate boundaries: each pattern matches the separator; the cut goes after
# the match plus trailing closers (quotes, brackets) and whitespace.
_TIERS: tuple[re.Pattern[str], ...] = (
    re.compile(r"\n[ \t\r]*\n"),
    re.compile(r"\n"),
    re.compile(r"[。！？!?；;…]|\.(?=\s)"),
    re.compile(r"[，,、：:]|\s"),
)
_CLOSERS = "\"'”’」』）)]】》〉"
_TRAILING = re.compile(rf"[{re.escape(_CLOSERS)}]*\s*")
_JOINERS = {"\u200d"}  # ZWJ: the characters on both sides belong together


def _chars_within(text: str, start: int, max_bytes: int) -> int:
    """End index of the longest slice ``text[start:end]`` within ``max_bytes`` of UTF-8."""
    used = 0
    end = start
    n = len(text)
    while end < n:
        ch = text[end]
        o = ord(ch)
        size = 1 if o < 0x80 else 2 if o < 0x800 else 3 if o < 0x10000 else 4
        if used + size > max_bytes:
            break
        used += size
        end += 1
    return end


def _glued(text: str, i: int) -> bool:
    """True when cutting before ``text[i]`` would split a user-perceived character."""
    ch = text[i]
    if unicodedata.combining(ch) or ch in _JOINERS or 0xFE00 <= ord(ch) <= 0xFE0F:
        return True
    return i > 0 and text[i - 1] in _JOINERS


def _cut(text: str, start: int, end: int) -> int:
    """Best cut in ``text[start:end]``: an index in ``(start, end]``."""
    floor = start + (end - start) // 2
    for pattern in _TIERS:
        best = -1
        for match in pattern.finditer(text, start, end):
            stop = _TRAILING.match(text, match.end(), end)
            cut = stop.end() if stop else match.end()
            if cut > best:
                best = cut
        if best > floor:
            return best
    cut = end
    while cut > start + 1 and _glued(text, cut):
        cut -= 1
    return cut if cut > floor else end


def part_end(text: str, start: int, max_bytes: int = 3000) -> int:
    """Where the part of ``text`` that begins at ``start`` ends (an index past ``start``).

    Parts depend only on where they start and on ``max_bytes``, so a sender can
    resume a reply from any recorded boundary, or split one part further after
    Easemob refused it as too large, and still cut the rest exactly as before.
    """
    if max_bytes < 4:
        raise ValueError("max_bytes must hold at least one UTF-8 character (4 bytes)")
    end = _chars_within(text, start, max_bytes)
    if end >= len(text):
        return len(text)
    return _cut(text, start, end)


def split_reply(text: str, max_bytes: int = 3000) -> list[str]:
    """Parts of ``text`` in order, each at most ``max_bytes`` of UTF-8; they join back to ``text``."""
    parts: list[str] = []
    start = 0
    while True:
        end = part_end(text, start, max_bytes)
        parts.append(text[start:end])
        if end >= len(text):
            return parts
        start = end
