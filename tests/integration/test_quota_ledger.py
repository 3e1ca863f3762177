"""The quota ledger on real SQLite and real PostgreSQL: reservations that cannot be raced,
settlement with the real spend, expiry of reservations whose worker died."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta, timezone

import pytest

from imbot.core.routing import QuotaScope
from imbot.storage import QuotaLedger, Reservation, Storage, open_storage
from imbot.storage.schema import utcnow


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Storage]:
    s = await open_storage(db_url)
    yield s
    await s.close()


def _scopes(user: str, *, micros: int | None = None, tokens: int | None = None) -> list[QuotaScope]:
    return [
        QuotaScope(
            key=f"user:{user}:d:2026-12-01", label="user daily", micros=micros, tokens=tokens
        ),
        QuotaScope(key=f"tenant:t-{user}:d:2026-12-01", label="tenant daily"),
    ]


async def _reserve(
    ledger: QuotaLedger, scopes: list[QuotaScope], *, micros: int, tokens: int = 10, ttl: float = 60
) -> Reservation | str:
    return await ledger.reserve(
        reservation_id=uuid.uuid4().hex,
        msg_id=f"m-{uuid.uuid4().hex[:8]}",
        user_id="u",
        tier="free",
        model="demo-pro",
        scopes=scopes,
        tokens=tokens,
        micros=micros,
        ttl_s=ttl,
    )


async def test_concurrent_reservations_never_pass_the_budget_together(store: Storage) -> None:
    """100 at once against a budget for 10: exactly 10 are held, whatever the interleaving."""
    scopes = _scopes(f"u{uuid.uuid4().hex[:8]}", micros=10_000)
    outcomes = await asyncio.gather(
        *(_reserve(store.quota, scopes, micros=1_000) for _ in range(100))
    )
    held = [o for o in outcomes if isinstance(o, Reservation)]
    assert len(held) == 10
    assert {o for o in outcomes if isinstance(o, str)} == {"user daily"}
    [user, tenant] = await store.quota.states(scopes)
    assert (user.reserved_micros, user.spent_micros) == (10_000, 0)
    assert tenant.reserved_micros == 10_000  # counted against the unlimited scope too


async def test_two_ledgers_on_two_connections_share_one_budget(db_url: str) -> None:
    """Two workers' ledgers (separate engines) against one budget: still exactly 10."""
    first, second = await open_storage(db_url), await open_storage(db_url)
    try:
        scopes = _scopes(f"u{uuid.uuid4().hex[:8]}", tokens=100)
        outcomes = await asyncio.gather(
            *(_reserve(s.quota, scopes, micros=0, tokens=10) for s in [first, second] * 30)
        )
        assert sum(isinstance(o, Reservation) for o in outcomes) == 10
    finally:
        await first.close()
        await second.close()


async def test_settling_replaces_the_reservation_by_the_real_spend_once(store: Storage) -> None:
    scopes = _scopes(f"u{uuid.uuid4().hex[:8]}", micros=5_000)
    held = await _reserve(store.quota, scopes, micros=4_000)
    assert isinstance(held, Reservation)
    assert isinstance(await _reserve(store.quota, scopes, micros=2_000), str)  # 6000 > 5000
    await store.quota.settle(held, tokens=7, micros=1_200)
    await store.quota.settle(held, tokens=7, micros=1_200)  # a retry settles nothing more
    [user, _] = await store.quota.states(scopes)
    assert (user.spent_micros, user.reserved_micros, user.spent_tokens) == (1_200, 0, 7)
    # What the reservation held beyond the real spend is free again.
    assert isinstance(await _reserve(store.quota, scopes, micros=3_800), Reservation)


async def test_a_reservation_whose_worker_died_expires_and_the_budget_is_whole(
    store: Storage,
) -> None:
    scopes = _scopes(f"u{uuid.uuid4().hex[:8]}", micros=1_000)
    dead = await _reserve(store.quota, scopes, micros=1_000, ttl=0.2)
    assert isinstance(dead, Reservation)
    assert isinstance(await _reserve(store.quota, scopes, micros=1), str)
    await asyncio.sleep(0.3)
    # The refused reservation expires the stale one and tries once more.
    again = await _reserve(store.quota, scopes, micros=1_000)
    assert isinstance(again, Reservation)
    [user, _] = await store.quota.states(scopes)
    assert (user.reserved_micros, user.spent_micros) == (1_000, 0)
    # The dead worker's call, settled late (it did finish), is still counted, once.
    await store.quota.settle(dead, tokens=3, micros=400)
    await store.quota.settle(dead, tokens=3, micros=400)
    [user, _] = await store.quota.states(scopes)
    assert (user.reserved_micros, user.spent_micros) == (1_000, 400)


