"""The function model, and the catalog's retry, fallback and streaming rules over function
models (no HTTP): the same wrappers and chain walk a provider gets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from imbot.adapters import (
    ChatMessage,
    ChatModel,
    ChatRequest,
    Delta,
    Done,
    ImagePart,
    StreamEvent,
    UnsupportedInput,
    Usage,
    UsageEvent,
)
from imbot.adapters.function import FunctionConfig, FunctionModel, FunctionReply, function_catalog
from imbot.core.catalog import CircuitConfig, Price, RetryConfig
from imbot.core.errors import ContentRejected, FatalError, RetryableError
from imbot.core.retry import spent_attempts

REQUEST = ChatRequest(messages=(ChatMessage(role="user", content="你好"),))
FAST = FunctionConfig(
    retry=RetryConfig(max_attempts=3, base_delay_s=0.001, max_delay_s=0.002),
    circuit=CircuitConfig(failure_threshold=50),
)


def last_user_text(request: ChatRequest) -> str:
    return request.messages[-1].content


async def collect(events: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    return [event async for event in events]


async def drain(events: AsyncIterator[StreamEvent], into: list[StreamEvent]) -> None:
    """Read a stream to its end or its error, keeping what arrived."""
    async for event in events:
        into.append(event)


async def test_a_sync_function_answers_with_estimated_usage_and_cost() -> None:
    price = Price(input=1_000_000, output=2_000_000, currency="USD")  # 1 and 2 per token
    model = FunctionModel(
        lambda r: f"echo {last_user_text(r)}", name="echo", config=FunctionConfig(price=price)
    )
    assert isinstance(model, ChatModel)
    result = await model.complete(REQUEST)
    assert result.text == "echo 你好"
    assert (result.provider, result.model_id, result.finish_reason) == ("function", "echo", "stop")
    assert result.usage == Usage(input_tokens=2, output_tokens=4)  # core.tokens' estimate
    assert result.cost == 2 * 1 + 4 * 2
    assert result.currency == "USD"
    assert model.calls == [REQUEST]


async def test_an_async_function_controls_usage_and_finish_reason() -> None:
    async def answer(request: ChatRequest) -> FunctionReply:
        return FunctionReply("cut", Usage(input_tokens=100, output_tokens=7), "length")

    result = await FunctionModel(answer).complete(REQUEST)
    assert (result.text, result.finish_reason) == ("cut", "length")
    assert result.usage == Usage(input_tokens=100, output_tokens=7)


async def test_streaming_replays_the_answer_in_pieces() -> None:
    model = FunctionModel(
        lambda r: "一二三四五六七八九十壹贰", config=FunctionConfig(stream_chunk_chars=5)
    )
    events = await collect(model.stream(REQUEST))
    assert [e.text for e in events if isinstance(e, Delta)] == ["一二三四五", "六七八九十", "壹贰"]
    done = events[-1]
    assert isinstance(done, Done)
    assert done.result is not None
    assert done.result.text == "一二三四五六七八九十壹贰"
    assert done.result.first_token_ms is not None


async def test_a_stream_function_sync_or_async_yields_pieces_and_usage() -> None:
    def sync_pieces(request: ChatRequest) -> Iterator[str | Usage]:
        yield "a"
        yield "b"
        yield Usage(input_tokens=3, output_tokens=2)

    async def async_pieces(request: ChatRequest) -> AsyncIterator[str | Usage]:
        for piece in sync_pieces(request):
            yield piece

    for stream_function in (sync_pieces, async_pieces):
        model = FunctionModel(lambda r: "unused", stream_function=stream_function)
        events = await collect(model.stream(REQUEST))
        assert [type(e) for e in events] == [Delta, Delta, UsageEvent, Done]
        done = events[-1]
        assert isinstance(done, Done)
        assert done.result is not None
        assert (done.result.text, done.result.usage) == (
            "ab",
            Usage(input_tokens=3, output_tokens=2),
        )


def failing(error: Exception, *, times: int, then: str = "ok") -> FunctionModel:
    """A model that raises ``error`` on its first ``times`` calls, then answers ``then``."""

    def answer(request: ChatRequest) -> str:
        if len(model.calls) <= times:
            raise error
        return then

    model = FunctionModel(answer, name=f"fails-{times}", config=FAST)
    return model


async def test_catalog_retries_a_retryable_model_then_it_answers() -> None:
    flaky = failing(RetryableError("503"), times=2)
    catalog = function_catalog(flaky, seed=1)
    result = await catalog.complete([flaky.name], REQUEST, deadline_s=5)
    assert result.text == "ok"
    assert result.attempts == 3
    assert len(flaky.calls) == 3


async def test_catalog_falls_back_over_two_function_models() -> None:
    down = FunctionModel(_raise(RetryableError("overloaded")), name="down", config=FAST)
    backup = FunctionModel(lambda r: "from backup", name="backup", config=FAST)
    catalog = function_catalog(down, backup, seed=1)
    result = await catalog.complete(["down", "backup"], REQUEST, deadline_s=5)
    assert (result.text, result.model_id) == ("from backup", "backup")
    assert len(down.calls) == FAST.retry.max_attempts  # retried, then fell back
    assert result.attempts == FAST.retry.max_attempts + 1


async def test_a_fatal_error_falls_back_without_retrying() -> None:
    broken = FunctionModel(_raise(FatalError("bad request")), name="broken", config=FAST)
    backup = FunctionModel(lambda r: "fine", name="backup", config=FAST)
    catalog = function_catalog(broken, backup)
    result = await catalog.complete(["broken", "backup"], REQUEST, deadline_s=5)
    assert result.text == "fine"
    assert len(broken.calls) == 1


async def test_content_rejected_stops_the_chain() -> None:
    refusing = FunctionModel(_raise(ContentRejected("no", stage="input")), name="r", config=FAST)
    backup = FunctionModel(lambda r: "never", name="backup", config=FAST)
    catalog = function_catalog(refusing, backup)
    with pytest.raises(ContentRejected):
        await catalog.complete(["r", "backup"], REQUEST, deadline_s=5)
    assert backup.calls == []


async def test_an_exhausted_chain_raises_the_last_error_marked_as_retried() -> None:
    a = FunctionModel(_raise(RetryableError("a down")), name="a", config=FAST)
    b = FunctionModel(_raise(FatalError("b refuses")), name="b", config=FAST)
    catalog = function_catalog(a, b)
    with pytest.raises(FatalError, match="b refuses") as caught:
        await catalog.complete(["a", "b"], REQUEST, deadline_s=5)
    assert spent_attempts(caught.value) == FAST.retry.max_attempts + 1


async def test_stream_falls_back_before_the_first_event_only() -> None:
    def dies_at_once(request: ChatRequest) -> Iterator[str]:
        raise RetryableError("connection reset")
        yield  # pragma: no cover - makes this a generator

    def dies_midway(request: ChatRequest) -> Iterator[str]:
        yield "half"
        raise RetryableError("connection reset mid-stream")

    first = FunctionModel(lambda r: "", stream_function=dies_at_once, name="first", config=FAST)
    second = FunctionModel(lambda r: "", stream_function=dies_midway, name="second", config=FAST)
    catalog = function_catalog(first, second)
    seen: list[StreamEvent] = []
    with pytest.raises(RetryableError, match="mid-stream"):
        await drain(catalog.stream(["first", "second"], REQUEST, deadline_s=5), seen)
    assert len(first.calls) == FAST.retry.max_attempts  # retried, then fell back
    assert len(second.calls) == 1  # past its first event: no retry, no fallback
    assert [e.text for e in seen if isinstance(e, Delta)] == ["half"]


async def test_a_streamed_reply_after_retries_counts_its_attempts() -> None:
    flaky = failing(RetryableError("503"), times=1, then="streamed")
    catalog = function_catalog(flaky)
    events = await collect(catalog.stream([flaky.name], REQUEST, deadline_s=5))
    done = events[-1]
    assert isinstance(done, Done)
    assert done.result is not None
    assert (done.result.text, done.result.attempts) == ("streamed", 2)


async def test_images_skip_function_models_without_vision() -> None:
    image = ImagePart(data=b"\x89PNG\r\n\x1a\n0000", media_type="image/png")
    request = ChatRequest(messages=(ChatMessage(role="user", content="看", images=(image,)),))
    text_only = FunctionModel(lambda r: "text", name="text", config=FAST)
    seeing = FunctionModel(
        lambda r: f"{len(r.images)} image",
        name="vision",
        config=FAST.model_copy(update={"vision": True}),
    )
    catalog = function_catalog(text_only, seeing)
    result = await catalog.complete(["text", "vision"], request, deadline_s=5)
    assert result.text == "1 image"
    assert text_only.calls == []
    assert catalog.vision_models == ("vision",)
    with pytest.raises(UnsupportedInput):
        await text_only.complete(request)


def test_names_must_be_distinct() -> None:
    with pytest.raises(ValueError, match="distinct"):
        function_catalog(FunctionModel(lambda r: "a"), FunctionModel(lambda r: "b"))


def _raise(error: Exception) -> Callable[[ChatRequest], str]:
    def answer(request: ChatRequest) -> str:
        raise error

    return answer
