"""Easemob server REST API: the app token, text messages and message files (reference §3).

Every response is mapped to the error taxonomy of ``core.errors`` here, in one
place (``classify``). The client does not retry: the caller's error boundary
owns the deadline and the backoff. The one exception is the app token: a 401
fetches a new token once and repeats the call once (reference §3.3).

Response classes:

=========================================  =====================================
429 ``reach_limit``, 408, 5xx              ``RetryableError`` (``retry_after`` from
                                           a ``Retry-After`` header, if any)
429 ``resource_limited`` (plan limit)      ``FatalError(reason="quota_exhausted")``
403 "message send reach limit"             ``RetryableError`` with ``retry_after``
                                           = the quota window for the target kind
other 403 (forbidden operation, banned)    ``FatalError``
413, 400 "message is too large" / 14007    ``MessageTooLarge`` (split further)
401 after one refresh                      ``ConfigurationError``
400, 405, 415                              ``FatalError(reason="bad_request")``
404                                        ``FatalError(reason="not_found")``
timeouts, dropped connections              ``RetryableError``
=========================================  =====================================

Stream messages (reference §3.6, ``send_stream_chunk``) answer with the same classes,
and with Easemob's stream codes in a 400:

=========================================  =====================================
14031 unknown ``msgId``, 14032 over 128 KB  ``StreamClosed``: the stream takes no
in total, 14033 over 30 s since the last    more chunks (what was shown stays);
chunk, 14034 over 30 min, 14035 after       send the rest as a normal message
``finish``
14038 ``seq`` not above the last one        ``ChunkAlreadySent``: Easemob has this
                                           chunk (a resend after a lost answer)
14001/14002/14005/14030/14036/14037         ``FatalError(reason="bad_request")``
=========================================  =====================================

A typing indicator (reference §3.5, ``send_typing``) is a ``cmd`` message with
``action: "TypingBegin"`` routed ``ROUTE_ONLINE``; it only shows where the client app
handles that action.

Neither the client secret nor a token ever appears in a log line or an
exception message.

``download_file`` fetches a message's attachment (an image for a vision model,
reference §3.6a): only from this app's own ``/{org}/{app}/chatfiles/{uuid}`` on the
configured Easemob host, whatever host the message body names, so the app token never
goes anywhere else; bounded in bytes (``AttachmentTooLarge``) and in time
(``RetryableError(code="download_timeout")``); 403/404 (wrong ``secret``, expired or
unknown file) are ``AttachmentUnavailable``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from imbot.core.errors import (
    ConfigurationError,
    FatalError,
    FatalReason,
    ImbotError,
    RetryableError,
)
from imbot.core.retry import retry_after_s
from imbot.sender.metrics import REQUEST_SECONDS, REQUESTS, TOKEN_REFRESHES
from imbot.sender.pacing import Pacer

log = logging.getLogger("imbot.sender.easemob")


TargetKind = Literal["users", "chatgroups", "chatrooms"]
_PROVIDER = "easemob"
_TOO_LARGE_CODE = 14007

# 403 "message send reach limit": how long until the quota window has rolled.
# 1:1 quotas are per minute (6,000 messages/min), group and chatroom quotas per
# second (reference §3.8-3.9). Not the full minute for 1:1: the window slides, so
# some budget comes back well before 60 s, and the caller adds its own backoff.
DEFAULT_QUOTA_RETRY_AFTER_S: Mapping[str, float] = {
    "users": 10.0,
    "chatgroups": 1.0,
    "chatrooms": 1.0,
}


class MessageTooLarge(FatalError):
    """413, or 400 "message is too large" (14007): split the part further and resend."""


# Easemob's default upload limit (reference §3.8): no attachment is larger unless raised.
DEFAULT_MAX_FILE_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Attachment:
    """A downloaded message file: its bytes and the Content-Type Easemob served."""

    data: bytes
    content_type: str

    def __repr__(self) -> str:  # the bytes are user content: never in a log line
        return f"Attachment({self.content_type}, {len(self.data)} bytes)"


class AttachmentTooLarge(FatalError):
    """The file is larger than the caller's limit; reading stopped there."""