async def test_expiry_leaves_live_reservations_alone(store: Storage) -> None:
    scopes = _scopes(f"u{uuid.uuid4().hex[:8]}", micros=10_000)
    live = await _reserve(store.quota, scopes, micros=3_000, ttl=600)
    assert isinstance(live, Reservation)
    expired = await store.quota.expire_stale(now=utcnow() + timedelta(seconds=60))
    assert expired >= 0
    [user, _] = await store.quota.states(scopes)
    assert user.reserved_micros == 3_000


# A zone other than UTC: where an operator (``imbot usage --since …+08:00``) or a caller
# of ``expire_stale(now=…)`` may give a moment.
SHANGHAI = timezone(timedelta(hours=8))


async def test_expiry_compares_instants_whatever_the_zone_of_now(store: Storage) -> None:
    """``expires_at`` is a moment of the reserving worker's clock; ``now`` one of the
    expiring worker's. Compared as instants on both databases (SQLite keeps timestamps
    as text: a moment in another zone must not be compared as its wall time there)."""
    scopes = _scopes(f"u{uuid.uuid4().hex[:8]}", micros=10_000)
    live = await _reserve(store.quota, scopes, micros=3_000, ttl=600)
    assert isinstance(live, Reservation)
    await store.quota.expire_stale(now=(utcnow() + timedelta(minutes=1)).astimezone(SHANGHAI))
    [user, _] = await store.quota.states(scopes)
    assert user.reserved_micros == 3_000  # 1 minute into its 10: still live
    await store.quota.expire_stale(now=(utcnow() + timedelta(minutes=11)).astimezone(SHANGHAI))
    [user, _] = await store.quota.states(scopes)
    assert user.reserved_micros == 0  # past its time to live: returned


async def test_spend_since_compares_instants_whatever_the_zone(store: Storage) -> None:
    user = f"u{uuid.uuid4().hex[:8]}"
    held = await store.quota.reserve(
        reservation_id=uuid.uuid4().hex,
        msg_id="m",
        user_id=user,
        tier="free",
        model="demo-lite",
        scopes=_scopes(user, micros=10_000),
        tokens=10,
        micros=1_000,
        ttl_s=60,
    )
    assert isinstance(held, Reservation)
    await store.quota.settle(held, tokens=5, micros=400)
    earlier = (utcnow() - timedelta(minutes=1)).astimezone(SHANGHAI)
    [row] = await store.quota.spend(user_id=user, since=earlier)
    assert (row.calls, row.micros) == (1, 400)
    later = (utcnow() + timedelta(minutes=1)).astimezone(SHANGHAI)
    assert await store.quota.spend(user_id=user, since=later) == []


async def test_spend_is_reported_by_user_tier_and_model(store: Storage) -> None:
    user = f"u{uuid.uuid4().hex[:8]}"
    scopes = _scopes(user, micros=100_000)
    for spent in (100, 250):
        held = await store.quota.reserve(
            reservation_id=uuid.uuid4().hex,
            msg_id="m",
            user_id=user,
            tier="free",
            model="demo-lite",
            scopes=scopes,
            tokens=50,
            micros=1_000,
            ttl_s=60,
        )
        assert isinstance(held, Reservation)
        await store.quota.settle(held, tokens=20, micros=spent)
    [row] = await store.quota.spend(user_id=user, since=utcnow() - timedelta(hours=1))
    assert (row.tier, row.model, row.calls, row.tokens, row.micros) == (
        "free",
        "demo-lite",
        2,
        40,
        350,
    )
    assert await store.quota.spend(user_id=user, since=utcnow() + timedelta(hours=1)) == []


async def test_user_tiers_are_set_changed_and_removed(store: Storage) -> None:
    user = f"u{uuid.uuid4().hex[:8]}"
    assert await store.tiers.tier_of(user) is None
    await store.tiers.set_tier(user, "pro")
    await store.tiers.set_tier(user, "free")
    assert await store.tiers.tier_of(user) == "free"
    await store.tiers.set_tier(user, None)
    assert await store.tiers.tier_of(user) is None
