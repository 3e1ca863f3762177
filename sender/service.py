"""Delivers a reply exactly once in the user's eyes, then records the history.

For each part of a (possibly split) reply the delivery ledger is written around
the send: a row ``sending`` before the REST call, ``sent`` with Easemob's message
id after it. A replayed or duplicated outbound record finds every part ``sent``
and sends nothing; a crash between the REST call and the ``sent`` update
resends only that one part (Easemob has no idempotency key, so that window can
show one part twice — see README "Delivery guarantee").
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from prometheus_client import Counter

from core.envelope import ChatType, Delivery, Envelope
from core.errors import RetryableError
from core.settings import Settings
from sender.easemob import EasemobClient
from sender.pacing import Pacer
from sender.split import split_reply
from sender.store import Store

log = logging.getLogger("imbot.sender")

PARTS_SENT = Counter("imbot_sender_parts_total", "Reply parts by outcome", ["outcome"])

TargetKind = Literal["users", "chatgroups", "chatrooms"]
_KINDS: dict[ChatType, TargetKind] = {
    ChatType.direct: "users",
    ChatType.group: "chatgroups",
    ChatType.chatroom: "chatrooms",
}


def reply_target(env: Envelope) -> tuple[TargetKind, str]:
    """Who receives the reply: the asker in 1:1, the group or chatroom otherwise."""
    kind = _KINDS[env.chat_type]
    return kind, env.sender if kind == "users" else env.to


class ReplySender:
    def __init__(
        self,
        client: EasemobClient,
        store: Store,
        *,
        max_part_bytes: int = 3000,
        mention_asker: bool = True,
    ) -> None:
        self.client = client
        self.store = store
        self.max_part_bytes = max_part_bytes
        self.mention_asker = mention_asker

    @classmethod
    def from_settings(cls, settings: Settings, store: Store) -> ReplySender:
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
        return cls(client, store)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def deliver(self, env: Envelope, *, deadline: float) -> Delivery:
        reply = env.reply
        if reply is None:
            raise ValueError("outbound record without a reply")
        kind, target = reply_target(env)
        parts = split_reply(reply.text, self.max_part_bytes)
        ledger = await self.store.ledger(env.msg_id)
        ids: list[str] = []
        sent_now = 0
        last = len(parts) - 1
        for index, text in enumerate(parts):
            row = ledger.get(index)
            if row is not None and row.status == "sent":
                ids.append(row.easemob_msg_id or "")
                continue
            if time.monotonic() > deadline:
                raise RetryableError("delivery deadline passed")
            ext: dict[str, object] = {
                "imbot_reply_to": env.msg_id,
                "imbot_part": index,
                "imbot_parts": len(parts),
                "imbot_kind": reply.kind,
            }
            if kind != "users" and self.mention_asker:
                ext["em_at_list"] = [env.sender]
            try:
                easemob_id = await self.client.send_text(
                    kind, sender=env.bot, to=target, text=text, ext=ext
                )
            except Exception as exc:
                PARTS_SENT.labels(type(exc).__name__).inc()
                final = not isinstance(exc, RetryableError)
                await self.store.mark_failed(
                    env.msg_id,
                    index,
                    str(exc),
                    final=final,
                    parts=len(parts),
                    target_kind=kind,
                    target=target,
                )
                raise
            # The last part records the history in the same transaction.
            exchange = (env, reply.text, reply.kind) if index == last else None
            await self.store.mark_sent(
                env.msg_id,
                index,
                easemob_id,
                exchange=exchange,
                parts=len(parts),
                target_kind=kind,
                target=target,
            )
            PARTS_SENT.labels("sent").inc()
            ids.append(easemob_id)
            sent_now += 1
        if sent_now == 0:
            PARTS_SENT.labels("duplicate").inc()
            log.info("duplicate outbound record, nothing sent", extra={"msg_id": env.msg_id})
        return Delivery(parts=len(parts), easemob_msg_ids=tuple(ids), duplicate=sent_now == 0)
