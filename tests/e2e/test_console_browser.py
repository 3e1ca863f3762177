"""The operator console in a real browser (Debian's chromium driven by Playwright) against
the real stack with the simulated Easemob: find a message and read its trace, requeue a
DLQ record and see it answered, change a user's tier; a viewer sees no user text, even by
URL; nobody logged in gets anything; a forged POST is refused.

``make browser`` installs chromium and Playwright (no browser download). Screenshots of
every page, at 1280×800 and at a phone's 390×844, go to ``$IMBOT_SCREENSHOTS_DIR`` when it
is set (``make console-screenshots``: docs/img/), else to the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Page, ViewportSize, async_playwright

from imbot.cli.devstack import DevStack, simulate

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}

pytestmark = [
    pytest.mark.skipif(
        shutil.which(CHROMIUM) is None, reason="Debian's chromium is missing: run `make browser`"
    ),
    pytest.mark.timeout(300),
]


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    where = Path(os.environ.get("IMBOT_SCREENSHOTS_DIR") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            await launched.close()


def _console_ready(stack: DevStack) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stack.check_alive()
        try:
            if httpx.get(f"{stack.console_url}healthz", timeout=1).status_code == 200:
                return stack.console_url.rstrip("/")
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the console did not start: see its log")


async def _logged_in(
    browser: Browser, base: str, token: str, viewport: ViewportSize = DESKTOP
) -> Page:
    page = await (await browser.new_context(viewport=viewport, base_url=base)).new_page()
    await page.goto("/login")
    await page.fill("#token", token)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{base}/")
    return page


async def _shoot(page: Page, shots: Path, name: str) -> None:
    await page.screenshot(path=str(shots / f"console-{name}.png"), full_page=True)


@pytest.mark.parametrize("stack", ["postgresql"], indirect=True)
async def test_the_console_in_a_browser(stack: DevStack, browser: Browser, shots: Path) -> None:
    base = await asyncio.to_thread(_console_ready, stack)
    user = f"web{uuid.uuid4().hex[:6]}"
    secret = f"我的订单号是 SECRET-{uuid.uuid4().hex[:6]}"
    answers = []
    for text in (secret, "介绍一下你自己", "谢谢"):
        sent = await asyncio.to_thread(simulate, stack.simulator_url, text, sender=user)
        replies = sent["replies"]
        assert isinstance(replies, list)
        assert replies
        answers.append(replies[0]["id"])
    # The user rates the first answer down (feedback in the message's ext, docs/feedback.md).
    async with httpx.AsyncClient(base_url=stack.simulator_url, timeout=40) as sim:
        rated = await sim.post(
            "/_sim/callback",
            json={
                "from": user,
                "to": "ai_bot",
                "text": "👎",
                "ext": {"imbot_feedback": {"msg_id": answers[0], "rating": "👎"}},
            },
        )
        rated.raise_for_status()

    # Nobody logged in: the login form, nothing else; an API call gets 401.
    anonymous = await (await browser.new_context(viewport=DESKTOP, base_url=base)).new_page()
    await anonymous.goto(f"/conversation/chat:ai_bot:{user}")
    assert anonymous.url == f"{base}/login"
    assert user not in await anonymous.content()
    await _shoot(anonymous, shots, "login")
    for path in ("/now/panel", f"/search?kind=user&q={user}", "/money", "/dlq"):
        response = await anonymous.request.get(f"{base}{path}", max_redirects=0)
        assert response.status == 401, path
        assert user not in await response.text()

    # The operator: the overview, then the user's conversation and a message's trace.
    page = await _logged_in(browser, base, stack.console_token)
    await page.wait_for_timeout(6000)  # two samples of the services' /metrics: rates
    await page.reload()
    await _shoot(page, shots, "now")
    await page.click("text=Conversations")
    await page.select_option("#kind", "user")
    await page.fill("input[name=q]", user)
    await page.click("text=Search")
    await page.wait_for_url(f"**/conversation/chat:ai_bot:{user}")
    transcript = await page.content()
    assert secret in transcript
    await _shoot(page, shots, "conversation")
    await page.locator("ol.transcript li.user a").first.click()
    await page.wait_for_selector("ol.timeline li", timeout=30_000)
    timeline = await page.inner_text("#trace")
    for topic in ("imbot.inbound", "imbot.routed", "imbot.outbound"):
        assert topic in timeline
    assert "rule" in timeline
    assert "tokens" in timeline
    # Read where the records must be: one partition, minutes around the database's times.
    assert "of each topic" in timeline
    await _shoot(page, shots, "message")

    # A DLQ record: Easemob answers the next send 404 (the user is unknown to it), the
    # send stage gives up; the operator requeues it once, and the user gets the answer.
    late = f"dlq{uuid.uuid4().hex[:6]}"
    async with httpx.AsyncClient(base_url=stack.simulator_url, timeout=40) as sim:
        (
            await sim.post("/_sim/inject", json={"status": 404, "count": 1, "endpoint": "messages"})
        ).raise_for_status()
        (
            await sim.post(
                "/_sim/callback",
                json={"from": late, "to": "ai_bot", "text": "你好", "chat_type": "chat"},
            )
        ).raise_for_status()
        row = page.locator("tr", has_text=f"chat:ai_bot:{late}")
        deadline = time.monotonic() + 60
        while await row.count() == 0:
            assert time.monotonic() < deadline, "no DLQ record appeared"
            await page.goto("/dlq?stage=send")
        await _shoot(page, shots, "dlq")
        await row.locator("text=show").click()
        await page.check("form[action$='/requeue'] input[name=confirm]")
        await page.click("text=Requeue once")
        await page.wait_for_url("**?done=requeued")
        assert "yes, 1×" in await page.content()
        await _shoot(page, shots, "dlq-record")
        waited = await sim.get("/_sim/wait", params={"to": late, "count": 1, "timeout": 30})
        answered = waited.json()
        assert [m for m in answered["messages"] if m.get("type") != "cmd"]
        # Once: a second requeue of the same record is refused.
        again = await page.request.post(
            page.url.split("?")[0] + "/requeue",
            form={"csrf": await page.input_value("input[name=csrf]"), "confirm": "yes"},
        )
        assert again.status == 409

    # A tier change, and the audit log that says who did it.
    await page.goto(f"/money?user={user}")
    await page.fill("#tier-form input[name=user]", user)
    await page.select_option("#tier-form select[name=tier]", "pro")
    await page.click("text=Change tier")
    await page.wait_for_url("**done=tier")
    assert "Tier changed" in await page.content()
    await _shoot(page, shots, "money")
    await page.goto("/audit")
    audit = await page.inner_text("table")
    assert "set-tier" in audit
    assert user in audit
    assert "requeue" in audit
    assert "dev" in audit
    await _shoot(page, shots, "audit")
    await page.goto("/quality")
    worst = page.locator("table tr", has_text="demo")
    deadline = time.monotonic() + 30
    while await worst.count() == 0:  # the feedback stage writes the rating
        assert time.monotonic() < deadline, "the rating never reached the quality page"
        await page.wait_for_timeout(500)
        await page.reload()
    await _shoot(page, shots, "quality")

    # A forged POST (no CSRF token) is refused, even with the operator's cookie.
    forged = await page.request.post(f"{base}/users/tier", form={"user": user, "tier": "free"})
    assert forged.status == 403

    # A viewer: ids and sizes, never the text, whichever URL they type.
    viewer = await _logged_in(browser, base, stack.console_viewer_token)
    for path in (f"/conversation/chat:ai_bot:{user}", f"/search?kind=user&q={user}"):
        await viewer.goto(path)
        body = await viewer.content()
        assert user in body
        assert "SECRET-" not in body
    await viewer.locator("ol.transcript li.user a").first.click()
    await viewer.wait_for_selector("ol.timeline li", timeout=30_000)
    assert "SECRET-" not in await viewer.content()
    refused = await viewer.request.post(
        f"{base}/users/tier",
        form={"user": user, "tier": "free", "csrf": await viewer.input_value("input[name=csrf]")},
    )
    assert refused.status == 403

    # On a phone: the same pages, one column.
    phone = await _logged_in(browser, base, stack.console_token, viewport=PHONE)
    await _shoot(phone, shots, "now-phone")
    await phone.goto(f"/conversation/chat:ai_bot:{user}")
    await _shoot(phone, shots, "conversation-phone")
    await phone.locator("ol.transcript li.user a").first.click()
    await phone.wait_for_selector("ol.timeline li", timeout=30_000)
    await _shoot(phone, shots, "message-phone")
    width = await phone.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"] + 1, "the message page scrolls sideways on a phone"
