"""Text normalisation for matching, with a map back to the original positions.

Evasions handled: full-width characters and compatibility forms (NFKC), case,
noise inserted between characters (spaces, punctuation, symbols, control and
format characters, emoji variation selectors, enclosing marks), and
traditional → simplified variants from a configured mapping.

The definition is per character: each character becomes the NFKC form of that
character with noise removed, each remaining character replaced by its variant
and lower-cased; the normalised text is the concatenation, and every
normalised character maps back to the one original character it came from.
``normalise_reference`` spells that out one character at a time (the tests hold
``Normaliser`` to it); ``Normaliser`` computes the same result with a few
whole-string operations at C speed over tables derived once from
``unicodedata``, which is what keeps ordinary Chinese text — full-width
punctuation in every sentence — fast.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_NOISE_CATEGORIES = frozenset("ZPSC")  # separators, punctuation, symbols, control/format/unassigned
# Marks that carry no letter: emoji presentation selectors ("❤️" is U+2764 U+FE0F) and
# enclosing marks (keycaps); inserted between two characters they would split a word.
_NOISE_MARKS = frozenset(
    [chr(c) for c in range(0xFE00, 0xFE10)] + [chr(c) for c in range(0xE0100, 0xE01F0)]
)
# str.lower() is context-free except for capital sigma at the end of a word (→ ς).
_CONTEXT_LOWER = frozenset("\u03a3")


def load_variant_map(path: Path) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) == 2 and parts[0] and parts[1]:
            mapping[parts[0]] = parts[1]
    return mapping


# Full-width forms of ASCII (U+FF01-FF5E) and the ideographic space, typed in an IME's
# full-width mode. Folding them keeps every position, unlike NFKC of the whole text.
_FULL_WIDTH_ALNUM = re.compile("[\uff10-\uff19\uff20-\uff3a\uff41-\uff5a]")
# From a letter, digit or @ on (a pattern that starts with a class is searched fast).
_FULL_WIDTH_RUN = re.compile("[\uff10-\uff19\uff20-\uff3a\uff41-\uff5a][\uff01-\uff5e\u3000]*")
_FOLD = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}


def _is_full_width(ch: str) -> bool:
    return "\uff01" <= ch <= "\uff5e" or ch == "\u3000"


def fold_full_width(text: str) -> str:
    """``text`` with each run of full-width forms that holds a letter, digit or ``@`` as
    ASCII (１３８－１２３４, ａ＠ｂ．ｃｎ, （０１０）). Full-width punctuation on its own, in
    every Chinese sentence, is left alone: nothing the detectors look for is made of it
    alone. Same length, so positions carry over."""
    if _FULL_WIDTH_ALNUM.search(text) is None:
        return text
    parts: list[str] = []
    pos = 0
    for match in _FULL_WIDTH_RUN.finditer(text):
        start = match.start()
        while start > pos and _is_full_width(text[start - 1]):  # the run's opening ＋ or （
            start -= 1
        parts += (text[pos:start], text[start : match.end()].translate(_FOLD))
        pos = match.end()
    parts.append(text[pos:])
    return "".join(parts)


def _is_noise(ch: str) -> bool:
    category = unicodedata.category(ch)
    return category[0] in _NOISE_CATEGORIES or category == "Me" or ch in _NOISE_MARKS


def _char_form(ch: str, variants: Mapping[str, str]) -> str:
    """The normalised form of one character (the definition)."""
    return "".join(
        variants.get(n, n).lower() for n in unicodedata.normalize("NFKC", ch) if not _is_noise(n)
    )


def normalise_reference(text: str, variants: Mapping[str, str]) -> tuple[str, list[int]]:
    """(normalised text, original index of each normalised character), one character at a time."""
    out: list[str] = []
    index: list[int] = []
    for i, ch in enumerate(text):
        form = _char_form(ch, variants)
        out.append(form)
        index.extend([i] * len(form))
    return "".join(out), index


_ASTRAL = re.compile("[\\U00010000-\\U0010ffff]")


Ranges = list[tuple[int, int]]  # sorted, disjoint, inclusive code point ranges


def _add(ranges: Ranges, cp: int) -> None:
    """Append ``cp`` (greater than any before it) to ``ranges``."""
    if ranges and ranges[-1][1] == cp - 1:
        ranges[-1] = (ranges[-1][0], cp)
    else:
        ranges.append((cp, cp))


def _class(ranges: Ranges) -> str:
    return "[" + "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges) + "]"


@dataclass(frozen=True, slots=True)
class _CharSet:
    """A set of code points as regexes.

    ``re`` keeps a class's BMP part as a bitmap but tries its non-BMP ranges one by one
    for every character that misses the bitmap, so the non-BMP part sits behind a single
    range test (``astral``), and ``bmp`` serves text with no such character in the set.
    ``full`` is both at once, with ``suffix`` (e.g. ``+`` for runs).
    """

    bmp: re.Pattern[str]
    astral: re.Pattern[str] | None
    full: re.Pattern[str]

    @classmethod
    def of(cls, ranges: Ranges, suffix: str = "") -> _CharSet:
        bmp = [(lo, min(hi, 0xFFFF)) for lo, hi in ranges if lo <= 0xFFFF]
        astral = [(max(lo, 0x10000), hi) for lo, hi in ranges if hi > 0xFFFF]
        bmp_class = _class(bmp) if bmp else "(?!)"
        if not astral:
            return cls(re.compile(bmp_class + suffix), None, re.compile(bmp_class + suffix))
        astral_char = f"{_ASTRAL.pattern}(?<={_class(astral)})"
        return cls(
            re.compile(bmp_class + suffix),
            re.compile(astral_char),
            re.compile(f"(?:{bmp_class}|{astral_char}){suffix}"),
        )

    @classmethod
    def of_chars(cls, chars: Sequence[str]) -> _CharSet:
        ranges: Ranges = []
        for cp in sorted(map(ord, chars)):
            _add(ranges, cp)
        return cls.of(ranges)

    def in_astral(self, text: str) -> bool:
        """Does ``text`` hold a non-BMP member of the set?"""
        return (
            self.astral is not None
            and _ASTRAL.search(text) is not None
            and (self.astral.search(text) is not None)
        )


@functools.cache
def _unicode_tables() -> tuple[_CharSet, tuple[str, ...]]:
    """(runs of characters whose form is empty, characters whose form is not plain
    ``str.lower``).

    Built once from ``unicodedata`` over every code point (a few tenths of a second), on
    first use rather than at import.
    """
    dropped = bytearray(0x110000)  # 1 where the form is empty
    special: list[str] = []
    category, decomposition = unicodedata.category, unicodedata.decomposition
    for cp in range(0x110000):
        ch = chr(cp)
        cat = category(ch)
        if cat in ("Cn", "Co", "Cs"):  # unassigned, private use, surrogate: most code points
            dropped[cp] = 1
        elif decomposition(ch):  # NFKC may change it: decide on its form
            nfkc = unicodedata.normalize("NFKC", ch)
            if all(_is_noise(n) for n in nfkc):
                dropped[cp] = 1
            elif nfkc != ch or len(ch.lower()) != 1:
                special.append(ch)
        elif cat[0] in _NOISE_CATEGORIES or cat == "Me" or ch in _NOISE_MARKS:
            dropped[cp] = 1
        elif len(ch.lower()) != 1 or ch in _CONTEXT_LOWER:
            special.append(ch)
    runs = [(m.start(), m.end() - 1) for m in re.finditer(b"\x01+", dropped)]
    return _CharSet.of(runs, "+"), tuple(special)


class Normalised:
    """Normalised text and the way back to the original."""

    __slots__ = ("_index", "_normaliser", "source", "text")

    def __init__(self, text: str, source: str, normaliser: Normaliser) -> None:
        self.text = text
        self.source = source
        self._normaliser = normaliser
        self._index: list[int] | None = None

    @property
    def index(self) -> Sequence[int]:
        """Original index of each normalised character (computed on first use: most texts
        match nothing and never need it)."""
        if self._index is None:
            self._index = self._normaliser.positions(self.source)
        return self._index

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The original span that ``text[start:end]`` came from."""
        index = self.index
        return index[start], index[end - 1] + 1


