"""EasemobClient.download_file against the simulator over real HTTP: a file uploaded as
Easemob takes it (multipart, ``restrict-access``) comes back byte for byte with the app
token and its share-secret; a wrong secret, an unknown file, a foreign URL, a file over
the limit and a slow download each end in their typed error."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from imbot.core.errors import RetryableError
from imbot.sender.easemob import (
    AttachmentTooLarge,
    AttachmentUnavailable,
    EasemobClient,
)
from imbot.simulator.app import SimulatorConfig, serve
from tests.integration.conftest import new_easemob_client

IMAGE = b"\x89PNG\r\n\x1a\n" + os.urandom(200 * 1024)  # 200 KiB: several chunks


@pytest.fixture
async def simulator() -> AsyncIterator[str]:
    config = SimulatorConfig(port=0)
    runner: web.AppRunner = await serve(config)
    yield f"http://127.0.0.1:{config.port}"
    await runner.cleanup()


@pytest.fixture
async def client(simulator: str) -> AsyncIterator[EasemobClient]:
    async with new_easemob_client(simulator) as c:
        yield c


@pytest.fixture
async def admin(simulator: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=simulator) as http:
        yield http


async def upload(
    admin: httpx.AsyncClient, client: EasemobClient, *, restricted: bool = True
) -> dict[str, Any]:
    """Upload IMAGE as a client SDK would (multipart ``file``); Easemob's ``entities[0]``."""
    headers = {"Authorization": f"Bearer {await client.token()}"}
    if restricted:
        headers["restrict-access"] = "true"
    response = await admin.post(
        "/demo-org/demo-app/chatfiles",
        files={"file": ("cat.png", IMAGE, "image/png")},
        headers=headers,
    )
    response.raise_for_status()
    entity: dict[str, Any] = response.json()["entities"][0]
    assert entity["type"] == "chatfile"
    return entity


def body_url(entity: dict[str, Any], host: str = "https://a1.easemob.com") -> str:
    """The ``url`` an image message body carries (Easemob's host, not ours)."""
    return f"{host}/demo-org/demo-app/chatfiles/{entity['uuid']}"


async def test_download_returns_the_bytes_and_content_type(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    entity = await upload(admin, client)
    # The body names Easemob's public host; the client asks its own configured host,
    # so the app token never leaves for a host a message body chose.
    got = await client.download_file(body_url(entity), secret=entity["share-secret"])
    assert got.data == IMAGE
    assert got.content_type == "image/png"
    assert str(len(IMAGE)) in repr(got)
    assert b"PNG" not in repr(got).encode()


async def test_unrestricted_files_need_no_secret(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    entity = await upload(admin, client, restricted=False)
    assert "share-secret" not in entity
    assert (await client.download_file(body_url(entity))).data == IMAGE


@pytest.mark.parametrize("secret", ["not-the-secret", None])
async def test_a_wrong_or_missing_secret_is_attachment_unavailable(
    client: EasemobClient, admin: httpx.AsyncClient, secret: str | None
) -> None:
    entity = await upload(admin, client)
    with pytest.raises(AttachmentUnavailable) as caught:
        await client.download_file(body_url(entity), secret=secret)
    assert caught.value.status == 403
    assert entity["share-secret"] not in str(caught.value)


async def test_an_unknown_file_is_attachment_unavailable_not_found(client: EasemobClient) -> None:
    with pytest.raises(AttachmentUnavailable) as caught:
        await client.download_file(body_url({"uuid": "0a1b2c3d-0000-4000-8000-000000000000"}))
    assert caught.value.status == 404
    assert caught.value.reason == "not_found"


@pytest.mark.parametrize(
    "url",
    [
        "https://a1.easemob.com/other-org/other-app/chatfiles/abc",
        "https://evil.example/demo-org/demo-app/messages/users",
        "https://a1.easemob.com/demo-org/demo-app/chatfiles/",
    ],
)
async def test_urls_that_are_not_this_apps_files_are_refused_without_a_request(
    client: EasemobClient, admin: httpx.AsyncClient, url: str
) -> None:
    with pytest.raises(AttachmentUnavailable):
        await client.download_file(url)
    answers = (await admin.get("/_sim/stats")).json()["answers"]
    assert not any(name.startswith("chatfiles") for name in answers)
    assert (await admin.get("/_sim/stats")).json()["token_requests"] == 0


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_file_over_the_limit_is_attachment_too_large(
    client: EasemobClient, admin: httpx.AsyncClient, chunked: bool
) -> None:
    """With Content-Length the limit is checked before reading; chunked, while reading."""
    entity = await upload(admin, client)
    (await admin.post("/_sim/inject", json={"file_chunked": chunked})).raise_for_status()
    with pytest.raises(AttachmentTooLarge) as caught:
        await client.download_file(
            body_url(entity), secret=entity["share-secret"], max_bytes=64 * 1024
        )
    assert caught.value.code == "file_too_large"
    # At the limit exactly, it passes.
    got = await client.download_file(
        body_url(entity), secret=entity["share-secret"], max_bytes=len(IMAGE)
    )
    assert got.data == IMAGE


async def test_a_slow_download_ends_in_a_timeout_error(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    entity = await upload(admin, client)
    (await admin.post("/_sim/inject", json={"file_delay_ms": 1500})).raise_for_status()
    started = time.monotonic()
    with pytest.raises(RetryableError) as caught:
        await client.download_file(body_url(entity), secret=entity["share-secret"], timeout_s=0.3)
    assert caught.value.code == "download_timeout"
    assert time.monotonic() - started < 1.5


async def test_an_expired_token_is_renewed_once(
    client: EasemobClient, admin: httpx.AsyncClient
) -> None:
    entity = await upload(admin, client)
    (await admin.post("/_sim/inject", json={"expire_tokens": True})).raise_for_status()
    got = await client.download_file(body_url(entity), secret=entity["share-secret"])
    assert got.data == IMAGE
    stats = (await admin.get("/_sim/stats")).json()
    assert stats["token_requests"] == 2  # the first, and one renewal
    assert stats["answers"]["chatfiles 401"] == 1
