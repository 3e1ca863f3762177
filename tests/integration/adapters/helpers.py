from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from adapters import ChatMessage, ChatRequest, Delta, Done, StreamEvent

REQUEST = ChatRequest(
    messages=(
        ChatMessage(role="system", content="你是一名简洁的助手。"),
        ChatMessage(role="user", content="你好"),
    ),
    max_output_tokens=512,
    temperature=0.7,
    user_id="u_3f9a1c",
)


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
