from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from imbot.core.envelope import ChatType, Envelope, decode_envelope, encode_envelope
from imbot.core.settings import AiRules, Bot, Policy
from imbot.core.signature import expected_security, verify_signature
from imbot.gateway.callback import CallbackRejected, decide, normalise_content, verify
from imbot.simulator.callbacks import Shape
from tests.payloads import callback

SECRETS = ["test-secret", "old-secret"]
POLICY = Policy(bots=(Bot(id="ai_bot"), Bot(id="helper_bot")))


def _envelope(data: dict[str, Any], policy: Policy) -> Envelope | None:
    """The envelope the gateway would publish for ``data``, or None when it is not for the AI."""
    message = decide(data, policy).message
    return None if message is None else decode_envelope(message.encode())


@pytest.mark.parametrize(
    ("call_id", "secret", "timestamp", "security"),
    [
        (
            "easemob-demo#test_0990a64f-dp01-6c50-8696-cf3b48b20e7e",
            "123456",
            1600060847294,
            "d4840ca528ea49e01cfbacb970d91a64",
        ),
        (
            "orgname#appname_966475585536657404",
            "s3cr3t",
            1642589932646,
            "a4155932eb2e64df2508b1709038af3c",
        ),
        (
            "XXXX-XXXX#test_0990a64f-XXXX-XXXX-8696-cf3b48b20e7e",
            "a1b2c3d4e5f6",
            1600060847294,
            "cd065726a1d0e86aaa8195dafe2c3ef9",
        ),
    ],
)
def test_signature_matches_reference_vectors(
    call_id: str, secret: str, timestamp: int, security: str
) -> None:
    assert expected_security(call_id, secret, timestamp) == security
    assert verify_signature(call_id, timestamp, security.upper(), ["other", secret])
    assert not verify_signature(call_id, timestamp + 1, security, [secret])


def test_any_configured_secret_is_accepted_for_rotation() -> None:
    verify(callback(secret="old-secret"), SECRETS, window_s=0)
    verify(callback(secret="test-secret"), SECRETS, window_s=0)


def test_wrong_secret_is_rejected_with_401() -> None:
    with pytest.raises(CallbackRejected) as err:
        verify(callback(secret="nope"), SECRETS, window_s=0)
    assert (err.value.status, err.value.error) == (401, "bad_signature")


def test_tampered_timestamp_breaks_the_signature() -> None:
    data = callback()
    data["timestamp"] += 1
    with pytest.raises(CallbackRejected) as err:
        verify(data, SECRETS, window_s=0)
    assert err.value.status == 401


@pytest.mark.parametrize("field", ["callId", "timestamp", "security"])
def test_missing_signed_fields_are_400(field: str) -> None:
    data = callback()
    del data[field]
    with pytest.raises(CallbackRejected) as err:
        verify(data, SECRETS, window_s=0)
    assert (err.value.status, err.value.error) == (400, "missing_field")


def test_timestamp_window_rejects_replays() -> None:
    old = callback(timestamp=int((time.time() - 3600) * 1000))
    verify(old, SECRETS, window_s=0)  # off by default
    with pytest.raises(CallbackRejected) as err:
        verify(old, SECRETS, window_s=300)
    assert err.value.error == "stale_timestamp"
    verify(callback(), SECRETS, window_s=300)


@pytest.mark.parametrize("shape", ["bodies", "flat"])
def test_both_payload_shapes_give_the_same_content(shape: Shape) -> None:
    data = callback("你好", shape=shape, ext={"k": "v"})
    content, ext = normalise_content(data["payload"])
    assert content is not None
    assert (content.type, content.text, ext) == ("txt", "你好", {"k": "v"})


def test_empty_bodies_is_no_content() -> None:
    assert normalise_content({"bodies": [], "ext": {}}) == (None, {})


def test_image_body_keeps_its_fields() -> None:
    content, _ = normalise_content({"type": "img", "url": "https://x/y.png", "filename": "y.png"})
    assert content is not None
    assert content.type == "img"
    assert content.fields["url"] == "https://x/y.png"


def test_combined_message_without_type_is_recognised() -> None:
    content, _ = normalise_content(
        {"subType": "sub_combine", "title": "聊天记录", "combineLevel": 1}
    )
    assert content is not None
    assert content.type == "combine"


def test_direct_message_to_bot_is_ai() -> None:
    env = _envelope(callback("你好"), POLICY)
    assert env is not None
    assert (env.chat_type, env.bot, env.conversation_id, env.content.text) == (
        ChatType.direct,
        "ai_bot",
        "chat:ai_bot:alice",
        "你好",
    )


def test_direct_message_between_people_is_not_ai() -> None:
    assert _envelope(callback(to="bob"), POLICY) is None


def test_message_from_a_bot_is_never_ai() -> None:
    assert _envelope(callback(sender="ai_bot", to="helper_bot"), POLICY) is None


@pytest.mark.parametrize("chat_type", ["group", "groupchat"])
def test_group_message_mentioning_bot_is_ai(chat_type: str) -> None:
    data = callback(
        "@AI 帮我总结一下",
        chat_type=chat_type,
        to="2289781",
        group_id="2289781",
        ext={"em_at_list": ["ai_bot"]},
    )
    env = _envelope(data, POLICY)
    assert env is not None
    assert (env.chat_type, env.conversation_id, env.to) == (
        ChatType.group,
        "group:2289781",
        "2289781",
    )


def test_group_message_without_mention_is_not_ai() -> None:
    data = callback(
        chat_type="groupchat", to="2289781", group_id="2289781", ext={"em_at_list": ["bob"]}
    )
    assert _envelope(data, POLICY) is None


