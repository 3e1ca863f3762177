"""A message the route and model stages see twice, with the budget of one call.

At-least-once delivery: a worker killed before it committed a record has it redelivered.
When the route stage had not committed the user's message yet, a restarted worker reads
it twice over: the routed record the dead worker published, and the message itself,
routed again. The first copy is answered; the second must not be answered with the quota
reply because of the money its own first copy spent. That reply goes straight to
``imbot.outbound`` while the answer still has the output review ahead of it, so it is
likely to reach the sender first, and the sender sends a message's first reply and no
other ("message already answered with another reply"): the user is told the budget is
spent instead of getting the answer they paid for.

Both stages did it (found behind the flaky killed-worker test of test_quota_race): the
ledger (``QuotaLedger.reserve``) and the route's ``budget_view`` cannot tell a copy of a
message already answered from a new message. The model stage writes a message's usage
row once its completion is published, which is what tells them apart: the model stage
drops a copy of an answered message before reserving (no second call, no quota reply),
and the route stage drops one it would refuse.
"""

from __future__ import annotations

import time
from pathlib import Path

from imbot.adapters import build_catalog
from imbot.core.settings import Settings
from imbot.routing.budgets import Budgets
from imbot.storage import Storage
from imbot.streams.boundary import AfterPublish, Emit
from tests.envelopes import direct_envelope
from tests.fakes.providers import FakeOpenAI
from tests.stages import default_policy, model_stage, route_stage, settings_with

PRICE = 1000.0  # CNY per million tokens: the fake's call (30 tokens) costs 30,000 micro-CNY
CALL_MICROS = 30 * int(PRICE)


def _settings(tmp_path: Path, base_url: str) -> Settings:
    """One paid model for every level; the free tier's day has room for one call's
    reservation (its worst case, about 32,000) but not for one more after it is spent."""
    policy = default_policy()
    policy["models"] = {
        "paid": {
            "provider": "openai",
            "base_url": base_url,
            "model": "gpt-test",
            "price": {"input": PRICE, "output": PRICE, "currency": "CNY"},
            "retry": {"max_attempts": 1},
        }
    }
    policy["routes"]["default"] = {"system_prompt": None, "max_output_tokens": 30}
    policy["routes"]["default"]["history_turns"] = 0
    for tier in policy["routing"]["tiers"].values():
        tier["models"] = {level["name"]: ["paid"] for level in policy["routing"]["levels"]}
    policy["routing"]["tiers"]["free"]["quota"] = {"daily": {"cost": 0.04}}
    return settings_with(tmp_path, policy)


def _quota_replies(emitted: list[Emit | AfterPublish]) -> list[Emit]:
    return [
        e
        for e in emitted
        if isinstance(e, Emit) and e.envelope.reply is not None and e.envelope.reply.kind == "quota"
    ]


async def test_a_redelivered_copy_of_an_answered_message_gets_no_quota_reply(
    storage: Storage, tmp_path: Path
) -> None:
    async with FakeOpenAI() as provider:
        settings = _settings(tmp_path, provider.base_url)
        env = direct_envelope("你好")
        route = route_stage(settings, storage)
        catalog = build_catalog(settings.policy.models)
        model = model_stage(settings, storage, catalog)
        try:
            # Routed twice before any call: the dead worker's routed record, and the
            # restarted worker's own routing of the message it had not committed.
            [first] = await route.handle(env, deadline=time.monotonic() + 10)
            [again] = await route.handle(env, deadline=time.monotonic() + 10)
            assert isinstance(first, Emit)
            assert isinstance(again, Emit)
            answered = await model.handle(first.envelope, deadline=time.monotonic() + 10)
            [completion, after] = answered
            assert isinstance(completion, Emit)
            assert completion.envelope.completion is not None
            assert isinstance(after, AfterPublish)
            await after.run()  # the completion is published: its usage row is written
            # The second copy reaches the model stage after the first was answered, and a
            # third is routed after it (the route stage lagging behind the model stage).
            second = await model.handle(again.envelope, deadline=time.monotonic() + 10)
            third = await route.handle(env, deadline=time.monotonic() + 10)
        finally:
            await catalog.aclose()
        assert len(provider.requests) == 1

    # The first copy's answer is the message's answer; its copies add no reply of
    # their own that could reach the user first, and no call beyond the budget.
    assert _quota_replies([*second]) == []
    assert _quota_replies([*third]) == []
    [daily, *_] = await storage.quota.states(Budgets.of(settings).scopes(env, "free"))
    assert (daily.spent_micros, daily.reserved_micros) == (CALL_MICROS, 0)
