"""Who is asking, and what they may do: logins, session cookies, roles, CSRF.

A person logs in with a token (``IMBOT_CONSOLE_TOKENS``: ``name:role:token``) and gets a
signed session cookie (HttpOnly, SameSite=Strict, Secure over TLS), or is named by an
authenticating proxy in front (``X-Forwarded-User`` / ``X-Forwarded-Groups``), trusted
only when ``IMBOT_CONSOLE_TRUSTED_PROXY`` says so. A *viewer* sees ids and metadata, an
*operator* sees text and may act. Every action is a POST carrying the session's CSRF
token, compared in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Literal

import orjson
from aiohttp import web

from imbot.core.errors import ConfigurationError
from imbot.core.settings import Settings

Role = Literal["operator", "viewer"]
ROLES: tuple[Role, ...] = ("operator", "viewer")
COOKIE = "imbot_console"


@dataclass(frozen=True, slots=True)
class Principal:
    """A logged-in person: their name (written to the audit log) and role."""

    name: str
    role: Role
    session: str  # what the CSRF token is derived from

    @property
    def sees_text(self) -> bool:
        return self.role == "operator"


@dataclass(frozen=True, slots=True)
class _Login:
    name: str
    role: Role
    token: bytes


def parse_tokens(settings: Settings) -> list[_Login]:
    """The configured logins; a malformed entry is a ConfigurationError naming its position
    (never its token)."""
    logins = []
    for i, secret in enumerate(settings.console_tokens, 1):
        name, _, rest = secret.get_secret_value().partition(":")
        role, _, token = rest.partition(":")
        if not name or role not in ROLES or len(token) < 16:
            raise ConfigurationError(
                f"IMBOT_CONSOLE_TOKENS entry {i}: use name:operator|viewer:token"
                " with a token of at least 16 characters"
            )
        logins.append(_Login(name, role, token.encode()))
    return logins


class Access:
    """Checks logins, signs and reads session cookies, derives CSRF tokens."""

    def __init__(self, settings: Settings) -> None:
        self._logins = parse_tokens(settings)
        key = settings.console_session_key.get_secret_value()
        self._key = key.encode() if key else secrets.token_bytes(32)
        self._ttl_s = settings.console_session_hours * 3600
        self._proxy = settings.console_trusted_proxy
        self._operator_groups = frozenset(settings.console_operator_groups)
        self._viewer_groups = frozenset(settings.console_viewer_groups)

    def _sign(self, data: bytes) -> str:
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()

    def login(self, token: str) -> Principal | None:
        """The person whose token this is; every configured token is compared (in
        constant time each), so the time taken does not say which one nearly matched."""
        given = token.encode()
        found = None
        for entry in self._logins:
            if hmac.compare_digest(entry.token, given):
                found = entry
        if found is None:
            return None
        return Principal(found.name, found.role, secrets.token_hex(16))

    def cookie_value(self, who: Principal, *, now: float | None = None) -> str:
        expires = int((now if now is not None else time.time()) + self._ttl_s)
        body = orjson.dumps({"n": who.name, "r": who.role, "s": who.session, "e": expires})
        encoded = base64.urlsafe_b64encode(body).decode().rstrip("=")
        return f"{encoded}.{self._sign(body)}"

    def from_cookie(self, value: str, *, now: float | None = None) -> Principal | None:
        encoded, _, signature = value.partition(".")
        try:
            body = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        except ValueError:
            return None
        if not hmac.compare_digest(self._sign(body), signature):
            return None
        data = orjson.loads(body)
        if data["e"] < (now if now is not None else time.time()) or data["r"] not in ROLES:
            return None
        return Principal(str(data["n"]), data["r"], str(data["s"]))

    def from_proxy(self, request: web.Request) -> Principal | None:
        """The proxy's user, when a proxy is trusted and names one in a known group."""
        if not self._proxy:
            return None
        user = request.headers.get("X-Forwarded-User", "").strip()
        if not user:
            return None
        groups = {g.strip() for g in request.headers.get("X-Forwarded-Groups", "").split(",")}
        role: Role | None = None
        if groups & self._operator_groups:
            role = "operator"
        elif groups & self._viewer_groups:
            role = "viewer"
        if role is None:
            return None
        # The proxy authenticates every request: the session is the user, and the CSRF
        # token derived from it is still a secret of this key.
        return Principal(user, role, f"proxy:{user}")

    def who(self, request: web.Request) -> Principal | None:
        proxied = self.from_proxy(request)
        if proxied is not None:
            return proxied
        cookie = request.cookies.get(COOKIE)
        return self.from_cookie(cookie) if cookie else None

    def csrf_token(self, who: Principal) -> str:
        return self._sign(f"csrf|{who.session}".encode())

    def csrf_ok(self, who: Principal, given: str) -> bool:
        return hmac.compare_digest(self.csrf_token(who).encode(), given.encode())


def over_tls(request: web.Request) -> bool:
    """Whether the browser reached us over TLS (directly, or through a proxy that says so)."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return request.secure or forwarded == "https"


def set_session(response: web.StreamResponse, request: web.Request, value: str) -> None:
    response.set_cookie(
        COOKIE,
        value,
        httponly=True,
        samesite="Strict",
        secure=over_tls(request),
        path="/",
    )
