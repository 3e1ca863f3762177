"""Baidu ERNIE v1 against the fake: token exchange, errors under HTTP 200, is_end streams."""

from __future__ import annotations

import pytest

from imbot.adapters import StreamEvent
from imbot.core.errors import ConfigurationError, ContentRejected, FatalError, RetryableError
from tests.fakes.providers import FakeErnie, Reply, ernie_error, json_reply, plain_error, sse
from tests.integration.adapters.conftest import PRICE_CNY, CatalogFactory
from tests.integration.adapters.helpers import REQUEST, collect, deltas, drain


def entry(fake: FakeErnie, **extra: object) -> dict[str, object]:
    return {
        "provider": "ernie",
        "model": "ERNIE-4.0-8K",
        "endpoint": "completions_pro",
        "base_url": fake.base_url,
        "token_url": fake.token_url,
        "price": PRICE_CNY,
        **extra,
    }


async def test_token_is_exchanged_once_and_reused(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    first = await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    second = await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    assert first.text == second.text == "你好！有什么可以帮你？"
    assert first.provider_request_id == "as-8fq2k1x0ab"
    assert first.usage is not None
    assert first.usage.input_tokens == 14
    assert first.cost == pytest.approx((14 * 0.8 + 86 * 2.0) / 1e6)
    assert first.currency == "CNY"
    assert ernie_fake.tokens_issued == 1
    sent = ernie_fake.requests[0]
    assert sent.path.endswith("/chat/completions_pro")
    assert sent.json["system"] == "你是一名简洁的助手。"
    assert sent.json["messages"] == [{"role": "user", "content": "你好"}]
    assert sent.json["user_id"] == "u_3f9a1c"
    assert sent.json["max_output_tokens"] == 512


async def test_expired_token_is_refreshed_and_the_call_retried_once(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    ernie_fake.expire_tokens()
    result = await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    assert result.text == "你好！有什么可以帮你？"
    assert result.attempts == 1  # the refresh is inside the adapter, not a catalog retry
    assert ernie_fake.tokens_issued == 2


async def test_access_token_110_is_refreshed_and_the_call_retried_once(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    ernie_fake.push(ernie_error(110, "Access token invalid or no longer valid"))
    result = await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    assert result.text == "你好！有什么可以帮你？"
    assert result.attempts == 1
    assert ernie_fake.tokens_issued == 2
    tokens = [r.query["access_token"] for r in ernie_fake.requests]
    assert len(tokens) == 2
    assert tokens[0] != tokens[1]  # the retry carried the new token


async def test_expired_token_on_a_stream_is_refreshed(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    ernie_fake.expire_tokens()  # the fake answers the stream with a JSON 111 body
    text, _, done = await collect(catalog.stream(["ernie"], REQUEST, deadline_s=5))
    assert text == "你好！有什么可以帮你？"
    assert done.result is not None
    assert done.result.attempts == 1
    assert ernie_fake.tokens_issued == 2


async def test_token_refresh_that_fails_is_a_configuration_error(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    ernie_fake.expire_tokens()
    ernie_fake.secret_key = "rotated-by-someone"  # the refresh itself is refused
    with pytest.raises(ConfigurationError, match="Client authentication failed"):
        await catalog.complete(["ernie"], REQUEST, deadline_s=5)


async def test_token_still_refused_after_a_refresh_is_not_refreshed_again(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    ernie_fake.push(ernie_error(111, "Access token expired"), ernie_error(110, "invalid"))
    with pytest.raises(ConfigurationError) as caught:
        await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    assert caught.value.code == "110"
    assert ernie_fake.tokens_issued == 2  # one exchange, one refresh, no loop
    assert "24." not in str(caught.value)  # no token in the message


async def test_bad_api_key_is_a_configuration_error(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    ernie_fake.api_key = "another-client"
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    with pytest.raises(ConfigurationError, match="unknown client id") as caught:
        await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    assert caught.value.code == "invalid_client"
    assert ernie_fake.token_requests == 1  # not retried
    assert ernie_fake.requests == []  # the chat endpoint was never called


@pytest.mark.parametrize(
    "reply",
    [plain_error(500), plain_error(503), Reply(body=b"", status=200), plain_error(429)],
    ids=["500", "503", "empty-200", "429"],
)
async def test_token_endpoint_failure_is_retried(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory, reply: Reply
) -> None:
    ernie_fake.push_token(reply)
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    result = await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    assert result.text == "你好！有什么可以帮你？"
    assert result.attempts == 2
    assert ernie_fake.token_requests == 2


async def test_token_endpoint_down_for_good_is_a_retryable_error(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    ernie_fake.push_token(*[plain_error(502)] * 3)
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    with pytest.raises(RetryableError) as caught:
        await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    assert caught.value.status == 502
    assert ernie_fake.requests == []


async def test_bad_secret_key_is_a_configuration_error_without_secrets(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    ernie_fake.secret_key = "another-secret"
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    with pytest.raises(ConfigurationError, match="Client authentication failed") as caught:
        await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    assert "sk-test" not in str(caught.value)


async def test_need_clear_history_is_a_rejection_that_clears_history(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    ernie_fake.extra = {"need_clear_history": True, "ban_round": -1, "result": "抱歉，我无法回答。"}
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    with pytest.raises(ContentRejected) as caught:
        await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    assert caught.value.clear_history
    assert caught.value.stage == "input"
    assert caught.value.code == "need_clear_history"
    assert "ban_round=-1" in caught.value.message
    assert caught.value.request_id == "as-8fq2k1x0ab"
    with pytest.raises(ContentRejected):
        await collect(catalog.stream(["ernie"], REQUEST, deadline_s=5))
    assert len(ernie_fake.requests) == 2  # neither was retried


async def test_need_clear_history_on_the_last_frame_after_text_is_raised(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    risky = {**ernie_fake.frame(1, "……", end=True), "need_clear_history": True, "ban_round": -1}
    frames = sse([ernie_fake.frame(0, "北京是", end=False), risky], done=False)
    ernie_fake.push(Reply(frames=frames, content_type="text/event-stream"))
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    received: list[StreamEvent] = []
    with pytest.raises(ContentRejected) as caught:
        await drain(catalog.stream(["ernie"], REQUEST, deadline_s=5), received)
    assert deltas(received) == ["北京是"]  # the caller must discard it
    assert caught.value.clear_history


@pytest.mark.parametrize(
    ("extra", "safety"),
    [
        ({"flag": 1, "ban_round": -1}, {"flag": 1, "ban_round": -1}),
        ({"finish_reason": "content_filter", "result": "北京是**"}, {}),
    ],
    ids=["flag", "finish_reason"],
)
async def test_safety_signals_in_a_200_are_a_content_filter_result(
    ernie_fake: FakeErnie,
    make_catalog: CatalogFactory,
    extra: dict[str, object],
    safety: dict[str, object],
) -> None:
    ernie_fake.extra = extra
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    result = await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    _, _, done = await collect(catalog.stream(["ernie"], REQUEST, deadline_s=5))
    assert result.finish_reason == done.finish_reason == "content_filter"
    assert done.result is not None
    assert result.safety == done.result.safety == safety


async def test_stream_ends_on_is_end_without_done_sentinel(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    text, _, done = await collect(catalog.stream(["ernie"], REQUEST, deadline_s=5))
    assert text == "你好！有什么可以帮你？"
    assert done.finish_reason == "stop"
    assert done.raw_finish_reason == "normal"
    assert done.result is not None
    assert done.result.usage is not None
    assert done.result.usage.output_tokens == 86


async def test_json_error_body_answering_a_stream_request(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    ernie_fake.push(ernie_error(336003, "the number of messages should be odd"))
    with pytest.raises(FatalError, match="odd"):
        await collect(catalog.stream(["ernie"], REQUEST, deadline_s=5))


async def test_bare_json_error_line_inside_a_stream(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    frames = [*sse([ernie_fake.frame(0, "北京是", end=False)], done=False)]
    frames.append(b'{"error_code":336100,"error_msg":"Server high load"}\n')
    ernie_fake.push(Reply(frames=frames, content_type="text/event-stream"))
    with pytest.raises(RetryableError, match="high load"):
        async for _ in catalog.stream(["ernie"], REQUEST, deadline_s=5):
            pass


async def test_stream_closed_before_is_end_is_retried(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    ernie_fake.push(
        Reply(
            frames=sse([ernie_fake.frame(0, "", end=False)], done=False),
            content_type="text/event-stream",
        )
    )
    text, _, done = await collect(catalog.stream(["ernie"], REQUEST, deadline_s=5))
    assert text == "你好！有什么可以帮你？"
    assert done.result is not None
    assert done.result.attempts == 2


async def test_malformed_body_is_retried(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    ernie_fake.push(json_reply({"unexpected": True}))
    result = await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    assert result.attempts == 2
