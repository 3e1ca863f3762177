"""Stream messages and typing indicators, end to end over real HTTP: the simulator's stream
endpoints (reference §3.6) and client view, and ``EasemobClient``'s stream and typing calls
with their error classes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from imbot.core.errors import FatalError, RetryableError
from imbot.sender.easemob import (
    ChunkAlreadySent,
    EasemobClient,
    StreamClosed,
    classify_stream,
)

ORG_APP = "/demo-org/demo-app"


@pytest.fixture
async def admin(simulator: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=simulator) as http:
        yield http


async def _inject(admin: httpx.AsyncClient, **body: Any) -> None:
    (await admin.post("/_sim/inject", json=body)).raise_for_status()


async def _screen(admin: httpx.AsyncClient, **query: Any) -> dict[str, Any]:
    response = await admin.get("/_sim/screen", params=query)
    response.raise_for_status()
    view: dict[str, Any] = response.json()
    return view


async def _streams(admin: httpx.AsyncClient, **query: Any) -> list[dict[str, Any]]:
    return [i for i in (await _screen(admin, **query))["items"] if i["kind"] == "stream"]


async def _open(client: EasemobClient, to: str = "alice", text: str = "Hello") -> str:
    return await client.send_stream_chunk("user", sender="ai_bot", to=to, text=text, seq=0)


async def _raw_chunk(admin: httpx.AsyncClient, client: EasemobClient, body: Any) -> httpx.Response:
    token = await client.token()
    return await admin.post(
        f"{ORG_APP}/stream_message/user",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
    )


# -- what the user sees ---------------------------------------------------------


async def test_chunks_grow_one_message_on_the_screen_until_it_finishes(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await client.send_text("users", sender="ai_bot", to="alice", text="earlier answer")
    msg_id = await client.send_stream_chunk(
        "user",
        sender="ai_bot",
        to="alice",
        text="# Weather\n",
        seq=0,
        markdown=True,
        ext={"imbot_reply_to": "42"},
    )
    assert msg_id.isdigit()
    shown = ["# Weather\n"]
    for seq, part in enumerate(["Sunny, ", "26°C."], start=1):
        [stream] = await _streams(admin, user="alice")
        assert (stream["text"], stream["finished"]) == ("".join(shown), False)
        finish = seq == 2
        same = await client.send_stream_chunk(
            "user",
            sender="ai_bot",
            to="alice",
            text=part,
            seq=seq,
            msg_id=msg_id,
            finish=finish,
            finish_reason=1 if finish else None,
        )
        assert same == msg_id
        shown.append(part)

    view = await _screen(admin, user="alice")
    earlier, stream = view["items"]
    assert (earlier["kind"], earlier["text"]) == ("message", "earlier answer")
    assert stream["kind"] == "stream"
    assert stream["id"] == msg_id
    assert stream["text"] == "# Weather\nSunny, 26°C."
    assert (stream["finished"], stream["finish_reason"], stream["ended"]) == (True, 1, None)
    assert (stream["format"], stream["ext"], stream["chunks"], stream["seq"]) == (
        "markdown",
        {"imbot_reply_to": "42"},
        3,
        2,
    )
    assert (await _screen(admin, user="bob"))["items"] == []
    # A stream is not a REST message: /_sim/messages keeps listing those only.
    messages = (await admin.get("/_sim/messages", params={"to": "alice"})).json()["messages"]
    assert [m["body"]["msg"] for m in messages] == ["earlier answer"]


async def test_group_stream_shows_in_the_group_conversation(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    msg_id = await client.send_stream_chunk(
        "chatgroup", sender="ai_bot", to="g1", text="@alice ", seq=0
    )
    await client.send_stream_chunk(
        "chatgroup", sender="ai_bot", to="g1", text="done", seq=1, msg_id=msg_id, finish=True
    )
    [stream] = await _streams(admin, group="g1")
    assert (stream["text"], stream["finished"], stream["format"]) == ("@alice done", True, "text")
    assert await _streams(admin, user="g1") == []
    # A group's msgId is not a 1:1 stream's.
    with pytest.raises(StreamClosed) as caught:
        await client.send_stream_chunk(
            "user", sender="ai_bot", to="g1", text="x", seq=2, msg_id=msg_id
        )
    assert caught.value.code == "14031"


async def test_screen_long_polls_until_a_stream_finishes(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    waiting = asyncio.create_task(
        admin.get("/_sim/screen", params={"user": "alice", "finished": 1, "timeout": 10})
    )
    msg_id = await _open(client)
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await client.send_stream_chunk(
        "user", sender="ai_bot", to="alice", text="!", seq=1, msg_id=msg_id, finish=True
    )
    view = (await waiting).json()
    assert view["timed_out"] is False
    assert [i["text"] for i in view["items"]] == ["Hello!"]
    gave_up = await _screen(admin, user="bob", finished=1, timeout=0.1)
    assert gave_up["timed_out"] is True


async def test_typing_indicator_shows_until_the_answer_starts(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    typing_id = await client.send_typing("users", sender="ai_bot", to="alice")
    view = await _screen(admin, user="alice")
    [typing] = view["items"]
    assert typing["kind"] == "typing"
    assert (typing["id"], typing["from"], typing["action"], typing["routetype"]) == (
        typing_id,
        "ai_bot",
        "TypingBegin",
        "ROUTE_ONLINE",
    )
    assert isinstance(typing["at"], float | int)
    assert view["typing"] == ["ai_bot"]
    [sent] = (await admin.get("/_sim/messages", params={"to": "alice"})).json()["messages"]
    assert (sent["type"], sent["body"], sent["options"]) == (
        "cmd",
        {"action": "TypingBegin"},
        {"routetype": "ROUTE_ONLINE"},
    )
    await _open(client)
    view = await _screen(admin, user="alice")
    assert [i["kind"] for i in view["items"]] == ["typing", "stream"]
    assert view["typing"] == []


async def test_typing_in_a_group_and_typing_end(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await client.send_typing("chatgroups", sender="ai_bot", to="g1")
    assert (await _screen(admin, group="g1"))["typing"] == ["ai_bot"]
    await client.send_typing("chatgroups", sender="ai_bot", to="g1", action="TypingEnd")
    view = await _screen(admin, group="g1")
    assert [i["action"] for i in view["items"]] == ["TypingBegin", "TypingEnd"]
    assert view["typing"] == []


# -- every stream error code, caused by its request, mapped by the client ------------


async def _chunk(client: EasemobClient, msg_id: str | None, seq: int, **kw: Any) -> str:
    args: dict[str, Any] = {"sender": "ai_bot", "to": "alice", "text": "more", **kw}
    return await client.send_stream_chunk("user", seq=seq, msg_id=msg_id, **args)


async def test_bad_parameters_are_fatal_bad_requests(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"sender": ""}, 14001, "param from can't be empty"),
        ({"to": ""}, 14002, "param to can't be empty"),
    ]
    for override, code, _ in cases:
        with pytest.raises(FatalError) as caught:
            await _chunk(client, None, 0, **override)
        assert type(caught.value) is FatalError
        assert (caught.value.reason, caught.value.status, caught.value.code) == (
            "bad_request",
            400,
            str(code),
        )
    with pytest.raises(FatalError) as bad_seq:
        await _chunk(client, None, -1)
    assert (type(bad_seq.value), bad_seq.value.code) == (FatalError, "14030")

    # What the client never sends, as Easemob answers it (and as the client would map it).
    body = {"from": "ai_bot", "to": "alice", "body": {"msg": "x", "seq": 0}}
    raw: list[tuple[Any, int | None, str]] = [
        ({k: v for k, v in body.items() if k != "from"}, 14001, "param from can't be empty"),
        ({k: v for k, v in body.items() if k != "to"}, 14002, "param to can't be empty"),
        ({**body, "body": {}}, 14005, "param body can't be empty"),
        ({**body, "body": {"msg": "x"}}, 14030, "param body.seq is illegal"),
        ({**body, "body": {"msg": "x", "seq": "0"}}, 14030, "param body.seq is illegal"),
        ({**body, "to": ["alice"]}, None, "Request body is invalid"),
        ({**body, "body": {"msg": "x", "seq": 0, "type": "html"}}, None, "Request body"),
        ({**body, "ext": None}, None, "param ext must be JSONObject"),
    ]
    for request, raw_code, text in raw:
        response = await _raw_chunk(admin, client, request)
        assert response.status_code == 400, request
        answer = response.json()
        assert answer.get("error_code") == raw_code
        assert text in answer["error_description"]
        error = classify_stream(response)
        assert type(error) is FatalError
        assert error.reason == "bad_request"
    assert await _streams(admin, user="alice") == []


async def test_unknown_msg_id_is_14031_stream_closed(client: EasemobClient) -> None:
    with pytest.raises(StreamClosed) as caught:
        await _chunk(client, "1234567890123456789", 1)
    assert (caught.value.code, caught.value.reason) == ("14031", "not_found")
    assert "can not find stream message by msgId" in caught.value.message


async def test_chunk_after_finish_is_14035(client: EasemobClient, admin: httpx.AsyncClient) -> None:
    msg_id = await _open(client)
    await _chunk(client, msg_id, 1, finish=True)
    with pytest.raises(StreamClosed) as caught:
        await _chunk(client, msg_id, 2)
    assert caught.value.code == "14035"
    assert "already finished" in caught.value.message
    [stream] = await _streams(admin, user="alice")
    assert (stream["text"], stream["finished"]) == ("Hellomore", True)


@pytest.mark.parametrize(
    ("override", "code", "text"),
    [
        ({"sender": "other_bot"}, "14036", "from user mismatch"),
        ({"to": "bob"}, "14037", "to user mismatch"),
    ],
)
async def test_from_and_to_must_stay_those_of_the_first_chunk(
    client: EasemobClient, admin: httpx.AsyncClient, override: dict[str, str], code: str, text: str
) -> None:
    msg_id = await _open(client)
    with pytest.raises(FatalError) as caught:
        await _chunk(client, msg_id, 1, **override)
    assert type(caught.value) is FatalError
    assert (caught.value.code, caught.value.reason) == (code, "bad_request")
    assert text in caught.value.message
    await _chunk(client, msg_id, 1, finish=True)  # the stream itself goes on
    [stream] = await _streams(admin, user="alice")
    assert (stream["text"], stream["finished"]) == ("Hellomore", True)


async def test_seq_not_increasing_is_14038_already_sent(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    msg_id = await _open(client)
    await _chunk(client, msg_id, 1)
    for stale in (1, 0):
        with pytest.raises(ChunkAlreadySent) as caught:
            await _chunk(client, msg_id, stale)
        assert (caught.value.code, caught.value.reason) == ("14038", "bad_request")
        assert "seq too small" in caught.value.message
    await _chunk(client, msg_id, 5, finish=True)  # a gap is accepted
    [stream] = await _streams(admin, user="alice")
    assert (stream["text"], stream["seq"]) == ("Hellomoremore", 5)


async def test_lost_answer_then_resend_is_already_sent_and_shown_once(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    msg_id = await _open(client)
    await _inject(admin, endpoint="stream", status=503, applied=True)
    with pytest.raises(RetryableError) as lost:
        await _chunk(client, msg_id, 1, text=" world")
    assert lost.value.status == 503
    with pytest.raises(ChunkAlreadySent):
        await _chunk(client, msg_id, 1, text=" world")
    [stream] = await _streams(admin, user="alice")
    assert stream["text"] == "Hello world"


async def test_more_than_128_kb_in_total_is_14032_and_ends_the_stream(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    text = "长" * 20_000  # 60,000 UTF-8 bytes
    msg_id = await _open(client, text=text)
    await _chunk(client, msg_id, 1, text=text)  # 120,000 bytes: still within 131,072
    with pytest.raises(StreamClosed) as caught:
        await _chunk(client, msg_id, 2, text=text)
    assert (caught.value.code, caught.value.reason) == ("14032", "bad_request")
    assert "total length exceeds limit" in caught.value.message
    with pytest.raises(StreamClosed) as after:  # ended: a small chunk is refused too
        await _chunk(client, msg_id, 3, text="x")
    assert after.value.code == "14032"
    [stream] = await _streams(admin, user="alice")
    assert (len(stream["text"]), stream["finished"], stream["ended"]) == (40_000, False, 14032)
    with pytest.raises(StreamClosed) as whole:  # a first chunk above the limit opens nothing
        await _open(client, to="bob", text="x" * (128 * 1024 + 1))
    assert whole.value.code == "14032"
    assert await _streams(admin, user="bob") == []


async def test_more_than_the_gap_since_the_last_chunk_is_14033(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await _inject(admin, stream_chunk_gap_s=0.2)  # Easemob's is 30 s
    msg_id = await _open(client)
    await _chunk(client, msg_id, 1)
    await asyncio.sleep(0.3)
    with pytest.raises(StreamClosed) as caught:
        await _chunk(client, msg_id, 2, finish=True)
    assert (caught.value.code, caught.value.reason) == ("14033", "other")
    assert "chunk interval timeout" in caught.value.message
    [stream] = await _streams(admin, user="alice")
    assert (stream["text"], stream["finished"], stream["ended"]) == ("Hellomore", False, 14033)


async def test_more_than_the_total_time_is_14034(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await _inject(admin, stream_total_s=0.3)  # Easemob's is 30 min
    msg_id = await _open(client)
    await asyncio.sleep(0.2)
    await _chunk(client, msg_id, 1)
    await asyncio.sleep(0.2)
    with pytest.raises(StreamClosed) as caught:
        await _chunk(client, msg_id, 2)
    assert caught.value.code == "14034"
    assert "total timeout" in caught.value.message
    [stream] = await _streams(admin, user="alice")
    assert stream["ended"] == 14034


# -- limits, faults, tokens ----------------------------------------------------------


async def test_streams_share_the_send_rate_limit(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await client.token()
    await _inject(admin, rate_limit=4)
    await client.send_text("users", sender="ai_bot", to="alice", text="one")
    await client.send_typing("users", sender="ai_bot", to="alice")
    outcomes = await asyncio.gather(
        *(_open(client, to=f"u{i}") for i in range(4)), return_exceptions=True
    )
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(refused) == 2
    for error in refused:
        assert isinstance(error, RetryableError)
        assert (error.status, error.code) == (429, "reach_limit")
    stats = (await admin.get("/_sim/stats")).json()
    assert (stats["answers"]["stream 200"], stats["answers"]["stream 429"]) == (2, 2)
    assert stats["streams"] == 2


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_injected_stream_faults_are_retryable_and_take_nothing(
    client: EasemobClient, admin: httpx.AsyncClient, status: int
) -> None:
    msg_id = await _open(client)
    await _inject(admin, endpoint="stream", status=status, retry_after="2")
    with pytest.raises(RetryableError) as caught:
        await _chunk(client, msg_id, 1)
    assert (caught.value.status, caught.value.retry_after) == (status, 2.0)
    await _chunk(client, msg_id, 1, finish=True)  # the same chunk, once
    [stream] = await _streams(admin, user="alice")
    assert stream["text"] == "Hellomore"


async def test_quota_403_on_a_stream_retries_after_a_second(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    await _inject(admin, endpoint="stream", status=403)
    with pytest.raises(RetryableError) as caught:
        await _open(client)
    assert (caught.value.status, caught.value.retry_after) == (403, 1.0)


async def test_expired_token_is_refreshed_once_for_a_chunk(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    msg_id = await _open(client)
    await _inject(admin, expire_tokens=True)
    await _chunk(client, msg_id, 1, finish=True)
    stats = (await admin.get("/_sim/stats")).json()
    assert stats["token_requests"] == 2
    assert stats["answers"]["stream 401"] == 1
    [stream] = await _streams(admin, user="alice")
    assert (stream["text"], stream["finished"]) == ("Hellomore", True)


async def test_chunk_without_a_token_is_401(admin: httpx.AsyncClient) -> None:
    response = await admin.post(
        f"{ORG_APP}/stream_message/user",
        json={"from": "ai_bot", "to": "alice", "body": {"msg": "x", "seq": 0}},
    )
    assert response.status_code == 401


async def test_reset_forgets_streams(client: EasemobClient, admin: httpx.AsyncClient) -> None:
    msg_id = await _open(client)
    await _inject(admin, stream_chunk_gap_s=0.01, endpoint="stream", status=500, count=3)
    assert (await admin.post("/_sim/reset")).json() == {"ok": True}
    assert await _streams(admin, user="alice") == []
    stats = (await admin.get("/_sim/stats")).json()
    assert (stats["streams"], stats["stream_requests"]) == (0, 0)
    with pytest.raises(StreamClosed):  # the stream is gone with the rest
        await _chunk(client, msg_id, 1)
    await asyncio.sleep(0.05)
    await _open(client)  # no fault left, the 30 s gap again
    assert len(await _streams(admin, user="alice")) == 1


async def test_screen_needs_exactly_one_conversation(admin: httpx.AsyncClient) -> None:
    assert (await admin.get("/_sim/screen")).status_code == 400
    both = await admin.get("/_sim/screen", params={"user": "a", "group": "g"})
    assert both.status_code == 400
