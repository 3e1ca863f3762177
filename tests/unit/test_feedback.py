"""Reading a rating out of a callback (gateway.feedback) and the policy's feedback section:
each shape an app may send, the configured words, and everything else not feedback."""

from __future__ import annotations

import random
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from imbot.core.envelope import ChatType, decode_envelope
from imbot.core.errors import ConfigurationError
from imbot.core.limits import MSG_ID_MAX
from imbot.core.settings import Bot, Feedback, Policy, load_policy
from imbot.gateway.callback import decide
from imbot.gateway.feedback import FeedbackMessage, read_feedback
from tests.payloads import callback
from tests.unit.test_gateway_input import ODD_VALUES, random_json, with_value

POLICY = Policy(bots=(Bot(id="ai_bot"), Bot(id="helper_bot")))
REPLY = "1290012345678999999"  # the bot reply's Easemob msg id


def _cmd(rating: Any = "up", reply: Any = REPLY, **options: Any) -> dict[str, Any]:
    """The cmd shape: action imbot_feedback, the fields flat in ext."""
    return callback(
        body={"type": "cmd", "action": "imbot_feedback"},
        ext={"msg_id": reply, "rating": rating},
        **options,
    )


def _custom(exts: Any, **options: Any) -> dict[str, Any]:
    return callback(body={"type": "custom", "customEvent": "imbot_feedback", **exts}, **options)


def _ext(rating: Any = "up", reply: Any = REPLY, **options: Any) -> dict[str, Any]:
    """Any message (here a text) whose ext carries imbot_feedback."""
    return callback("谢谢", ext={"imbot_feedback": {"msg_id": reply, "rating": rating}}, **options)


SHAPES: dict[str, dict[str, Any]] = {
    "cmd_flat_ext": _cmd(),
    "cmd_nested_ext": callback(
        body={"type": "cmd", "action": "imbot_feedback"},
        ext={"imbot_feedback": {"msg_id": REPLY, "rating": "up"}},
    ),
    "cmd_flat_payload": _cmd(shape="flat"),
    "custom_v2": _custom({"v2:customExts": {"msg_id": REPLY, "rating": "up"}}),
    "custom_legacy_list": _custom({"customExts": [{"msg_id": REPLY}, {"rating": "up"}]}),
    "custom_map": _custom({"customExts": {"msg_id": REPLY, "rating": "up"}}),
    "ext_on_text": _ext(),
    "ext_on_text_flat": _ext(shape="flat"),
}


def _read(data: dict[str, Any], policy: Policy = POLICY) -> FeedbackMessage | None:
    return read_feedback(data, policy)


@pytest.mark.parametrize("name", SHAPES)
def test_every_documented_shape_is_read_as_feedback(name: str) -> None:
    data = SHAPES[name]
    fb = _read(data)
    assert fb is not None
    assert (fb.msg_id, fb.reply_msg_id, fb.rating) == (data["msg_id"], REPLY, "up")
    assert (fb.sender, fb.to, fb.bot, fb.conversation_id) == (
        "alice",
        "ai_bot",
        "ai_bot",
        "chat:ai_bot:alice",
    )
    assert fb.easemob_timestamp == data["timestamp"]


@pytest.mark.parametrize(
    ("word", "rating"),
    [
        ("up", "up"),
        ("UP", "up"),
        (" up ", "up"),
        ("👍", "up"),
        ("👍\ufe0f", "up"),  # emoji presentation selector
        ("👍🏽", "up"),  # a skin tone
        ("有用", "up"),
        ("down", "down"),
        ("👎", "down"),
        ("👎🏿", "down"),
        ("没用", "down"),
    ],
)
def test_the_configured_words_and_emoji_give_their_rating(word: str, rating: str) -> None:
    fb = _read(_cmd(word))
    assert fb is not None
    assert fb.rating == rating


@pytest.mark.parametrize(
    "data",
    [
        _cmd("meh"),  # not a configured word
        _cmd(""),
        _cmd(1),
        _cmd(None),
        _cmd(["up"]),
        _cmd("up" * 100),
        _cmd(reply=""),
        _cmd(reply=None),
        _cmd(reply="x" * (MSG_ID_MAX + 1)),  # longer than any Easemob msg id we admit
        _cmd(reply="12\x0034"),  # unprintable
        _cmd(reply={"id": REPLY}),
        _cmd(reply=True),
        _cmd(sender="ai_bot"),  # the bot's own message
        _cmd(to="bob"),  # between people, not to a bot
        _cmd(msg_id="9" * (MSG_ID_MAX + 1)),
        callback(body={"type": "cmd", "action": "TypingBegin"}, ext={"msg_id": REPLY}),
        callback(body={"type": "custom", "customEvent": "other"}, ext={"rating": "up"}),
        callback("👍"),  # a bare thumbs-up text names no reply: an ordinary message
        callback("hi", ext={"imbot_feedback": "up"}),
        callback("hi", ext={"imbot_feedback": [REPLY, "up"]}),
    ],
    ids=lambda data: str(data["payload"])[:60],
)
def test_anything_else_is_not_feedback(data: dict[str, Any]) -> None:
    assert _read(data) is None


def test_a_direct_text_with_a_broken_rating_stays_an_ordinary_ai_message() -> None:
    data = _ext(rating="meh")
    assert _read(data) is None
    assert decide(data, POLICY).message is not None  # answered like any question


