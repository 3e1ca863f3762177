"""Easemob callback signature: ``security == md5_hex(callId + secret + timestamp)``.

The signature covers only callId, the rule's secret and the timestamp — not the
body — so it authenticates Easemob but does not protect the payload; see the
gateway's timestamp window and msg_id dedupe for replays.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable


def expected_security(call_id: str, secret: str, timestamp: int | str) -> str:
    return hashlib.md5(f"{call_id}{secret}{timestamp}".encode()).hexdigest()


def verify_signature(
    call_id: str, timestamp: int | str, security: str, secrets: Iterable[str]
) -> bool:
    """True when ``security`` matches any configured secret (several for rotation)."""
    got = security.lower().encode()
    ok = False
    for secret in secrets:
        # No early exit: the time taken does not reveal which secret matched.
        ok |= hmac.compare_digest(got, expected_security(call_id, secret, timestamp).encode())
    return ok
