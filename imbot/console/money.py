"""Money in the console: spend over time by tenant, tier, user and model; budgets left;
reservations in flight; users' tiers and the (audited) form that changes one."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import quote

from aiohttp import web

from imbot.console.charts import line_chart
from imbot.console.site import audited, console, render, require_operator
from imbot.core.limits import USER_ID_MAX
from imbot.routing.budgets import Budgets
from imbot.routing.tiers import TierBook
from imbot.storage.console import SeriesPoint, SpendBy
from imbot.storage.schema import utcnow

_BY: tuple[SpendBy, ...] = ("tenant", "tier", "user", "model")


def _series(points: list[SeriesPoint]) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for p in points:
        out.setdefault(p.key, []).append((p.bucket.timestamp(), p.value / 1_000_000))
    return out


async def money_page(request: web.Request) -> web.Response:
    c = console(request)
    days = min(max(int(request.query.get("days", "2")), 1), 90)
    hours = 24 if days > 7 else 1
    since = utcnow() - timedelta(days=days)
    currency = c.settings.policy.routing.currency
    spend = await c.queries.spend(since=since, hours=hours)
    charts = [
        (
            by,
            line_chart(
                _series(spend[by]),
                unit=f"{currency} per {'day' if hours == 24 else 'hour'}",
                title=f"Spend by {by}",
                span=(since.timestamp(), utcnow().timestamp()),
            ),
        )
        for by in _BY
    ]
    user = request.query.get("user", "").strip()[:USER_ID_MAX]
    routing = c.settings.policy.routing
    tiers = await c.tiers.all_tiers()
    return render(
        request,
        "money.html",
        days=days,
        charts=charts,
        budgets=await _budgets(request, user or None),
        user=user,
        tiers=sorted(tiers.items()),
        tier_names=sorted(routing.tiers),
        default_tier=routing.default_tier,
        in_flight=await c.queries.in_flight(),
        done=request.query.get("done", ""),
    )


async def _budgets(request: web.Request, user: str | None) -> list[dict[str, Any]]:
    """Where the budgets stand: the tenant's, and a user's when one is asked for."""
    c = console(request)
    routing = c.settings.policy.routing
    if not routing.enabled:
        return []
    tier = routing.default_tier
    if user is not None:
        tier = await TierBook(routing, c.tiers).tier_of(user)
    scopes = Budgets.of(c.settings).scopes_of(tier, user=user, group=None)
    return [
        {
            "label": s.scope.label,
            "key": s.scope.key,
            "limit": s.scope.micros,
            "spent": s.spent_micros,
            "left": None if s.scope.micros is None else max(0, s.scope.micros - s.used_micros),
            "reserved": s.reserved_micros,
            "share": s.share,
        }
        for s in await c.quota.states(scopes)
    ]


async def set_tier_action(request: web.Request) -> web.Response:
    """Set (or clear, with an empty tier) a user's tier, as ``imbot users set-tier`` does."""
    require_operator(request)
    c = console(request)
    form = await request.post()
    user = str(form.get("user", "")).strip()
    tier = str(form.get("tier", "")).strip() or None
    if not user or len(user) > USER_ID_MAX:
        raise web.HTTPBadRequest(text="name a user")
    if tier is not None and tier not in c.settings.policy.routing.tiers:
        await audited(request, "set-tier", user, {"tier": tier, "why": "unknown tier"}, "refused")
        raise web.HTTPBadRequest(text="unknown tier")
    before = await c.tiers.tier_of(user)
    await c.tiers.set_tier(user, tier)
    await audited(request, "set-tier", user, {"from": before, "to": tier}, "done")
    raise web.HTTPSeeOther(f"/money?user={quote(user)}&done=tier")
