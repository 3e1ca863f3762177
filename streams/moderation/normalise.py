"""Text normalisation for matching, with a map back to the original positions.

Evasions handled: full-width characters and compatibility forms (NFKC), case,
noise inserted between characters (spaces, punctuation, symbols, zero-width),
and traditional → simplified variants from a configured mapping.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
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


def normalise(text: str, variants: Mapping[str, str]) -> tuple[str, list[int]]:
    """(normalised text, original index of each normalised character)."""
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
