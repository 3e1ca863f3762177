"""The DLQ in the console against the real embedded broker (requeue once, sandboxed replay,
both audited; the record's text for operators only), and every page rendering real rows."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from imbot.console.app import create_app
from imbot.core import topics
from imbot.core.envelope import DlqRecord, encode_envelope
from imbot.core.kafka import ensure_topics, new_producer
from imbot.core.settings import Settings
from imbot.devtools.broker import consume_all
from imbot.storage import Storage
from tests.envelopes import direct_envelope
from tests.integration.console.conftest import (
    OPERATOR_TOKEN,
    PAGE,
    VIEWER_TOKEN,
    Client,
    log_in,
)

SECRET = "请帮我查一下 DLQ-SECRET-4410"


async def _dead_letter(settings: Settings, msg_id: str) -> tuple[int, int]:
    """A DLQ record as the boundary writes it: the model stage gave up on an envelope."""
    env = direct_envelope(SECRET, user="dora", msg_id=msg_id)
    record = DlqRecord(
        stage="model",
        topic=settings.topic(topics.ROUTED),
        partition=0,
        offset=3,
        key=env.conversation_id,
        value=encode_envelope(env).decode(),
        error_kind="RetryableError",
        error="upstream answered 503",
        status=503,
        attempts=4,
        msg_id=msg_id,
        conversation_id=env.conversation_id,
    )
    producer = new_producer(settings)
    await producer.start()
    try:
        meta = await producer.send_and_wait(
            settings.topic(topics.DLQ),
            record.model_dump_json().encode(),
            key=env.conversation_id.encode(),
        )
    finally:
        await producer.stop()
    return meta.partition, meta.offset


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_dlq_record_is_requeued_once_and_audited(
    console: Client, console_settings: Settings
) -> None:
    await ensure_topics(console_settings)
    partition, offset = await _dead_letter(console_settings, "m-dlq-1")
    where = f"/dlq/{partition}/{offset}"

    await log_in(console, VIEWER_TOKEN)
    listing = await (await console.get("/dlq?stage=model", headers=PAGE)).text()
    assert "m-dlq-1" in listing
    assert "waiting" in listing
    assert "DLQ-SECRET" not in listing
    shown = await (await console.get(where, headers=PAGE)).text()
    assert "m-dlq-1" in shown
    assert "DLQ-SECRET" not in shown
    assert "Requeue once" not in shown

    csrf = await log_in(console, OPERATOR_TOKEN)
    shown = await (await console.get(where, headers=PAGE)).text()
    assert "DLQ-SECRET-4410" in shown
    assert "Requeue once" in shown
    unconfirmed = await console.post(f"{where}/requeue", data={"csrf": csrf})
    assert unconfirmed.status == 400
    done = await console.post(
        f"{where}/requeue", data={"csrf": csrf, "confirm": "yes"}, allow_redirects=False
    )
    assert done.status == 303
    assert done.headers["Location"] == f"{where}?done=requeued"
    # The original bytes are back on the model stage's input, as they were.
    [(_, value)] = await consume_all(
        console_settings.kafka_bootstrap, console_settings.topic(topics.ROUTED), 1, timeout=10
    )
    assert value is not None
    assert b"m-dlq-1" in value
    again = await console.post(f"{where}/requeue", data={"csrf": csrf, "confirm": "yes"})
    assert again.status == 409
    shown = await (await console.get(where, headers=PAGE)).text()
    assert "yes, 1×" in shown
    audit = await (await console.get("/audit", headers=PAGE)).text()
    assert audit.count("<td>requeue</td>") == 2
    assert "<td>done</td>" in audit
    assert "<td>refused</td>" in audit
    assert "olga" in audit
    assert "m-dlq-1" in audit
    assert "DLQ-SECRET" not in audit

    # A sandboxed replay puts a marked copy on the stage's input, and is audited.
    replayed = await console.post(
        f"{where}/replay", data={"csrf": csrf, "confirm": "yes"}, allow_redirects=False
    )
    assert replayed.status == 303
    records = await consume_all(
        console_settings.kafka_bootstrap, console_settings.topic(topics.ROUTED), 2, timeout=10
    )
    assert b'"sandbox":true' in (records[-1][1] or b"")
    audit = await (await console.get("/audit", headers=PAGE)).text()
    assert "<td>replay</td>" in audit


async def test_every_page_renders_what_the_database_has(
    console: Client, store: Storage, console_settings: Settings
) -> None:
    from tests.integration.console.test_access import _exchange

    await _exchange(store, "m-pages-1")
    now = datetime.now(UTC)
    await store.deliveries.mark_sent(
        msg_id="m-pages-1",
        part=0,
        easemob_msg_id="em-1",
        end_offset=10,
        reply_digest="d",
        parts=1,
        target_kind="users",
        target="alice",
    )
    await store.feedback.record_feedback(
        msg_id="fb-1",
        reply_msg_id="em-1",
        rating="down",
        user_id="alice",
        conversation_id="chat:ai_bot:alice",
        at=now,
    )
    await log_in(console, VIEWER_TOKEN)
    for path, expected in (
        ("/", "records/s"),
        ("/now/panel", "consumer lag"),
        ("/search", "chat:ai_bot:alice"),
        ("/money?days=7", "Spend by model"),
        ("/quality", "Worst-rated"),
        ("/message/m-pages-1", "demo-1"),
    ):
        response = await console.get(path, headers=PAGE)
        body = await response.text()
        assert response.status == 200, (path, body[-400:])
        assert expected in body, path
        assert "QUESTION-7731" not in body
        assert response.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    quality = await (await console.get("/quality", headers=PAGE)).text()
    assert 'href="/message/m-pages-1"' in quality  # the worst-rated answer, linked
    assert "model demo-1" in quality  # its series, by the model that answered
    message = await (await console.get("/message/m-pages-1", headers=PAGE)).text()
    assert "down" in message  # its rating
    assert "em-1" in message  # its reply part
    assert (await console.get("/message/nope", headers=PAGE)).status == 404
    found = await console.get(
        "/search?kind=msg_id&q=m-pages-1", headers=PAGE, allow_redirects=False
    )
    assert found.headers["Location"] == "/message/m-pages-1"


async def test_a_malformed_token_list_stops_the_start(make_settings: object) -> None:
    from imbot.core.errors import ConfigurationError

    assert callable(make_settings)
    with pytest.raises(ConfigurationError, match="entry 1") as caught:
        create_app(make_settings(console_tokens="olga:admin:short"))
    assert "short" not in str(caught.value)


async def test_money_shows_spend_budgets_and_reservations_in_flight(
    console: Client, store: Storage, console_settings: Settings
) -> None:
    from imbot.routing.budgets import Budgets
    from imbot.storage.quota import Reservation

    scopes = Budgets.of(console_settings).scopes_of("free", user="mia", group=None)
    for n, settle in ((1, True), (2, False)):
        held = await store.quota.reserve(
            reservation_id=f"r-money-{n}",
            msg_id=f"m-money-{n}",
            user_id="mia",
            tier="free",
            model="demo-plus",
            scopes=scopes,
            tokens=1000,
            micros=20_000,
            ttl_s=600,
        )
        assert isinstance(held, Reservation)
        if settle:
            await store.quota.settle(held, tokens=400, micros=7_000)
    await log_in(console, VIEWER_TOKEN)
    body = await (await console.get("/money?days=1&user=mia", headers=PAGE)).text()
    assert "<polyline" in body  # spend plotted
    assert "demo-plus" in body
    assert "mia" in body
    assert "user daily" in body
    assert "0.0070" in body  # the settled call's spend
    assert "m-money-2" in body  # held, in flight
    now = await (await console.get("/now/panel", headers=PAGE)).text()
    assert "0.0070" in now