class AttachmentUnavailable(FatalError):
    """The file cannot be had: not this app's file URL, a wrong or missing ``secret``
    (403), or expired/unknown (404, ``file_expired`` after the default 7 days)."""


StreamTarget = Literal["user", "chatgroup"]

# Stream message error codes (reference §3.6).
_STREAM_CLOSED_CODES: Mapping[int, FatalReason] = {
    14031: "not_found",  # unknown msgId (or one Easemob no longer holds)
    14032: "bad_request",  # the text passed 128 KB in total: the stream ended
    14033: "other",  # more than 30 s since the last chunk: the stream ended
    14034: "other",  # more than 30 min since the first chunk
    14035: "other",  # a chunk after finish
}
_SEQ_TOO_SMALL_CODE = 14038


class StreamClosed(FatalError):
    """The stream takes no more chunks (14031–14035, see the module docstring): the user
    keeps what was shown; whatever was not sent must go as a normal message."""


class ChunkAlreadySent(FatalError):
    """14038: a chunk with this ``seq`` or a later one was already taken, so Easemob shows
    it already (a resend after a lost answer). Not to be sent again."""


class AnswerLost(RetryableError):
    """The request reached Easemob but its answer did not come back (a read timeout, a
    dropped connection, a 200 without a message id): Easemob may have delivered the
    message. Easemob has no idempotency key, so a resend may show it twice."""


def _status_class(status: int) -> str:
    return f"{status // 100}xx"


def _error_fields(response: httpx.Response) -> tuple[str, str, int | None]:
    """``error``, ``error_description`` and ``error_code`` of an Easemob error body."""
    try:
        body = response.json()
    except ValueError:
        return "", response.text[:200], None
    if not isinstance(body, dict):
        return "", str(body)[:200], None
    code = body.get("error_code")
    description = body.get("error_description") or body.get("exception") or ""
    return (
        str(body.get("error") or ""),
        str(description)[:300],
        int(code) if isinstance(code, int | str) and str(code).isdigit() else None,
    )


def classify(
    response: httpx.Response, *, kind: str = "users", quota_retry_after_s: float | None = None
) -> ImbotError:
    """The error a non-2xx Easemob response to a send stands for (see the module docstring)."""
    status = response.status_code
    error, description, error_code = _error_fields(response)
    kw: dict[str, Any] = {
        "provider": _PROVIDER,
        "status": status,
        "code": str(error_code) if error_code else (error or None),
    }
    text = f"Easemob {status} {error}: {description}".strip().rstrip(":")
    lowered = description.lower()
    if status == 413 or (
        status == 400 and (error_code == _TOO_LARGE_CODE or "too large" in lowered)
    ):
        return MessageTooLarge(text, reason="bad_request", **kw)
    if status == 429 and error == "resource_limited":
        return FatalError(text, reason="quota_exhausted", **kw)
    if status in (408, 429) or status >= 500:
        return RetryableError(text, retry_after=retry_after_s(response.headers), **kw)
    if status == 403 and "reach limit" in lowered:
        default = quota_retry_after_s or DEFAULT_QUOTA_RETRY_AFTER_S.get(kind, 10.0)
        return RetryableError(text, retry_after=retry_after_s(response.headers) or default, **kw)
    if status == 401:
        return ConfigurationError(f"{text} (after a fresh app token)", **kw)
    if status == 404:
        return FatalError(text, reason="not_found", **kw)
    if status in (400, 405, 415):
        return FatalError(text, reason="bad_request", **kw)
    return FatalError(text, **kw)


