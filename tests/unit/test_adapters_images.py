"""Image inputs without a network: the message type, format sniffing, per-provider token
estimates, and each provider's pure translation of an image."""

from __future__ import annotations

import base64

import orjson
import pytest

from imbot.adapters import (
    ChatMessage,
    ChatRequest,
    ImagePart,
    UnsupportedInput,
    anthropic,
    dashscope,
    estimate_image_tokens,
    image_from_bytes,
    ollama,
    openai,
    request_image_tokens,
)
from imbot.adapters.images import (
    ANTHROPIC_MAX,
    OPENAI_UNKNOWN,
    anthropic_image_tokens,
    dashscope_image_tokens,
    openai_image_tokens,
    sniff_media_type,
)
from imbot.core.catalog import (
    AnthropicConfig,
    DashScopeConfig,
    DemoConfig,
    ErnieConfig,
    OllamaConfig,
    OpenAIConfig,
)

PRICE = {"input": 1, "output": 2, "currency": "USD"}
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF" + bytes(range(40))
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
GIF = b"GIF89a" + bytes(range(10))
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + bytes(range(10))


def test_text_only_callers_are_unchanged() -> None:
    message = ChatMessage(role="user", content="你好")
    assert message.images == ()
    request = ChatRequest(messages=(message,))
    assert request.images == ()


def test_image_part_serialises_as_base64_and_never_dumps_bytes_in_repr() -> None:
    image = ImagePart(data=JPEG, media_type="image/jpeg", width=640, height=480)
    message = ChatMessage(role="user", content="看图", images=(image,))
    dumped = orjson.loads(message.model_dump_json())
    # pydantic writes URL-safe base64; only data_url() is what a provider sees.
    assert base64.urlsafe_b64decode(dumped["images"][0]["data"]) == JPEG
    assert ChatMessage.model_validate_json(message.model_dump_json()) == message
    assert "JFIF" not in repr(image)
    assert repr(image) == f"ImagePart(image/jpeg, {len(JPEG)} bytes)"
    assert image.data_url() == "data:image/jpeg;base64," + base64.b64encode(JPEG).decode()


def test_image_part_refuses_empty_data_and_unknown_types() -> None:
    with pytest.raises(ValueError, match="data"):
        ImagePart(data=b"", media_type="image/png")
    with pytest.raises(ValueError, match="media_type"):
        ImagePart.model_validate({"data": PNG, "media_type": "image/bmp"})


@pytest.mark.parametrize(
    ("data", "expected"),
    [(JPEG, "image/jpeg"), (PNG, "image/png"), (GIF, "image/gif"), (WEBP, "image/webp")],
)
def test_the_format_comes_from_the_bytes(data: bytes, expected: str) -> None:
    assert sniff_media_type(data) == expected
    image = image_from_bytes(data, width=10, height=20)
    assert (image.media_type, image.width, image.height) == (expected, 10, 20)


def test_formats_no_provider_takes_are_unsupported_input() -> None:
    heic = b"\x00\x00\x00\x18ftypheic" + bytes(20)
    assert sniff_media_type(heic) is None
    with pytest.raises(UnsupportedInput) as caught:
        image_from_bytes(heic)
    assert caught.value.code == "image_format"
    assert caught.value.reason == "bad_request"


@pytest.mark.parametrize(
    ("width", "height", "detail", "tokens"),
    [
        (None, None, "low", 85),
        (4000, 3000, "low", 85),
        (512, 512, "high", 85 + 170),  # one tile
        (1024, 1024, "high", 85 + 170 * 4),  # 768 × 768 → 2 × 2 tiles
        (2048, 4096, "high", 85 + 170 * 6),  # 1024 × 2048 → 768 × 1536 → 2 × 3
        (None, None, "auto", OPENAI_UNKNOWN),
    ],
)
def test_openai_estimate_follows_the_tile_rule(
    width: int | None, height: int | None, detail: str, tokens: int
) -> None:
    assert openai_image_tokens(width, height, detail=detail) == tokens


def test_anthropic_and_dashscope_estimates() -> None:
    assert anthropic_image_tokens(750, 100) == 100
    assert anthropic_image_tokens(4000, 4000) == ANTHROPIC_MAX  # resized, capped
    assert anthropic_image_tokens(None, None) == ANTHROPIC_MAX
    assert dashscope_image_tokens(280, 280) == 100 + 2
    assert dashscope_image_tokens(10, 10) == 4 + 2  # the minimum
    assert dashscope_image_tokens(5000, 5000) == 1280 + 2  # the maximum
    # Unknown size: the largest value the rule allows, so the reservation never falls short.
    assert dashscope_image_tokens(None, None) == max(
        dashscope_image_tokens(w, w) for w in (28, 280, 2800)
    )


