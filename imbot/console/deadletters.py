"""The dead-letter queue in the console: list with filters, one record, and the two
actions on it (requeue once, sandboxed replay), each audited. Reads and writes go through
the operator tools of ``imbot.streams`` (``dlq``, ``replay``), as ``imbot dlq`` does."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from aiohttp import web

from imbot.console.site import audited, console, render, require_operator, who
from imbot.core import topics
from imbot.core.errors import ConfigurationError
from imbot.streams.dlq import DlqFilter, list_dlq, requeue, show_dlq
from imbot.streams.pipeline import STAGE_NAMES
from imbot.streams.reader import Bounds, parse_time
from imbot.streams.replay import replay

LIST_LIMIT = 200


def _filter(query: Any) -> tuple[DlqFilter, Bounds]:
    def opt(name: str) -> str | None:
        value = str(query.get(name, "")).strip()
        return value or None

    since = opt("since")
    try:
        bounds = Bounds(since_ms=parse_time(since)) if since else Bounds()
    except ConfigurationError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    return DlqFilter(
        stage=opt("stage"), reason=opt("reason"), conversation=opt("conversation")
    ), bounds


async def dlq_page(request: web.Request) -> web.Response:
    filt, bounds = _filter(request.query)
    lines: list[dict[str, Any]] = []
    summary = await list_dlq(
        console(request).settings,
        bounds,
        filt,
        limit=LIST_LIMIT,
        out=lines.append,
    )
    return render(
        request,
        "dlq.html",
        lines=list(reversed(lines)),  # newest first
        summary=summary,
        filt=filt,
        since=request.query.get("since", ""),
        stages=STAGE_NAMES,
    )


def _where(request: web.Request) -> tuple[int, int]:
    try:
        return int(request.match_info["partition"]), int(request.match_info["offset"])
    except ValueError:
        raise web.HTTPNotFound() from None


async def _record(request: web.Request, partition: int, offset: int) -> dict[str, Any]:
    shown: list[dict[str, Any]] = []
    await show_dlq(
        console(request).settings,
        offset=offset,
        partition=partition,
        out=shown.append,
    )
    if not shown:
        raise web.HTTPNotFound(text="no such DLQ record")
    return shown[0]


async def dlq_record_page(request: web.Request) -> web.Response:
    partition, offset = _where(request)
    line = await _record(request, partition, offset)
    # The record holds the original bytes: the user's message. Only an operator sees them.
    record = line.pop("record", None)
    line.pop("raw_b64", None)
    shown = None
    if record is not None and who(request).sees_text:
        # The original is an envelope's JSON as text: shown as the object it is.
        with contextlib.suppress(TypeError, ValueError):
            record["value"] = json.loads(record["value"])
        shown = json.dumps(record, ensure_ascii=False, indent=2)
    history = await console(request).audit.recent(target=f"{partition}:{offset}")
    return render(
        request,
        "dlq_record.html",
        line=line,
        record=shown,
        history=history,
        done=request.query.get("done", ""),
    )


def _confirmed(data: Any) -> None:
    if data.get("confirm") != "yes":
        raise web.HTTPBadRequest(text="tick the confirmation first")


async def requeue_action(request: web.Request) -> web.Response:
    """Send the record's original back to its stage, once: a record requeued before (by
    the console or ``imbot dlq requeue``: the marks in Kafka) is refused."""
    require_operator(request)
    partition, offset = _where(request)
    _confirmed(await request.post())
    target = f"{partition}:{offset}"
    lines: list[dict[str, Any]] = []
    summary = await requeue(
        console(request).settings,
        Bounds(partition=partition, from_offset=offset, to_offset=offset),
        limit=1,
        out=lines.append,
    )
    line = lines[0] if lines else {}
    detail = {
        "msg_id": line.get("msg_id"),
        "stage": line.get("stage"),
        "run": summary.run,
        "to": line.get("target"),
        "skipped": line.get("skipped"),
    }
    outcome = "done" if summary.requeued == 1 else "refused"
    await audited(request, "requeue", target, detail, outcome)
    if outcome != "done":
        raise web.HTTPConflict(text=f"not requeued: {line.get('skipped') or 'no such record'}")
    raise web.HTTPSeeOther(f"/dlq/{partition}/{offset}?done=requeued")


async def replay_action(request: web.Request) -> web.Response:
    """Replay the record through its stage in the sandbox: the answer goes to
    imbot.sandbox (see the trace), never to the user; a model call is paid for."""
    require_operator(request)
    partition, offset = _where(request)
    _confirmed(await request.post())
    lines: list[dict[str, Any]] = []
    summary = await replay(
        console(request).settings,
        topics.DLQ,
        Bounds(partition=partition, from_offset=offset, to_offset=offset),
        limit=1,
        out=lines.append,
    )
    line = lines[0] if lines else {}
    detail = {"msg_id": line.get("msg_id"), "run": summary.replay_id, "to": line.get("target")}
    outcome = "done" if summary.replayed == 1 else "refused"
    await audited(request, "replay", f"{partition}:{offset}", detail, outcome)
    if outcome != "done":
        raise web.HTTPConflict(text="not replayed")
    raise web.HTTPSeeOther(f"/dlq/{partition}/{offset}?done=replayed")