def classify_stream(response: httpx.Response) -> ImbotError:
    """The error a non-2xx answer to a stream chunk stands for (see the module docstring)."""
    if response.status_code == 400:
        error, description, error_code = _error_fields(response)
        text = f"Easemob 400 {error}: {description}".strip().rstrip(":")
        kw: dict[str, Any] = {"provider": _PROVIDER, "status": 400, "code": str(error_code)}
        reason = _STREAM_CLOSED_CODES.get(error_code) if error_code is not None else None
        if reason is not None:
            return StreamClosed(text, reason=reason, **kw)
        if error_code == _SEQ_TOO_SMALL_CODE:
            return ChunkAlreadySent(text, reason="bad_request", **kw)
    # Stream messages are limited per second (100 msgs/s per App Key): a quota answer
    # is over within about a second.
    return classify(response, kind="stream", quota_retry_after_s=1.0)


class EasemobClient:
    """Easemob REST client for one app (``{org}#{app}``).

    ``pacer`` is acquired before every message call (token calls are not paced;
    they are rare). ``http`` lets a test or a caller share an ``httpx.AsyncClient``
    (its ``base_url`` must be Easemob's); otherwise the client owns one.
    ``token_margin_s``: a cached token is replaced this long before it expires.
    ``quota_retry_after_s``: the ``retry_after`` given with a 403 quota error, per
    target kind (defaults in ``DEFAULT_QUOTA_RETRY_AFTER_S``).
    """

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
        quota_retry_after_s: Mapping[str, float] | None = None,
    ) -> None:
        self._prefix = f"/{org}/{app}"
        self._client_id = client_id
        self._client_secret = client_secret
        self._http = http or httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=timeout,
            headers={"Accept": "application/json"},
        )
        self._owns_http = http is None
        self._pacer = pacer
        self._margin = token_margin_s
        self._quota_retry_after = {**DEFAULT_QUOTA_RETRY_AFTER_S, **(quota_retry_after_s or {})}
        self._token: str | None = None
        self._expires = 0.0  # time.monotonic() after which the cached token is not used
        self._refresh: asyncio.Future[str] | None = None

    async def aclose(self) -> None:
        if self._refresh is not None and not self._refresh.done():
            self._refresh.cancel()
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> EasemobClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- app token ------------------------------------------------------------

    async def token(self, *, stale: str | None = None) -> str:
        """The app token: cached until near expiry, fetched once for all concurrent callers.

        ``stale``: a token the server just rejected with 401 — fetch a new one unless
        another caller already did.
        """
        current = self._token
        if current is not None and current != stale and time.monotonic() < self._expires:
            return current
        if self._refresh is None or self._refresh.done():
            cause = "rejected" if stale is not None and stale == current else "expired"
            if current is None:
                cause = "first"
            self._refresh = asyncio.ensure_future(self._fetch_token(cause))
            # If every waiter was cancelled, nobody reads a failure: mark it read.
            self._refresh.add_done_callback(_consume_exception)
        # shield: one caller giving up (cancelled) must not cancel the fetch the others await
        return await asyncio.shield(self._refresh)

    async def _fetch_token(self, cause: str) -> str:
        if not self._client_id or not self._client_secret:
            raise ConfigurationError(
                "Easemob client id / client secret are not set", provider=_PROVIDER
            )
        started = time.perf_counter()
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
            REQUESTS.labels("token", "error").inc()
            raise RetryableError(
                f"Easemob token request failed: {type(exc).__name__}", provider=_PROVIDER
            ) from None
        REQUEST_SECONDS.labels("token").observe(time.perf_counter() - started)
        REQUESTS.labels("token", _status_class(response.status_code)).inc()
        if response.status_code != 200:
            error = classify(response)
            if response.status_code in (400, 401, 403, 404):
                # invalid_grant, illegal_argument, organization_application_not_found:
                # the operator's credentials or org/app are wrong; no retry fixes that.
                raise ConfigurationError(
                    f"Easemob refused the app's client credentials: {error.message}",
                    provider=_PROVIDER,
                    status=response.status_code,
                    code=error.code,
                )
            raise error
        try:
            body = response.json()
            token = str(body["access_token"])
            ttl = float(body.get("expires_in") or 0)
        except (ValueError, KeyError, TypeError):
            raise RetryableError(
                "Easemob token response without access_token", provider=_PROVIDER, status=200
            ) from None
        TOKEN_REFRESHES.labels(cause).inc()
        now = time.monotonic()
        # expires_in 0 means a token that never expires (reference §3.3).
        self._expires = now + max(ttl - self._margin, ttl / 2) if ttl > 0 else float("inf")
        self._token = token
        log.info("easemob app token fetched", extra={"cause": cause, "expires_in": ttl})
        return token

    # -- messages -------------------------------------------------------------

    async def send_text(
        self,
        kind: TargetKind,
        *,
        sender: str,
        to: str,
        text: str,
        ext: Mapping[str, Any] | None = None,
        paced: bool = False,
    ) -> str:
        """Send one text message to one user, group or chatroom; returns Easemob's message id.

        ``paced``: the caller already took its turn from the pacer (``wait_turn``).
        """
        body: dict[str, Any] = {
            "from": sender,
            "to": [to],
            "type": "txt",
            "body": {"msg": text},
        }
        if ext is not None:
            body["ext"] = dict(ext)  # never null: Easemob answers 400 "ext must be JSONObject"
        token = await self.token()
        response = await self._post(kind, body, token, paced=paced)
        if response.status_code == 401:
            log.warning("easemob rejected the app token; fetching a new one", extra={"kind": kind})
            token = await self.token(stale=token)
            response = await self._post(kind, body, token)
        if response.status_code != 200:
            raise classify(response, kind=kind, quota_retry_after_s=self._quota_retry_after[kind])
        return _message_id(response, to)

    async def send_typing(
        self,
        kind: TargetKind,
        *,
        sender: str,
        to: str,
        action: Literal["TypingBegin", "TypingEnd"] = "TypingBegin",
        paced: bool = False,
    ) -> str:
        """Show ``sender`` as typing to ``to`` (reference §3.5): a ``cmd`` message with
        ``action`` routed ``ROUTE_ONLINE`` (offline users never get a stale indicator);
        returns Easemob's message id. Clients hide it after a few seconds without a new one.
        """
        body: dict[str, Any] = {
            "from": sender,
            "to": [to],
            "type": "cmd",
            "body": {"action": action},
            "routetype": "ROUTE_ONLINE",
        }
        token = await self.token()
        response = await self._post(kind, body, token, paced=paced)
        if response.status_code == 401:
            token = await self.token(stale=token)
            response = await self._post(kind, body, token)
        if response.status_code != 200:
            raise classify(response, kind=kind, quota_retry_after_s=self._quota_retry_after[kind])
        return _message_id(response, to)

    async def send_stream_chunk(
        self,
        target: StreamTarget,
        *,
        sender: str,
        to: str,
        text: str,
        seq: int,
        msg_id: str | None = None,
        finish: bool = False,
        finish_reason: int | None = None,
        markdown: bool = False,
        ext: Mapping[str, Any] | None = None,
        paced: bool = False,
    ) -> str:
        """Send one chunk of a stream message to a user or a group (≤ 200 members);
        returns the stream's ``msgId``.

        The first chunk (``msg_id=None``, usually ``seq=0``) opens the stream and takes
        ``markdown`` and ``ext``; every later chunk passes the ``msgId`` the first returned
        and a larger ``seq``, within 30 s of the previous one; ``finish`` ends the stream
        (``finish_reason``: our own code, kept by Easemob). Errors: see the module
        docstring (``StreamClosed``, ``ChunkAlreadySent``, the send classes). An
        ``AnswerLost`` on a later chunk can be resolved by resending it (14038 then means
        it arrived); on a first chunk, the stream's id is unknown.
        """
        chunk: dict[str, Any] = {"msg": text, "seq": seq}
        if msg_id is None:
            chunk["type"] = "markdown" if markdown else "text"
        else:
            chunk["msgId"] = msg_id
        if finish:
            chunk["finish"] = True
            if finish_reason is not None:
                chunk["finishReason"] = finish_reason
        body: dict[str, Any] = {"from": sender, "to": to, "body": chunk}
        if ext is not None and msg_id is None:
            body["ext"] = dict(ext)  # only the first chunk's ext counts; never null
        path = f"/stream_message/{target}"
        label = f"stream_{target}"
        token = await self.token()
        response = await self._post(label, body, token, paced=paced, path=path)
        if response.status_code == 401:
            log.warning("easemob rejected the app token; fetching a new one", extra={"kind": label})
            token = await self.token(stale=token)
            response = await self._post(label, body, token, path=path)
        if response.status_code != 200:
            raise classify_stream(response)
        if msg_id is not None:
            return msg_id
        return _stream_id(response)

    async def download_file(
        self,
        url: str,
        *,
        secret: str | None = None,
        max_bytes: int = DEFAULT_MAX_FILE_BYTES,
        timeout_s: float = 10.0,
    ) -> Attachment:
        """Download a message's file (an ``img``/``audio``/``video``/``file`` body's ``url``)
        with the app token and, when the body has one, its ``secret`` as ``share-secret``.

        The URL's path must be this app's ``/{org}/{app}/chatfiles/{uuid}``; it is fetched
        from the configured Easemob host (a body naming another host is not followed).
        ``max_bytes``: stop reading and raise ``AttachmentTooLarge`` beyond it;
        ``timeout_s``: the whole download (token included), else
        ``RetryableError(code="download_timeout")``. A 401 fetches a new token once.
        """
        path = self._chatfile_path(url)
        headers = {"Accept": "application/octet-stream"}
        if secret:
            headers["share-secret"] = secret
        try:
            async with asyncio.timeout(timeout_s):
                token = await self.token()
                fetched = await self._get_file(path, headers, token, max_bytes)
                if fetched is None:  # 401: the token went stale
                    token = await self.token(stale=token)
                    fetched = await self._get_file(path, headers, token, max_bytes)
        except (TimeoutError, httpx.TimeoutException):
            REQUESTS.labels("chatfiles", "timeout").inc()
            raise RetryableError(
                f"Easemob file download took longer than {timeout_s:g} s",
                provider=_PROVIDER,
                code="download_timeout",
            ) from None
        except httpx.HTTPError as exc:
            REQUESTS.labels("chatfiles", "error").inc()
            raise RetryableError(
                f"Easemob file download failed: {type(exc).__name__}", provider=_PROVIDER
            ) from None
        if fetched is None:
            raise ConfigurationError(
                "Easemob refused the app token for a file download (after a fresh token)",
                provider=_PROVIDER,
                status=401,
            )
        return fetched

    def _chatfile_path(self, url: str) -> str:
        """The path of this app's file URL; ``AttachmentUnavailable`` for any other URL."""
        path = urlsplit(url).path
        uuid = path.removeprefix(f"{self._prefix}/chatfiles/")
        if uuid == path or not uuid or "/" in uuid:
            raise AttachmentUnavailable(
                "not a file URL of this Easemob app", reason="bad_request", provider=_PROVIDER
            )
        return path

    async def _get_file(
        self, path: str, headers: Mapping[str, str], token: str, max_bytes: int
    ) -> Attachment | None:
        """One GET of the file, read up to ``max_bytes``; None on 401 (refresh the token)."""
        started = time.perf_counter()
        request = self._http.build_request(
            "GET", path, headers={**headers, "Authorization": f"Bearer {token}"}
        )
        response = await self._http.send(request, stream=True)
        try:
            REQUESTS.labels("chatfiles", _status_class(response.status_code)).inc()
            if response.status_code == 401:
                return None
            if response.status_code != 200:
                await response.aread()
                raise _file_error(response)
            data = await _read_bounded(response, max_bytes)
        finally:
            await response.aclose()
        REQUEST_SECONDS.labels("chatfiles").observe(time.perf_counter() - started)
        content_type = response.headers.get("content-type", "application/octet-stream")
        return Attachment(data, content_type.split(";")[0].strip())

    async def wait_turn(self) -> None:
        """Wait for the pacer's next send slot (the caller then sends with ``paced=True``)."""
        if self._pacer is not None:
            await self._pacer.acquire()

    async def _post(
        self,
        kind: str,
        body: dict[str, Any],
        token: str,
        *,
        paced: bool = False,
        path: str | None = None,
    ) -> httpx.Response:
        """POST a message call (``path``: another than ``/messages/{kind}``; ``kind`` then
        only labels the metrics)."""
        if self._pacer is not None and not paced:
            await self._pacer.acquire()
        started = time.perf_counter()
        try:
            response = await self._http.post(
                f"{self._prefix}{path or f'/messages/{kind}'}",
                json=body,
                headers={"Authorization": f"Bearer {token}"},
            )
        except (httpx.ConnectTimeout, httpx.PoolTimeout):
            # The request never left: nothing was delivered.
            REQUESTS.labels(kind, "timeout").inc()
            raise RetryableError("Easemob send timed out connecting", provider=_PROVIDER) from None
        except httpx.TimeoutException:
            # Easemob has no idempotency key: the message may have been delivered.
            REQUESTS.labels(kind, "timeout").inc()
            raise AnswerLost("Easemob send timed out", provider=_PROVIDER) from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            REQUESTS.labels(kind, "error").inc()
            raise AnswerLost(
                f"Easemob send failed: {type(exc).__name__}", provider=_PROVIDER
            ) from None
        except httpx.HTTPError as exc:
            REQUESTS.labels(kind, "error").inc()
            raise RetryableError(
                f"Easemob send failed: {type(exc).__name__}", provider=_PROVIDER
            ) from None
        REQUEST_SECONDS.labels(kind).observe(time.perf_counter() - started)
        REQUESTS.labels(kind, _status_class(response.status_code)).inc()
        return response


