"""An answer streamed to the user as it is written (docs/streaming.md).

Records of ``imbot.chunks.reviewed`` carry the reviewed text so far, never a delta.
The stream's ledger is the delivery ledger under ``<msg_id>#stream``: one row per
chunk Easemob accepted (``part`` = the chunk's ``seq``, ``end_offset`` = how much of
the text the stream shows after it, ``reply_digest`` = that prefix's digest,
``easemob_msg_id`` = the stream's ``msgId``). ``parts`` is 0 while the stream is
open; the row that finishes it has ``parts`` = its ``seq`` + 1. So:

* a chunk record sends only the text beyond what the ledger says is shown: a late,
  redelivered or duplicated record sends nothing (``stale``), a record of another
  text (a model call made again after a crash) sends nothing (``diverged``);
* each chunk is claimed before it is sent (as a reply's parts are), so two senders
  never send the same ``seq``;
* the final envelope (on the chain: the whole answer, reviewed) finishes the stream
  with the rest of the text, or with the configured reply after a block, a failure or
  a budget cut-off. With no chunk sent yet it closes the stream's ledger first (a
  row that says "sent as a message") and the reply goes as a normal message: a chunk
  arriving later finds the stream closed;
* a stream Easemob has closed (more than 30 s between chunks, 128 KB) is closed in the
  ledger where it stood, and the rest goes as a normal message.

Chunks are best effort: a chunk that fails is not retried (the next record, or the
final envelope, carries its text).
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from imbot.core.envelope import Envelope
from imbot.core.errors import RetryableError
from imbot.sender.easemob import (
    ChunkAlreadySent,
    EasemobClient,
    StreamClosed,
    StreamTarget,
    TargetKind,
)
from imbot.sender.metrics import (
    STREAM_CHUNKS,
    STREAM_FIRST_CHUNK,
    STREAMS_FINISHED,
    STREAMS_STARTED,
    UNCERTAIN_PARTS,
)
from imbot.sender.targets import reply_digest, reply_target
from imbot.storage import DeliveryLedger, LedgerRow

log = logging.getLogger("imbot.sender")

# ``reply_digest`` of the row that closes a stream's ledger when the reply (or its rest)
# goes as a normal message: no chunk was sent before the final reply came, Easemob
# closed the stream, or the final answer is not the one streamed. Its ``end_offset`` is
# where that message starts in the reply's text.
REST_AS_MESSAGE = "message"
_STREAM_TARGETS: dict[TargetKind, StreamTarget] = {"users": "user", "chatgroups": "chatgroup"}


def stream_ledger_id(msg_id: str) -> str:
    """Where the delivery ledger keeps the chunks of the stream answering ``msg_id``."""
    return f"{msg_id}#stream"


@dataclass(frozen=True, slots=True)
class StreamState:
    """What a stream's ledger says."""

    rows: Mapping[int, LedgerRow]

    @property
    def sent(self) -> int:
        """Rows sent, in order from ``seq`` 0: the next chunk's ``seq``."""
        n = 0
        while (row := self.rows.get(n)) is not None and row.status == "sent":
            n += 1
        return n

    def _last_chunk(self) -> LedgerRow | None:
        """The last chunk that showed text (not a row that closed the ledger)."""
        for seq in range(self.sent - 1, -1, -1):
            row = self.rows[seq]
            if row.reply_digest != REST_AS_MESSAGE:
                return row
        return None

    @property
    def shown(self) -> int:
        """How much of the text the stream shows."""
        row = self._last_chunk()
        return (row.end_offset or 0) if row is not None else 0

    @property
    def stream_id(self) -> str | None:
        row = self.rows.get(0)
        if row is None or row.status != "sent" or not row.easemob_msg_id:
            return None
        return row.easemob_msg_id

    @property
    def closed(self) -> LedgerRow | None:
        """The row that closed the stream's ledger, if one did."""
        for row in self.rows.values():
            if row.status == "sent" and row.parts:
                return row
        return None

    def shows(self, text: str) -> bool:
        """Does the stream show the beginning of ``text``?"""
        row = self._last_chunk()
        return row is None or row.reply_digest == reply_digest(text[: row.end_offset or 0])


