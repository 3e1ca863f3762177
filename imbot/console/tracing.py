"""A message's trace in the console: its records on every topic (``imbot trace``), read
where they must be instead of over a week of topics, and shown as a timeline of stages."""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta
from typing import Any

from aiohttp import web
from aiokafka import AIOKafkaConsumer
from aiokafka.partitioner import DefaultPartitioner

from imbot.console.site import console, render
from imbot.core import topics
from imbot.core.errors import ConfigurationError
from imbot.core.kafka import connection_kwargs
from imbot.core.limits import MSG_ID_MAX
from imbot.core.settings import Settings
from imbot.storage.console import as_utc
from imbot.storage.schema import utcnow
from imbot.streams.reader import connect
from imbot.streams.trace import trace

# A message's records lie between its receipt and its delivery. Its first row in the
# database (the model stage's reservation) comes at most two stages' deadlines after the
# receipt (IMBOT_STAGE_DEADLINE_S, a minute each); after its last (the history, written on
# delivery) only the delivered record follows, and before a delivery the sender may retry
# for its deadline (ten minutes). A requeue days later is found by the wide search.
TRACE_BEFORE_S = 3 * 60.0
TRACE_AFTER_DELIVERY_S = 60.0
TRACE_AFTER_S = 11 * 60.0
_PARTITIONER = DefaultPartitioner()  # the producers' (aiokafka's): murmur2 of the key
_COUNTS: dict[str, int] = {}  # partitions of a topic, as Kafka says (they only ever grow)


async def trace_panel(request: web.Request) -> web.Response:
    """The message's records on every topic (``imbot trace``), as a timeline; loaded by the
    message page after it showed what the database has. No record view carries text.

    Narrowed first to where the records must be: the partition its conversation's key
    maps to, and minutes around the times the database has of it (Kafka finds the first
    offset by time), so a week of retained topics is not scanned; ``?wide=1``, or
    nothing found, reads every partition of the last ``days``."""
    c = console(request)
    msg_id = request.match_info["msg_id"][:MSG_ID_MAX]
    days = min(int(request.query.get("days", "7")), 30)
    started = time.perf_counter()
    result, where = None, None
    if not request.query.get("wide"):
        where = await _where_to_look(request, msg_id)
        if where is not None:
            with contextlib.suppress(ConfigurationError):  # topics partitioned differently
                result = await trace(c.settings, msg_id, **where)
    if result is None or not result.views:
        where = None
        since = utcnow() - timedelta(days=days)
        result = await trace(
            c.settings,
            msg_id,
            since_ms=int(since.timestamp() * 1000),
        )
    took_ms = (time.perf_counter() - started) * 1000
    return render(
        request,
        "trace_panel.html",
        result=result,
        steps=timeline(result.views),
        took_ms=took_ms,
        days=days,
        narrowed=where,
        msg_id=msg_id,
    )


async def _where_to_look(request: web.Request, msg_id: str) -> dict[str, int] | None:
    """The partition and the time window that hold a message's records, from the rows
    the database has of it; None when it has none."""
    c = console(request)
    facts = await c.queries.message_facts(msg_id, with_text=False)
    times = [m.created_at for m in (facts.message, facts.reply) if m is not None]
    times += [r["created_at"] for r in facts.reservations if r.get("created_at")]
    if facts.message is None or not times:
        return None
    stamps = [as_utc(t).timestamp() for t in times]
    after = TRACE_AFTER_DELIVERY_S if facts.reply is not None else TRACE_AFTER_S
    count = await partition_count(c.settings)
    if not count:
        return None
    partitions = list(range(count))
    key = facts.message.conversation_id.encode()
    return {
        "partition": int(_PARTITIONER(key, partitions, partitions)),
        "since_ms": int((min(stamps) - TRACE_BEFORE_S) * 1000),
        "until_ms": int((max(stamps) + after) * 1000),
    }


# What a stage adds to the envelope, in the order the pipeline adds it.
FACTS = (
    "content",
    "moderation_in",
    "route",
    "chunk",
    "completion",
    "moderation_out",
    "reply",
    "delivery",
    "dlq",
)


def timeline(views: list[dict[str, Any]]) -> list[tuple[dict[str, Any], set[str]]]:
    """Each record with the facts that are new on it: a stage's step shows what that
    stage decided, not everything the envelope carried along."""
    steps = []
    before: dict[str, Any] = {}
    for view in views:
        fresh = {k for k in FACTS if k in view and view[k] != before.get(k)}
        steps.append((view, fresh))
        before = view
    return steps


async def partition_count(settings: Settings) -> int:
    """How many partitions the pipeline's topics have (the inbound topic's; every topic is
    created with as many): asked of Kafka once per process, not taken from the settings,
    which may differ from what an earlier deploy created."""
    name = settings.topic(topics.INBOUND)
    if name not in _COUNTS:
        consumer = AIOKafkaConsumer(**connection_kwargs(settings))
        await connect(consumer, settings)
        try:
            await consumer.topics()
            _COUNTS[name] = len(consumer.partitions_for_topic(name) or ())
        finally:
            await consumer.stop()
    return _COUNTS[name]
