"""Any JSON in any field of a signed callback gets a defined answer (issue 9).

Table-driven over every field the gateway reads, plus a seeded random walk over
arbitrary JSON shapes: ``verify`` + ``decide`` either refuse with a 4xx
``CallbackRejected`` or decide; an AI message always encodes into an envelope every
stage decodes, with ids the database can store.
"""

from __future__ import annotations

import copy
import itertools
import json
import random
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from imbot.core.envelope import decode_envelope
from imbot.core.errors import ConfigurationError
from imbot.core.limits import CALL_ID_MAX, GROUP_ID_MAX, MSG_ID_MAX, USER_ID_MAX
from imbot.core.settings import Bot, Policy, load_policy
from imbot.core.signature import expected_security
from imbot.gateway.callback import MAX_NESTING, CallbackRejected, decide, verify
from tests.payloads import callback

SECRETS = ["test-secret"]
POLICY = Policy(bots=(Bot(id="ai_bot"), Bot(id="helper_bot")))


def nested(levels: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(levels):
        value = {"k": value} if i % 2 else [value]
    return value


ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**64 - 1,
    1.5,
    -0.0,
    "",
    "x",
    "ai_bot",
    "\x00",
    "a\x00b",
    "\x1b[31m",
    "ALL",
    "txt",
    "chatroom",
    "长" * 3000,
    [],
    [None],
    ["ai_bot"],
    [1, "ai_bot", None, {}],
    ["ai_bot", ["ai_bot"]],
    {},
    {"type": "txt"},
    {"type": ["txt"]},
    {"type": {"a": 1}, "msg": "hi"},
    {"em_at_list": ["ai_bot"]},
    nested(3),
    nested(MAX_NESTING + 5),
    nested(260),
]


BASES: dict[str, dict[str, Any]] = {
    "direct": callback("你好"),
    "direct_flat": callback("你好", shape="flat"),
    "group_mention": callback(
        "hi", chat_type="group", to="g1", group_id="g1", ext={"em_at_list": ["ai_bot"]}
    ),
    "group_ordinary": callback("hi", chat_type="groupchat", to="g1", group_id="g1"),
    "chatroom_flat": callback(
        shape="flat", chat_type="chatroom", to="r1", group_id="r1", ext={"em_at_list": ["ai_bot"]}
    ),
    "between_people": callback("hi bob", to="bob"),
}

# Every place the gateway reads, as a path into the callback.
PATHS: list[tuple[str | int, ...]] = [
    ("chat_type",),
    ("from",),
    ("to",),
    ("msg_id",),
    ("group_id",),
    ("payload",),
    ("payload", "type"),
    ("payload", "ext"),
    ("payload", "ext", "em_at_list"),
    ("payload", "ext", "imbot_ai"),
    ("payload", "ext", "imbot_bot"),
    ("payload", "ext", "deep"),
    ("payload", "bodies"),
    ("payload", "bodies", 0),
    ("payload", "bodies", 0, "type"),
    ("payload", "bodies", 0, "msg"),
    ("payload", "bodies", 0, "subType"),
    ("payload", "bodies", 0, "combineLevel"),
    ("payload", "bodies", 0, "addr"),
    ("payload", "bodies", 0, "url"),
    ("payload", "msg"),
    ("payload", "subType"),
]


def with_value(data: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """A copy of ``data`` with ``value`` at ``path``, creating what is missing on the way
    (a path through a value of another shape is left as it is)."""
    out = copy.deepcopy(data)
    node: Any = out
    for step, following in itertools.pairwise(path):
        if isinstance(step, int) != isinstance(node, list):
            return out
        if isinstance(node, list):
            while len(node) <= step:  # type: ignore[operator]
                node.append(None)
        elif step not in node:
            node[step] = None
        child = node[step]
        if not isinstance(child, list if isinstance(following, int) else dict):
            child = node[step] = [] if isinstance(following, int) else {}
        node = child
    last = path[-1]
    if isinstance(last, int) != isinstance(node, list):
        return out
    if isinstance(node, list):
        while len(node) <= last:  # type: ignore[operator]
            node.append(None)
    node[last] = value
    return out


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(10 if depth < 4 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -7, 2**63, 2**64 - 1, rng.randrange(-(10**12), 10**12)])
    if kind == 3:
        return rng.choice([0.5, -1e300, 1e-300, 3.0])
    if kind in (4, 5, 6):
        alphabet = "ab_#@ 长\x00\x01\x1f\x7f\u200b\ufffd\t\n" + "".join(map(chr, range(0x20, 0x7F)))
        return "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 1, 5, 70, 300])))
    if kind in (7, 8):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["type", "msg", "ext", "bodies", "em_at_list", "ai_bot", "k", "subType"]
    return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def cases() -> Iterator[tuple[str, dict[str, Any]]]:
    for base_name, base in BASES.items():
        for path in PATHS:
            for i, value in enumerate(ODD_VALUES):
                yield f"{base_name}:{'.'.join(map(str, path))}:{i}", with_value(base, path, value)
    rng = random.Random(20261208)
    names = list(BASES)
    for n in range(1500):
        data = BASES[rng.choice(names)]
        for _ in range(rng.randrange(1, 4)):
            data = with_value(data, rng.choice(PATHS), random_json(rng))
        yield f"random:{n}", data


