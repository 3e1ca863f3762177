"""Who gets what from the console: nothing without a login, no text for a viewer (not even
by URL), no action without the session's CSRF token, and every action audited."""

from __future__ import annotations

import pytest

from imbot.core.envelope import Completion
from imbot.storage import Storage
from tests.envelopes import direct_envelope
from tests.integration.console.conftest import (
    OPERATOR_TOKEN,
    PAGE,
    VIEWER_TOKEN,
    Client,
    log_in,
)

QUESTION = "我的银行卡密码是 QUESTION-7731"
ANSWER = "请不要把密码告诉任何人 ANSWER-5512"

PAGES = (
    "/",
    "/now/panel",
    "/search?kind=user&q=alice",
    "/conversation/chat:ai_bot:alice",
    "/message/m-console-1",
    "/message/m-console-1/trace",
    "/dlq",
    "/money",
    "/quality",
    "/audit",
)


async def _exchange(store: Storage, msg_id: str = "m-console-1") -> None:
    env = direct_envelope(QUESTION, user="alice", msg_id=msg_id)
    env = env.model_copy(
        update={
            "completion": Completion(
                text=ANSWER,
                finish_reason="stop",
                model="demo-1",
                provider="demo",
                input_tokens=12,
                output_tokens=9,
            )
        }
    )
    await store.deliveries.record_exchange(env, ANSWER, reply_kind="answer")
    assert env.completion is not None
    await store.usage.record_usage(env, env.completion)


async def test_nothing_without_a_login(console: Client, store: Storage) -> None:
    await _exchange(store)
    for path in PAGES:
        api = await console.get(path, allow_redirects=False)
        assert api.status == 401, path
        page = await console.get(path, headers=PAGE, allow_redirects=False)
        assert page.status == 303, path
        assert page.headers["Location"] == "/login"
        for body in (await api.text(), await page.text()):
            assert "alice" not in body
            assert "QUESTION" not in body
            assert "m-console-1" not in body
    # An action without a login changes nothing.
    refused = await console.post("/users/tier", data={"user": "alice", "tier": "pro"})
    assert refused.status == 401
    assert await store.tiers.tier_of("alice") is None
    # A wrong token gets the form again, and no session.
    wrong = await console.post("/login", data={"token": "not-a-token-at-all"})
    assert wrong.status == 401
    assert "imbot_console" not in {c.key for c in console.session.cookie_jar}


async def test_the_session_cookie_is_httponly_strict_and_secure_behind_tls(
    console: Client,
) -> None:
    plain = await console.post("/login", data={"token": VIEWER_TOKEN}, allow_redirects=False)
    cookie = plain.cookies["imbot_console"]
    assert cookie["httponly"]
    assert cookie["samesite"] == "Strict"
    assert not cookie["secure"]
    tls = await console.post(
        "/login",
        data={"token": VIEWER_TOKEN},
        headers={"X-Forwarded-Proto": "https"},
        allow_redirects=False,
    )
    assert tls.cookies["imbot_console"]["secure"]
    # A cookie whose signature does not match is nobody. (The signature is hex: its last
    # digit is changed to another one, never to itself.)
    last = cookie.value[-1]
    forged = cookie.value[:-1] + ("1" if last == "0" else "0")
    console.session.cookie_jar.clear()
    console.session.cookie_jar.update_cookies({"imbot_console": forged})
    assert (await console.get("/audit", allow_redirects=False)).status == 401


async def test_a_viewer_sees_ids_never_text_even_by_url(console: Client, store: Storage) -> None:
    await _exchange(store)
    await log_in(console, VIEWER_TOKEN)
    for path in (
        "/conversation/chat:ai_bot:alice",
        "/message/m-console-1",
        "/message/m-console-1:reply",
        "/search?kind=user&q=alice",
    ):
        response = await console.get(path, headers=PAGE)
        body = await response.text()
        assert response.status == 200, path
        assert "m-console-1" in body, path  # the ids are there
        assert "QUESTION-7731" not in body, path
        assert "ANSWER-5512" not in body, path
    # The operator reads the same pages with the text.
    await log_in(console, OPERATOR_TOKEN)
    body = await (await console.get("/conversation/chat:ai_bot:alice", headers=PAGE)).text()
    assert "QUESTION-7731" in body
    assert "ANSWER-5512" in body
    body = await (await console.get("/message/m-console-1", headers=PAGE)).text()
    assert "QUESTION-7731" in body
    assert "demo-1" in body


