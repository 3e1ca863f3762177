"""Per-part claims in the delivery ledger: two senders never send the same part, and a part
whose fate is unknown after a crash is sent again visibly (SQLite and PostgreSQL, real
simulator over HTTP)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from imbot.core.envelope import Envelope, Reply
from imbot.core.errors import RetryableError
from imbot.sender.easemob import EasemobClient
from imbot.sender.service import ReplySender
from imbot.sender.split import part_end, split_reply
from imbot.storage import UNCERTAIN_CLAIM, Storage, open_storage
from tests.envelopes import direct_envelope
from tests.integration.conftest import new_easemob_client
from tests.rows import DeliveryTarget

TEXT = "".join(f"第{i}句话，内容比较长一些。" for i in range(250))  # 4 parts of 3,000 bytes


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Storage]:
    s = await open_storage(db_url)
    yield s
    await s.close()


def _env(user: str, text: str = TEXT) -> Envelope:
    return direct_envelope("问题", user=user, reply=Reply(text=text))


async def _delivered(simulator: str, to: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        resp = await http.get(f"{simulator}/_sim/messages", params={"to": to})
        return list(resp.json()["messages"])


async def _inject(simulator: str, **body: Any) -> None:
    async with httpx.AsyncClient() as http:
        (await http.post(f"{simulator}/_sim/inject", json=body)).raise_for_status()


async def _deliver_until_done(sender: ReplySender, env: Envelope) -> int:
    """What the stage boundary does: retry a RetryableError. Returns the retries."""
    retries = 0
    while True:
        try:
            await sender.deliver(env, deadline=time.monotonic() + 30)
            return retries
        except RetryableError:
            retries += 1
            await asyncio.sleep(0.02)


def _uncertain(cause: str) -> float:
    return REGISTRY.get_sample_value("imbot_sender_uncertain_parts_total", {"cause": cause}) or 0.0


async def test_two_senders_on_the_same_record_send_each_part_once(
    simulator: str, db_url: str
) -> None:
    """A rebalance: two sender processes (each its own engine) deliver one 4-part reply."""
    parts = split_reply(TEXT)
    assert len(parts) == 4
    await _inject(simulator, delay_ms=30)  # each send takes a while: the senders overlap
    senders, storages = [], []
    for _ in range(2):
        storages.append(store := await open_storage(db_url))
        senders.append(ReplySender(new_easemob_client(simulator), store.deliveries))
    user = f"u{uuid.uuid4().hex[:8]}"
    env = _env(user)
    try:
        retries = await asyncio.gather(*(_deliver_until_done(s, env) for s in senders))
        ledger = await senders[0].store.ledger(env.msg_id)
    finally:
        for s in senders:
            await s.aclose()
        for storage in storages:
            await storage.close()
    delivered = await _delivered(simulator, user)
    assert [m["body"]["msg"] for m in delivered] == parts  # each part once, in order
    assert sum(retries) >= 1  # the second sender did meet the first one's claims
    assert [row.status for row in ledger.values()] == ["sent"] * len(parts)


async def test_a_part_another_live_sender_holds_is_left_to_it(
    client: EasemobClient, simulator: str, store: Storage
) -> None:
    user = f"u{uuid.uuid4().hex[:8]}"
    env = _env(user, "短回答")
    held = await store.deliveries.claim_part(
        env.msg_id, 0, "other-sender:0", lease_s=60, parts=1, target_kind="users", target=user
    )
    assert held is not None
    with pytest.raises(RetryableError):
        await ReplySender(client, store.deliveries).deliver(env, deadline=time.monotonic() + 10)
    assert await _delivered(simulator, user) == []


async def test_a_part_whose_sender_died_after_easemob_accepted_it_is_resent_visibly(
    client: EasemobClient, simulator: str, store: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    """The state a crash leaves: part 0 recorded, part 1 claimed and accepted, not recorded.

    The new sender cannot know whether the user saw part 1: it sends it again (never lost)
    and says so: a warning with the ids, the uncertain-parts counter, the ledger row.
    """
    user = f"u{uuid.uuid4().hex[:8]}"
    env = _env(user)
    parts = split_reply(TEXT)
    first = part_end(TEXT, 0)
    where: DeliveryTarget = {"parts": len(parts), "target_kind": "users", "target": user}
    # The sender that died: its claims had a lease that has run out by now.
    assert await store.deliveries.claim_part(env.msg_id, 0, "dead:0", lease_s=0.01, **where)
    id0 = await client.send_text("users", sender="ai_bot", to=user, text=parts[0])
    await store.deliveries.mark_sent(
        env.msg_id, 0, id0, end_offset=first, reply_digest=_digest(), **where
    )
    assert await store.deliveries.claim_part(env.msg_id, 1, "dead:0", lease_s=0.01, **where)
    await client.send_text("users", sender="ai_bot", to=user, text=parts[1])
    # ...killed here. The redelivered record, once the lease has passed:
    await asyncio.sleep(0.05)
    before = _uncertain("unresolved_claim")
    with caplog.at_level(logging.INFO, logger="imbot.sender"):
        result = await ReplySender(client, store.deliveries).deliver(
            env, deadline=time.monotonic() + 10
        )
    bodies = [m["body"]["msg"] for m in await _delivered(simulator, user)]
    assert bodies == [parts[0], parts[1], parts[1], *parts[2:]]  # one part twice, no more
    assert result.parts == len(parts)
    assert _uncertain("unresolved_claim") == before + 1
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert (vars(warning)["msg_id"], vars(warning)["part"]) == (env.msg_id, 1)  # log extras
    ledger = await store.deliveries.ledger(env.msg_id)
    assert [row.status for row in ledger.values()] == ["sent"] * len(parts)
    assert ledger[1].error == UNCERTAIN_CLAIM
    assert ledger[2].error is None


async def test_easemobs_lost_answer_is_counted_and_the_part_resent(
    simulator: str, store: Storage
) -> None:
    """A read timeout: Easemob may have shown the part. The retry sends it, counted."""
    user = f"u{uuid.uuid4().hex[:8]}"
    env = _env(user, "短回答")
    sender = ReplySender(new_easemob_client(simulator, timeout=0.2), store.deliveries)
    await sender.client.token()
    await _inject(simulator, delay_ms=400)
    before = _uncertain("answer_lost")
    try:
        with pytest.raises(RetryableError):
            await sender.deliver(env, deadline=time.monotonic() + 10)
        assert _uncertain("answer_lost") == before + 1
        ledger = await store.deliveries.ledger(env.msg_id)
        assert ledger[0].status == "retrying"
        assert (ledger[0].error or "").startswith("uncertain: ")
        await _inject(simulator, delay_ms=0)
        await sender.deliver(env, deadline=time.monotonic() + 10)
    finally:
        await sender.aclose()
    assert (await store.deliveries.ledger(env.msg_id))[0].status == "sent"
    assert "短回答" in [m["body"]["msg"] for m in await _delivered(simulator, user)]


def _digest() -> str:
    from imbot.sender.targets import reply_digest

    return reply_digest(TEXT)


async def test_a_failed_attempt_on_an_uncertain_part_keeps_it_marked(store: Storage) -> None:
    """A sender died with part 0 claimed (its fate at Easemob unknown); the next sender's
    attempt fails (its Easemob client closed under it, say) before a third one sends the
    part. The row still says the part is uncertain, so the user's possible second copy is
    the documented one (found by the chaos test: the failure's error overwrote the mark)."""
    user = f"u{uuid.uuid4().hex[:8]}"
    msg_id = uuid.uuid4().hex
    where: DeliveryTarget = {"parts": 1, "target_kind": "users", "target": user}
    assert await store.deliveries.claim_part(msg_id, 0, "dead:0", lease_s=0.01, **where)
    await asyncio.sleep(0.05)
    claim = await store.deliveries.claim_part(msg_id, 0, "second:0", lease_s=5, **where)
    assert claim is not None
    assert claim.uncertain
    await store.deliveries.mark_failed(
        msg_id, 0, "client has been closed", final=False, claimant="second:0", **where
    )
    ledger = await store.deliveries.ledger(msg_id)
    assert ledger[0].status == "retrying"
    assert ledger[0].error == UNCERTAIN_CLAIM
    third = await store.deliveries.claim_part(msg_id, 0, "third:0", lease_s=5, **where)
    assert third is not None
    assert (await store.deliveries.ledger(msg_id))[0].error == UNCERTAIN_CLAIM
