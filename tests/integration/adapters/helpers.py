from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from imbot.adapters import ChatMessage, ChatRequest, Delta, Done, StreamEvent
from tests.fakes.providers import (
    FakeAnthropic,
    FakeDashScope,
    FakeErnie,
    FakeOllama,
    FakeOpenAI,
    FakeProvider,
    FakeSpark,
)

REQUEST = ChatRequest(
    messages=(
        ChatMessage(role="system", content="你是一名简洁的助手。"),
        ChatMessage(role="user", content="你好"),
    ),
    max_output_tokens=512,
    temperature=0.7,
    user_id="u_3f9a1c",
)

PRICE_USD = {"input": 0.15, "output": 0.6, "currency": "USD"}
PRICE_CNY = {"input": 0.8, "output": 2.0, "currency": "CNY"}


def entry_for(fake: FakeProvider, **extra: object) -> dict[str, object]:
    """A catalog entry pointing at ``fake`` (secrets come from conftest.ENV)."""
    base: dict[str, object]
    if isinstance(fake, FakeOpenAI):
        base = {"provider": "openai", "model": "gpt-4o-mini", "api_key_env": "OPENAI_API_KEY"}
        base["price"] = PRICE_USD
    elif isinstance(fake, FakeAnthropic):
        base = {"provider": "anthropic", "model": "claude-haiku-4-5", "price": PRICE_USD}
    elif isinstance(fake, FakeErnie):
        base = {
            "provider": "ernie",
            "model": "ERNIE-4.0-8K",
            "endpoint": "completions_pro",
            "token_url": fake.token_url,
            "price": PRICE_CNY,
        }
    elif isinstance(fake, FakeDashScope):
        base = {"provider": "dashscope", "model": "qwen-plus", "price": PRICE_CNY}
    elif isinstance(fake, FakeSpark):
        base = {"provider": "spark", "model": "generalv3.5", "price": PRICE_CNY}
    elif isinstance(fake, FakeOllama):
        base = {"provider": "ollama", "model": "qwen2.5:7b", "price": PRICE_CNY}
    else:  # pragma: no cover
        raise TypeError(type(fake).__name__)
    return {**base, "base_url": fake.base_url, **extra}


async def collect(events: AsyncIterator[StreamEvent]) -> tuple[str, list[StreamEvent], Done]:
    seen: list[StreamEvent] = [e async for e in events]
    done = seen[-1]
    assert isinstance(done, Done), seen
    text = "".join(e.text for e in seen if isinstance(e, Delta))
    return text, seen, done


def deltas(events: Sequence[StreamEvent]) -> list[str]:
    return [e.text for e in events if isinstance(e, Delta)]


async def drain(events: AsyncIterator[StreamEvent], into: list[StreamEvent]) -> None:
    """Read a stream to its end (or error), keeping what arrived."""
    async for event in events:
        into.append(event)
