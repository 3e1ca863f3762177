"""The whole path with the oddest input a real app user can send, on both databases.

The gateway refuses what cannot be stored (ids that are too long or not printable
text) and makes text storable, so that nothing depending on the data can fail
after Easemob accepted a reply: the longest accepted values travel the whole
pipeline and leave a reply, its ledger row, the history and the usage row.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import orjson

from imbot.cli.devstack import DevStack
from imbot.core import topics
from imbot.core.envelope import DlqRecord
from imbot.core.limits import GROUP_ID_MAX, MSG_ID_MAX, USER_ID_MAX
from imbot.core.settings import load_settings
from imbot.devtools.broker import consume_all
from imbot.storage import open_storage
from imbot.storage.schema import DeliveryRow, MessageRow, UsageRow
from tests.payloads import callback
from tests.rows import count_rows

SECRET = "e2e-secret"


def _longest(prefix: str, length: int) -> str:
    return (prefix + uuid.uuid4().hex * 4)[:length]


def _post(stack: DevStack, data: dict[str, Any]) -> httpx.Response:
    return httpx.post(
        stack.callback_url, content=orjson.dumps(data), headers={"Content-Type": "application/json"}
    )


def _messages(stack: DevStack, to: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{stack.simulator_url}/_sim/messages", params={"to": to})
    return list(resp.json()["messages"])


def _wait_messages(stack: DevStack, to: str, count: int, timeout: float = 60.0) -> None:
    resp = httpx.get(
        f"{stack.simulator_url}/_sim/wait",
        params={"to": to, "count": count, "timeout": timeout},
        timeout=timeout + 5,
    )
    resp.raise_for_status()


async def _rows(stack: DevStack, table: type[object], **where: object) -> int:
    store = await open_storage(stack.env["IMBOT_DATABASE_URL"])
    try:
        return await count_rows(store.database, table, **where)
    finally:
        await store.close()


async def _eventually(stack: DevStack, table: type[object], expected: int, **where: object) -> None:
    deadline = time.monotonic() + 10
    while (n := await _rows(stack, table, **where)) != expected and time.monotonic() < deadline:  # noqa: ASYNC110 - polling a database
        await asyncio.sleep(0.1)
    assert n == expected, f"{table.__name__} {where}: {n} rows, expected {expected}"


async def _dlq_for(stack: DevStack, msg_id: str) -> list[DlqRecord]:
    settings = load_settings(
        kafka_bootstrap=stack.env["IMBOT_KAFKA_BOOTSTRAP"],
        kafka_embedded=True,
        topic_prefix=stack.env["IMBOT_TOPIC_PREFIX"],
    )
    records = await consume_all(
        settings.kafka_bootstrap, settings.topic(topics.DLQ), 100_000, timeout=2
    )
    found = [DlqRecord.model_validate_json(v) for _, v in records if v]
    return [r for r in found if r.msg_id == msg_id]


async def test_longest_accepted_ids_and_control_characters_travel_the_whole_path(
    stack: DevStack,
) -> None:
    """A group message with a 64-character msg_id, sender and group id, and NUL and
    other control characters in the text: one reply, ledger, history and usage rows."""
    sender = _longest("u", USER_ID_MAX)
    group = _longest("9", GROUP_ID_MAX)
    msg_id = _longest("1", MSG_ID_MAX)
    data = callback(
        "你好\x00，请\x01介绍\x7f一下\u200b你自己\x1b[31m",
        sender=sender,
        to=group,
        chat_type="group",
        group_id=group,
        msg_id=msg_id,
        ext={"em_at_list": ["ai_bot"]},
        secret=SECRET,
    )
    resp = _post(stack, data)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"valid": True}
    _wait_messages(stack, group, 1)
    await _eventually(stack, UsageRow, 1, msg_id=msg_id)
    await _eventually(stack, MessageRow, 1, reply_to=msg_id)
    assert await _rows(stack, MessageRow, msg_id=msg_id) == 1
    assert await _rows(stack, DeliveryRow, msg_id=msg_id, status="sent") == 1
    await asyncio.sleep(1)  # a duplicate would arrive by now
    replies = _messages(stack, group)
    assert len(replies) == 1
    assert replies[0]["ext"]["imbot_reply_to"] == msg_id
    assert await _dlq_for(stack, msg_id) == []


async def test_longest_direct_sender_gets_one_reply(stack: DevStack) -> None:
    sender = _longest("d", USER_ID_MAX)
    msg_id = _longest("2", MSG_ID_MAX)
    data = callback("讲个笑话\x00", sender=sender, msg_id=msg_id, secret=SECRET)
    assert _post(stack, data).json() == {"valid": True}
    _wait_messages(stack, sender, 1)
    await _eventually(stack, MessageRow, 1, reply_to=msg_id)
    await _eventually(stack, UsageRow, 1, msg_id=msg_id)
    assert len(_messages(stack, sender)) == 1


async def test_ids_that_cannot_be_stored_are_refused_before_kafka(stack: DevStack) -> None:
    """Too long, or not printable text: a clear 400, and the user is never answered
    by a reply that would then fail to be recorded."""
    cases = {
        "msg_id too long": {"msg_id": "1" * (MSG_ID_MAX + 1)},
        "msg_id with NUL": {"msg_id": "1290012345\x00678"},
        "sender too long": {"sender": "u" * (USER_ID_MAX + 1)},
        "sender with NUL": {"sender": "alice\x00"},
    }
    for name, change in cases.items():
        sender = change.get("sender", _longest("r", 20))
        msg_id = change.get("msg_id", _longest("3", 19))
        data = callback("你好", sender=sender, msg_id=msg_id, secret=SECRET)
        resp = _post(stack, data)
        assert resp.status_code == 400, (name, resp.status_code, resp.text)
        assert resp.json()["error"], name
    await asyncio.sleep(2)
    for change in cases.values():
        if "sender" in change:
            assert _messages(stack, change["sender"]) == []
