"""The model stage against a fake provider over real HTTP, with the real store."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from imbot.core.envelope import Envelope, RouteDecision
from imbot.core.settings import Settings
from imbot.storage import Storage, open_storage
from imbot.storage.schema import ModerationAuditRow, UsageRow
from imbot.streams.boundary import AfterPublish, Emit
from imbot.streams.stages import CallModel, Resources
from tests.envelopes import direct_envelope
from tests.fakes.providers import FakeErnie
from tests.integration.adapters.conftest import CatalogFactory, ernie_fake, make_catalog
from tests.integration.adapters.helpers import entry_for
from tests.integration.conftest import UNUSED, new_easemob_client
from tests.rows import count_rows

__all__ = ["ernie_fake", "make_catalog"]  # fixtures used below


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Storage]:
    s = await open_storage(db_url)
    yield s
    await s.close()


def _env(conv: str, user: str) -> Envelope:
    return direct_envelope(
        "一个有风险的问题",
        user=user,
        conversation_id=conv,
        route=RouteDecision(route="default", models=("ernie",)),
    )


async def test_a_provider_asking_to_clear_history_gets_it_cleared_and_audited(
    ernie_fake: FakeErnie,
    make_catalog: CatalogFactory,
    make_settings: Callable[..., Settings],
    store: Storage,
) -> None:
    user = f"u{uuid.uuid4().hex[:8]}"
    conv = f"chat:ai_bot:{user}"
    earlier = _env(conv, user)
    await store.deliveries.record_exchange(earlier, "之前的回答", reply_kind="answer")
    assert await store.history.history_window(conv, turns=10, token_budget=1000) != ()

    ernie_fake.extra = {"need_clear_history": True, "ban_round": -1, "result": "抱歉，我无法回答。"}
    settings = make_settings()
    catalog = make_catalog({"ernie": entry_for(ernie_fake)})
    stage = CallModel.build(
        Resources(settings, storage=store, catalog=catalog, easemob=new_easemob_client(UNUSED))
    )
    env = _env(conv, user)
    emit, after = await stage.handle(env, deadline=time.monotonic() + 10)

    assert isinstance(emit, Emit)
    assert emit.envelope.reply is not None
    assert (emit.envelope.reply.kind, emit.envelope.reply.text) == (
        "rejected",
        settings.policy.replies.rejected,
    )
    # The audit row and the history clear are written once the reply is published.
    assert isinstance(after, AfterPublish)
    await after.run()
    assert await store.history.history_window(conv, turns=10, token_budget=1000) == ()
    assert (
        await count_rows(store.database, ModerationAuditRow, msg_id=env.msg_id, stage="model") == 1
    )
    assert await count_rows(store.database, UsageRow, msg_id=env.msg_id) == 0


async def test_a_completed_call_is_accounted_for_once_it_is_published(
    ernie_fake: FakeErnie,
    make_catalog: CatalogFactory,
    make_settings: Callable[..., Settings],
    store: Storage,
) -> None:
    user = f"u{uuid.uuid4().hex[:8]}"
    settings = make_settings()
    catalog = make_catalog({"ernie": entry_for(ernie_fake)})
    stage = CallModel.build(
        Resources(settings, storage=store, catalog=catalog, easemob=new_easemob_client(UNUSED))
    )
    env = _env(f"chat:ai_bot:{user}", user)
    emit, after = await stage.handle(env, deadline=time.monotonic() + 10)
    assert isinstance(emit, Emit)
    assert isinstance(after, AfterPublish)
    completion = emit.envelope.completion
    assert completion is not None
    assert completion.provider == "ernie"
    # Written after the completion is published, before the record is acknowledged.
    assert await count_rows(store.database, UsageRow, msg_id=env.msg_id) == 0
    await after.run()
    assert await count_rows(store.database, UsageRow, msg_id=env.msg_id) == 1