def check_defined(data: dict[str, Any], policy: Policy = POLICY) -> None:
    """What the handler relies on: a 4xx refusal or a decision that encodes."""
    # What the gateway sees went through JSON (tuples, NaN and the like cannot arrive).
    data = orjson.loads(json.dumps(data))
    refused: CallbackRejected | None = None
    try:
        verify(data, SECRETS, window_s=300)
        decision = decide(data, policy)
    except CallbackRejected as exc:
        refused = exc
    if refused is not None:
        assert 400 <= refused.status < 500, refused.status
        assert refused.error
        assert refused.detail
        return
    message = decision.message
    if message is None:
        return
    env = decode_envelope(message.encode())
    for value, limit in (
        (env.msg_id, MSG_ID_MAX),
        (env.sender, USER_ID_MAX),
        (env.to, GROUP_ID_MAX),
        (env.call_id, CALL_ID_MAX),
    ):
        assert value is not None
        assert value.isprintable()
        assert 0 < len(value) <= limit
    text = env.content.text or ""
    assert not any(ch < " " and ch not in "\t\n\r" for ch in text)


def test_every_json_value_in_every_field_gets_a_defined_answer() -> None:
    count = 0
    for name, data in cases():
        try:
            check_defined(data)
        except Exception as exc:  # name the case that failed
            raise AssertionError(f"{name}: {type(exc).__name__}: {exc}") from exc
        count += 1
    assert count > 3000


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("payload", "type"), ["txt"]),
        (("payload", "type"), {"a": 1}),
        (("payload", "bodies", 0, "type"), ["txt"]),
        (("payload", "bodies", 0, "type"), {"t": "txt"}),
    ],
)
def test_unhashable_type_is_not_a_crash(path: tuple[str | int, ...], value: Any) -> None:
    # Was a TypeError (a list looked up in a frozenset): a 500.
    for base in (BASES["direct"], BASES["direct_flat"], BASES["group_mention"]):
        check_defined(with_value(base, path, value))


def _refused(data: dict[str, Any]) -> CallbackRejected:
    with pytest.raises(CallbackRejected) as err:
        decide(data, POLICY)
    assert err.value.status == 400
    return err.value


def test_ext_nested_beyond_the_bound_is_400_too_deep() -> None:
    # 253 levels fit Easemob's 5 KB and orjson reads them, but cannot write them back.
    for levels in (MAX_NESTING + 1, 253):
        exc = _refused(callback(ext={"deep": nested(levels)}))
        assert exc.error == "too_deep"
    assert decide(callback(ext={"deep": nested(MAX_NESTING - 1)}), POLICY).message is not None


def test_deep_body_fields_are_400_too_deep() -> None:
    body = {"type": "img", "url": "https://x/y.png", "size": nested(253)}
    assert _refused(callback(body=body)).error == "too_deep"


def test_deep_ext_on_a_message_between_people_passes() -> None:
    data = callback(to="bob", ext={"deep": nested(253)})
    assert decide(data, POLICY).message is None


@pytest.mark.parametrize("field", ["msg_id", "from", "to", "group_id", "callId"])
@pytest.mark.parametrize("bad", ["a\x00b", "a\x1fb", "a\nb", "a\u2028b", "a\x7fb"])
def test_unprintable_ids_are_400(field: str, bad: str) -> None:
    # `to` of a direct message names the bot; a group's `to` is the group id.
    base = BASES["group_mention"] if field in ("to", "group_id") else BASES["direct"]
    exc = _refused(with_value(base, (field,), bad))
    assert (exc.error, field in exc.detail) == ("invalid_field", True)


