"""Budget leases: the tenant's budget taken in slices, on SQLite and PostgreSQL, and raced
by worker processes on PostgreSQL.

What must hold (docs/routing.md, "Budgets that scale"):
- a call is held against a budget before it is made, and settles with what it spent;
- the shared row is written once per slice, not once per call;
- near the limit the slices shrink to one call, so no more is ever reserved than is left;
- a worker SIGKILLed while holding a slice: what its calls settled is spent, its calls in
  flight expire like reservations, the rest of its slice comes back — the budget is whole;
- two processes racing many calls against tenant and user budgets together never spend
  beyond any limit.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence

import pytest

from imbot.core.routing import QuotaScope
from imbot.storage import Storage, open_database
from imbot.storage.leases import BudgetLeases, close_lease
from imbot.storage.quota import QuotaLedger, Reservation

CALL = 1_000  # micros per call


def _tenant(micros: int, day: str = "2026-12-07") -> QuotaScope:
    return QuotaScope(
        key=f"tenant:t{uuid.uuid4().hex[:6]}:d:{day}",
        label="tenant daily",
        micros=micros,
        shared=True,
    )


def _user(micros: int) -> QuotaScope:
    return QuotaScope(
        key=f"user:u{uuid.uuid4().hex[:6]}:d:2026-12-07", label="user daily", micros=micros
    )


async def _reserve(
    ledger: QuotaLedger, scopes: Sequence[QuotaScope], micros: int = CALL
) -> Reservation | str:
    return await ledger.reserve(
        reservation_id=uuid.uuid4().hex,
        msg_id=uuid.uuid4().hex,
        user_id="u",
        tier="free",
        model="m",
        scopes=scopes,
        tokens=micros // 100,
        micros=micros,
        ttl_s=300,
    )


async def _counter(storage: Storage, scope: QuotaScope) -> tuple[int, int]:
    [state] = await storage.quota.states([scope])
    return state.spent_micros, state.reserved_micros


async def test_calls_are_held_against_one_slice_and_settle_into_the_shared_row(
    storage: Storage,
) -> None:
    tenant, user = _tenant(1_000 * CALL), _user(100 * CALL)
    held = [await _reserve(storage.quota, [tenant, user]) for _ in range(8)]
    assert all(isinstance(r, Reservation) for r in held)
    spent_before, reserved = await _counter(storage, tenant)
    # One slice for all eight calls (sized for the call at hand, it grows with demand):
    # the shared row was written once per lease, not once per call.
    leases = {r.lease.id for r in held if isinstance(r, Reservation) and r.lease is not None}
    assert spent_before == 0
    assert reserved >= 8 * CALL
    assert len(leases) <= 4
    # The user's own row is reserved per call, as before.
    assert await _counter(storage, user) == (0, 8 * CALL)

    for r in held:
        assert isinstance(r, Reservation)
        await storage.quota.settle(r, tokens=10, micros=CALL // 2)  # each spent half
    await storage.quota.close()  # the worker stops: its leases close
    assert await _counter(storage, tenant) == (8 * CALL // 2, 0)
    assert await _counter(storage, user) == (8 * CALL // 2, 0)


async def test_near_the_limit_the_slice_is_one_call_and_nothing_beyond_the_limit_is_held(
    storage: Storage,
) -> None:
    tenant = _tenant(3 * CALL)
    results = await asyncio.gather(*(_reserve(storage.quota, [tenant]) for _ in range(6)))
    held = [r for r in results if isinstance(r, Reservation)]
    assert len(held) == 3  # the limit, exactly: slices never take more than is left
    assert [r for r in results if not isinstance(r, Reservation)] == ["tenant daily"] * 3
    spent, reserved = await _counter(storage, tenant)
    assert spent + reserved <= 3 * CALL
    for r in held:
        await storage.quota.settle(r, tokens=10, micros=CALL)
    await storage.quota.close()
    assert await _counter(storage, tenant) == (3 * CALL, 0)


async def test_a_user_refused_gives_the_call_back_to_the_slice(storage: Storage) -> None:
    tenant, user = _tenant(100 * CALL), _user(2 * CALL)
    results = [await _reserve(storage.quota, [tenant, user]) for _ in range(4)]
    assert [isinstance(r, Reservation) for r in results] == [True, True, False, False]
    for r in results:
        if isinstance(r, Reservation):
            await storage.quota.settle(r, tokens=10, micros=CALL)
    await storage.quota.close()
    assert await _counter(storage, tenant) == (2 * CALL, 0)  # the refused ones cost nothing


async def test_a_lease_closed_while_calls_are_held_makes_them_reservations(
    storage: Storage, db_url: str
) -> None:
    """The sweep closes a lease (its worker is thought dead) while a call is held under it:
    the call becomes an ordinary reservation of the tenant's row, settles there, and the
    tenant's row ends exact."""
    database = await open_database(db_url)
    worker = QuotaLedger(database, BudgetLeases(database, window_s=3.0, margin_s=0))
    try:
        tenant = _tenant(100 * CALL)
        # The first call's slice is 1.5 calls: the second, half a call, fits beside it.
        settled = await _reserve(worker, [tenant])
        in_flight = await _reserve(worker, [tenant], micros=CALL // 2)
        assert isinstance(settled, Reservation)
        assert isinstance(in_flight, Reservation)
        assert settled.lease is in_flight.lease
        await worker.settle(settled, tokens=10, micros=CALL)
        assert in_flight.lease is not None
        assert await close_lease(database, in_flight.lease.id)  # as the sweep would
        spent, reserved = await _counter(storage, tenant)
        assert (spent, reserved) == (CALL, CALL // 2)  # the held call kept its reservation
        await worker.settle(in_flight, tokens=10, micros=CALL // 4)
        assert await _counter(storage, tenant) == (CALL + CALL // 4, 0)
        # A call after the window takes a new lease; the closed one is never used again.
        await asyncio.sleep(3.1)
        again = await _reserve(worker, [tenant])
        assert isinstance(again, Reservation)
        assert again.lease is not None
        assert again.lease.id != in_flight.lease.id
        await worker.settle(again, tokens=10, micros=CALL)
    finally:
        await worker.close()
        await database.close()
    assert await _counter(storage, tenant) == (2 * CALL + CALL // 4, 0)


# A worker process: holds calls against the shared and its users' budgets, settles them.
_WORKER = r"""
import asyncio, json, os, random, signal, sys, uuid
from imbot.core.routing import QuotaScope
from imbot.storage import open_database
from imbot.storage.leases import BudgetLeases, close_lease
from imbot.storage.quota import QuotaLedger, Reservation

url, tenant_key, tenant_limit, user_limit, users, calls, call, mode = sys.argv[1:9]
tenant = QuotaScope(key=tenant_key, label="tenant daily", micros=int(tenant_limit), shared=True)

async def main():
    database = await open_database(url)
    ledger = QuotaLedger(database, BudgetLeases(database, window_s=2.0, margin_s=0.5))
    user_scopes = [
        QuotaScope(key=f"{tenant_key}:user{n}", label="user daily", micros=int(user_limit))
        for n in range(int(users))
    ]
    made = refused = 0
    held = []

    async def one(n):
        nonlocal made, refused
        user = user_scopes[n % len(user_scopes)]
        r = await ledger.reserve(
            reservation_id=uuid.uuid4().hex, msg_id=uuid.uuid4().hex, user_id=user.key,
            tier="free", model="m", scopes=[tenant, user], tokens=1, micros=int(call),
            ttl_s=1.0,
        )
        if not isinstance(r, Reservation):
            refused += 1
            return
        made += 1
        if mode == "kill" and n % 3 == 0:
            held.append(r)  # in flight when the worker dies
            return
        await asyncio.sleep(random.uniform(0, 0.05))  # the model call
        await ledger.settle(r, tokens=1, micros=int(call))

    await asyncio.gather(*(one(n) for n in range(int(calls))))
    print(json.dumps({"made": made, "refused": refused, "held": len(held)}), flush=True)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # holding its slice and its calls in flight
    await ledger.close()
    await database.close()

asyncio.run(main())
"""


def _workers(args: list[str], n: int) -> list[dict[str, int]]:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert out.strip(), err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


@pytest.mark.timeout(180)
async def test_two_processes_racing_never_spend_beyond_the_tenant_or_a_user_budget(
    pg_url: str,
) -> None:
    tenant_key = f"tenant:race{uuid.uuid4().hex[:6]}:d:2026-12-07"
    # 2 × 300 calls; the tenant has room for 120, each of 20 users for 8 (160 in all).
    outs = await asyncio.to_thread(
        _workers,
        [pg_url, tenant_key, str(120 * CALL), str(8 * CALL), "20", "300", str(CALL), "settle"],
        2,
    )
    database = await open_database(pg_url)
    try:
        ledger = QuotaLedger(database)
        tenant = QuotaScope(key=tenant_key, label="tenant daily", micros=120 * CALL, shared=True)
        users = [
            QuotaScope(key=f"{tenant_key}:user{n}", label="user daily", micros=8 * CALL)
            for n in range(20)
        ]
        [t] = await ledger.states([tenant])
        states = await ledger.states(users)
    finally:
        await database.close()
    made = sum(o["made"] for o in outs)
    assert t.spent_micros == made * CALL  # every call made was settled into the row
    assert t.reserved_micros == 0  # both workers returned their slices
    assert t.spent_micros <= 120 * CALL
    assert all(s.spent_micros <= 8 * CALL for s in states)
    # Slices only delay money, never lose it: the tenant's budget was used up.
    assert made == 120


@pytest.mark.timeout(180)
async def test_a_worker_killed_holding_a_slice_leaves_the_budget_whole(pg_url: str) -> None:
    tenant_key = f"tenant:kill{uuid.uuid4().hex[:6]}:d:2026-12-07"
    [out] = await asyncio.to_thread(
        _workers,
        [pg_url, tenant_key, str(1000 * CALL), str(1000 * CALL), "5", "30", str(CALL), "kill"],
        1,
    )
    assert out["held"] > 0
    database = await open_database(pg_url)
    try:
        ledger = QuotaLedger(database)
        tenant = QuotaScope(key=tenant_key, label="tenant daily", micros=1000 * CALL, shared=True)
        [before] = await ledger.states([tenant])
        assert before.reserved_micros > 0  # the dead worker's slice is still held
        # After the lease's expiry (its window, the calls' time to live, the margin) and
        # then the adopted calls' own time to live, any worker's sweep makes it whole.
        deadline = time.monotonic() + 30
        while True:
            await ledger.expire_stale()
            [after] = await ledger.states([tenant])
            if after.reserved_micros == 0 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    finally:
        await database.close()
    settled = out["made"] - out["held"]
    assert (after.spent_micros, after.reserved_micros) == (settled * CALL, 0)