class Normaliser:
    """``normalise_reference`` for one variant map, fast.

    Three whole-string steps: drop runs of noise (a regex), replace the few characters
    whose form is not plain lower case — compatibility forms such as full-width letters
    and digits, variants, expanding or context-dependent lower case — from a table, then
    ``str.lower``.
    """

    def __init__(self, variants: Mapping[str, str]) -> None:
        self._drop, special = _unicode_tables()
        single = [k for k in variants if len(k) == 1]  # variants apply per character
        table: dict[str, str] = {}
        for ch in (*special, *single):
            if self._drop.full.fullmatch(ch):
                continue  # noise stays noise whatever the variant map says
            form = _char_form(ch, variants)
            if form != ch.lower() or len(form) != 1 or ch in _CONTEXT_LOWER:
                table[ch] = form
        self._table = table
        self._replace = _CharSet.of_chars(list(table)) if table else None
        expanding = [k for k, v in table.items() if len(v) != 1]
        self._expanding = _CharSet.of_chars(expanding) if expanding else None

    def __call__(self, text: str) -> Normalised:
        drop = self._drop
        kept = drop.bmp.sub("", text)
        if drop.in_astral(kept):  # removals commute: the BMP ones are done already
            kept = drop.astral.sub("", kept)  # type: ignore[union-attr]
        replace = self._replace
        if replace is not None:
            # One pass, so a replacement is never replaced again.
            pattern = replace.full if replace.in_astral(kept) else replace.bmp
            table = self._table
            kept = pattern.sub(lambda m: table[m[0]], kept)
        return Normalised(kept.lower(), text, self)

    def positions(self, text: str) -> list[int]:
        """Original index of each character of ``self(text).text``."""
        index: list[int] = []
        pos = 0
        for match in self._drop.full.finditer(text):
            self._extend(index, text, pos, match.start())
            pos = match.end()
        self._extend(index, text, pos, len(text))
        return index

    def _extend(self, index: list[int], text: str, start: int, end: int) -> None:
        if self._expanding is None or self._expanding.full.search(text, start, end) is None:
            index.extend(range(start, end))
            return
        for i in range(start, end):
            form = self._table.get(text[i])
            index.extend([i] * (1 if form is None else len(form)))
