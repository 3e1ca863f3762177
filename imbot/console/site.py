"""What every page and action of the console shares: the app's keys, the templates, who
is asking, the operator check, and the audit write."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

from imbot.console.access import Access, Principal
from imbot.console.pulse import PulseHistory
from imbot.core.settings import Settings
from imbot.storage.console import ConsoleAudit, ConsoleQueries, as_utc
from imbot.storage.database import Database
from imbot.storage.quota import QuotaLedger
from imbot.storage.tiers import UserTiers

HERE = Path(__file__).parent


@dataclass(frozen=True, slots=True)
class Console:
    """The console's resources, opened once per process (``app.console_ctx``)."""

    settings: Settings
    access: Access
    database: Database
    queries: ConsoleQueries
    audit: ConsoleAudit
    quota: QuotaLedger
    tiers: UserTiers
    pulse: PulseHistory


CONSOLE: web.AppKey[Console] = web.AppKey("console", Console)
WHO: web.RequestKey[Principal] = web.RequestKey("who", Principal)


def _utc(value: datetime | str | float | None) -> str:
    """A time as UTC text: an epoch, or a database's timestamp (SQLite's is text, naive)."""
    if value is None:
        return "—"
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    return as_utc(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _money(micros: float | None) -> str:
    return "—" if micros is None else f"{micros / 1_000_000:,.4f}"


TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
TEMPLATES.filters["utc"] = _utc
TEMPLATES.filters["money"] = _money


def console(request: web.Request) -> Console:
    return request.app[CONSOLE]


def who(request: web.Request) -> Principal:
    return request[WHO]


def render(
    request: web.Request, template: str, *, status: int = 200, **context: Any
) -> web.Response:
    """A page (or a fragment) for the person asking; the CSRF token goes into every form."""
    person = request.get(WHO)
    body = TEMPLATES.get_template(template).render(
        who=person,
        csrf=console(request).access.csrf_token(person) if person is not None else "",
        path=request.path,
        currency=console(request).settings.policy.routing.currency,
        **context,
    )
    response = web.Response(text=body, content_type="text/html", status=status)
    # Pages carry conversations: never cached, never framed, no script but our own.
    response.headers["Cache-Control"] = "no-store"
    return response


def require_operator(request: web.Request) -> Principal:
    person = who(request)
    if person.role != "operator":
        raise web.HTTPForbidden(text="operators only")
    return person


async def audited(
    request: web.Request, action: str, target: str, detail: dict[str, Any], outcome: str
) -> None:
    person = who(request)
    await console(request).audit.record(
        operator=person.name,
        role=person.role,
        action=action,
        target=target,
        detail=detail,
        outcome=outcome,
    )
