"""The stages before the sender, with in-memory storage (tests/fakes/storage.py) and the
demo model: what each one emits and what it records, in milliseconds."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

import pytest

from imbot.adapters import ChatRequest, CompletionResult, ModelCatalog, StreamEvent, build_catalog
from imbot.core import topics
from imbot.core.envelope import Content, Envelope, RouteDecision, Turn
from imbot.core.errors import ContentRejected
from imbot.core.settings import DEFAULT_POLICY_FILE, Settings, load_policy, load_settings
from imbot.moderation import Moderator
from imbot.streams.boundary import AfterPublish, Emit
from imbot.streams.stages import CallModel, ModerateIn, ModerateOut, Route
from tests.envelopes import direct_envelope
from tests.fakes.storage import FakeStorage
from tests.stages import model_stage, route_stage


@pytest.fixture
def settings() -> Settings:
    return load_settings(policy_file=DEFAULT_POLICY_FILE, callback_secrets="unit-secret")


@pytest.fixture
def store() -> FakeStorage:
    return FakeStorage()


def _call_model(settings: Settings, store: FakeStorage, catalog: ModelCatalog) -> CallModel:
    return model_stage(settings, store, catalog)


def _route(settings: Settings, store: FakeStorage) -> Route:
    return route_stage(settings, store)


def _demo_catalog() -> ModelCatalog:
    """The default policy's demo models (a cheap and a strong one)."""
    return build_catalog(load_policy(DEFAULT_POLICY_FILE).models)


def _moderator(settings: Settings) -> Moderator:
    return Moderator.from_config(settings.policy.moderation, base_dir=DEFAULT_POLICY_FILE.parent)


def _env(text: str = "你好，今天天气怎么样？") -> Envelope:
    return direct_envelope(text)


def _deadline() -> float:
    return time.monotonic() + 10


async def test_moderate_in_passes_a_harmless_question_on(
    settings: Settings, store: FakeStorage
) -> None:
    stage = ModerateIn(settings.policy, _moderator(settings), store.audit)
    [out] = await stage.handle(_env(), deadline=_deadline())
    assert isinstance(out, Emit)
    assert out.topic == topics.MODERATED
    assert out.envelope.reply is None
    assert store.audit.entries == []  # a plain allow is not audited


async def test_moderate_in_answers_a_blocked_question_and_audits_it(
    settings: Settings, store: FakeStorage
) -> None:
    stage = ModerateIn(settings.policy, _moderator(settings), store.audit)
    env = _env("请告诉我炸弹制作的方法")
    [out] = await stage.handle(env, deadline=_deadline())
    assert isinstance(out, Emit)
    assert out.topic == topics.OUTBOUND
    assert out.envelope.reply is not None
    assert out.envelope.reply.text == settings.policy.replies.blocked_input
    assert [(m, s, e.action) for m, s, e in store.audit.entries] == [(env.msg_id, "input", "block")]


async def test_route_sends_the_history_window_with_the_question(
    settings: Settings, store: FakeStorage
) -> None:
    env = _env()
    earlier = (
        Turn(role="user", content="之前的问题"),
        Turn(role="assistant", content="之前的回答"),
    )
    store.history.windows[env.conversation_id] = earlier
    [out] = await _route(settings, store).handle(env, deadline=_deadline())
    assert isinstance(out, Emit)
    assert out.topic == topics.ROUTED
    assert out.envelope.route is not None
    assert out.envelope.route.history == earlier
    # The default policy routes by tier and level: small talk goes to the light chain.
    free = settings.policy.routing.tiers["free"]
    assert out.envelope.route.models == free.models["light"]
    assert (out.envelope.route.tier, out.envelope.route.level) == ("free", "light")
    [(conversation, _, _, before)] = store.history.asked
    assert (conversation, before) == (env.conversation_id, env.msg_id)


async def test_route_answers_a_message_it_cannot_send_to_a_model(
    settings: Settings, store: FakeStorage
) -> None:
    env = _env().model_copy(update={"content": Content(type="img")})
    [out] = await _route(settings, store).handle(env, deadline=_deadline())
    assert isinstance(out, Emit)
    assert out.topic == topics.OUTBOUND
    assert out.envelope.reply is not None
    assert out.envelope.reply.kind == "unsupported"
    assert store.history.asked == []


async def _routed(settings: Settings, store: FakeStorage) -> Envelope:
    [out] = await _route(settings, store).handle(_env(), deadline=_deadline())
    assert isinstance(out, Emit)
    return out.envelope


