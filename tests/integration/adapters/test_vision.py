"""Images to vision models, against each provider's fake over real HTTP: the image reaches
the provider inline in its own format (the fake decodes it and keeps the bytes), models
without vision refuse it before any request, and a chain falls back past them.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import AsyncIterator

import httpx
import pytest

from imbot.adapters import ChatMessage, ChatRequest, ImagePart, UnsupportedInput, build_catalog
from imbot.core.errors import ConfigurationError, FatalError
from tests.fakes.providers import (
    REPLY_TEXT,
    FakeAnthropic,
    FakeDashScope,
    FakeErnie,
    FakeOllama,
    FakeOpenAI,
    FakeProvider,
    FakeSpark,
)
from tests.integration.adapters.conftest import CatalogFactory
from tests.integration.adapters.helpers import collect, entry_for


def png(width: int, height: int, rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A real PNG of one colour (built here so the test needs no image files)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    row = b"\x00" + bytes(rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


IMAGE = ImagePart(data=png(64, 48), media_type="image/png", width=64, height=48)
IMAGE_REQUEST = ChatRequest(
    messages=(
        ChatMessage(role="system", content="你是一名简洁的助手。"),
        ChatMessage(role="user", content="图里是什么？", images=(IMAGE,)),
    ),
    max_output_tokens=256,
)
VISION_FAKES = {
    "openai": FakeOpenAI,
    "anthropic": FakeAnthropic,
    "dashscope": FakeDashScope,
    "ollama": FakeOllama,
}
# Ollama's native API carries bare base64, without a media type.
SEEN_TYPE = {"openai": "image/png", "anthropic": "image/png", "dashscope": "image/png"}


@pytest.fixture(params=list(VISION_FAKES))
async def vision_fake(request: pytest.FixtureRequest) -> AsyncIterator[FakeProvider]:
    async with VISION_FAKES[request.param]() as fake:
        yield fake


def _provider(fake: FakeProvider) -> str:
    return next(name for name, cls in VISION_FAKES.items() if isinstance(fake, cls))


async def test_complete_sends_the_image_inline_in_the_providers_format(
    vision_fake: FakeProvider, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"vl": entry_for(vision_fake, vision=True)})
    result = await catalog.complete(["vl"], IMAGE_REQUEST, deadline_s=5)
    assert result.text == REPLY_TEXT
    assert vision_fake.images == [(SEEN_TYPE.get(_provider(vision_fake), ""), IMAGE.data)]


async def test_stream_sends_the_image_and_assembles_the_reply(
    vision_fake: FakeProvider, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"vl": entry_for(vision_fake, vision=True)})
    text, _, done = await collect(catalog.stream(["vl"], IMAGE_REQUEST, deadline_s=5))
    assert text == REPLY_TEXT
    assert done.result is not None
    assert done.result.usage is not None
    assert [data for _, data in vision_fake.images] == [IMAGE.data]


async def test_openai_parts_are_text_then_image_url_with_detail_when_set(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"vl": entry_for(openai_fake, vision=True, image_detail="low")})
    await catalog.complete(["vl"], IMAGE_REQUEST, deadline_s=5)
    system, user = openai_fake.requests[0].json["messages"]
    assert system == {"role": "system", "content": "你是一名简洁的助手。"}  # text stays a string
    text_part, image_part = user["content"]
    assert text_part == {"type": "text", "text": "图里是什么？"}
    assert image_part["type"] == "image_url"
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
    assert image_part["image_url"]["detail"] == "low"


async def test_anthropic_puts_images_before_the_text_and_merges_turns(
    anthropic_fake: FakeAnthropic, make_catalog: CatalogFactory
) -> None:
    second = ImagePart(data=b"\xff\xd8\xff\xe0" + b"\x00" * 32, media_type="image/jpeg")
    request = ChatRequest(
        messages=(
            ChatMessage(role="user", content="第一张", images=(IMAGE,)),
            ChatMessage(role="user", content="第二张", images=(second,)),
        )
    )
    catalog = make_catalog({"vl": entry_for(anthropic_fake, vision=True)})
    await catalog.complete(["vl"], request, deadline_s=5)
    [message] = anthropic_fake.requests[0].json["messages"]
    kinds = [(b["type"], b.get("text") or b["source"]["media_type"]) for b in message["content"]]
    assert kinds == [
        ("image", "image/png"),
        ("text", "第一张"),
        ("image", "image/jpeg"),
        ("text", "第二张"),
    ]
    assert anthropic_fake.images == [("image/png", IMAGE.data), ("image/jpeg", second.data)]


async def test_dashscope_vision_models_use_the_multimodal_endpoint(
    dashscope_fake: FakeDashScope, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"qwen-vl": entry_for(dashscope_fake, model="qwen-vl-max", vision=True)})
    result = await catalog.complete(["qwen-vl"], IMAGE_REQUEST, deadline_s=5)
    assert result.text == REPLY_TEXT  # the answer's content is a list of {"text"} parts
    sent = dashscope_fake.requests[0]
    assert sent.path == FakeDashScope.MULTIMODAL_PATH
    system, user = sent.json["input"]["messages"]
    assert system["content"] == [{"text": "你是一名简洁的助手。"}]
    assert user["content"][0]["image"].startswith("data:image/png;base64,")
    assert user["content"][1] == {"text": "图里是什么？"}
    assert "result_format" not in sent.json["parameters"]


@pytest.mark.parametrize("fake_class", [FakeErnie, FakeSpark])
async def test_providers_without_vision_refuse_images_before_any_request(
    fake_class: type[FakeProvider], make_catalog: CatalogFactory
) -> None:
    async with fake_class() as fake:
        catalog = make_catalog({"text": entry_for(fake)})
        with pytest.raises(UnsupportedInput) as caught:
            await catalog.complete(["text"], IMAGE_REQUEST, deadline_s=5)
        with pytest.raises(UnsupportedInput):
            # Directly, without the catalog's walk: the model itself refuses.
            await catalog.model("text").complete(IMAGE_REQUEST)
        assert fake.requests == []
        assert isinstance(caught.value, FatalError)
        assert caught.value.code == "unsupported_input"
        if isinstance(fake, FakeErnie):
            assert fake.token_requests == 0


@pytest.mark.parametrize("provider", ["ernie", "spark"])
def test_vision_cannot_be_switched_on_where_the_api_has_no_images(provider: str) -> None:
    entry = {
        "provider": provider,
        "vision": True,
        "price": {"input": 1, "output": 1, "currency": "CNY"},
    }
    with pytest.raises(ConfigurationError, match="vision"):
        build_catalog(
            {"m": entry}, env={"QIANFAN_AK": "a", "QIANFAN_SK": "b", "SPARK_API_PASSWORD": "c"}
        )


async def test_a_model_not_declared_vision_is_skipped_for_the_next_in_the_chain(
    ernie_fake: FakeErnie, openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog(
        {
            "ernie": entry_for(ernie_fake),
            "gpt-text": entry_for(openai_fake),  # vision off: skipped too
            "gpt-vision": entry_for(openai_fake, vision=True),
        }
    )
    result = await catalog.complete(
        ["ernie", "gpt-text", "gpt-vision"], IMAGE_REQUEST, deadline_s=5
    )
    assert result.model_id == "gpt-vision"
    assert result.attempts == 1  # the skipped models were never called
    assert ernie_fake.requests == []
    assert ernie_fake.token_requests == 0
    assert len(openai_fake.requests) == 1
    assert catalog.vision_models == ("gpt-vision",)


async def test_a_chain_of_text_models_only_ends_in_unsupported_input(
    openai_fake: FakeOpenAI, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"gpt-text": entry_for(openai_fake)})
    with pytest.raises(UnsupportedInput):
        await collect(catalog.stream(["gpt-text"], IMAGE_REQUEST, deadline_s=5))
    assert openai_fake.requests == []


async def test_demo_with_vision_answers_a_labelled_reply_about_the_image() -> None:
    catalog = build_catalog({"demo-vl": {"provider": "demo", "vision": True}}, env={})
    try:
        result = await catalog.complete(["demo-vl"], IMAGE_REQUEST, deadline_s=5)
    finally:
        await catalog.aclose()
    assert result.text.startswith("【演示模型 demo】")
    assert "1 张图片" in result.text
    assert "png" in result.text
    assert result.usage is not None
    assert result.usage.input_tokens > 85


async def test_demo_without_vision_refuses_images() -> None:
    catalog = build_catalog({"demo": {"provider": "demo"}}, env={})
    try:
        with pytest.raises(UnsupportedInput):
            await catalog.model("demo").complete(IMAGE_REQUEST)
    finally:
        await catalog.aclose()


@pytest.mark.parametrize(
    ("fake_class", "payload"),
    [
        (
            FakeOpenAI,
            {
                "model": "gpt-4o",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://a1.easemob.com/x"}}
                        ],
                    }
                ],
            },
        ),
        (
            FakeAnthropic,
            {
                "model": "claude",
                "max_tokens": 10,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {
                                    "type": "base64",
                                    "media_type": "image/bmp",
                                    "data": "AA==",
                                },
                            }
                        ],
                    }
                ],
            },
        ),
    ],
)
async def test_the_fakes_refuse_what_their_provider_refuses(
    fake_class: type[FakeProvider], payload: dict[str, object]
) -> None:
    """The fakes are strict: a URL (an Easemob link would leak our token) or a media type the
    provider does not take is a 400, as the provider answers it."""
    async with fake_class() as fake:
        path = "/chat/completions" if fake_class is FakeOpenAI else "/messages"
        async with httpx.AsyncClient() as http:
            response = await http.post(fake.base_url + path, json=payload)
        assert response.status_code == 400
        assert fake.images == []
