"""The console's read-only pages: now, search, a conversation, a message (its trace is
``tracing``), quality, the audit log. A viewer's pages are built from statements that never
select text."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any, get_args
from urllib.parse import quote

from aiohttp import web

from imbot.console.charts import line_chart
from imbot.console.pulse import EASEMOB_BUDGET_MS, Pulse
from imbot.console.site import console, render, who
from imbot.storage.console import SearchKind
from imbot.storage.schema import utcnow

SEARCH_MAX = 300  # the longest id searched for: a conversation's (storage's column size)


async def now_page(request: web.Request) -> web.Response:
    return render(request, "now.html", **(await _now(request)))


async def now_panel(request: web.Request) -> web.Response:
    """The overview's live part, fetched every few seconds by console.js."""
    return render(request, "now_panel.html", **(await _now(request)))


async def _now(request: web.Request) -> dict[str, Any]:
    c = console(request)
    totals = await c.queries.totals()
    readings = list(c.pulse.readings)
    latest = c.pulse.latest
    budgets = await _tenant_budgets(request)
    return {
        "pulse": latest,
        "stale": time.time() - latest.at > 30,
        "totals": totals,
        "budgets": budgets,
        "budget_ms": EASEMOB_BUDGET_MS,
        "rates_chart": line_chart(
            _by_key(readings, lambda p: p.stage_rates),
            unit="records/s",
            title="Records per second by stage",
        ),
        "callbacks_chart": line_chart(
            _by_key(readings, lambda p: p.callbacks),
            unit="answers/s",
            title="Callback answers per second by outcome",
        ),
    }


def _by_key(readings: list[Pulse], pick: Any) -> dict[str, list[tuple[float, float]]]:
    """One series per key that was ever above zero (label sets created at zero, such as
    every callback outcome, would bury the ones that happen)."""
    keys = sorted({k for p in readings for k, v in pick(p).items() if v > 0})
    return {k: [(p.at, pick(p).get(k, 0.0)) for p in readings] for k in keys}


async def _tenant_budgets(request: web.Request) -> list[dict[str, Any]]:
    """Where the app's own budgets stand today (the tenant scopes of the default tier)."""
    from imbot.routing.budgets import Budgets

    c = console(request)
    routing = c.settings.policy.routing
    if not routing.enabled:
        return []
    scopes = Budgets.of(c.settings).scopes_of(routing.default_tier, user=None, group=None)
    return [
        {
            "label": s.scope.label,
            "limit": s.scope.micros,
            "spent": s.spent_micros,
            "reserved": s.reserved_micros,
            "share": s.share,
        }
        for s in await c.quota.states(scopes)
    ]


async def search_page(request: web.Request) -> web.Response:
    c = console(request)
    kind = request.query.get("kind", "user")
    term = request.query.get("q", "").strip()[:SEARCH_MAX]
    if kind not in get_args(SearchKind):
        raise web.HTTPBadRequest(text="kind: msg_id, conversation, user or group")
    found: list[str] = []
    if term:
        found = await c.queries.search(kind, term)  # type: ignore[arg-type]
        if kind == "msg_id" and found:
            raise web.HTTPSeeOther(f"/message/{quote(found[0], safe=':')}")
        if kind != "msg_id" and len(found) == 1:
            raise web.HTTPSeeOther(f"/conversation/{quote(found[0], safe=':')}")
    recent = await c.queries.recent_conversations() if not term else []
    return render(request, "search.html", kind=kind, term=term, found=found, recent=recent)


async def conversation_page(request: web.Request) -> web.Response:
    c = console(request)
    conversation_id = request.match_info["conversation"]
    messages = await c.queries.transcript(conversation_id, with_text=who(request).sees_text)
    if not messages:
        raise web.HTTPNotFound(text="no such conversation")
    return render(request, "conversation.html", conversation=conversation_id, messages=messages)


async def message_page(request: web.Request) -> web.Response:
    c = console(request)
    facts = await c.queries.message_facts(
        request.match_info["msg_id"], with_text=who(request).sees_text
    )
    if facts.message is None and facts.usage is None and not facts.deliveries:
        raise web.HTTPNotFound(text="the database has nothing of this message")
    return render(request, "message.html", facts=facts)


async def quality_page(request: web.Request) -> web.Response:
    c = console(request)
    days = min(int(request.query.get("days", "14")), 90)
    since = utcnow() - timedelta(days=days)
    # Two statements over the same ratings, on two connections at once.
    rows, worst = await asyncio.gather(
        c.queries.ratings(since=since, hours=24), c.queries.worst_rated(since=since)
    )
    shares: dict[str, dict[float, list[int]]] = {}
    for r in rows:
        for name in (f"model {r.model}", f"tier {r.tier}"):
            up_down = shares.setdefault(name, {}).setdefault(r.bucket.timestamp(), [0, 0])
            up_down[0] += r.count if r.rating == "up" else 0
            up_down[1] += r.count if r.rating in ("up", "down") else 0
    series = {
        name: [(t, 100 * up / rated) for t, (up, rated) in sorted(days_.items()) if rated]
        for name, days_ in sorted(shares.items())
    }
    return render(
        request,
        "quality.html",
        days=days,
        chart=line_chart(
            series,
            unit="% up",
            title="Share of thumbs up by model and tier, per day",
            span=(since.timestamp(), utcnow().timestamp()),
            y_max=100.0,
            width=1200,
            height=260,
        ),
        rows=rows,
        worst=worst,
    )


async def audit_page(request: web.Request) -> web.Response:
    rows = await console(request).audit.recent(limit=200)
    return render(request, "audit.html", rows=rows)
