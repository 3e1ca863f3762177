"""The routing policy and the route stage's decisions, table-driven, with in-memory storage
(tests/fakes/storage.py): message types, commands, tiers, levels, budgets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from imbot.core import topics
from imbot.core.envelope import ChatType, Content, Envelope
from imbot.core.errors import ConfigurationError
from imbot.core.routing import MICROS, Routing
from imbot.core.settings import DEFAULT_POLICY_FILE, Policy, Settings, load_policy, load_settings
from imbot.routing.budgets import Budgets
from imbot.routing.choice import Price, scopes_for, standing, worst_case_micros
from imbot.routing.tiers import TierBook
from imbot.streams.boundary import Emit
from imbot.streams.stages import Route
from tests.envelopes import direct_envelope
from tests.fakes.storage import FakeStorage
from tests.stages import route_stage


def _policy_file(tmp_path: Path, **routing: Any) -> Path:
    data = yaml.safe_load(DEFAULT_POLICY_FILE.read_text(encoding="utf-8"))
    data["routing"].update(routing)
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def _settings(path: Path = DEFAULT_POLICY_FILE) -> Settings:
    return load_settings(policy_file=path, callback_secrets="unit")


def _route(settings: Settings, store: FakeStorage) -> Route:
    return route_stage(settings, store)


async def _handle(settings: Settings, store: FakeStorage, env: Envelope) -> list[Emit]:
    return list(await _route(settings, store).handle(env, deadline=time.monotonic() + 5))


# -- message types ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (Content(type="txt", text=""), None),  # nothing to answer: ignored, not "I only read text"
        (Content(type="txt", text="   \n\t "), None),
        (
            Content(type="img", body={"url": "https://a1.easemob.com/x/y/chatfiles/1"}),
            "unsupported",
        ),
        (Content(type="audio", body={"url": "https://x/a.amr", "length": 3}), "unsupported"),
        (Content(type="video", body={}), "unsupported"),
        (Content(type="file", body={"filename": "a.pdf"}), "unsupported"),
        (Content(type="loc", text="北京", body={"lat": 1, "lng": 2}), "unsupported"),
        (Content(type="custom", body={"customEvent": "gift"}), None),
        (Content(type="cmd", body={"action": "typing"}), None),
    ],
)
async def test_each_message_type_gets_its_configured_behaviour(
    content: Content, expected: str | None
) -> None:
    store = FakeStorage()
    outs = await _handle(_settings(), store, direct_envelope(content=content))
    if expected is None:
        assert outs == []
    else:
        [out] = outs
        assert out.topic == topics.OUTBOUND
        assert out.envelope.reply is not None
        assert out.envelope.reply.kind == expected
    assert store.history.asked == []  # no model, no history read


async def test_an_image_goes_to_the_vision_models_when_there_are_any(tmp_path: Path) -> None:
    policy = yaml.safe_load(DEFAULT_POLICY_FILE.read_text(encoding="utf-8"))
    policy["models"]["demo-vision"] = {
        "provider": "demo",
        "vision": True,
        "price": {"input": 5, "output": 15, "currency": "CNY"},
    }
    policy["routing"]["vision_models"] = ["demo-vision"]
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(policy, allow_unicode=True), encoding="utf-8")
    body = {"url": "https://a1.easemob.com/o/a/chatfiles/u1", "secret": "s3", "filename": "p.jpg"}
    [out] = await _handle(
        _settings(path), FakeStorage(), direct_envelope(content=Content(type="img", body=body))
    )
    route = out.envelope.route
    assert out.topic == topics.ROUTED
    assert route is not None
    assert (route.rule, route.models) == ("vision", ("demo-vision",))
    assert [(i.url, i.secret) for i in route.images] == [(body["url"], "s3")]


async def test_types_the_operator_ignores_or_answers_follow_the_policy(tmp_path: Path) -> None:
    path = _policy_file(tmp_path, message_types={"img": "ignore", "custom": "reply"})
    settings = _settings(path)
    img = direct_envelope(content=Content(type="img", body={"url": "https://x/y"}))
    custom = direct_envelope(content=Content(type="custom", body={}))
    assert await _handle(settings, FakeStorage(), img) == []
    [out] = await _handle(settings, FakeStorage(), custom)
    assert out.envelope.reply is not None
    assert out.envelope.reply.kind == "unsupported"


# -- commands ----------------------------------------------------------------------------


@pytest.mark.parametrize("word", ["/reset", " /RESET ", "#清除记忆", "清除记忆", "/clear"])
async def test_reset_clears_what_later_windows_see_and_reaches_no_model(word: str) -> None:
    store = FakeStorage()
    env = direct_envelope(word)
    [out] = await _handle(_settings(), store, env)
    assert out.topic == topics.OUTBOUND  # answered here, never routed to a model
    assert out.envelope.reply is not None
    assert out.envelope.reply.kind == "command"
    assert store.history.cleared == [env.conversation_id]


async def test_a_reset_word_inside_a_question_is_a_question() -> None:
    store = FakeStorage()
    [out] = await _handle(_settings(), store, direct_envelope("怎么 /reset 路由器？"))
    assert out.topic == topics.ROUTED
    assert store.history.cleared == []


async def test_help_shows_the_budget_left_and_reaches_no_model() -> None:
    settings = _settings()
    store = FakeStorage()
    env = direct_envelope("/help")
    budgets = Budgets.of(settings)
    [daily_scope, *_] = budgets.scopes(env, "free")
    store.quota.counters[daily_scope.key] = [50_000, 500_000, 0, 0]  # 0.5 CNY spent today
    [out] = await _handle(settings, store, env)
    assert out.envelope.reply is not None
    assert out.envelope.reply.kind == "command"
    assert "free" in out.envelope.reply.text
    assert "1.50" in out.envelope.reply.text  # 2 CNY a day, 0.5 spent
    assert "150000" in out.envelope.reply.text  # tokens left today


def test_custom_command_words_are_validated() -> None:
    with pytest.raises(ValueError, match="both reset and help"):
        Routing.model_validate({"commands": {"reset": ["/x"], "help": ["/X"]}})


# -- tiers ---------------------------------------------------------------------------------


async def test_the_tier_comes_from_the_table_then_the_policy_then_the_default(
    tmp_path: Path,
) -> None:
    settings = _settings(_policy_file(tmp_path, users={"vip": "pro", "both": "pro"}))
    store = FakeStorage()
    store.tiers.tiers = {"both": "free", "listed": "pro", "stale": "gone-tier"}
    book = TierBook(settings.policy.routing, store.tiers)
    assert await book.tier_of("vip") == "pro"  # policy file
    assert await book.tier_of("both") == "free"  # the table wins over the file
    assert await book.tier_of("listed") == "pro"
    assert await book.tier_of("stale") == "free"  # a tier no longer in the policy: default
    assert await book.tier_of("nobody") == "free"


async def test_a_client_cannot_choose_its_tier_through_ext() -> None:
    env = direct_envelope("你好", ext={"tier": "pro", "imbot_tier": "pro", "vip": True})
    [out] = await _handle(_settings(), FakeStorage(), env)
    assert out.envelope.route is not None
    assert out.envelope.route.tier == "free"


# -- levels and budgets ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "level"),
    [
        ("你好呀", "light"),
        ("thanks!", "light"),
        (
            "请用 Python 实现一个 LRU 缓存，并分析每个操作的时间复杂度，再和 OrderedDict 的实现比较优缺点",
            "strong",
        ),
        ("Prove that the square root of 2 is irrational, step by step.", "strong"),
    ],
)
async def test_the_level_follows_the_question(text: str, level: str) -> None:
    settings = _settings()
    [out] = await _handle(settings, FakeStorage(), direct_envelope(text))
    route = out.envelope.route
    assert route is not None
    assert (route.rule, route.level) == ("level", level)
    assert route.models == settings.policy.routing.tiers["free"].models[level]
    assert route.score is not None  # explained
    assert route.features


async def _strong_with_spent(share: float) -> Emit:
    settings = _settings()
    store = FakeStorage()
    env = direct_envelope("请详细分析并比较微服务和单体架构在一个十人团队中的权衡，给出迁移步骤")
    [daily, *_] = Budgets.of(settings).scopes(env, "free")
    assert daily.micros is not None
    store.quota.counters[daily.key] = [0, int(daily.micros * share), 0, 0]
    [out] = await _handle(settings, store, env)
    return out


async def test_near_the_limit_the_cheaper_level_answers() -> None:
    out = await _strong_with_spent(0.85)
    route = out.envelope.route
    assert route is not None
    assert (route.rule, route.level, route.quota.state) == ("downgrade", "light", "near")
    assert route.quota.scope == "user daily"


async def test_at_the_limit_the_quota_reply_is_sent_and_no_model_is_chosen() -> None:
    out = await _strong_with_spent(0.99999)
    assert out.topic == topics.OUTBOUND
    assert out.envelope.reply is not None
    assert out.envelope.reply.kind == "quota"
    assert out.envelope.route is not None
    assert out.envelope.route.models == ()
    assert out.envelope.route.quota.state == "exhausted"


def test_scopes_cover_the_user_the_tenant_and_the_group_by_day_and_month() -> None:
    from datetime import UTC, datetime

    policy = load_policy(DEFAULT_POLICY_FILE)
    routing = policy.routing.model_copy(update={"group_quota": policy.routing.tenant_quota})
    now = datetime(2026, 12, 1, 23, 59, tzinfo=UTC)
    scopes = scopes_for(routing, "free", user="u1", tenant="org#app", group="g1", now=now)
    assert [(s.key, s.label) for s in scopes] == [
        ("user:u1:d:2026-12-01", "user daily"),
        ("user:u1:m:2026-12", "user monthly"),
        ("tenant:org#app:d:2026-12-01", "tenant daily"),
        ("group:g1:d:2026-12-01", "group daily"),
    ]
    assert scopes[0].micros == 2 * MICROS
    assert scopes[0].tokens == 200_000


def test_the_worst_case_is_the_dearest_model_of_the_chain_at_the_output_cap() -> None:
    prices = {"lite": Price(2, 6), "pro": Price(20, 60)}
    assert worst_case_micros(prices, ["pro", "lite"], 100, 1000) == 100 * 20 + 1000 * 60
    assert worst_case_micros(prices, ["lite"], 100, 1000) == 100 * 2 + 1000 * 6
    assert worst_case_micros(prices, ["unpriced"], 100, 1000) == 0


def test_standing_names_the_refusing_budget() -> None:
    from imbot.core.routing import QuotaScope

    small = QuotaScope(key="a", label="user daily", micros=100)
    big = QuotaScope(key="b", label="tenant daily", micros=10_000)
    s = standing([(small, 0, 90), (big, 0, 9_000)], tokens=1, micros=20)
    assert (s.fits, s.scope) == (False, "user daily")
    assert standing([(small, 0, 10), (big, 0, 10)], tokens=1, micros=20).fits


# -- the policy file's errors name the key ------------------------------------------------------


@pytest.mark.parametrize(
    ("routing", "message"),
    [
        ({"levels": [{"name": "a", "below": 0.5}, {"name": "b", "below": 0.9}]}, "last level"),
        ({"levels": [{"name": "a"}, {"name": "b"}]}, "needs a `below`"),
        ({"tiers": {"free": {"models": {"light": ["demo-lite"]}}}}, "tiers.free.models"),
        ({"users": {"u": "platinum"}}, "unknown tiers"),
        ({"default_tier": "gold"}, "default_tier"),
        ({"vision_models": ["gpt-vision"]}, "unknown model 'gpt-vision'"),
    ],
)
def test_a_broken_routing_section_is_refused_with_its_key(
    tmp_path: Path, routing: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        load_policy(_policy_file(tmp_path, **routing))
    assert "policy.yaml" in str(caught.value)


def test_a_policy_without_tiers_keeps_each_route_s_fixed_chain(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "models: {demo: {provider: demo, price: {input: 0, output: 0, currency: CNY}}}\n"
        "routes: {default: {models: [demo]}}\n",
        encoding="utf-8",
    )
    policy = load_policy(path)
    assert not policy.routing.enabled
    empty = tmp_path / "empty.yaml"
    empty.write_text("routes: {default: {}}\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"routes\.default\.models is empty"):
        load_policy(empty)


async def test_a_fixed_chain_route_is_not_scored_or_budgeted(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "models: {demo: {provider: demo, price: {input: 0, output: 0, currency: CNY}}}\n"
        "routes: {default: {models: [demo]}}\n",
        encoding="utf-8",
    )
    [out] = await _handle(_settings(path), FakeStorage(), direct_envelope("证明费马大定理"))
    route = out.envelope.route
    assert route is not None
    assert (route.rule, route.models, route.tier, route.quota.state) == (
        "fixed",
        ("demo",),
        None,
        "unlimited",
    )


def test_the_group_conversation_counts_against_the_group() -> None:
    settings = _settings()
    env = direct_envelope("hi").model_copy(
        update={"chat_type": ChatType.group, "to": "g-42", "conversation_id": "group:g-42"}
    )
    policy: Policy = settings.policy
    budgets = Budgets(
        policy.model_copy(
            update={
                "routing": policy.routing.model_copy(
                    update={"group_quota": policy.routing.tenant_quota}
                )
            }
        ),
        Budgets.of(settings).prices,
        "org#app",
    )
    assert any(s.key.startswith("group:g-42:") for s in budgets.scopes(env, "free"))


def test_a_sandboxed_replay_is_paid_by_the_tenant_not_by_the_user() -> None:
    from imbot.core.envelope import ReplayMark

    settings = _settings()
    env = direct_envelope("hi")
    budgets = Budgets.of(settings)
    live = {s.label for s in budgets.scopes(env, "free")}
    replayed = env.model_copy(update={"replay": ReplayMark(id="r", sandbox=True)})
    delivered = env.model_copy(update={"replay": ReplayMark(id="r", sandbox=False)})
    assert "user daily" in live
    assert {s.label for s in budgets.scopes(replayed, "free")} == {"tenant daily"}
    assert {s.label for s in budgets.scopes(delivered, "free")} == live


# -- model health ------------------------------------------------------------------------------


def test_models_with_an_open_circuit_leave_the_chain_unless_all_are_open() -> None:
    from imbot.routing.health import healthy

    assert healthy(("a", "b", "c"), frozenset({"a"})) == (("b", "c"), ("a",))
    assert healthy(("a", "b"), frozenset()) == (("a", "b"), ())
    # All open: the chain stays whole (one may be half-open; else the fallback reply).
    assert healthy(("a", "b"), frozenset({"a", "b"})) == (("a", "b"), ())


async def test_the_route_skips_a_model_another_worker_reported_open() -> None:
    from datetime import UTC, datetime, timedelta

    settings = _settings()
    store = FakeStorage()
    store.health.open_until["demo-pro"] = datetime.now(UTC) + timedelta(seconds=30)
    stage = route_stage(settings, store, circuits_ttl_s=2.0)
    env = direct_envelope("Prove that the square root of 2 is irrational, step by step.")
    [out] = await stage.handle(env, deadline=time.monotonic() + 5)
    route = out.envelope.route
    assert route is not None
    assert route.level == "strong"
    assert route.models == ("demo-plus",)  # strong chain [demo-pro, demo-plus] without pro
    assert route.skipped == ("demo-pro",)


async def test_reservations_in_flight_alone_do_not_close_the_budget_at_the_route() -> None:
    """Calls in flight (or a dead worker's reservation) fill the budget: the route sends the
    message on, cheaper, and the model stage's atomic reservation decides."""
    settings = _settings()
    store = FakeStorage()
    env = direct_envelope("你好")
    [daily, *_] = Budgets.of(settings).scopes(env, "free")
    assert daily.micros is not None
    store.quota.counters[daily.key] = [0, 0, 0, daily.micros]  # nothing spent, all reserved
    [out] = await _handle(settings, store, env)
    assert out.topic == topics.ROUTED
    assert out.envelope.route is not None
    assert out.envelope.route.quota.state == "near"


async def test_reservations_in_flight_downgrade_a_hard_question_rather_than_refuse_it() -> None:
    """The same rule on the downgraded chain: in-flight reservations alone never make the
    route answer with the quota reply."""
    settings = _settings()
    store = FakeStorage()
    env = direct_envelope("请详细分析并比较微服务和单体架构在一个十人团队中的权衡，给出迁移步骤")
    [daily, *_] = Budgets.of(settings).scopes(env, "free")
    assert daily.micros is not None
    store.quota.counters[daily.key] = [0, 0, 0, daily.micros]  # nothing spent, all reserved
    [out] = await _handle(settings, store, env)
    route = out.envelope.route
    assert out.topic == topics.ROUTED
    assert route is not None
    assert (route.rule, route.level, route.quota.state) == ("downgrade", "light", "near")
