"""How often one message calls a provider that keeps failing: the catalog owns the
model call's repeats, and the boundary does not run the model stage again after them
(docs/models.md, "Retries: one owner"). Real broker, fake providers over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from imbot.core import topics
from imbot.core.envelope import (
    DlqRecord,
    Envelope,
    RouteDecision,
    decode_envelope,
    encode_envelope,
)
from imbot.core.errors import RetryableError
from imbot.core.kafka import ensure_topics, new_producer
from imbot.core.settings import Settings
from imbot.devtools.broker import consume_all
from imbot.storage import Storage, open_storage
from imbot.streams.boundary import Boundary, Outputs
from imbot.streams.stages import CallModel, Resources
from tests.envelopes import direct_envelope
from tests.fakes.providers import REPLY_TEXT, FakeOpenAI, openai_error
from tests.integration.adapters.conftest import (
    CatalogFactory,
    make_catalog,
    openai_fake,
    openai_fake2,
)
from tests.integration.adapters.helpers import REQUEST, entry_for
from tests.integration.conftest import UNUSED, new_easemob_client

__all__ = ["make_catalog", "openai_fake", "openai_fake2"]  # fixtures used below


@pytest.fixture
async def store(sqlite_url: str) -> AsyncIterator[Storage]:
    s = await open_storage(sqlite_url)
    yield s
    await s.close()


@pytest.fixture
async def outputs(make_settings: Callable[..., Settings]) -> AsyncIterator[Outputs]:
    # A deadline long enough for many re-runs of the stage, short waits between them:
    # if the boundary repeated the catalog's work, the providers would see it.
    settings = make_settings(stage_deadline_s=3.0, stage_retry_base_s=0.01, stage_retry_max_s=0.05)
    await ensure_topics(settings)
    producer = new_producer(settings)
    await producer.start()
    yield Outputs(settings, producer)
    await producer.stop()


def _retry(max_attempts: int) -> dict[str, object]:
    return {"max_attempts": max_attempts, "base_delay_s": 0.01, "max_delay_s": 0.02}


def _env(models: tuple[str, ...]) -> Envelope:
    return direct_envelope(route=RouteDecision(route="default", models=models))


def _always_overloaded(fake: FakeOpenAI) -> None:
    fake.push(*[openai_error(503, "The server is overloaded", "server_error")] * 200)


async def test_a_provider_that_always_fails_is_called_no_more_than_the_documented_bound(
    openai_fake: FakeOpenAI,
    openai_fake2: FakeOpenAI,
    make_catalog: CatalogFactory,
    outputs: Outputs,
    store: Storage,
) -> None:
    _always_overloaded(openai_fake)
    _always_overloaded(openai_fake2)
    catalog = make_catalog(
        {
            "primary": entry_for(openai_fake, retry=_retry(3)),
            "secondary": entry_for(openai_fake2, retry=_retry(2)),
        }
    )
    settings = outputs.settings
    stage = CallModel.build(
        Resources(settings, storage=store, catalog=catalog, easemob=new_easemob_client(UNUSED))
    )
    env = _env(("primary", "secondary"))

    outcome = await Boundary(stage, outputs, settings).process(
        b"k", encode_envelope(env), "t", 0, 11
    )

    # docs/models.md: at most the sum of retry.max_attempts over the route's chain.
    bound = 3 + 2
    assert len(openai_fake.requests) + len(openai_fake2.requests) == bound
    assert (len(openai_fake.requests), len(openai_fake2.requests)) == (3, 2)
    assert outcome == "exhausted"
    [dlq] = await consume_all(settings.kafka_bootstrap, settings.topic(topics.DLQ), 1, 3.0)
    assert dlq[1] is not None
    record = DlqRecord.model_validate_json(dlq[1])
    assert (record.stage, record.error_kind, record.status) == ("model", "RetryableError", 503)
    assert (record.msg_id, record.attempts) == (env.msg_id, bound)
    # The user still hears back: the polite fallback, not silence.
    [out] = await consume_all(settings.kafka_bootstrap, settings.topic(topics.OUTBOUND), 1, 3.0)
    assert out[1] is not None
    reply = decode_envelope(out[1]).reply
    assert reply is not None
    assert (reply.kind, reply.text) == ("fallback", settings.policy.replies.fallback)


async def test_a_chain_whose_circuits_are_all_open_is_tried_again_after_the_cool_down(
    openai_fake: FakeOpenAI,
    make_catalog: CatalogFactory,
    outputs: Outputs,
    store: Storage,
) -> None:
    # Nothing was called, so nothing was retried yet: the boundary owns this repeat
    # and waits for the circuit's cool-down; the probe call then answers the user.
    catalog = make_catalog(
        {
            "primary": entry_for(
                openai_fake,
                retry=_retry(1),
                circuit={"failure_threshold": 1, "cooldown_s": 0.3},
            )
        }
    )
    openai_fake.push(openai_error(503, "The server is overloaded", "server_error"))
    with pytest.raises(RetryableError):
        await catalog.complete(["primary"], REQUEST, deadline_s=2)
    assert catalog.entry("primary").breaker.state == "open"
    settings = outputs.settings
    stage = CallModel.build(
        Resources(settings, storage=store, catalog=catalog, easemob=new_easemob_client(UNUSED))
    )
    env = _env(("primary",))

    outcome = await Boundary(stage, outputs, settings).process(
        b"k", encode_envelope(env), "t", 0, 12
    )

    assert outcome == "ok"
    assert len(openai_fake.requests) == 2  # the call that opened the circuit, the probe
    [done] = await consume_all(settings.kafka_bootstrap, settings.topic(topics.COMPLETED), 1, 3.0)
    assert done[1] is not None
    completion = decode_envelope(done[1]).completion
    assert completion is not None
    assert completion.text == REPLY_TEXT