async def _read_bounded(response: httpx.Response, max_bytes: int) -> bytes:
    """The body, or ``AttachmentTooLarge`` as soon as it (or its declared length) passes
    ``max_bytes``: nothing beyond the limit is held in memory."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    total = 0
    async for chunk in response.aiter_bytes():
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> AttachmentTooLarge:
    return AttachmentTooLarge(
        f"Easemob file is larger than {max_bytes} bytes",
        reason="bad_request",
        provider=_PROVIDER,
        code="file_too_large",
    )


def _file_error(response: httpx.Response) -> ImbotError:
    """A download's non-2xx answer: 403/404 say this file cannot be had; 429/5xx/408 are
    retryable as for a send (``classify``)."""
    status = response.status_code
    if status in (403, 404):
        error, description, _ = _error_fields(response)
        return AttachmentUnavailable(
            f"Easemob {status} {error}: {description}".strip().rstrip(":"),
            reason="not_found" if status == 404 else "bad_request",
            provider=_PROVIDER,
            status=status,
            code=error or None,
        )
    return classify(response)


def _consume_exception(future: asyncio.Future[str]) -> None:
    if not future.cancelled():
        future.exception()


def _message_id(response: httpx.Response, to: str) -> str:
    """The id Easemob gave the message to ``to`` (``data`` maps each target to its id)."""
    try:
        data = response.json().get("data")
    except (ValueError, AttributeError):
        data = None
    message_id = data.get(to) if isinstance(data, dict) else None
    if not message_id:
        raise AnswerLost(
            "Easemob answered 200 without a message id", provider=_PROVIDER, status=200
        )
    return str(message_id)


def _stream_id(response: httpx.Response) -> str:
    """The ``data.msgId`` a stream's first chunk is answered with."""
    try:
        data = response.json().get("data")
    except (ValueError, AttributeError):
        data = None
    msg_id = data.get("msgId") if isinstance(data, dict) else None
    if not msg_id:
        raise AnswerLost(
            "Easemob answered a stream's first chunk without a msgId",
            provider=_PROVIDER,
            status=200,
        )
    return str(msg_id)