@dataclass(frozen=True, slots=True)
class Finished:
    """How the final reply ended a stream: ``rest_from`` is where the part of the reply
    that goes as a normal message starts (None: the stream took all of it)."""

    chunks: int
    stream_id: str | None
    rest_from: int | None
    duplicate: bool = False


class StreamSender:
    def __init__(
        self, client: EasemobClient, store: DeliveryLedger, *, claim_lease_s: float
    ) -> None:
        self.client = client
        self.store = store
        self.claim_lease_s = claim_lease_s
        self._name = uuid.uuid4().hex[:16]
        self._calls = 0
        # What this sender last wrote of each stream it is sending: a conversation's
        # chunks all come to one sender (keyed records), so the ledger is read once per
        # stream, not once per chunk. A stale entry (another sender went on after a
        # rebalance) only makes a claim fail, and is dropped then.
        self._known: dict[str, StreamState] = {}

    def _claimant(self) -> str:
        self._calls += 1
        return f"{self._name}:s{self._calls}"

    async def state(self, msg_id: str) -> StreamState:
        return StreamState(await self.store.ledger(stream_ledger_id(msg_id)))

    async def chunk(self, env: Envelope) -> str:
        """Send what a reviewed chunk record adds to the stream; the outcome (a label of
        ``imbot_stream_chunks_total``)."""
        part = env.partial
        assert part is not None
        kind, target = reply_target(env)
        if part.kind == "typing":
            return await self._typing(env, kind, target)
        state = self._known.get(env.msg_id) or await self.state(env.msg_id)
        if kind not in _STREAM_TARGETS or state.closed is not None:
            self._known.pop(env.msg_id, None)
            return _count("closed")
        if env.reply is not None:  # the review blocked the text: the stream ends here
            if state.sent == 0:
                return _count("stale")  # nothing shown: the final reply goes as a message
            await self._finish(env, state, f"\n{env.reply.text}", env.reply.text, env.reply.kind)
            return _count("sent")
        text = part.text
        if len(text) <= state.shown:
            return _count("stale")
        if not state.shows(text):
            log.warning(
                "chunk of another text than the stream shows, not sent",
                extra={"msg_id": env.msg_id, "seq": state.sent},
            )
            return _count("diverged")
        seq = state.sent
        claimant = self._claimant()
        ledger_id = stream_ledger_id(env.msg_id)
        claim = await self.store.claim_part(
            ledger_id, seq, claimant, lease_s=self.claim_lease_s, parts=0,
            target_kind=kind, target=target,
        )  # fmt: skip
        if claim is None:
            self._known.pop(env.msg_id, None)
            return _count("claimed_elsewhere")
        try:
            stream_id = await self.client.send_stream_chunk(
                _STREAM_TARGETS[kind], sender=env.bot, to=target, text=text[state.shown :],
                seq=seq, msg_id=state.stream_id, ext=_ext(env, kind) if seq == 0 else None,
                paced=True,
            )  # fmt: skip
        except ChunkAlreadySent:
            await self._taken(env, state, seq)
            return _count("closed")
        except StreamClosed as exc:
            await self._closed_by_easemob(env, state, seq, exc)
            return _count("closed")
        except Exception as exc:
            await self.store.mark_failed(
                ledger_id, seq, str(exc), parts=0, target_kind=kind, target=target,
                final=False, claimant=claimant,
            )  # fmt: skip
            log.info(
                "chunk not sent; the next one or the final reply carries its text",
                extra={"msg_id": env.msg_id, "seq": seq, "error": type(exc).__name__},
            )
            return _count("failed")
        digest = reply_digest(text)
        await self.store.mark_sent(
            ledger_id, seq, stream_id, end_offset=len(text), reply_digest=digest,
            parts=0, target_kind=kind, target=target,
        )  # fmt: skip
        row = LedgerRow(seq, "sent", stream_id, claim.attempt, len(text), digest, None, 0)
        if len(self._known) >= _KNOWN_MAX:
            self._known.clear()
        self._known[env.msg_id] = StreamState({**state.rows, seq: row})
        if seq == 0:
            STREAMS_STARTED.inc()
            STREAM_FIRST_CHUNK.observe(max(0.0, time.time() - env.received_at / 1000))
        return _count("sent")

    async def finish(self, env: Envelope, text: str, reply_kind: str) -> Finished:
        """End the stream answering ``env`` with the final reply ``text`` (idempotent)."""
        self._known.pop(env.msg_id, None)
        kind, target = reply_target(env)
        # Most often no chunk was sent (a quick model): one statement closes the stream's
        # ledger before the reply goes as a message, so a chunk coming later is not sent.
        if await self.store.sent_if_absent(
            stream_ledger_id(env.msg_id), 0, end_offset=0, reply_digest=REST_AS_MESSAGE,
            parts=1, target_kind=kind, target=target,
        ):  # fmt: skip
            return Finished(0, None, 0)
        state = await self.state(env.msg_id)
        closed = state.closed
        if closed is not None:
            if closed.reply_digest == REST_AS_MESSAGE:
                rest = (closed.end_offset or 0) if state.shows(text) else 0
                return Finished(state.sent, state.stream_id, rest, duplicate=True)
            return Finished(state.sent, state.stream_id, None, duplicate=True)
        if state.sent == 0:
            # No chunk was shown: the ledger is closed before the reply goes as a message,
            # so a chunk that comes later is not sent.
            await self._close(env, 0, rest_from=0, claimed=False)
            return Finished(0, None, 0)
        if reply_kind == "answer" and state.shows(text):
            return await self._finish(env, state, text[state.shown :], text, "answer")
        if reply_kind == "answer":
            # Another answer than the one streamed (a model call made again after a
            # crash): the stream ends where it stood, and the new answer goes whole.
            log.warning("the final answer is not the one streamed", extra={"msg_id": env.msg_id})
            finished = await self._finish(env, state, "…", text, "diverged", rest_from=0)
            return finished
        return await self._finish(env, state, f"\n{text}", text, reply_kind)

    async def _finish(
        self,
        env: Envelope,
        state: StreamState,
        last: str,
        final_text: str,
        reason: str,
        *,
        rest_from: int | None = None,
    ) -> Finished:
        """Send the stream's last chunk (``last``) and close its ledger."""
        self._known.pop(env.msg_id, None)
        kind, target = reply_target(env)
        seq, ledger_id = state.sent, stream_ledger_id(env.msg_id)
        claimant = self._claimant()
        claim = await self.store.claim_part(
            ledger_id, seq, claimant, lease_s=self.claim_lease_s, parts=seq + 1,
            target_kind=kind, target=target,
        )  # fmt: skip
        if claim is None:
            raise RetryableError("a chunk of this stream is being sent")
        try:
            stream_id = await self.client.send_stream_chunk(
                _STREAM_TARGETS[kind], sender=env.bot, to=target, text=last, seq=seq,
                msg_id=state.stream_id, finish=True, paced=True,
            )  # fmt: skip
        except ChunkAlreadySent:
            await self._taken(env, state, seq)
            return Finished(seq, state.stream_id, state.shown if state.shows(final_text) else 0)
        except StreamClosed as exc:
            await self._closed_by_easemob(env, state, seq, exc)
            return Finished(seq, state.stream_id, state.shown if state.shows(final_text) else 0)
        except Exception as exc:
            await self.store.mark_failed(
                ledger_id, seq, str(exc), parts=seq + 1, target_kind=kind, target=target,
                final=False, claimant=claimant,
            )  # fmt: skip
            raise
        if rest_from is None:
            digest, end = reply_digest(final_text), len(final_text)
        else:
            digest, end = REST_AS_MESSAGE, rest_from
        await self.store.mark_sent(
            ledger_id, seq, stream_id, end_offset=end, reply_digest=digest, parts=seq + 1,
            target_kind=kind, target=target,
        )  # fmt: skip
        STREAMS_FINISHED.labels(reason).inc()
        return Finished(seq + 1, stream_id, rest_from)

    async def _taken(self, env: Envelope, state: StreamState, seq: int) -> None:
        """Easemob already has a chunk ``seq`` (14038) that the ledger does not: a sender
        died after Easemob took it and before recording it, or its answer was lost. Its
        text is unknown, so the stream is finished at the next ``seq`` and the ledger
        closed where it last knew the stream to stand: the rest goes as a normal message,
        and may repeat that one chunk's text (counted as uncertain, like a resent part)."""
        UNCERTAIN_PARTS.labels("stream_chunk_taken").inc()
        log.warning(
            "a chunk of this stream was taken by Easemob but never recorded; finishing the"
            " stream, the rest goes as a message and may repeat that chunk",
            extra={"msg_id": env.msg_id, "seq": seq},
        )
        kind, target = reply_target(env)
        with contextlib.suppress(Exception):  # best effort: Easemob ends it after 30 s
            await self.client.send_stream_chunk(
                _STREAM_TARGETS[kind], sender=env.bot, to=target, text="…", seq=seq + 1,
                msg_id=state.stream_id, finish=True, paced=True,
            )  # fmt: skip
        STREAMS_FINISHED.labels("uncertain").inc()
        await self._close(env, seq, rest_from=state.shown, claimed=True)

    async def _closed_by_easemob(
        self, env: Envelope, state: StreamState, seq: int, exc: StreamClosed
    ) -> None:
        """Easemob takes no more chunks (30 s without one, 128 KB): the ledger is closed
        where the stream stood, and the rest of the reply goes as a normal message."""
        STREAMS_FINISHED.labels("closed_by_easemob").inc()
        log.warning(
            "stream closed by Easemob; the rest goes as a normal message",
            extra={"msg_id": env.msg_id, "seq": seq, "error": str(exc)},
        )
        await self._close(env, seq, rest_from=state.shown, claimed=True)

    async def _close(self, env: Envelope, seq: int, *, rest_from: int, claimed: bool) -> None:
        """Close the stream's ledger at ``seq`` (claimed by this call already, or not):
        what the stream does not show goes as a message."""
        self._known.pop(env.msg_id, None)
        kind, target = reply_target(env)
        ledger_id = stream_ledger_id(env.msg_id)
        if not claimed:
            claim = await self.store.claim_part(
                ledger_id, 0, self._claimant(), lease_s=self.claim_lease_s, parts=1,
                target_kind=kind, target=target,
            )  # fmt: skip
            if claim is None:
                raise RetryableError("the first chunk of this reply is being sent")
        await self.store.mark_sent(
            ledger_id, seq, "", end_offset=rest_from, reply_digest=REST_AS_MESSAGE,
            parts=seq + 1, target_kind=kind, target=target,
        )  # fmt: skip

    async def _typing(self, env: Envelope, kind: TargetKind, target: str) -> str:
        """A typing indicator while the model runs, unless the reply was sent already."""
        rows = await self.store.ledger(env.msg_id)
        if any(row.status == "sent" for row in rows.values()):
            return _count("stale")
        try:
            await self.client.send_typing(kind, sender=env.bot, to=target, paced=True)
        except Exception as exc:
            log.info(
                "typing indicator not sent",
                extra={"msg_id": env.msg_id, "error": type(exc).__name__},
            )
            return _count("typing_failed")
        return _count("typing")


_KNOWN_MAX = 10_000  # streams remembered at once (a few minutes of a busy app)


def _ext(env: Envelope, kind: TargetKind) -> dict[str, Any]:
    ext: dict[str, Any] = {
        "imbot_reply_to": env.msg_id,
        "imbot_kind": "answer",
        "imbot_stream": True,
    }
    if kind != "users":
        ext["em_at_list"] = [env.sender]
    return ext


def _count(outcome: str) -> str:
    STREAM_CHUNKS.labels(outcome).inc()
    return outcome
