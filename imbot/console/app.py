"""``imbot console``: the operator console's app (docs/console.md).

Nothing without authentication: the access middleware answers a request nobody logged
in for with 401 (or, for a page, a redirect to the login form) before any handler reads
data, and refuses a POST without its session's CSRF token with 403.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from imbot.console import deadletters, money, pages, tracing
from imbot.console.access import COOKIE, Access, set_session
from imbot.console.pulse import PulseHistory, sampling, source_of
from imbot.console.site import CONSOLE, HERE, WHO, Console, render
from imbot.core.settings import Settings
from imbot.storage import open_database
from imbot.storage.console import ConsoleAudit, ConsoleQueries
from imbot.storage.quota import QuotaLedger
from imbot.storage.tiers import UserTiers

log = logging.getLogger("imbot.console")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PUBLIC = ("/login", "/healthz", "/static/")
LOGIN_FAILURE_DELAY_S = 0.5  # slows guessing; a person barely notices


def _wants_page(request: web.Request) -> bool:
    return request.method == "GET" and "text/html" in request.headers.get("Accept", "")


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(PUBLIC):
        return await handler(request)
    access = request.app[CONSOLE].access
    person = access.who(request)
    if person is None:
        if _wants_page(request):
            raise web.HTTPSeeOther("/login")
        raise web.HTTPUnauthorized(text="log in first")
    if request.method not in ("GET", "HEAD"):
        form = await request.post()
        if not access.csrf_ok(person, str(form.get("csrf", ""))):
            log.warning("console POST refused: no valid CSRF token", extra={"path": request.path})
            raise web.HTTPForbidden(text="refused: the form's CSRF token is missing or wrong")
    request[WHO] = person
    response = await handler(request)
    response.headers.setdefault("Cache-Control", "no-store")
    return response


@web.middleware
async def headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        _harden(exc, started)
        raise
    _harden(response, started)
    return response


def _harden(response: web.StreamResponse, started: float) -> None:
    # How long the page took us (the browser's developer tools and bench/console.py read it).
    response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.1f}"
    # Our own script and style only, never framed, no referrer leaving the console.
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'"
    )
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"


async def login_form(request: web.Request) -> web.Response:
    return render(request, "login.html", failed=False)


async def login(request: web.Request) -> web.Response:
    access = request.app[CONSOLE].access
    form = await request.post()
    person = access.login(str(form.get("token", "")))
    if person is None:
        await asyncio.sleep(LOGIN_FAILURE_DELAY_S)
        return render(request, "login.html", failed=True, status=401)
    log.info("console login", extra={"operator": person.name, "role": person.role})
    response = web.HTTPSeeOther("/")
    set_session(response, request, access.cookie_value(person))
    raise response


async def logout(request: web.Request) -> web.Response:
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def console_ctx(settings: Settings) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        database = await open_database(settings.database_url)
        source = source_of(
            settings.prometheus_url, settings.console_metrics_urls, settings.console_fetch_timeout_s
        )
        history = PulseHistory(source)
        app[CONSOLE] = Console(
            settings=settings,
            access=Access(settings),
            database=database,
            queries=ConsoleQueries(database),
            audit=ConsoleAudit(database),
            quota=QuotaLedger(database),
            tiers=UserTiers(database),
            pulse=history,
        )
        try:
            async with sampling(history):
                yield
        finally:
            await database.close()

    return ctx


def create_app(settings: Settings) -> web.Application:
    Access(settings)  # a malformed IMBOT_CONSOLE_TOKENS stops the start, not the first login
    app = web.Application(
        middlewares=[headers_middleware, access_middleware], client_max_size=64 * 1024
    )
    app.cleanup_ctx.append(console_ctx(settings))
    r = app.router
    r.add_get("/healthz", healthz)
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_static("/static/", HERE / "static")
    r.add_get("/", pages.now_page)
    r.add_get("/now/panel", pages.now_panel)
    r.add_get("/search", pages.search_page)
    r.add_get("/conversation/{conversation}", pages.conversation_page)
    r.add_get("/message/{msg_id}", pages.message_page)
    r.add_get("/message/{msg_id}/trace", tracing.trace_panel)
    r.add_get("/dlq", deadletters.dlq_page)
    r.add_get("/dlq/{partition}/{offset}", deadletters.dlq_record_page)
    r.add_post("/dlq/{partition}/{offset}/requeue", deadletters.requeue_action)
    r.add_post("/dlq/{partition}/{offset}/replay", deadletters.replay_action)
    r.add_get("/money", money.money_page)
    r.add_post("/users/tier", money.set_tier_action)
    r.add_get("/quality", pages.quality_page)
    r.add_get("/audit", pages.audit_page)
    return app


def main(settings: Settings) -> None:
    log.info(
        "console listening",
        extra={"url": f"http://{settings.console_host}:{settings.console_port}/"},
    )
    web.run_app(
        create_app(settings),
        host=settings.console_host,
        port=settings.console_port,
        access_log=None,
        print=None,
        handle_signals=True,
        shutdown_timeout=5,
    )
