"""End to end: an answer streamed to the user as the model writes it, through every
stage as real processes, with a demo model that writes at a realistic pace. What the
user saw is read from the simulator's client view (``/_sim/screen``)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from imbot.cli.devstack import DevStack, simulate
from imbot.core.settings import DEFAULT_POLICY_FILE
from imbot.devtools.broker import EmbeddedBroker
from tests.e2e.conftest import running_stack

# A model that takes a few seconds to write: first token after 0.3-0.5 s, then 40-60
# tokens/s, 120-160 tokens (the demo's text is CJK: about one token per character).
SLOW = {"first_token_ms": [300, 500], "tokens_per_s": [40, 60], "output_tokens": [120, 160]}


@pytest.fixture(scope="module")
def stack(
    broker: EmbeddedBroker, pg_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DevStack]:
    root: Path = tmp_path_factory.mktemp("streaming")
    policy = yaml.safe_load(DEFAULT_POLICY_FILE.read_text(encoding="utf-8"))
    for model in policy["models"].values():
        model.update(SLOW)
    policy["streaming"] = {"chunk_interval_s": 0.3, "typing_every_s": 1.0}
    with running_stack(root, broker, pg_url, policy, prefix="s", console=False) as dev:
        yield dev


def _screen(stack: DevStack, **query: Any) -> dict[str, Any]:
    response = httpx.get(f"{stack.simulator_url}/_sim/screen", params=query, timeout=40)
    response.raise_for_status()
    view: dict[str, Any] = response.json()
    return view


def _user() -> str:
    return f"u{uuid.uuid4().hex[:10]}"


def test_a_direct_answer_grows_on_the_screen_and_finishes_once(stack: DevStack) -> None:
    user = _user()
    fired = httpx.post(
        f"{stack.simulator_url}/_sim/callback",
        json={
            "from": user,
            "to": "ai_bot",
            "text": "详细解释一下量子计算的原理",
            "chat_type": "chat",
        },
    )
    fired.raise_for_status()
    # While the model writes: one stream message, not finished, already showing words.
    seen_growing = None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        items = _screen(stack, user=user)["items"]
        if items and not items[0]["finished"] and items[0]["text"]:
            seen_growing = items[0]
            break
        time.sleep(0.05)
    assert seen_growing is not None, "no words on the screen while the answer was written"
    done = _screen(stack, user=user, finished=1, timeout=30)["items"]
    [stream] = done  # one stream message, and no whole message after it
    assert stream["kind"] == "stream"
    assert stream["finished"]
    assert stream["id"] == seen_growing["id"]
    assert stream["text"].startswith(seen_growing["text"])
    assert stream["chunks"] >= 2
    assert "演示模型" in stream["text"] or "demo" in stream["text"].lower()
    time.sleep(1.0)  # a late chunk or a duplicate final record would show by now
    assert _screen(stack, user=user)["items"] == [stream]


def test_simulate_waits_for_a_streamed_answer(stack: DevStack) -> None:
    result: dict[str, Any] = simulate(stack.simulator_url, "你好", sender=_user(), timeout=30)
    [reply] = result["replies"]
    assert reply["stream"] is True
    assert reply["ext"]["imbot_reply_to"] == result["callback"]["request"]["msg_id"]


def test_a_chatroom_sees_the_bot_typing_then_gets_a_whole_message(stack: DevStack) -> None:
    room = f"r{uuid.uuid4().int % 10**12}"
    result: dict[str, Any] = simulate(
        stack.simulator_url,
        "@AI 总结一下今天的讨论",
        sender=_user(),
        chat_type="chatroom",
        group_id=room,
        timeout=30,
    )
    [reply] = result["replies"]
    assert "stream" not in reply
    items = _screen(stack, room=room)["items"]
    kinds = [i["kind"] for i in items]
    assert kinds[-1] == "message"
    assert kinds[:-1]
    assert set(kinds[:-1]) == {"typing"}
    assert all(i["action"] == "TypingBegin" for i in items[:-1])


def _ask_all(stack: DevStack, users: list[str]) -> dict[str, str]:
    """One question from each user; their msg_ids."""
    asked = {}
    for user in users:
        fired = httpx.post(
            f"{stack.simulator_url}/_sim/callback",
            json={"from": user, "to": "ai_bot", "text": "讲讲长城的历史", "chat_type": "chat"},
        )
        fired.raise_for_status()
        asked[user] = fired.json()["request"]["msg_id"]
    return asked


def _wait_streaming(stack: DevStack, users: list[str]) -> set[str]:
    """Until every user's screen shows a stream with words, or a whole message (an answer
    done before its first chunk was shown goes as one, docs/streaming.md); the users
    whose answer is streaming. Most of them must be: the tests kill a process mid-stream."""
    deadline = time.monotonic() + 30
    waiting, streaming = set(users), set()
    while waiting and time.monotonic() < deadline:
        for user in list(waiting):
            items = _screen(stack, user=user)["items"]
            if any(i["kind"] == "stream" and i["text"] for i in items):
                streaming.add(user)
                waiting.discard(user)
            elif any(i["kind"] == "message" for i in items):
                waiting.discard(user)
        time.sleep(0.05)
    screens = {user: _screen(stack, user=user)["items"] for user in waiting}
    assert not waiting, f"nothing shown: {screens}; logs in {stack.log_dir}"
    assert len(streaming) * 2 >= len(users), f"few streams: {streaming}; logs in {stack.log_dir}"
    return streaming


def _whole(
    user: str,
    streaming: set[str],
    streams: list[dict[str, Any]],
    messages: list[dict[str, Any]],
    answer: str,
) -> bool:
    """True for a user whose answer was done before any chunk was shown (not streaming
    at the kill): it came whole, once, and no stream was ever started for it."""
    if user in streaming:
        return False
    assert streams == []
    assert [m["text"] for m in messages] == [answer]
    return True


async def _answers(stack: DevStack, msg_ids: list[str]) -> dict[str, str]:
    """The answers the history recorded (what the final envelope carried)."""
    from sqlalchemy import select

    from imbot.storage import open_storage
    from imbot.storage.schema import MessageRow

    store = await open_storage(stack.env["IMBOT_DATABASE_URL"])
    try:
        async with store.database.reading() as session:
            rows = await session.execute(
                select(MessageRow.reply_to, MessageRow.text).where(MessageRow.reply_to.in_(msg_ids))
            )
            return {str(reply_to): str(text) for reply_to, text in rows}
    finally:
        await store.close()


def _seen(stack: DevStack, user: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The user's streams (once finished or ended) and messages."""
    items = _screen(stack, user=user, finished=1, timeout=60)["items"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        streams = [i for i in items if i["kind"] == "stream"]
        messages = [i for i in items if i["kind"] == "message"]
        # A stream closed early is followed by a message with the rest: wait for it.
        if all(s["finished"] for s in streams) and (
            messages or not any(s["ended"] for s in streams)
        ):
            break
        time.sleep(0.2)
        items = _screen(stack, user=user)["items"]
    time.sleep(1.0)  # anything late would show by now
    items = _screen(stack, user=user)["items"]
    return [i for i in items if i["kind"] == "stream"], [i for i in items if i["kind"] == "message"]


async def test_a_sender_killed_mid_stream_finishes_each_stream_without_repeating_it(
    stack: DevStack,
) -> None:
    users = [_user() for _ in range(6)]
    asked = _ask_all(stack, users)
    streaming = _wait_streaming(stack, users)
    stack.restart("sender")  # SIGKILL mid-stream, then start again
    seen = {user: _seen(stack, user) for user in users}
    answers = await _answers(stack, list(asked.values()))
    for user, (streams, messages) in seen.items():
        answer = answers[asked[user]]
        if _whole(user, streaming, streams, messages, answer):
            continue
        [stream] = streams  # the same stream went on: never a second one
        assert stream["finished"] or stream["ended"]
        if not messages:
            assert stream["text"] == answer  # continued and finished: the whole answer once
        else:
            # Closed early (Easemob's 30 s, or a chunk taken but unrecorded at the kill):
            # the rest as one message.
            [message] = messages
            assert answer.startswith(stream["text"].removesuffix("…"))
            assert answer.endswith(message["text"])


async def test_a_model_worker_killed_mid_stream_never_shows_a_whole_answer_twice(
    stack: DevStack,
) -> None:
    users = [_user() for _ in range(6)]
    asked = _ask_all(stack, users)
    streaming = _wait_streaming(stack, users)
    stack.restart("worker")  # the calls in flight are made again after the restart
    seen = {user: _seen(stack, user) for user in users}
    answers = await _answers(stack, list(asked.values()))
    for user, (streams, messages) in seen.items():
        answer = answers[asked[user]]
        if _whole(user, streaming, streams, messages, answer):
            continue
        [stream] = streams
        assert stream["finished"]
        if not messages:
            assert stream["text"] == answer
        else:
            # Another answer than the one streamed: the stream ended where it stood (a
            # part of the first answer), the new answer came whole, once.
            [message] = messages
            assert message["text"] == answer
            assert stream["text"].endswith("…")
            assert stream["text"] != answer