@pytest.mark.parametrize(
    ("field", "limit"),
    [
        ("msg_id", MSG_ID_MAX),
        ("from", USER_ID_MAX),
        ("to", GROUP_ID_MAX),
        ("group_id", GROUP_ID_MAX),
        ("callId", CALL_ID_MAX),
    ],
)
def test_ids_longer_than_the_limits_are_400_naming_the_field(field: str, limit: int) -> None:
    base = BASES["direct"] if field in ("msg_id", "from", "callId") else BASES["group_mention"]
    assert decide(with_value(base, (field,), "1" * limit), POLICY).message is not None
    exc = _refused(with_value(base, (field,), "1" * (limit + 1)))
    assert exc.error == "field_too_long"
    assert repr(field) in exc.detail


def test_a_5kb_msg_id_never_reaches_the_reply() -> None:
    # It used to be published, then copied into the reply's ext (imbot_reply_to).
    assert _refused(callback(msg_id="9" * 5000)).error == "field_too_long"


def test_control_characters_are_removed_from_the_text_tab_and_newlines_kept() -> None:
    message = decide(callback("a\x00b\x01c\x1b[31m\td\ne\rf\x7f"), POLICY).message
    assert message is not None
    assert decode_envelope(message.encode()).content.text == "abc[31m\td\ne\rf\x7f"


def test_location_address_is_made_storable_too() -> None:
    message = decide(callback(body={"type": "loc", "addr": "北\x00京", "lat": 1}), POLICY).message
    assert message is not None
    assert message.body.text == "北京"


@pytest.mark.parametrize(
    "change",
    [
        {"msg_id": ""},
        {"msg_id": None},
        {"msg_id": "1\x00"},
        {"msg_id": "9" * 5000},
        {"from": None},
        {"from": ["x"]},
        {"group_id": {"a": 1}},
        {"payload": "not an object"},
        {"payload": {"bodies": "nope"}},
        {"payload": {"bodies": ["a string"]}},
        {"payload": {"bodies": [{"type": "txt"}], "ext": ["a list"]}},
        {"payload": {"bodies": [{"type": "txt", "msg": "x"}], "ext": {"em_at_list": [1, None]}}},
    ],
)
def test_ordinary_group_message_with_odd_fields_passes(change: dict[str, Any]) -> None:
    # Not for the AI: only the signature fields matter. A 400 here would, with a
    # "block" fail policy, stop an ordinary message between two people.
    data = {**callback("hi", chat_type="groupchat", to="g1", group_id="g1"), **change}
    verify(data, SECRETS, window_s=300)
    assert decide(data, POLICY).message is None


@pytest.mark.parametrize("chat_type", [None, 7, ["chat"], {"a": 1}, "", "muc", "notify"])
def test_unknown_chat_type_with_odd_fields_passes(chat_type: Any) -> None:
    data = {**callback(), "chat_type": chat_type, "msg_id": None, "payload": [1]}
    assert decide(data, POLICY).message is None


def test_signature_fields_are_still_required_of_every_callback() -> None:
    data = callback("hi", chat_type="groupchat", to="g1", group_id="g1")
    data["callId"] = ["x"]
    with pytest.raises(CallbackRejected) as err:
        verify(data, SECRETS, window_s=300)
    assert err.value.status == 400


def test_huge_timestamp_is_refused_by_the_window_not_a_crash() -> None:
    call_id = "myorg#myapp_x"
    for ts in (2**64 - 1, -(2**63), 0):
        data = {**callback(), "callId": call_id, "timestamp": ts}
        data["security"] = expected_security(call_id, "test-secret", ts)
        with pytest.raises(CallbackRejected) as err:
            verify(data, SECRETS, window_s=300)
        assert err.value.error == "stale_timestamp"


def test_bot_ids_longer_than_a_user_id_are_refused_at_load(tmp_path: Any) -> None:
    path = tmp_path / "policy.yaml"
    body = "models: {demo: {provider: demo}}\nroutes: {default: {models: [demo]}}\n"
    path.write_text(f"bots: [{{id: {'b' * USER_ID_MAX}}}]\n{body}")
    assert load_policy(path).bots[0].id == "b" * USER_ID_MAX
    path.write_text(f"bots: [{{id: {'b' * (USER_ID_MAX + 1)}}}]\n{body}")
    with pytest.raises(ConfigurationError):
        load_policy(path)
    path.write_text(f'bots: [{{id: "bot\\0"}}]\n{body}')
    with pytest.raises(ConfigurationError):
        load_policy(path)