def test_the_estimate_per_model_config_and_its_override() -> None:
    image = ImagePart(data=PNG, media_type="image/png", width=1024, height=1024)
    request = ChatRequest(
        messages=(ChatMessage(role="user", content="两张图", images=(image, image)),)
    )
    gpt = OpenAIConfig(provider="openai", price=PRICE, vision=True)
    assert estimate_image_tokens(gpt, image) == 85 + 170 * 4
    assert request_image_tokens(gpt, request) == 2 * (85 + 170 * 4)
    low = OpenAIConfig(provider="openai", price=PRICE, vision=True, image_detail="low")
    assert request_image_tokens(low, request) == 170
    claude = AnthropicConfig(provider="anthropic", price=PRICE, vision=True)
    assert estimate_image_tokens(claude, image) == 1399  # ceil(1024 * 1024 / 750)
    qwen = DashScopeConfig(provider="dashscope", price=PRICE, vision=True, image_tokens=500)
    assert estimate_image_tokens(qwen, image) == 500  # the operator's figure wins
    assert estimate_image_tokens(OllamaConfig(provider="ollama", price=PRICE), image) > 0
    assert estimate_image_tokens(DemoConfig(provider="demo"), image) == 85
    ernie = ErnieConfig(provider="ernie", price=PRICE)
    assert estimate_image_tokens(ernie, image) == 0  # never sent one


def _request() -> ChatRequest:
    image = ImagePart(data=PNG, media_type="image/png")
    return ChatRequest(
        messages=(
            ChatMessage(role="system", content="sys"),
            ChatMessage(role="user", content="", images=(image,)),
            ChatMessage(role="user", content="what is it?"),
        )
    )


def test_openai_translation_skips_an_empty_text_part() -> None:
    config = OpenAIConfig(provider="openai", price=PRICE, vision=True)
    body = openai.build_body(config, "gpt-4o", _request(), stream=False)
    assert body["messages"][1]["content"] == [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(PNG)}}
    ]
    assert body["messages"][2] == {"role": "user", "content": "what is it?"}


def test_anthropic_merges_an_image_turn_with_a_text_turn_into_blocks() -> None:
    config = AnthropicConfig(provider="anthropic", price=PRICE, vision=True)
    body = anthropic.build_body(config, "claude", _request(), stream=False)
    [user] = body["messages"]
    assert user["content"] == [
        {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": _b64(PNG)},
        },
        {"type": "text", "text": "what is it?"},
    ]
    assert body["system"] == "sys"


def test_dashscope_text_models_keep_string_content_and_vision_models_get_parts() -> None:
    text = dashscope.build_body(
        DashScopeConfig(provider="dashscope", price=PRICE),
        "qwen-plus",
        _text_request(),
        stream=False,
    )
    assert text["input"]["messages"][0]["content"] == "hi"
    assert text["parameters"]["result_format"] == "message"
    vision = DashScopeConfig(provider="dashscope", price=PRICE, vision=True)
    body = dashscope.build_body(vision, "qwen-vl-max", _request(), stream=True)
    assert body["input"]["messages"][1]["content"] == [
        {"image": "data:image/png;base64," + _b64(PNG)},
        {"text": ""},
    ]
    assert body["parameters"] == {"incremental_output": True}
    parsed = dashscope.parse_completion(
        {},
        orjson.dumps(
            {
                "output": {
                    "choices": [
                        {
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": [{"text": "一只猫"}]},
                        }
                    ]
                },
                "usage": {"input_tokens": 1300, "output_tokens": 3, "image_tokens": 1282},
                "request_id": "r1",
            }
        ),
    )
    assert parsed.text == "一只猫"


def test_ollama_sends_bare_base64_images() -> None:
    body = ollama.build_body(
        OllamaConfig(provider="ollama", price=PRICE, vision=True), "llava", _request(), stream=False
    )
    assert body["messages"][1] == {"role": "user", "content": "", "images": [_b64(PNG)]}
    assert "images" not in body["messages"][2]


def _text_request() -> ChatRequest:
    return ChatRequest(messages=(ChatMessage(role="user", content="hi"),))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
