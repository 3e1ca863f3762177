"""Easemob server REST API: app token and text messages (reference §3).

The client maps every response to the error taxonomy and leaves retrying to the
caller (the stage boundary owns the deadline), except one thing it handles
itself: a 401 refreshes the app token once and repeats the call once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Literal

import httpx
from prometheus_client import Counter

from core.errors import ConfigurationError, FatalError, RetryableError
from sender.pacing import Pacer

REQUESTS = Counter("imbot_easemob_requests_total", "Easemob REST calls", ["endpoint", "status"])
TOKEN_REFRESHES = Counter("imbot_easemob_token_refreshes_total", "App tokens fetched")

TargetKind = Literal["users", "chatgroups", "chatrooms"]
_PROVIDER = "easemob"
_QUOTA_BACKOFF_S = 5.0  # 403 "message send reach limit": wait for the quota window to roll


class MessageTooLarge(FatalError):
    """413, or 400 "message is too large" (14007): split the part further."""


def _describe(response: httpx.Response) -> tuple[str, str]:
    try:
        body = response.json()
    except ValueError:
        return "", response.text[:200]
    if not isinstance(body, dict):
        return "", str(body)[:200]
    return str(body.get("error", "")), str(
        body.get("error_description", body.get("exception", ""))
    )[:300]


def classify(response: httpx.Response) -> Exception:
    """The error a non-2xx Easemob response stands for."""
    status = response.status_code
    error, description = _describe(response)
    kw: dict[str, Any] = {"provider": _PROVIDER, "status": status, "code": error or None}
    text = f"Easemob {status} {error}: {description}".strip()
    retry_after = response.headers.get("retry-after")
    hint = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None
    if status == 413 or "too large" in description.lower() or "14007" in response.text:
        return MessageTooLarge(text, reason="bad_request", **kw)
    if status in (408, 429) or status >= 500:
        return RetryableError(text, retry_after=hint, **kw)
    if status == 403 and "reach limit" in description.lower():
        return RetryableError(text, retry_after=hint or _QUOTA_BACKOFF_S, **kw)
    if status == 401:
        return ConfigurationError(text, **kw)
    if status == 404:
        return FatalError(text, reason="not_found", **kw)
    if status in (400, 403, 405, 415):
        return FatalError(text, reason="bad_request", **kw)
    return FatalError(text, **kw)


class EasemobClient:
    def __init__(
        self,
        *,
        base_url: str,
        org: str,
        app: str,
        client_id: str,
        client_secret: str,
        timeout: float = 10.0,
        pacer: Pacer | None = None,
        http: httpx.AsyncClient | None = None,
        token_margin_s: float = 60.0,
    ) -> None:
        self._prefix = f"/{org}/{app}"
        self._client_id = client_id
        self._client_secret = client_secret
        self._http = http or httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout)
        self._owns_http = http is None
        self._pacer = pacer
        self._margin = token_margin_s
        self._token: str | None = None
        self._expires = 0.0
        self._refresh_lock = asyncio.Lock()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def token(self, *, stale: str | None = None) -> str:
        """The app token; fetched once for all concurrent callers, cached until near expiry.

        ``stale``: a token the server just rejected — refresh unless someone already did.
        """
        if self._token and self._token != stale and time.monotonic() < self._expires:
            return self._token
        async with self._refresh_lock:
            if self._token and self._token != stale and time.monotonic() < self._expires:
                return self._token
            if not self._client_id or not self._client_secret:
                raise ConfigurationError(
                    "IMBOT_EASEMOB_CLIENT_ID / _CLIENT_SECRET are not set", provider=_PROVIDER
                )
            try:
                response = await self._http.post(
                    f"{self._prefix}/token",
                    json={
                        "grant_type": "client_credentials",
                        "client_id": self._client_id,
                        "client_secret": self._client_secret,
                    },
                )
            except httpx.HTTPError as exc:
                raise RetryableError(
                    f"Easemob token request failed: {type(exc).__name__}", provider=_PROVIDER
                ) from None
            REQUESTS.labels("token", str(response.status_code)).inc()
            if response.status_code != 200:
                error = classify(response)
                if response.status_code in (400, 401):
                    raise ConfigurationError(
                        f"Easemob refused the client credentials: {error}", provider=_PROVIDER
                    )
                raise error
            body = response.json()
            TOKEN_REFRESHES.inc()
            self._token = str(body["access_token"])
            ttl = float(body.get("expires_in", 3600))
            self._expires = time.monotonic() + max(ttl - self._margin, ttl / 2)
            return self._token

    async def send_text(
        self,
        kind: TargetKind,
        *,
        sender: str,
        to: str,
        text: str,
        ext: Mapping[str, Any] | None = None,
    ) -> str:
        """Send one text message; returns Easemob's id of the new message."""
        body: dict[str, Any] = {"from": sender, "to": [to], "type": "txt", "body": {"msg": text}}
        if ext:
            body["ext"] = dict(ext)
        token = await self.token()
        response = await self._post(kind, body, token)
        if response.status_code == 401:
            token = await self.token(stale=token)
            response = await self._post(kind, body, token)
        if response.status_code != 200:
            raise classify(response)
        data = response.json().get("data") or {}
        msg_id = data.get(to) if isinstance(data, dict) else None
        if not msg_id:
            raise RetryableError(
                "Easemob answered 200 without a message id", provider=_PROVIDER, status=200
            )
        return str(msg_id)

    async def _post(self, kind: TargetKind, body: dict[str, Any], token: str) -> httpx.Response:
        if self._pacer is not None:
            await self._pacer.acquire()
        try:
            response = await self._http.post(
                f"{self._prefix}/messages/{kind}",
                json=body,
                headers={"Authorization": f"Bearer {token}"},
            )
        except httpx.TimeoutException:
            REQUESTS.labels(kind, "timeout").inc()
            raise RetryableError("Easemob send timed out", provider=_PROVIDER) from None
        except httpx.HTTPError as exc:
            REQUESTS.labels(kind, "error").inc()
            raise RetryableError(
                f"Easemob send failed: {type(exc).__name__}", provider=_PROVIDER
            ) from None
        REQUESTS.labels(kind, str(response.status_code)).inc()
        return response
