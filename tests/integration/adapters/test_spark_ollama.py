"""iFlytek Spark HTTP and Ollama's native API against their fakes."""

from __future__ import annotations

import time

import pytest

from imbot.adapters import StreamEvent
from imbot.core.errors import ConfigurationError, ContentRejected, RetryableError
from tests.fakes.providers import (
    FakeOllama,
    FakeSpark,
    Reply,
    dumps,
    json_reply,
    plain_error,
    sse,
)
from tests.integration.adapters.conftest import ENV, PRICE_CNY, CatalogFactory
from tests.integration.adapters.helpers import REQUEST, collect, deltas, drain


def spark(fake: FakeSpark) -> dict[str, object]:
    return {
        "provider": "spark",
        "model": "generalv3.5",
        "base_url": fake.base_url,
        "price": PRICE_CNY,
    }


def ollama(fake: FakeOllama) -> dict[str, object]:
    return {
        "provider": "ollama",
        "model": "qwen2.5:7b",
        "base_url": fake.base_url,
        "price": PRICE_CNY,
    }


async def test_spark_complete_without_finish_reason(
    spark_fake: FakeSpark, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"spark": spark(spark_fake)})
    result = await catalog.complete(["spark"], REQUEST, deadline_s=5)
    assert result.text == "你好！有什么可以帮你？"
    assert result.finish_reason == "stop"
    assert result.provider_request_id == "cha000b1234@dx19a0b1c2d3e4f5a6b7"
    assert result.usage is not None
    assert result.usage.output_tokens == 42
    sent = spark_fake.requests[0]
    assert sent.headers["authorization"] == f"Bearer {ENV['SPARK_API_PASSWORD']}"
    assert sent.json["user"] == "u_3f9a1c"


@pytest.mark.parametrize("space", [True, False])
async def test_spark_stream_with_either_data_spelling(
    spark_fake: FakeSpark, make_catalog: CatalogFactory, space: bool
) -> None:
    spark_fake.data_space = space
    catalog = make_catalog({"spark": spark(spark_fake)})
    text, _, done = await collect(catalog.stream(["spark"], REQUEST, deadline_s=5))
    assert text == "你好！有什么可以帮你？"
    assert done.finish_reason == "stop"
    assert done.result is not None
    assert done.result.usage is not None
    assert done.result.usage.output_tokens == 12  # from the last content chunk
    assert done.result.provider_request_id == FakeSpark.SID


async def test_spark_error_envelope_with_string_code(
    spark_fake: FakeSpark, make_catalog: CatalogFactory
) -> None:
    spark_fake.push(
        json_reply(
            {
                "error": {
                    "message": "AppIdNoAuthError (sid: cha000a9999@dx19)",
                    "type": "api_error",
                    "param": None,
                    "code": "11200",
                }
            },
            401,
        )
    )
    catalog = make_catalog({"spark": spark(spark_fake)})
    with pytest.raises(ConfigurationError, match="AppIdNoAuthError"):
        await catalog.complete(["spark"], REQUEST, deadline_s=5)


async def test_spark_input_moderation_mid_stream(
    spark_fake: FakeSpark, make_catalog: CatalogFactory
) -> None:
    spark_fake.push(
        Reply(
            frames=sse(
                [{"code": 10013, "message": "input content audit failed", "sid": "cha000x"}],
                done=False,
            ),
            content_type="text/event-stream",
        )
    )
    catalog = make_catalog({"spark": spark(spark_fake)})
    with pytest.raises(ContentRejected) as caught:
        await collect(catalog.stream(["spark"], REQUEST, deadline_s=5))
    assert caught.value.stage == "input"
    assert caught.value.request_id == "cha000x"