async def test_a_forged_post_is_refused(console: Client, store: Storage) -> None:
    csrf = await log_in(console, OPERATOR_TOKEN)
    for data in (
        {"user": "alice", "tier": "pro"},
        {"user": "alice", "tier": "pro", "csrf": ""},
        {"user": "alice", "tier": "pro", "csrf": "0" * len(csrf)},
        {"user": "alice", "tier": "pro", "csrf": csrf[:-1]},
    ):
        response = await console.post("/users/tier", data=data, allow_redirects=False)
        assert response.status == 403
        assert "CSRF" in await response.text()
    assert await store.tiers.tier_of("alice") is None  # (the database is shared by tests)
    # Another session's token is not this one's.
    other = await log_in(console, OPERATOR_TOKEN)
    assert other != csrf
    response = await console.post(
        "/users/tier", data={"user": "alice", "tier": "pro", "csrf": csrf}, allow_redirects=False
    )
    assert response.status == 403


async def test_changing_a_tier_works_and_is_audited(console: Client, store: Storage) -> None:
    csrf = await log_in(console, OPERATOR_TOKEN)
    response = await console.post(
        "/users/tier", data={"user": "alice", "tier": "pro", "csrf": csrf}, allow_redirects=False
    )
    assert response.status == 303
    assert await store.tiers.tier_of("alice") == "pro"
    money = await (await console.get("/money?user=alice", headers=PAGE)).text()
    assert "Tier changed" not in money  # only after the redirect's done=tier
    audit = await (await console.get("/audit", headers=PAGE)).text()
    assert "olga" in audit
    assert "set-tier" in audit
    assert "alice" in audit
    assert "to=pro" in audit
    # An unknown tier is refused, and that too is written down.
    bad = await console.post(
        "/users/tier", data={"user": "alice", "tier": "platinum", "csrf": csrf}
    )
    assert bad.status == 400
    assert await store.tiers.tier_of("alice") == "pro"
    # A viewer, even with a valid token of their own session, may not act.
    viewer_csrf = await log_in(console, VIEWER_TOKEN)
    denied = await console.post(
        "/users/tier", data={"user": "alice", "tier": "free", "csrf": viewer_csrf}
    )
    assert denied.status == 403
    assert await store.tiers.tier_of("alice") == "pro"
    audit = await (await console.get("/audit", headers=PAGE)).text()
    assert audit.count("set-tier") == 2
    assert "refused" in audit


@pytest.mark.parametrize("trusted", [False, True])
async def test_proxy_headers_count_only_when_the_proxy_is_trusted(
    trusted: bool, make_settings: object, db_url: str, store: Storage
) -> None:
    from aiohttp.test_utils import TestClient, TestServer

    from imbot.console.app import create_app

    assert callable(make_settings)
    settings = make_settings(
        database_url=db_url,
        console_trusted_proxy=trusted,
        console_operator_groups="sre",
        console_viewer_groups="support",
    )
    await _exchange(store)
    async with TestClient(TestServer(create_app(settings))) as client:
        viewer = {"X-Forwarded-User": "sam", "X-Forwarded-Groups": "staff,support"}
        response = await client.get("/conversation/chat:ai_bot:alice", headers=viewer)
        if not trusted:
            assert response.status == 401
            return
        body = await response.text()
        assert response.status == 200
        assert "QUESTION-7731" not in body
        assert "sam" in body
        stranger = {"X-Forwarded-User": "eve", "X-Forwarded-Groups": "staff"}
        assert (await client.get("/audit", headers=stranger)).status == 401
        operator = {"X-Forwarded-User": "ops", "X-Forwarded-Groups": "sre"}
        body = await (await client.get("/conversation/chat:ai_bot:alice", headers=operator)).text()
        assert "QUESTION-7731" in body
