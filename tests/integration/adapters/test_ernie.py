"""Baidu ERNIE v1 against the fake: token exchange, errors under HTTP 200, is_end streams."""

from __future__ import annotations

import pytest

from core.errors import ConfigurationError, ContentRejected, FatalError, RetryableError
from tests.fakes.providers import FakeErnie, Reply, ernie_error, json_reply, sse
from tests.integration.adapters.conftest import PRICE_CNY, CatalogFactory
from tests.integration.adapters.helpers import REQUEST, collect


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


async def test_bad_secret_key_is_a_configuration_error_without_secrets(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    ernie_fake.secret_key = "another-secret"
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    with pytest.raises(ConfigurationError, match="Client authentication failed") as caught:
        await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    assert "sk-test" not in str(caught.value)


@pytest.mark.parametrize(
    ("code", "expected", "reason"),
    [
        (336003, FatalError, "bad_request"),
        (17, FatalError, "quota_exhausted"),
        (6, ConfigurationError, None),
    ],
)
async def test_errors_inside_http_200_are_classified(
    ernie_fake: FakeErnie,
    make_catalog: CatalogFactory,
    code: int,
    expected: type[Exception],
    reason: str | None,
) -> None:
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    await catalog.complete(["ernie"], REQUEST, deadline_s=5)  # get a token first
    ernie_fake.push(ernie_error(code, "error"))
    with pytest.raises(expected) as caught:
        await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    assert caught.value.code == str(code)  # type: ignore[attr-defined]
    if reason:
        assert caught.value.reason == reason  # type: ignore[attr-defined]


@pytest.mark.parametrize("code", [18, 336100, 336501, 336502])
async def test_rate_limits_and_overload_are_retried(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory, code: int
) -> None:
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    ernie_fake.push(ernie_error(code, "Rate limit reached"))
    result = await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    assert result.attempts == 2


async def test_need_clear_history_is_a_rejection_that_clears_history(
    ernie_fake: FakeErnie, make_catalog: CatalogFactory
) -> None:
    ernie_fake.extra = {"need_clear_history": True, "ban_round": -1, "result": "抱歉，我无法回答。"}
    catalog = make_catalog({"ernie": entry(ernie_fake)})
    with pytest.raises(ContentRejected) as caught:
        await catalog.complete(["ernie"], REQUEST, deadline_s=5)
    assert caught.value.clear_history
    assert caught.value.stage == "input"
    with pytest.raises(ContentRejected):
        await collect(catalog.stream(["ernie"], REQUEST, deadline_s=5))


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
