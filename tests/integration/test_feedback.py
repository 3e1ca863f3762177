"""Users' ratings end to end: the gateway over real HTTP catches them and publishes them to
the real broker, the feedback stage (inside its real boundary, built as the sender process
builds it) writes each once to SQLite and PostgreSQL, and the report joins a really
delivered answer (the simulator's Easemob msg ids) to its model and tier."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from imbot.core import topics
from imbot.core.envelope import Completion, Envelope, Reply, decode_envelope
from imbot.core.kafka import ensure_topics, new_producer
from imbot.core.routing import QuotaScope
from imbot.core.settings import Settings
from imbot.devtools.broker import consume_all
from imbot.devtools.processes import free_port
from imbot.gateway.app import create_app
from imbot.sender.service import ReplySender
from imbot.storage import Storage
from imbot.storage.schema import FeedbackRow
from imbot.streams.boundary import Boundary, Outputs
from imbot.streams.pipeline import spec
from imbot.streams.stages import STAGES
from imbot.streams.worker import Runtime
from tests.envelopes import direct_envelope
from tests.integration.conftest import new_easemob_client, start_gateway
from tests.payloads import callback
from tests.rows import count_rows
from tests.unit.test_gateway_input import ODD_VALUES, with_value

Client = TestClient[web.Request, web.Application]
REPLY = "1290012345678999999"


@pytest.fixture
async def gateway(make_settings: Callable[..., Settings]) -> AsyncIterator[tuple[Client, Settings]]:
    settings = make_settings()
    client = await start_gateway(settings)
    yield client, settings
    await client.close()


async def _post(client: Client, body: Any) -> tuple[int, Any]:
    # json, not orjson: orjson writes at most 254 levels, and some hostile values nest more.
    resp = await client.post(
        "/easemob/callback",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    return resp.status, await resp.json()


async def _topic(settings: Settings, topic: str, count: int, timeout: float = 5.0) -> list[Any]:
    records = await consume_all(settings.kafka_bootstrap, settings.topic(topic), count, timeout)
    return [(key, decode_envelope(value)) for key, value in records]


def _rated(reply: str = REPLY, rating: str = "👍", **options: Any) -> dict[str, Any]:
    """The cmd shape, as the Web SDK sends it (docs/feedback.md)."""
    return callback(
        body={"type": "cmd", "action": "imbot_feedback"},
        ext={"msg_id": reply, "rating": rating},
        **options,
    )


SHAPES: dict[str, Callable[[], dict[str, Any]]] = {
    "cmd": _rated,
    "custom": lambda: callback(
        body={
            "type": "custom",
            "customEvent": "imbot_feedback",
            "v2:customExts": {"msg_id": REPLY, "rating": "👍"},
        }
    ),
    "ext": lambda: callback("谢谢", ext={"imbot_feedback": {"msg_id": REPLY, "rating": "up"}}),
    "group": lambda: _rated(chat_type="groupchat", to="g42", group_id="g42"),
}


def _counted(metrics: str, rating: str) -> float:
    found = re.search(rf'^imbot_feedback_total{{rating="{rating}"}} (\S+)$', metrics, re.M)
    return float(found.group(1)) if found else 0.0


# -- the gateway ------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
async def test_each_shape_is_published_to_the_feedback_topic_and_never_to_the_bot(
    gateway: tuple[Client, Settings], shape: str
) -> None:
    client, settings = gateway
    before = _counted(await (await client.get("/metrics")).text(), "up")
    data = SHAPES[shape]()
    assert await _post(client, data) == (200, {"valid": True})
    [(key, env)] = await _topic(settings, topics.FEEDBACK, 1)
    assert env.msg_id == data["msg_id"]
    assert env.content.body == {"reply_msg_id": REPLY, "rating": "up"}
    assert env.sender == "alice"
    assert key == env.conversation_id.encode()
    assert env.easemob_timestamp == data["timestamp"]
    assert await _topic(settings, topics.INBOUND, 1, timeout=1.0) == []  # never answered
    metrics = await (await client.get("/metrics")).text()
    assert _counted(metrics, "up") == before + 1
    assert 'imbot_gateway_callbacks_total{outcome="feedback"}' in metrics


async def test_a_rating_passes_even_where_ai_messages_are_intercepted(
    make_settings: Callable[..., Settings], tmp_path: Any
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "callback: {ai_message: intercept, intercept_code: AI}\n"
        "models: {demo: {provider: demo}}\nroutes: {default: {models: [demo]}}\n"
    )
    settings = make_settings(policy_file=path)
    client = await start_gateway(settings)
    try:
        assert await _post(client, _rated()) == (200, {"valid": True})
        assert await _post(client, callback("你好")) == (200, {"valid": False, "code": "AI"})
        assert len(await _topic(settings, topics.FEEDBACK, 1)) == 1
        assert len(await _topic(settings, topics.INBOUND, 1)) == 1
    finally:
        await client.close()


async def test_a_repeated_rating_callback_is_published_once(
    gateway: tuple[Client, Settings],
) -> None:
    client, settings = gateway
    data = _rated()
    again = dict(data)  # Easemob's second matching rule: same message, another callId
    again.update(callback(msg_id=data["msg_id"]))
    again["payload"] = data["payload"]
    assert await _post(client, data) == (200, {"valid": True})
    assert await _post(client, again) == (200, {"valid": True})
    assert await _post(client, data) == (200, {"valid": True})  # the first, once more
    assert len(await _topic(settings, topics.FEEDBACK, 3, timeout=1.5)) == 1


async def test_a_signature_replayed_with_another_rating_is_never_published(
    gateway: tuple[Client, Settings],
) -> None:
    """The signature covers callId and timestamp, not the body: a captured rating must
    not carry forged ones."""
    client, settings = gateway
    data = _rated()
    forged = {**data, "msg_id": "1290012345670000001"}
    forged["payload"] = {**data["payload"], "ext": {"msg_id": "other", "rating": "👎"}}
    assert await _post(client, data) == (200, {"valid": True})
    assert await _post(client, forged) == (200, {"valid": True})
    [(_, env)] = await _topic(settings, topics.FEEDBACK, 2, timeout=1.5)
    assert env.msg_id == data["msg_id"]
    metrics = await (await client.get("/metrics")).text()
    assert 'imbot_gateway_callbacks_total{outcome="replayed"}' in metrics


@pytest.mark.parametrize(
    # Made when the test runs: a callback's timestamp must be within the gateway's window
    # (five minutes), and collection can be longer ago than that.
    "make",
    [
        lambda: _rated(rating="meh"),
        lambda: _rated(reply="x" * 65),
        lambda: _rated(reply="12\x0034"),
        lambda: _rated(sender="ai_bot"),
        lambda: _rated(to="bob"),
        lambda: callback(
            "hi bob", to="bob", ext={"imbot_feedback": {"msg_id": REPLY, "rating": "up"}}
        ),
        lambda: callback(body={"type": "cmd", "action": "imbot_feedback"}, ext={"rating": "up"}),
        lambda: callback(
            body={"type": "cmd", "action": "imbot_feedback"}, ext={"imbot_feedback": 1}
        ),
    ],
    ids=[
        "word",
        "long_id",
        "nul_id",
        "from_bot",
        "between_people",
        "ext_to_person",
        "no_id",
        "odd",
    ],
)
async def test_an_invalid_rating_is_not_feedback_and_passes(
    gateway: tuple[Client, Settings], make: Callable[[], dict[str, Any]]
) -> None:
    client, settings = gateway
    assert await _post(client, make()) == (200, {"valid": True})
    assert await _topic(settings, topics.FEEDBACK, 1, timeout=1.0) == []
    assert await _topic(settings, topics.INBOUND, 1, timeout=0.5) == []  # a cmd: not for the AI


async def test_a_question_with_a_broken_rating_in_its_ext_is_answered_as_a_question(
    gateway: tuple[Client, Settings],
) -> None:
    client, settings = gateway
    data = callback("你好", ext={"imbot_feedback": {"msg_id": REPLY, "rating": "meh"}})
    assert await _post(client, data) == (200, {"valid": True})
    [(_, env)] = await _topic(settings, topics.INBOUND, 1)
    assert env.msg_id == data["msg_id"]
    assert await _topic(settings, topics.FEEDBACK, 1, timeout=0.5) == []


async def test_hostile_values_in_a_rating_are_never_a_5xx(
    gateway: tuple[Client, Settings],
) -> None:
    client, settings = gateway
    paths: list[tuple[str | int, ...]] = [
        ("payload", "ext", "msg_id"),
        ("payload", "ext", "rating"),
        ("payload", "ext"),
        ("payload", "bodies", 0, "action"),
        ("payload", "bodies", 0),
        ("payload", "bodies"),
        ("to",),
        ("from",),
        ("group_id",),
    ]
    sent: set[str] = set()
    for path in paths:
        for value in ODD_VALUES:
            data = with_value(_rated(), path, value)
            sent.add(data["msg_id"])
            status, body = await _post(client, data)
            assert status < 500, (path, value)
            if status == 200:
                assert body == {"valid": True}
    records = await _topic(settings, topics.FEEDBACK, 1000, timeout=1.5)
    # Some odd values leave the rating whole (an odd group_id on a direct message): those,
    # and only well-formed ones, are published.
    assert records
    for _, env in records:
        assert env.msg_id in sent
        assert env.content.body["rating"] == "up"
        assert 0 < len(env.content.body["reply_msg_id"]) <= 64


@pytest.mark.parametrize(
    ("policy", "expected"), [("pass", {"valid": True}), ("block", {"valid": False, "code": "DOWN"})]
)
async def test_a_rating_kafka_cannot_take_is_answered_by_the_fail_policy(
    make_settings: Callable[..., Settings], tmp_path: Any, policy: str, expected: dict[str, Any]
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        f"callback: {{kafka_failure: {policy}, kafka_failure_code: DOWN}}\n"
        "models: {demo: {provider: demo}}\nroutes: {default: {models: [demo]}}\n"
    )
    settings = make_settings(policy_file=path, kafka_bootstrap=f"127.0.0.1:{free_port()}")
    client: Client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    try:
        started = time.perf_counter()
        assert await _post(client, _rated()) == (200, expected)
        assert time.perf_counter() - started < 1.0
        metrics = await (await client.get("/metrics")).text()
        assert 'imbot_gateway_callbacks_total{outcome="publish_failed"}' in metrics
    finally:
        await client.close()


# -- the feedback stage and the report ------------------------------------------------------


class Recorder:
    """The feedback stage as ``imbot sender`` builds it (its row's resources), in its
    boundary, with the real producer for its DLQ."""

    def __init__(self, boundary: Boundary, store: Storage) -> None:
        self.boundary = boundary
        self.store = store

    async def process(self, key: bytes | None, value: bytes | None, offset: int) -> str:
        return await self.boundary.process(key, value, topics.FEEDBACK, 0, offset)


@pytest.fixture
async def recorder(
    make_settings: Callable[..., Settings], db_url: str
) -> AsyncIterator[tuple[Recorder, Settings]]:
    settings = make_settings(database_url=db_url)
    await ensure_topics(settings)
    runtime = Runtime(settings, ["feedback"])
    producer = new_producer(settings)
    await producer.start()
    try:
        resources = await runtime.open_resources(spec("feedback").needs)
        stage = STAGES["feedback"].build(resources)
        boundary = Boundary(stage, Outputs(settings, producer), settings)
        yield Recorder(boundary, await runtime.storage()), settings
    finally:
        await producer.stop()
        await runtime.close()


async def _published(settings: Settings, data: dict[str, Any]) -> tuple[bytes | None, bytes]:
    """What the gateway publishes for the rating ``data`` (a real gateway, a real topic)."""
    client = await start_gateway(settings)
    try:
        assert await _post(client, data) == (200, {"valid": True})
    finally:
        await client.close()
    records = await consume_all(settings.kafka_bootstrap, settings.topic(topics.FEEDBACK), 100, 2)
    for key, value in records:
        if value is not None and decode_envelope(value).msg_id == data["msg_id"]:
            return key, value
    raise AssertionError("the rating was not published")


async def test_the_stage_writes_a_rating_once_however_often_it_is_delivered(
    recorder: tuple[Recorder, Settings],
) -> None:
    rec, settings = recorder
    data = _rated(reply=f"r{uuid.uuid4().hex[:12]}", rating="👎")
    key, value = await _published(settings, data)
    assert await rec.process(key, value, 0) == "ok"
    assert await rec.process(key, value, 0) == "ok"  # redelivered after a restart
    db = rec.store.database
    assert await count_rows(db, FeedbackRow, msg_id=data["msg_id"]) == 1
    assert await count_rows(db, FeedbackRow, msg_id=data["msg_id"], rating="down") == 1
    assert await count_rows(db, FeedbackRow, msg_id=data["msg_id"], user_id="alice") == 1
    dlq = await consume_all(settings.kafka_bootstrap, settings.topic(topics.DLQ), 1, timeout=0.5)
    assert dlq == []


async def test_a_record_without_its_rating_goes_to_the_dlq_without_a_reply(
    recorder: tuple[Recorder, Settings],
) -> None:
    rec, settings = recorder
    env = direct_envelope("not a rating")
    assert await rec.process(b"k", env.model_dump_json().encode(), 5) == "fatal"
    [(_, raw)] = await consume_all(settings.kafka_bootstrap, settings.topic(topics.DLQ), 1)
    assert raw is not None
    assert orjson.loads(raw)["stage"] == "feedback"
    outbound = settings.topic(topics.OUTBOUND)
    assert await consume_all(settings.kafka_bootstrap, outbound, 1, timeout=0.5) == []


async def _answered(
    store: Storage, simulator: str, *, model: str, tier: str | None, user: str
) -> tuple[Envelope, tuple[str, ...]]:
    """A question answered by ``model`` for a user of ``tier`` and delivered through the
    simulator in two parts: the usage row, the reservation, the ledger's Easemob ids."""
    env = direct_envelope("问题", user=user, reply=Reply(text="答" * 40))
    if tier is not None:
        held = await store.quota.reserve(
            reservation_id=uuid.uuid4().hex,
            msg_id=env.msg_id,
            user_id=user,
            tier=tier,
            model=model,
            scopes=[QuotaScope(key=f"user:{user}:d:2026-12-08", label="user daily")],
            tokens=100,
            micros=1000,
            ttl_s=60,
        )
        assert not isinstance(held, str)
        await store.quota.settle(held, tokens=50, micros=500)
    completion = Completion(text="答" * 40, finish_reason="stop", model=model, provider="fake")
    await store.usage.record_usage(env, completion)
    sender = ReplySender(new_easemob_client(simulator), store.deliveries, max_part_bytes=64)
    try:
        delivery = await sender.deliver(env, deadline=time.monotonic() + 10)
    finally:
        await sender.aclose()
    assert delivery.parts == 2
    return env, delivery.easemob_msg_ids


async def test_the_report_joins_ratings_to_the_delivered_answers_model_and_tier(
    recorder: tuple[Recorder, Settings], simulator: str
) -> None:
    rec, settings = recorder
    store = rec.store
    tag = uuid.uuid4().hex[:8]
    strong, light, tier = f"strong-{tag}", f"light-{tag}", f"pro-{tag}"
    _, pro_parts = await _answered(store, simulator, model=strong, tier=tier, user=f"p{tag}")
    _, free_parts = await _answered(store, simulator, model=light, tier=None, user=f"f{tag}")
    before = await store.feedback.report()
    ratings = [
        (pro_parts[0], "👍"),
        (pro_parts[1], "up"),  # the second part of the same answer
        (pro_parts[0], "👎"),
        (free_parts[1], "没用"),
        (f"nobody-{tag}", "up"),  # a reply id the ledger does not know
    ]
    for offset, (reply, word) in enumerate(ratings):
        key, value = await _published(settings, _rated(reply=reply, rating=word))
        assert await rec.process(key, value, offset) == "ok"
    report = await store.feedback.report()
    rows = {(row.model, row.tier): row for row in report.rows}
    pro, free = rows[(strong, tier)], rows[(light, None)]
    assert (pro.up, pro.down, pro.share) == (2, 1, round(2 / 3, 4))
    assert (free.up, free.down, free.share) == (0, 1, 0.0)
    assert report.total - before.total == len(ratings)
    assert report.unmatched - before.unmatched == 1
    json_rows = report.as_json()["by_model_and_tier"]
    assert {"model": strong, "tier": tier, "up": 2, "down": 1, "share": 0.6667} == {
        k: v
        for k, v in next(r for r in json_rows if r["model"] == strong).items()
        if k != "ratings"
    }
