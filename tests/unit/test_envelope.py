from __future__ import annotations

import pytest

from imbot.core.envelope import (
    ChatType,
    Envelope,
    RouteDecision,
    Turn,
    Verdict,
    conversation_id,
    decode_envelope,
    encode_envelope,
)
from imbot.core.errors import UndecodableError
from tests.envelopes import direct_envelope


def _env(**changes: object) -> Envelope:
    return direct_envelope(
        "我的电话是13812345678", user="alice", msg_id="1290012345678901234", **changes
    )


def test_round_trip_keeps_every_section() -> None:
    env = _env(
        moderation_in=Verdict(action="mask", text="我的电话是[手机号]", categories=("pii.mobile",)),
        route=RouteDecision(
            route="default", models=("demo",), history=(Turn(role="user", content="hi"),)
        ),
    ).stamped("moderate-in")
    assert decode_envelope(encode_envelope(env)) == env


def test_user_text_is_the_masked_text_when_moderation_masked_it() -> None:
    assert _env().user_text == "我的电话是13812345678"
    masked = _env(moderation_in=Verdict(action="mask", text="我的电话是[手机号]"))
    assert masked.user_text == "我的电话是[手机号]"


def test_stamped_records_each_stage_without_touching_the_original() -> None:
    env = _env()
    later = env.stamped("route").stamped("model")
    assert list(later.stamps) == ["route", "model"]
    assert env.stamps == {}


@pytest.mark.parametrize(
    "raw",
    [
        None,
        b"",
        b"not json",
        b"[]",
        b'{"schema_version": 2}',
        b'{"schema_version": 1, "msg_id": "x"}',
    ],
)
def test_anything_else_is_undecodable(raw: bytes | None) -> None:
    with pytest.raises(UndecodableError):
        decode_envelope(raw)


def test_conversation_ids_follow_the_topic_key_scheme() -> None:
    assert conversation_id(ChatType.direct, bot="b", sender="u", group_id=None) == "chat:b:u"
    assert conversation_id(ChatType.group, bot="b", sender="u", group_id="g1") == "group:g1"
    assert conversation_id(ChatType.chatroom, bot="b", sender="u", group_id="r1") == "room:r1"
