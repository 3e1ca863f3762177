"""A user's tier, from server-side sources only."""

from __future__ import annotations

import time
from typing import Protocol

from imbot.core.routing import Routing


class TierSource(Protocol):
    """Tiers set by the operator (the storage's ``UserTiers``)."""

    async def tier_of(self, user_id: str) -> str | None: ...


class TierBook:
    """A user's tier from server-side sources only: the tiers table (``imbot users
    set-tier``), then the policy's ``routing.users``, then ``routing.default_tier``;
    never the message's ``ext``. Table answers are cached ``routing.tier_cache_s``."""

    def __init__(self, routing: Routing, tiers: TierSource) -> None:
        self._routing = routing
        self._tiers = tiers
        self._cache: dict[str, tuple[float, str | None]] = {}

    async def tier_of(self, user: str) -> str:
        now = time.monotonic()
        hit = self._cache.get(user)
        if hit is not None and hit[0] > now:
            stored = hit[1]
        else:
            stored = await self._tiers.tier_of(user)
            if len(self._cache) >= 100_000:
                self._cache.clear()
            self._cache[user] = (now + self._routing.tier_cache_s, stored)
        if stored in self._routing.tiers:
            return stored
        return self._routing.users.get(user, self._routing.default_tier)
