"""Easemob stream messages (reference §3.6) and the client view the simulator keeps.

A stream is one message whose text grows chunk by chunk: the first chunk (no ``msgId``)
opens it and is answered with ``data.msgId``; later chunks name that ``msgId`` with a
larger ``seq``; ``finish: true`` closes it. The checks and their codes, in the order the
simulator makes them (Easemob's docs give the codes and texts, not the HTTP status: the
simulator answers them all with 400 ``message_send_error``, as the documented 14035 body
reads **[unconfirmed status]**):

=====  ===========================================  =========================================
14001  ``from`` missing or empty                    request refused
14002  ``to`` missing or empty                      request refused
14005  ``body`` missing or empty                    request refused
14030  ``body.seq`` missing, not an int, or < 0     request refused
14031  ``msgId`` unknown (or of the other endpoint)  request refused
14035  a chunk after ``finish``                     request refused
14036  ``from`` differs from the first chunk's      request refused
14037  ``to`` differs from the first chunk's        request refused
14038  ``seq`` not above the last accepted one      request refused (a resent chunk)
14034  more than 30 min since the first chunk       the stream ends; later chunks get 14034
14033  more than 30 s since the last chunk          the stream ends; later chunks get 14033
14032  the text passes 128 KB (UTF-8) in total      the stream ends; later chunks get 14032
=====  ===========================================  =========================================

Gaps in ``seq`` are accepted (the docs only refuse a ``seq`` that is too small). ``type``
(``text``/``markdown``) and ``ext`` are taken from the first chunk. Chatrooms have no
stream endpoint.

The client view (``screen``) rebuilds what a user's screen shows in one conversation:
a normal message as itself, a stream as one message whose text is every accepted chunk
joined (``finished`` or not, ``ended`` with the code that cut it off), and ``cmd``
``TypingBegin``/``TypingEnd`` messages (reference §3.5) as ``typing`` events, with an
indicator that shows until the sender's next message, a ``TypingEnd``, or
``TYPING_SHOWN_S`` without a new ``TypingBegin``. Other ``cmd`` messages show nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from imbot.simulator import wire

StreamTarget = Literal["user", "chatgroup"]

# Reference §3.6 limits.
STREAM_MAX_BYTES = 128 * 1024
CHUNK_GAP_S = 30.0
STREAM_TOTAL_S = 30 * 60.0
# How long a client shows "typing…" after the last TypingBegin (reference §3.5: "a few seconds").
TYPING_SHOWN_S = 5.0
TYPING_ACTIONS = frozenset({"TypingBegin", "TypingEnd"})

FROM_EMPTY = 14001
TO_EMPTY = 14002
BODY_EMPTY = 14005
BAD_SEQ = 14030
UNKNOWN_MSG_ID = 14031
TOO_LONG = 14032
CHUNK_GAP_TIMEOUT = 14033
TOTAL_TIMEOUT = 14034
ALREADY_FINISHED = 14035
FROM_MISMATCH = 14036
TO_MISMATCH = 14037
SEQ_TOO_SMALL = 14038

# Easemob's error_description for each code (its stream message pages).
DESCRIPTIONS: dict[int, str] = {
    FROM_EMPTY: "param from can't be empty",
    TO_EMPTY: "param to can't be empty",
    BODY_EMPTY: "param body can't be empty",
    BAD_SEQ: "param body.seq is illegal",
    UNKNOWN_MSG_ID: "can not find stream message by msgId",
    TOO_LONG: "stream message total length exceeds limit",
    CHUNK_GAP_TIMEOUT: "stream message chunk interval timeout",
    TOTAL_TIMEOUT: "stream message total timeout",
    ALREADY_FINISHED: "stream message has already finished",
    FROM_MISMATCH: "stream message from user mismatch",
    TO_MISMATCH: "stream message to user mismatch",
    SEQ_TOO_SMALL: "stream message chunk seq too small",
}

# Screen kinds (the send endpoints' names) and the stream endpoint of each.
STREAM_TARGET_OF: dict[str, StreamTarget] = {"users": "user", "chatgroups": "chatgroup"}


def stream_error(code: int) -> web.Response:
    return wire.send_error(DESCRIPTIONS[code], error_code=code)


@dataclass(frozen=True)
class StreamLimits:
    chunk_gap_s: float = CHUNK_GAP_S
    total_s: float = STREAM_TOTAL_S
    max_bytes: int = STREAM_MAX_BYTES


@dataclass(frozen=True)
class Chunk:
    """One validated stream request."""

    sender: str
    to: str
    msg: str
    seq: int
    msg_id: str | None
    finish: bool
    finish_reason: int | None
    format: str
    ext: dict[str, Any]


def parse_chunk(body: Any) -> Chunk | web.Response:
    """The chunk, or the 400 Easemob answers for a malformed request."""
    if not isinstance(body, dict):
        return wire.invalid_body()
    sender = body.get("from")
    if sender is None or sender == "":
        return stream_error(FROM_EMPTY)
    to = body.get("to")
    if to is None or to == "":
        return stream_error(TO_EMPTY)
    if not isinstance(sender, str) or not isinstance(to, str):
        return wire.invalid_body()
    message = body.get("body")
    if not message:
        return stream_error(BODY_EMPTY)
    if not isinstance(message, dict) or not isinstance(message.get("msg"), str):
        return wire.invalid_body()
    seq = message.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        return stream_error(BAD_SEQ)
    msg_id = message.get("msgId")
    if msg_id is not None and not isinstance(msg_id, str | int):
        return wire.invalid_body()
    finish = message.get("finish", False)
    reason = message.get("finishReason")
    text_format = message.get("type", "text")
    if (
        not isinstance(finish, bool)
        or (reason is not None and not isinstance(reason, int))
        or text_format not in ("text", "markdown")
    ):
        return wire.invalid_body()
    ext = body.get("ext", {})
    if not isinstance(ext, dict):
        return wire.send_error("param ext must be JSONObject")
    return Chunk(
        sender=sender,
        to=to,
        msg=message["msg"],
        seq=seq,
        msg_id=str(msg_id) if msg_id not in (None, "") else None,
        finish=finish,
        finish_reason=reason if finish else None,
        format=text_format,
        ext=ext,
    )


@dataclass
class Stream:
    """One stream message as Easemob holds it."""

    msg_id: str
    target: StreamTarget
    sender: str
    to: str
    format: str
    ext: dict[str, Any]
    opened: float  # monotonic
    last_chunk: float  # monotonic
    opened_at: float  # ms epoch
    updated_at: float  # ms epoch
    seq: int
    parts: list[str] = field(default_factory=list)
    size: int = 0  # UTF-8 bytes of the text
    finished: bool = False
    finish_reason: int | None = None
    ended_by: int | None = None  # the code that cut the stream off (14032/14033/14034)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def view(self) -> dict[str, Any]:
        return {
            "kind": "stream",
            "id": self.msg_id,
            "from": self.sender,
            "to": self.to,
            "text": self.text,
            "format": self.format,
            "ext": self.ext,
            "finished": self.finished,
            "finish_reason": self.finish_reason,
            "ended": self.ended_by,
            "chunks": len(self.parts),
            "seq": self.seq,
            "at": self.opened_at,
            "updated_at": self.updated_at,
        }


@dataclass
class StreamBook:
    """Every stream of the app, by ``msgId``."""

    streams: dict[str, Stream] = field(default_factory=dict)

    def accept(
        self,
        target: StreamTarget,
        chunk: Chunk,
        msg_id: str,
        limits: StreamLimits,
        *,
        now: float | None = None,
    ) -> Stream | int:
        """Apply one chunk; the stream, or the error code refusing it.

        ``msg_id``: the id a first chunk gets (ignored for later chunks).
        """
        now = time.monotonic() if now is None else now
        now_ms = time.time() * 1000
        size = len(chunk.msg.encode())
        if chunk.msg_id is None:
            if size > limits.max_bytes:
                return TOO_LONG
            stream = Stream(
                msg_id=msg_id,
                target=target,
                sender=chunk.sender,
                to=chunk.to,
                format=chunk.format,
                ext=chunk.ext,
                opened=now,
                last_chunk=now,
                opened_at=now_ms,
                updated_at=now_ms,
                seq=chunk.seq,
            )
            self.streams[msg_id] = stream
            _append(stream, chunk, size)
            return stream
        stream_or_none = self.streams.get(chunk.msg_id)
        if stream_or_none is None or stream_or_none.target != target:
            return UNKNOWN_MSG_ID
        stream = stream_or_none
        if stream.ended_by is not None:
            return stream.ended_by
        if stream.finished:
            return ALREADY_FINISHED
        if chunk.sender != stream.sender:
            return FROM_MISMATCH
        if chunk.to != stream.to:
            return TO_MISMATCH
        if chunk.seq <= stream.seq:
            return SEQ_TOO_SMALL
        for code, late in (
            (TOTAL_TIMEOUT, now - stream.opened > limits.total_s),
            (CHUNK_GAP_TIMEOUT, now - stream.last_chunk > limits.chunk_gap_s),
            (TOO_LONG, stream.size + size > limits.max_bytes),
        ):
            if late:
                stream.ended_by = code
                stream.updated_at = now_ms
                return code
        stream.seq = chunk.seq
        stream.last_chunk = now
        stream.updated_at = now_ms
        _append(stream, chunk, size)
        return stream

    def clear(self) -> None:
        self.streams.clear()


def _append(stream: Stream, chunk: Chunk, size: int) -> None:
    stream.parts.append(chunk.msg)
    stream.size += size
    if chunk.finish:
        stream.finished = True
        stream.finish_reason = chunk.finish_reason


def screen(
    messages: Iterable[dict[str, Any]],
    streams: Iterable[Stream],
    *,
    kind: str,
    to: str,
    peer: str | None = None,
    now_ms: float | None = None,
) -> dict[str, Any]:
    """What ``to``'s screen shows (a user's 1:1 chats, a group's or a room's conversation).

    ``kind``: ``users``, ``chatgroups`` or ``chatrooms``; ``peer``: only what this sender
    sent. Answers ``{"items": [...], "typing": [senders whose indicator shows now]}``, the
    items in the order they appeared.
    """
    now_ms = time.time() * 1000 if now_ms is None else now_ms
    items: list[dict[str, Any]] = []
    for m in messages:
        if m["kind"] != kind or to not in m["to"] or (peer is not None and m["from"] != peer):
            continue
        if m["type"] == "cmd":
            action = m["body"].get("action")
            if action in TYPING_ACTIONS:
                items.append(
                    {
                        "kind": "typing",
                        "id": m["id"],
                        "from": m["from"],
                        "action": action,
                        "routetype": m["options"].get("routetype"),
                        "at": m["received_at"],
                    }
                )
            continue  # a cmd message is never shown as a message
        item: dict[str, Any] = {
            "kind": "message",
            "id": m["id"],
            "from": m["from"],
            "type": m["type"],
            "body": m["body"],
            "ext": m["ext"],
            "at": m["received_at"],
        }
        if m["type"] == "txt":
            item["text"] = m["body"]["msg"]
        items.append(item)
    target = STREAM_TARGET_OF.get(kind)
    items.extend(
        s.view()
        for s in streams
        if s.target == target and s.to == to and (peer is None or s.sender == peer)
    )
    items.sort(key=lambda i: i["at"])  # stable: equal times keep their arrival order
    return {"items": items, "typing": _typing_now(items, now_ms)}


def _typing_now(items: list[dict[str, Any]], now_ms: float) -> list[str]:
    """Senders whose typing indicator shows: a TypingBegin within ``TYPING_SHOWN_S``, and
    nothing from them since (a message, a stream, a TypingEnd)."""
    since: dict[str, float | None] = {}
    for item in items:
        begins = item["kind"] == "typing" and item["action"] == "TypingBegin"
        since[item["from"]] = item["at"] if begins else None
    return sorted(
        sender
        for sender, at in since.items()
        if at is not None and now_ms - at <= TYPING_SHOWN_S * 1000
    )
