"""Models whose circuit some model worker reported open, as the route stage sees them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from imbot.core.errors import StorageError, StorageUnavailable


class OpenModels(Protocol):
    """Models whose circuit is open, shared by every worker (the storage's ``ModelHealth``)."""

    async def open_models(self) -> frozenset[str]: ...


class OpenCircuits:
    """The models whose circuit some model worker reported open (``ModelHealth``), read
    at most every ``ttl_s`` by this process; a database hiccup reads as none open."""

    def __init__(self, health: OpenModels, *, ttl_s: float = 2.0) -> None:
        self._health = health
        self._ttl_s = ttl_s
        self._until = 0.0
        self._open: frozenset[str] = frozenset()

    async def models(self) -> frozenset[str]:
        now = time.monotonic()
        if now >= self._until:
            self._until = now + self._ttl_s
            try:
                self._open = await self._health.open_models()
            except (StorageUnavailable, StorageError):
                self._open = frozenset()
        return self._open


def healthy(
    chain: Sequence[str], open_models: frozenset[str]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the chain without models whose circuit is open, those left out). When every model
    of the chain is open the chain stays whole: the catalog's own breakers decide then
    (one may be half-open), and the fallback reply follows if none answers."""
    kept = tuple(m for m in chain if m not in open_models)
    if not kept:
        return tuple(chain), ()
    return kept, tuple(m for m in chain if m in open_models)