def test_a_group_rating_belongs_to_the_groups_conversation() -> None:
    fb = _read(_cmd(chat_type="groupchat", to="g42", group_id="g42"))
    assert fb is not None
    assert (fb.chat_type, fb.to, fb.conversation_id) == (ChatType.group, "g42", "group:g42")
    room = _read(_cmd(chat_type="chatroom", to="r7", group_id="r7"))
    assert room is not None
    assert (room.chat_type, room.conversation_id) == (ChatType.chatroom, "room:r7")


def test_the_record_is_an_envelope_carrying_only_ids_the_rating_and_times() -> None:
    data = _ext("👍")
    fb = _read(data)
    assert fb is not None
    raw = fb.encode(received_at=1.0)
    env = decode_envelope(raw)
    assert env.msg_id == data["msg_id"]
    assert env.content.body == {"reply_msg_id": REPLY, "rating": "up"}
    assert (env.sender, env.conversation_id, env.easemob_timestamp, env.received_at) == (
        "alice",
        "chat:ai_bot:alice",
        data["timestamp"],
        1.0,
    )
    assert "谢谢".encode() not in raw  # never the message's text
    assert env.ext == {}


def test_shapes_can_be_renamed_or_turned_off_in_the_policy() -> None:
    renamed = Policy(
        feedback=Feedback(
            cmd_action="rate",
            custom_event=None,
            ext_key=None,
            msg_id_field="reply",
            rating_field="score",
            ratings={"good": ("+1",), "bad": ("-1",)},
        )
    )
    data = callback(body={"type": "cmd", "action": "rate"}, ext={"reply": REPLY, "score": "+1"})
    fb = _read(data, renamed)
    assert fb is not None
    assert fb.rating == "good"
    assert _read(SHAPES["custom_v2"], renamed) is None
    assert _read(SHAPES["ext_on_text"], renamed) is None
    assert _read(SHAPES["cmd_flat_ext"], renamed) is None  # the old action is nobody's now
    off = Policy(feedback=Feedback(enabled=False))
    assert all(_read(data, off) is None for data in SHAPES.values())


def test_the_policy_file_sets_the_feedback_section(tmp_path: Any) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "models": {"demo": {"provider": "demo"}},
                "routes": {"default": {"models": ["demo"]}},
                "feedback": {"ext_key": "rate_it", "ratings": {"up": ["🆗"], "down": ["🙅"]}},
            },
            allow_unicode=True,
        ),
        encoding="utf-8",
    )
    feedback = load_policy(path).feedback
    assert feedback.ext_key == "rate_it"
    assert (feedback.rating_of("🆗"), feedback.rating_of("👍"), feedback.rating_of("down")) == (
        "up",
        None,
        "down",
    )


@pytest.mark.parametrize(
    "ratings",
    [
        {"up": ("好",), "down": ("好",)},  # one word, two ratings
        {"up": ("👍",), "down": ("👍🏽",)},  # the same emoji with a skin tone
        {"Up!": ("x",)},  # a rating name is a short label, not free text
        {"up": ("",)},
        {},
    ],
)
def test_an_ambiguous_or_odd_rating_table_is_refused(ratings: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Feedback(ratings=ratings)


def test_a_bad_feedback_section_names_the_policy_file(tmp_path: Any) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("feedback: {ratings: {up: [x], down: [x]}}\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="feedback"):
        load_policy(path)


FEEDBACK_PATHS: list[tuple[str | int, ...]] = [
    ("payload", "ext"),
    ("payload", "ext", "msg_id"),
    ("payload", "ext", "rating"),
    ("payload", "ext", "imbot_feedback"),
    ("payload", "ext", "imbot_feedback", "msg_id"),
    ("payload", "ext", "imbot_feedback", "rating"),
    ("payload", "bodies", 0),
    ("payload", "bodies", 0, "type"),
    ("payload", "bodies", 0, "action"),
    ("payload", "bodies", 0, "customEvent"),
    ("payload", "bodies", 0, "customExts"),
    ("payload", "bodies", 0, "v2:customExts"),
    ("payload", "bodies", 0, "v2:customExts", "rating"),
    ("payload", "bodies"),
    ("payload", "type"),
    ("payload",),
    ("chat_type",),
    ("from",),
    ("to",),
    ("msg_id",),
    ("group_id",),
    ("callId",),
    ("timestamp",),
]


def test_any_json_value_anywhere_gives_feedback_or_none_never_an_error() -> None:
    seen = 0
    for data in SHAPES.values():
        for path in FEEDBACK_PATHS:
            for value in ODD_VALUES:
                fb = _read(with_value(data, path, value))
                seen += fb is not None
    rng = random.Random(20261208)
    for _ in range(1500):
        data = rng.choice(list(SHAPES.values()))
        for _ in range(rng.randrange(1, 4)):
            data = with_value(data, rng.choice(FEEDBACK_PATHS), random_json(rng))
        fb = _read(data)
        if fb is not None:  # what is read is always bounded and one of the ratings
            assert fb.rating in ("up", "down")
            assert 0 < len(fb.reply_msg_id) <= MSG_ID_MAX
            assert fb.reply_msg_id.isprintable()
            decode_envelope(fb.encode())
    assert seen > 0  # the odd values that leave a rating whole still give one
