"""Text normalisation for matching, with a map back to the original positions.

Evasions handled: full-width characters and compatibility forms (NFKC), case,
noise inserted between characters (spaces, punctuation, symbols, zero-width),
and traditional → simplified variants from a configured mapping.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path

_DROP_CATEGORIES = ("Z", "P", "S", "C")  # separators, punctuation, symbols, control/format


def load_variant_map(path: Path) -> dict[str, str]:
    mapping: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) == 2 and parts[0] and parts[1]:
            mapping[parts[0]] = parts[1]
    return mapping


# Every BMP character that is noise between letters (built once, ~10k entries).
_NOISE = frozenset(
    chr(c) for c in range(0x10000) if unicodedata.category(chr(c))[0] in _DROP_CATEGORIES
)


def normalise(text: str, variants: Mapping[str, str]) -> tuple[str, Sequence[int]]:
    """(normalised text, original index of each normalised character)."""
    if unicodedata.is_normalized("NFKC", text):
        # Fast path (most messages): no character changes width or form, so only
        # noise removal, variants and case remain — at C speed.
        index: Sequence[int]
        if _NOISE_RE.search(text) is None:
            index, kept = range(len(text)), text
        else:
            index = [i for i, ch in enumerate(text) if ch not in _NOISE]
            kept = _NOISE_RE.sub("", text)
        norm = kept.translate(_table(variants)).lower()
        if len(norm) == len(index):
            return norm, index
    return _normalise_slow(text, variants)


_NOISE_RE = re.compile("[" + "".join(re.escape(c) for c in sorted(_NOISE)) + "]")
_TABLES: dict[int, dict[int, str]] = {}


def _table(variants: Mapping[str, str]) -> dict[int, str]:
    key = id(variants)
    table = _TABLES.get(key)
    if table is None:
        table = _TABLES[key] = {
            ord(k): v for k, v in variants.items() if len(k) == 1 and len(v) == 1
        }
    return table


def _normalise_slow(text: str, variants: Mapping[str, str]) -> tuple[str, Sequence[int]]:
    out: list[str] = []
    index: list[int] = []
    for i, ch in enumerate(text):
        if ch.isascii():
            if ch.isalnum():
                out.append(ch.lower())
                index.append(i)
            continue
        for norm in unicodedata.normalize("NFKC", ch):
            if unicodedata.category(norm)[0] in _DROP_CATEGORIES:
                continue
            out.append(variants.get(norm, norm).lower())
            index.append(i)
    return "".join(out), index
