"""Delivers a reply exactly once in the user's eyes, then records the history.

A reply is sent in parts (``sender.split``). The delivery ledger has one row per
part Easemob accepted, keyed by (msg_id, part), holding where that part ends in
the reply text and a digest of the text. So:

* a replayed or duplicated outbound record finds every part ``sent`` and sends
  nothing (it only makes sure the history is written);
* a reply cut short (crash, Easemob outage, deadline) resumes at the first unsent
  character and cuts the rest exactly as it would have;
* a part Easemob refuses as too large (413 / 14007) is split further at half the
  size and the smaller pieces are sent in its place, without renumbering what was
  already sent;
* a *different* reply to a message already answered (a replay through the model
  stage) is not sent: the user already has an answer. The fallback apology is the
  exception: it has a ledger of its own (``msg_id#fallback``), so the real answer
  that a replay produces after an outage still reaches the user, while an apology
  for a message already answered is never sent.

Each part is *claimed* before it is sent: one atomic statement inserts its ledger
row as ``sending`` (or takes the row over), unless the part was sent or another
sender's claim is still live. So two senders working on the same record (a
consumer-group rebalance) never send the same part: the one that finds a part
claimed stops with a ``RetryableError``, and its retry finds the part sent. A
claim lasts ``claim_lease_s`` (2 × the Easemob client's timeout: a token fetch and
the send, each bounded by that timeout); a sender that died holding one stops
blocking the part when it expires.

Right after Easemob accepts a part its ledger row is set to ``sent``: one
statement, committed on its own, with nothing else awaited in between. The
history is written after the last part, in its own transaction: a failing
history write never rolls back or delays a ledger row (the retry finds every
part sent and writes only the history).

Easemob has no idempotency key, so a crash between Easemob's answer and that
commit, or an answer lost on the way (``AnswerLost``), leaves a part whose fate
is unknown. The rule is: never silently lost, and a duplicate is the lesser evil
but must be visible. Such a part is sent again, and counted
(``imbot_sender_uncertain_parts_total``), logged with its ids, and marked in its
ledger row's ``error`` (see README "Delivery guarantee").
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid

from imbot.core.envelope import Delivery, Envelope
from imbot.core.errors import FatalError, RetryableError
from imbot.core.settings import Settings
from imbot.sender.easemob import AnswerLost, EasemobClient, MessageTooLarge, TargetKind
from imbot.sender.metrics import PARTS_SENT, UNCERTAIN_PARTS
from imbot.sender.pacing import Pacer
from imbot.sender.split import part_end, split_reply
from imbot.sender.stream import StreamSender, stream_ledger_id
from imbot.sender.targets import reply_digest, reply_target
from imbot.storage import UNCERTAIN_ANSWER, Claim, DeliveryLedger, unstorable

log = logging.getLogger("imbot.sender")


# Below this a 413 is not about our part size any more (ext or Easemob's limit).
_MIN_PART_BYTES = 256


class ReplySender:
    def __init__(
        self,
        client: EasemobClient,
        store: DeliveryLedger,
        *,
        max_part_bytes: int = 3000,
        mention_asker: bool = True,
        claim_lease_s: float = 20.0,
    ) -> None:
        self.client = client
        self.store = store
        self.max_part_bytes = max_part_bytes
        self.mention_asker = mention_asker
        self.claim_lease_s = claim_lease_s
        # Claims are per call of ``deliver``: a second call for the same record (in
        # this process or another) is another claimant and waits for the first.
        self._name = uuid.uuid4().hex[:16]
        self._calls = itertools.count()
        # Answers streamed as they are written (docs/streaming.md): the chunks, and the
        # end of a stream when its final reply comes through here.
        self.streams = StreamSender(client, store, claim_lease_s=claim_lease_s)

    @classmethod
    def from_settings(cls, settings: Settings, store: DeliveryLedger) -> ReplySender:
        client = EasemobClient(
            base_url=settings.easemob_base_url,
            org=settings.easemob_org,
            app=settings.easemob_app,
            client_id=settings.easemob_client_id,
            client_secret=settings.easemob_client_secret.get_secret_value(),
            timeout=settings.easemob_timeout_s,
            pacer=(
                Pacer(settings.easemob_rate_limit / max(1, settings.sender_replicas))
                if settings.easemob_rate_limit > 0
                else None
            ),
        )
        return cls(
            client,
            store,
            max_part_bytes=settings.sender_max_part_bytes,
            mention_asker=settings.sender_mention_asker,
            claim_lease_s=2 * settings.easemob_timeout_s,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def deliver(self, env: Envelope, *, deadline: float) -> Delivery:
        reply = env.reply
        if reply is None:
            raise ValueError("outbound record without a reply")
        full = text = reply.text
        kind, target = reply_target(env)
        # The fallback apology has a ledger of its own: a real answer that comes later
        # (the DLQ record replayed once the outage is over) is still delivered. An
        # apology for a message that already has an answer is not.
        if reply.kind == "fallback":
            answered = await self.store.ledger(env.msg_id)
            if any(row.status == "sent" for row in answered.values()):
                PARTS_SENT.labels("superseded").inc()
                log.info("fallback for an answered message, not sent", extra={"msg_id": env.msg_id})
                return Delivery(parts=len(answered), duplicate=True)
        ledger_id = fallback_ledger_id(env.msg_id) if reply.kind == "fallback" else env.msg_id
        for written in (ledger_id, stream_ledger_id(env.msg_id)):
            if (field := unstorable(env, written)) is not None:
                # Refused before anything is sent: the ledger and history rows written
                # after Easemob's acceptance must never fail (a replay would resend).
                raise FatalError(f"{field} too long to store, not sent", reason="bad_request")
        if env.route is not None and env.route.live == "stream" and kind != "chatrooms":
            # The answer may be streaming already: its end finishes the stream, and only
            # what the stream does not show goes as a normal message (none, usually).
            finished = await self.streams.finish(env, text, reply.kind)
            if finished.rest_from is not None:
                text = text[finished.rest_from :]
            if finished.rest_from is None or not text:
                await self.store.record_exchange(env, full, reply_kind=reply.kind)
                streamed = (finished.stream_id,) if finished.stream_id else ()
                return Delivery(
                    parts=finished.chunks, easemob_msg_ids=streamed, duplicate=finished.duplicate
                )
        digest = reply_digest(text)
        size = self.max_part_bytes
        claimant = f"{self._name}:{next(self._calls)}"
        # Most replies are new, and claiming their first part says so: a row made by this
        # claim (first attempt, no earlier claimant) means no part was ever tried, since
        # parts go in order. Then the ledger need not be read. Otherwise it says what was
        # sent; a claim of part 0 held now is claimed again below by the same claimant.
        # The pacer's wait comes before the claim, so the lease covers only the send.
        await self.client.wait_turn()
        if time.monotonic() > deadline:  # (a claim made now would only block the retry)
            raise RetryableError("delivery deadline passed")
        parts = len(split_reply(text, size))  # if no part was sent: part 0 of these
        first = await self._claim(ledger_id, 0, claimant, parts, kind, target)
        fresh = first is not None and first.attempt == 1 and not first.uncertain
        ledger = {} if fresh else await self.store.ledger(ledger_id)

        # Skip what was sent already: parts 0, 1, … as long as the ledger has them.
        ids: list[str] = []
        start = 0
        while (row := ledger.get(len(ids))) is not None and row.status == "sent":
            if row.reply_digest != digest or row.end_offset is None:
                PARTS_SENT.labels("superseded").inc()
                log.warning(
                    "message already answered with another reply, not sending this one",
                    extra={"msg_id": env.msg_id, "conversation": env.conversation_id},
                )
                return Delivery(parts=len(ids) + 1, duplicate=True)
            ids.append(row.easemob_msg_id or "")
            start = row.end_offset
        resumed = len(ids)

        while start < len(text) or not ids:
            if time.monotonic() > deadline:
                raise RetryableError("delivery deadline passed")
            index = len(ids)
            end = part_end(text, start, size)
            if not fresh:  # (fresh: part 0 of the split made for the claim above)
                parts = index + len(split_reply(text[start:], size))
            ext: dict[str, object] = {
                "imbot_reply_to": env.msg_id,
                "imbot_part": index,
                "imbot_parts": parts,
                "imbot_kind": reply.kind,
            }
            if kind != "users" and self.mention_asker:
                ext["em_at_list"] = [env.sender]
            ids_log = {"msg_id": env.msg_id, "conversation": env.conversation_id, "part": index}
            if fresh:
                claim, fresh = first, False  # made above, for this part and this split
            else:
                await self.client.wait_turn()
                claim = await self._claim(ledger_id, index, claimant, parts, kind, target)
            if claim is None:
                PARTS_SENT.labels("claimed_elsewhere").inc()
                log.info("part claimed by another sender, leaving it to that one", extra=ids_log)
                raise RetryableError("another sender is delivering this reply")
            if claim.uncertain:
                UNCERTAIN_PARTS.labels("unresolved_claim").inc()
                log.warning(
                    "part may have been shown already (a sender stopped before recording"
                    " Easemob's answer); sending it again",
                    extra={**ids_log, "attempt": claim.attempt},
                )
            try:
                easemob_id = await self.client.send_text(
                    kind, sender=env.bot, to=target, text=text[start:end], ext=ext, paced=True
                )
            except MessageTooLarge as exc:
                if size // 2 >= _MIN_PART_BYTES and end - start > 1:
                    PARTS_SENT.labels("split_further").inc()
                    log.info(
                        "part too large for Easemob, splitting it further",
                        extra={**ids_log, "max_bytes": size // 2},
                    )
                    size //= 2
                    continue  # the same claimant claims the part again
                await self._failed(ledger_id, index, parts, kind, target, exc, claimant)
                raise
            except Exception as exc:
                if isinstance(exc, AnswerLost):
                    UNCERTAIN_PARTS.labels("answer_lost").inc()
                    log.warning(
                        "Easemob's answer was lost; the part may have been shown and will be"
                        " sent again",
                        extra={**ids_log, "attempt": claim.attempt, "error": str(exc)},
                    )
                await self._failed(ledger_id, index, parts, kind, target, exc, claimant)
                raise
            # Nothing else is awaited between Easemob's answer and this commit.
            await self.store.mark_sent(
                ledger_id,
                index,
                easemob_id,
                end_offset=end,
                reply_digest=digest,
                parts=parts,
                target_kind=kind,
                target=target,
            )
            PARTS_SENT.labels("sent").inc()
            log.info(
                "reply part sent",
                extra={
                    **ids_log,
                    "parts": parts,
                    "easemob_msg_id": easemob_id,
                    "attempt": claim.attempt,
                },
            )
            ids.append(easemob_id)
            start = end
        duplicate = resumed == len(ids)
        # Idempotent, and after every ledger row: a record whose parts were all sent
        # before (a duplicate, or a retry after this write failed) completes it.
        await self.store.record_exchange(env, full, reply_kind=reply.kind)
        if duplicate:
            PARTS_SENT.labels("duplicate").inc()
            log.info("duplicate outbound record, nothing sent", extra={"msg_id": env.msg_id})
        return Delivery(parts=len(ids), easemob_msg_ids=tuple(ids), duplicate=duplicate)

    async def _claim(
        self, ledger_id: str, index: int, claimant: str, parts: int, kind: TargetKind, target: str
    ) -> Claim | None:
        """Claim part ``index`` of ``parts`` for the length of a send."""
        return await self.store.claim_part(
            ledger_id, index, claimant, lease_s=self.claim_lease_s,
            parts=parts, target_kind=kind, target=target,
        )  # fmt: skip

    async def _failed(
        self,
        ledger_id: str,
        index: int,
        parts: int,
        kind: TargetKind,
        target: str,
        exc: Exception,
        claimant: str,
    ) -> None:
        PARTS_SENT.labels(type(exc).__name__).inc()
        error = f"{UNCERTAIN_ANSWER}{exc}" if isinstance(exc, AnswerLost) else str(exc)
        await self.store.mark_failed(
            ledger_id,
            index,
            error,
            final=not isinstance(exc, RetryableError),
            parts=parts,
            target_kind=kind,
            target=target,
            claimant=claimant,
        )


def fallback_ledger_id(msg_id: str) -> str:
    """Where the ledger keeps the parts of the fallback apology for ``msg_id``."""
    return f"{msg_id}#fallback"