async def test_call_model_completes_and_records_usage_after_publishing(
    settings: Settings, store: FakeStorage
) -> None:
    catalog = _demo_catalog()
    try:
        env = await _routed(settings, store)
        emit, after = await _call_model(settings, store, catalog).handle(env, deadline=_deadline())
        assert isinstance(emit, Emit)
        assert emit.topic == topics.COMPLETED
        assert emit.envelope.completion is not None
        assert emit.envelope.completion.text.startswith("【演示模型 demo】")
        assert store.usage.rows == {}  # not before the completion is published
        assert isinstance(after, AfterPublish)
        await after.run()
        assert store.usage.rows == {env.msg_id: emit.envelope.completion}
    finally:
        await catalog.aclose()


async def test_call_model_gives_up_a_usage_row_the_database_keeps_refusing(
    settings: Settings, store: FakeStorage
) -> None:
    """Raising would make the boundary pay for the call again: the row is given up."""
    catalog = _demo_catalog()
    try:
        env = await _routed(settings, store)
        _, after = await _call_model(settings, store, catalog).handle(env, deadline=_deadline())
        assert isinstance(after, AfterPublish)
        store.usage.failures = 3
        await after.run()  # no exception
        assert store.usage.rows == {}
    finally:
        await catalog.aclose()


async def test_moderate_out_delivers_a_clean_answer(settings: Settings, store: FakeStorage) -> None:
    catalog = _demo_catalog()
    try:
        routed = await _routed(settings, store)
        completed, _ = await _call_model(settings, store, catalog).handle(
            routed, deadline=_deadline()
        )
        assert isinstance(completed, Emit)
    finally:
        await catalog.aclose()
    stage = ModerateOut(settings.policy, _moderator(settings), store.audit)
    [out] = await stage.handle(completed.envelope, deadline=_deadline())
    assert isinstance(out, Emit)
    assert out.topic == topics.OUTBOUND
    assert out.envelope.reply is not None
    assert out.envelope.reply.kind == "answer"
    assert completed.envelope.completion is not None
    assert out.envelope.reply.text == completed.envelope.completion.text


async def test_moderate_out_without_a_completion_answers_with_the_fallback(
    settings: Settings, store: FakeStorage
) -> None:
    stage = ModerateOut(settings.policy, _moderator(settings), store.audit)
    [out] = await stage.handle(_env(), deadline=_deadline())
    assert isinstance(out, Emit)
    assert out.envelope.reply is not None
    assert out.envelope.reply.kind == "fallback"


class RefusingModel:
    """A ChatModel whose provider's safety system refuses every question."""

    name = "refuser"

    def __init__(self) -> None:
        self.calls = 0

    async def complete(self, request: ChatRequest) -> CompletionResult:
        self.calls += 1
        raise ContentRejected("refused", stage="input", clear_history=True, provider="fake")

    def stream(self, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        raise NotImplementedError


async def test_a_refusal_is_audited_after_publishing_so_a_database_hiccup_calls_no_model_again(
    settings: Settings, store: FakeStorage
) -> None:
    demo = _demo_catalog()
    refuser = RefusingModel()
    entry = demo.entry("demo-lite")
    catalog = ModelCatalog({"demo": dataclasses.replace(entry, model=refuser)})
    store.audit.failures = 2  # the database refuses the audit row twice
    env = _env().model_copy(update={"route": RouteDecision(route="default", models=("demo",))})
    try:
        emit, after = await _call_model(settings, store, catalog).handle(env, deadline=_deadline())
        assert isinstance(emit, Emit)
        assert emit.envelope.reply is not None
        assert emit.envelope.reply.kind == "rejected"
        assert isinstance(after, AfterPublish)
        await after.run()  # retried on its own, never by re-running the stage
        assert refuser.calls == 1
        assert [(m, s, e.category) for m, s, e in store.audit.entries] == [
            (env.msg_id, "model", "provider_input")
        ]
        assert store.history.cleared == [env.conversation_id]
    finally:
        await catalog.aclose()
        await demo.aclose()


class _NoDelivery:
    """A sender that must not be used: a sandboxed reply is never delivered."""

    async def deliver(self, env: Envelope, *, deadline: float) -> None:
        raise AssertionError("a sandboxed replay reached the sender")


async def test_a_sandboxed_replay_s_reply_goes_to_the_sandbox_not_to_the_user() -> None:
    from imbot.core.envelope import ReplayMark, Reply
    from imbot.streams.stages import Send

    env = _env().model_copy(
        update={"reply": Reply(text="答"), "replay": ReplayMark(id="r1", sandbox=True)}
    )
    # Send takes a ReplySender; the stage only ever calls deliver(), which this one refuses
    stage = Send(_NoDelivery(), deadline_s=5)  # type: ignore[arg-type]
    [out] = await stage.handle(env, deadline=_deadline())
    assert out.topic == topics.SANDBOX
    assert out.envelope.delivery is None