async def test_spark_output_moderation_after_some_content_is_raised(
    spark_fake: FakeSpark, make_catalog: CatalogFactory
) -> None:
    reply = spark_fake.success(stream=True)
    frames = list(reply.frames or ())
    withheld = {"code": 10014, "message": "output contains sensitive content", "sid": "cha000z"}
    reply.frames = [frames[0], *sse([withheld], done=False)]
    spark_fake.push(reply)
    catalog = make_catalog({"spark": spark(spark_fake)})
    received: list[StreamEvent] = []
    with pytest.raises(ContentRejected) as caught:
        await drain(catalog.stream(["spark"], REQUEST, deadline_s=5), received)
    assert deltas(received) == ["你好！"]  # the caller must discard it
    assert caught.value.stage == "output"
    assert caught.value.code == "10014"
    assert caught.value.request_id == "cha000z"
    assert len(spark_fake.requests) == 1


async def test_spark_plain_http_429_waits_for_retry_after(
    spark_fake: FakeSpark, make_catalog: CatalogFactory
) -> None:
    spark_fake.push(plain_error(429, b"Too Many Requests", headers={"retry-after": "0.2"}))
    catalog = make_catalog({"spark": spark(spark_fake)})
    started = time.monotonic()
    result = await catalog.complete(["spark"], REQUEST, deadline_s=5)
    assert result.attempts == 2
    assert time.monotonic() - started >= 0.2


async def test_ollama_complete_and_options(
    ollama_fake: FakeOllama, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"local": ollama(ollama_fake)})
    result = await catalog.complete(["local"], REQUEST, deadline_s=5)
    assert result.text == "你好！有什么可以帮你？"
    assert result.usage is not None
    assert (result.usage.input_tokens, result.usage.output_tokens) == (
        24,
        11,
    )
    assert result.provider_request_id is not None
    assert result.provider_request_id.startswith("local-")
    sent = ollama_fake.requests[0].json
    assert sent["stream"] is False  # always explicit: Ollama streams by default
    assert sent["options"] == {"temperature": 0.7, "num_predict": 512}


async def test_ollama_ndjson_stream(ollama_fake: FakeOllama, make_catalog: CatalogFactory) -> None:
    catalog = make_catalog({"local": ollama(ollama_fake)})
    text, _, done = await collect(catalog.stream(["local"], REQUEST, deadline_s=5))
    assert text == "你好！有什么可以帮你？"
    assert done.finish_reason == "stop"
    assert done.result is not None
    assert done.result.usage is not None
    assert done.result.usage.output_tokens == 11


async def test_ollama_model_not_pulled(
    ollama_fake: FakeOllama, make_catalog: CatalogFactory
) -> None:
    ollama_fake.push(
        json_reply({"error": 'model "qwen2.5:7b" not found, try pulling it first'}, 404)
    )
    catalog = make_catalog({"local": ollama(ollama_fake)})
    with pytest.raises(ConfigurationError, match="try pulling"):
        await catalog.complete(["local"], REQUEST, deadline_s=5)


async def test_ollama_error_line_mid_stream(
    ollama_fake: FakeOllama, make_catalog: CatalogFactory
) -> None:
    line = (
        dumps({"model": "m", "message": {"role": "assistant", "content": "你"}, "done": False})
        + b"\n"
    )
    ollama_fake.push(
        Reply(
            frames=[line, b'{"error":"an error was encountered while running the model"}\n'],
            content_type="application/x-ndjson",
        )
    )
    catalog = make_catalog({"local": ollama(ollama_fake)})
    with pytest.raises(RetryableError, match="running the model"):
        async for _ in catalog.stream(["local"], REQUEST, deadline_s=5):
            pass


async def test_ollama_slow_first_token_hits_the_deadline(
    ollama_fake: FakeOllama, make_catalog: CatalogFactory
) -> None:
    ollama_fake.push(*[Reply(frames=[b"{}\n"], content_type="application/x-ndjson", delay_s=3)] * 3)
    catalog = make_catalog({"local": ollama(ollama_fake)})
    with pytest.raises(RetryableError) as caught:
        await collect(catalog.stream(["local"], REQUEST, deadline_s=0.3))
    assert caught.value.code == "timeout"