def test_mention_all_counts_only_when_configured() -> None:
    data = callback(chat_type="group", to="g1", group_id="g1", ext={"em_at_list": "ALL"})
    assert _envelope(data, POLICY) is None
    policy = POLICY.model_copy(update={"ai": AiRules(mention_all=True)})
    assert _envelope(data, policy) is not None


def test_chatroom_message_mentioning_bot_is_ai() -> None:
    data = callback(
        shape="flat",
        chat_type="chatroom",
        to="1851453",
        group_id="1851453",
        ext={"em_at_list": ["ai_bot"]},
    )
    env = _envelope(data, POLICY)
    assert env is not None
    assert (env.chat_type, env.conversation_id) == (ChatType.chatroom, "room:1851453")


def test_groupchat_with_chatroom_payload_type_is_a_chatroom() -> None:
    data = callback(chat_type="groupchat", to="r1", group_id="r1", ext={"em_at_list": ["ai_bot"]})
    data["payload"]["type"] = "chatroom"
    env = _envelope(data, POLICY)
    assert env is not None
    assert env.chat_type is ChatType.chatroom


EXT_FLAG = POLICY.model_copy(update={"ai": AiRules(ext_flag="imbot_ai")})


def test_ext_flag_marks_any_message_as_ai_when_configured() -> None:
    data = callback(to="bob", ext={"imbot_ai": True, "imbot_bot": "helper_bot"})
    env = _envelope(data, EXT_FLAG)
    assert env is not None
    assert env.bot == "helper_bot"


def test_ext_flag_is_off_by_default() -> None:
    # Any client can set ext: by default a key there must not make the bot answer.
    data = callback(to="bob", ext={"imbot_ai": True, "imbot_bot": "helper_bot"})
    assert _envelope(data, Policy()) is None
    assert _envelope(data, POLICY) is None


@pytest.mark.parametrize("chat_type", ["recall", "read_ack", "edit", "roster"])
def test_post_send_event_types_pass_untouched(chat_type: str) -> None:
    assert _envelope(callback(chat_type=chat_type), POLICY) is None


def test_cmd_messages_are_not_answered() -> None:
    assert _envelope(callback(body={"type": "cmd", "action": "TypingBegin"}), POLICY) is None


def test_text_body_without_msg_is_400() -> None:
    with pytest.raises(CallbackRejected) as err:
        decide(callback(body={"type": "txt"}), POLICY)
    assert err.value.status == 400


def test_numeric_msg_id_is_kept_as_string() -> None:
    data = callback()
    data["msg_id"] = 1290012345678901234
    env = _envelope(data, POLICY)
    assert env is not None
    assert env.msg_id == "1290012345678901234"


@pytest.mark.parametrize("field", ["from", "msg_id"])
def test_missing_message_fields_are_400(field: str) -> None:
    data = callback()
    del data[field]
    with pytest.raises(CallbackRejected) as err:
        decide(data, POLICY)
    assert (err.value.status, err.value.error) == (400, "missing_field")


def test_body_type_not_listed_in_policy_is_not_ai() -> None:
    text_only = POLICY.model_copy(update={"ai": AiRules(body_types=("txt",))})
    image = callback(body={"type": "img", "url": "https://x/y.png"})
    decision = decide(image, text_only)
    assert (decision.message, decision.reason) == (None, "body_type")
    assert decide(callback("你好"), text_only).message is not None
    # The default policy lists images: they reach the pipeline (which answers `unsupported`).
    assert decide(image, POLICY).message is not None


def test_custom_body_is_not_ai_by_default() -> None:
    decision = decide(callback(body={"type": "custom", "customEvent": "gift"}), POLICY)
    assert (decision.message, decision.reason) == (None, "body_type")


_GROUP: dict[str, Any] = {
    "chat_type": "group",
    "to": "g1",
    "group_id": "g1",
    "ext": {"em_at_list": ["ai_bot"]},
}


@pytest.mark.parametrize(
    "data",
    [
        callback("你好"),
        callback("hi", shape="flat"),
        callback("总结一下", **_GROUP),
        callback(chat_type="chatroom", to="r1", group_id="r1", ext={"em_at_list": ["ai_bot"]}),
        callback(body={"type": "img", "url": "https://x/y.png", "secret": None}),
        callback(body={"type": "loc", "addr": "北京", "lat": 39.9, "lng": 116.4}),
        callback(to="bob", ext={"imbot_ai": True, "nested": {"a": [1, None, "x"]}}),
    ],
    ids=["text", "flat", "group", "chatroom", "image", "location", "ext"],
)
def test_published_bytes_are_the_envelope_pydantic_would_write(data: dict[str, Any]) -> None:
    # The gateway writes the envelope's JSON with orjson (hot path); it must stay
    # exactly what the pydantic model encodes and what every stage decodes.
    message = decide(data, EXT_FLAG).message
    assert message is not None
    fast = message.encode(received_at=1_700_000_000_123.5)
    model = message.envelope(received_at=1_700_000_000_123.5)
    assert orjson.loads(fast) == orjson.loads(encode_envelope(model))
    assert decode_envelope(fast) == model


def test_numeric_call_id_is_published_as_the_string_that_was_signed() -> None:
    data = callback()
    data["callId"] = 12345
    message = decide(data, POLICY).message
    assert message is not None
    assert decode_envelope(message.encode()).call_id == "12345"


def test_direct_message_without_to_is_not_ai() -> None:
    data = callback()
    del data["to"]
    assert decide(data, POLICY).message is None
