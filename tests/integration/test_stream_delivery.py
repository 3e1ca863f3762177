"""An answer streamed as it is written: the sender against the Easemob simulator over real
HTTP, with the real delivery ledger. Each test asserts what the user's screen shows
(the simulator's client view), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from imbot.core import topics
from imbot.core.envelope import (
    ChatType,
    Content,
    Envelope,
    Partial,
    ReplayMark,
    Reply,
    ReplyKind,
    RouteDecision,
)
from imbot.sender.service import ReplySender
from imbot.sender.stream import stream_ledger_id
from imbot.storage import Storage, open_storage
from imbot.streams.stages import SendStream
from tests.integration.conftest import new_easemob_client


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[Storage]:
    s = await open_storage(db_url)
    yield s
    await s.close()


@pytest.fixture
async def sender(simulator: str, store: Storage) -> AsyncIterator[ReplySender]:
    s = ReplySender(new_easemob_client(simulator), store.deliveries)
    yield s
    await s.aclose()


async def _screen(simulator: str, **query: Any) -> list[dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{simulator}/_sim/screen", params=query)
        response.raise_for_status()
        items: list[dict[str, Any]] = response.json()["items"]
        return items


async def _inject(simulator: str, **body: Any) -> None:
    async with httpx.AsyncClient() as http:
        (await http.post(f"{simulator}/_sim/inject", json=body)).raise_for_status()


def _env(*, chat_type: ChatType = ChatType.direct, msg_id: str | None = None) -> Envelope:
    group = chat_type is ChatType.group
    return Envelope(
        msg_id=msg_id or uuid.uuid4().hex,
        conversation_id="group:g1" if group else "chat:ai_bot:alice",
        chat_type=chat_type,
        sender="alice",
        to="g1" if group else "ai_bot",
        bot="ai_bot",
        content=Content(type="txt", text="问题"),
        route=RouteDecision(route="default", models=("demo",), live="stream"),
    )


def _chunk(env: Envelope, text: str, **changes: Any) -> Envelope:
    return env.model_copy(update={"partial": Partial(text=text), **changes})


def _final(env: Envelope, text: str, kind: ReplyKind = "answer") -> Envelope:
    return env.model_copy(update={"reply": Reply(text=text, kind=kind)})


ANSWER = "第一句话在这里。第二句话也来了！第三句是最后一句。"
FIRST, SECOND = "第一句话在这里。", "第一句话在这里。第二句话也来了！"


async def test_chunks_then_the_final_reply_show_one_stream_with_the_whole_answer(
    sender: ReplySender, simulator: str
) -> None:
    env = _env()
    assert await sender.streams.chunk(_chunk(env, FIRST)) == "sent"
    assert await sender.streams.chunk(_chunk(env, FIRST)) == "stale"  # redelivered
    assert await sender.streams.chunk(_chunk(env, SECOND)) == "sent"
    [shown] = await _screen(simulator, user="alice")
    assert (shown["kind"], shown["text"], shown["finished"]) == ("stream", SECOND, False)

    delivery = await sender.deliver(_final(env, ANSWER), deadline=_later())
    assert not delivery.duplicate
    assert delivery.easemob_msg_ids == (shown["id"],)
    [shown] = await _screen(simulator, user="alice")
    assert (shown["kind"], shown["text"], shown["finished"]) == ("stream", ANSWER, True)
    assert shown["chunks"] == 3
    assert shown["ext"]["imbot_reply_to"] == env.msg_id

    # The final record again, a late chunk: nothing more on the screen.
    assert (await sender.deliver(_final(env, ANSWER), deadline=_later())).duplicate
    assert await sender.streams.chunk(_chunk(env, ANSWER)) == "closed"
    assert await _screen(simulator, user="alice") == [shown]


async def test_a_final_reply_before_any_chunk_goes_as_a_message_and_no_stream_follows(
    sender: ReplySender, simulator: str
) -> None:
    env = _env()
    await sender.deliver(_final(env, ANSWER), deadline=_later())
    assert await sender.streams.chunk(_chunk(env, FIRST)) == "closed"
    [shown] = await _screen(simulator, user="alice")
    assert (shown["kind"], shown["text"]) == ("message", ANSWER)


async def test_a_block_while_streaming_ends_the_stream_with_the_configured_reply(
    sender: ReplySender, simulator: str
) -> None:
    env = _env(chat_type=ChatType.group)
    blocked = Reply(text="抱歉，这个回答未能通过内容审核。", kind="blocked_output")
    await sender.streams.chunk(_chunk(env, FIRST))
    await sender.streams.chunk(_chunk(env, "", reply=blocked))
    [shown] = await _screen(simulator, group="g1")
    assert (shown["text"], shown["finished"]) == (f"{FIRST}\n{blocked.text}", True)
    assert shown["ext"]["em_at_list"] == ["alice"]  # the asker, as a whole reply would
    # moderate-out blocks the final envelope too: already said, nothing more.
    final = await sender.deliver(_final(env, blocked.text, "blocked_output"), deadline=_later())
    assert final.duplicate
    assert await _screen(simulator, group="g1") == [shown]


async def test_a_failure_half_way_finishes_the_stream_with_the_fallback_reply(
    sender: ReplySender, simulator: str
) -> None:
    env = _env()
    await sender.streams.chunk(_chunk(env, FIRST))
    await sender.deliver(_final(env, "抱歉，AI 助手暂时无法回答。", "fallback"), deadline=_later())
    [shown] = await _screen(simulator, user="alice")
    assert (shown["text"], shown["finished"]) == (f"{FIRST}\n抱歉，AI 助手暂时无法回答。", True)


async def test_a_stream_easemob_closed_gets_the_rest_as_a_normal_message(
    sender: ReplySender, simulator: str
) -> None:
    env = _env()
    await _inject(simulator, stream_chunk_gap_s=0.2)  # Easemob's is 30 s
    await sender.streams.chunk(_chunk(env, FIRST))
    await asyncio.sleep(0.4)
    assert await sender.streams.chunk(_chunk(env, SECOND)) == "closed"
    await sender.deliver(_final(env, ANSWER), deadline=_later())
    stream, rest = await _screen(simulator, user="alice")
    assert (stream["kind"], stream["text"], stream["ended"]) == ("stream", FIRST, 14033)
    assert (rest["kind"], rest["text"]) == ("message", ANSWER[len(FIRST) :])
    # Redelivered: the ledgers say both went.
    assert (await sender.deliver(_final(env, ANSWER), deadline=_later())).duplicate
    assert len(await _screen(simulator, user="alice")) == 2


async def test_another_answer_than_the_one_streamed_ends_the_stream_and_goes_whole(
    sender: ReplySender, simulator: str
) -> None:
    """The model worker died mid-stream and the call was made again: the user keeps the
    beginning they read, the stream ends, and the new answer comes whole (not twice)."""
    env = _env()
    await sender.streams.chunk(_chunk(env, FIRST))
    assert await sender.streams.chunk(_chunk(env, "另一个回答的第一句。")) == "diverged"
    other = "另一个回答的第一句。第二句。"
    await sender.deliver(_final(env, other), deadline=_later())
    await sender.deliver(_final(env, other), deadline=_later())
    stream, message = await _screen(simulator, user="alice")
    assert (stream["text"], stream["finished"]) == (f"{FIRST}…", True)
    assert (message["kind"], message["text"]) == ("message", other)


async def test_a_sender_killed_holding_a_chunk_leaves_the_stream_to_the_next_one(
    store: Storage, simulator: str
) -> None:
    """A sender claimed a chunk and died before Easemob's answer: another sender (its
    replacement after the rebalance) leaves that seq alone while the claim lives, then
    finishes the same stream (same msgId, next seq) with the whole rest."""
    env = _env()
    first = ReplySender(new_easemob_client(simulator), store.deliveries, claim_lease_s=0.3)
    second = ReplySender(new_easemob_client(simulator), store.deliveries, claim_lease_s=0.3)
    try:
        assert await first.streams.chunk(_chunk(env, FIRST)) == "sent"
        claim = await store.deliveries.claim_part(
            stream_ledger_id(env.msg_id), 1, "dead-sender", lease_s=0.3, parts=0,
            target_kind="users", target="alice",
        )  # fmt: skip
        assert claim is not None  # the dead one's claim of seq 1
        assert await second.streams.chunk(_chunk(env, SECOND)) == "claimed_elsewhere"
        await asyncio.sleep(0.4)
        await second.deliver(_final(env, ANSWER), deadline=_later())
    finally:
        await first.aclose()
        await second.aclose()
    [shown] = await _screen(simulator, user="alice")
    assert (shown["text"], shown["finished"], shown["chunks"]) == (ANSWER, True, 2)


async def test_two_senders_racing_on_one_chunk_send_it_once(store: Storage, simulator: str) -> None:
    env = _env()
    senders = [ReplySender(new_easemob_client(simulator), store.deliveries) for _ in range(2)]
    try:
        outcomes = await asyncio.gather(*(s.streams.chunk(_chunk(env, FIRST)) for s in senders))
    finally:
        for s in senders:
            await s.aclose()
    assert sorted(outcomes) in (["claimed_elsewhere", "sent"], ["sent", "stale"])
    [shown] = await _screen(simulator, user="alice")
    assert (shown["text"], shown["chunks"]) == (FIRST, 1)


async def test_chatrooms_get_a_typing_indicator_and_a_whole_message(
    sender: ReplySender, simulator: str
) -> None:
    env = _env().model_copy(
        update={"chat_type": ChatType.chatroom, "to": "r1", "conversation_id": "room:r1"}
    )
    typing = env.model_copy(update={"partial": Partial(kind="typing")})
    assert await sender.streams.chunk(typing) == "typing"
    await sender.deliver(_final(env, ANSWER), deadline=_later())
    assert await sender.streams.chunk(typing) == "stale"  # the answer is there
    items = await _screen(simulator, room="r1")
    assert [i["kind"] for i in items] == ["typing", "message"]
    assert items[1]["text"] == ANSWER


async def test_a_sandboxed_replay_streams_to_the_sandbox_not_to_the_user(
    sender: ReplySender, simulator: str
) -> None:
    env = _env().model_copy(update={"replay": ReplayMark(id="r1", sandbox=True)})
    [emit] = await SendStream(sender).handle(_chunk(env, FIRST), deadline=_later())
    assert emit.topic == topics.SANDBOX
    assert await _screen(simulator, user="alice") == []


def _later() -> float:
    return time.monotonic() + 30


async def test_a_chunk_easemob_took_but_the_ledger_never_recorded_ends_the_stream(
    store: Storage, simulator: str
) -> None:
    """A sender died after Easemob took its chunk and before recording it: Easemob refuses
    that seq again (14038) and what it showed is unknown. The stream is finished, and the
    rest goes as a message from where the ledger last knew the stream to stand (it may
    repeat that one chunk: the documented uncertain window)."""
    env = _env()
    client = new_easemob_client(simulator)
    sender = ReplySender(client, store.deliveries, claim_lease_s=0.2)
    try:
        await sender.streams.chunk(_chunk(env, FIRST))
        [opened] = await _screen(simulator, user="alice")
        claim = await store.deliveries.claim_part(
            stream_ledger_id(env.msg_id), 1, "dead-sender", lease_s=0.2, parts=0,
            target_kind="users", target="alice",
        )  # fmt: skip
        assert claim is not None
        await client.send_stream_chunk(
            "user",
            sender="ai_bot",
            to="alice",
            text=SECOND[len(FIRST) :],
            seq=1,
            msg_id=opened["id"],
        )  # fmt: skip  (the dead sender's chunk: taken, never recorded)
        await asyncio.sleep(0.3)
        assert await sender.streams.chunk(_chunk(env, SECOND)) == "closed"
        await sender.deliver(_final(env, ANSWER), deadline=_later())
    finally:
        await sender.aclose()
    stream, rest = await _screen(simulator, user="alice")
    assert (stream["text"], stream["finished"]) == (f"{SECOND}…", True)
    assert (rest["kind"], rest["text"]) == ("message", ANSWER[len(FIRST) :])
