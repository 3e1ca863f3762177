"""The one token estimate imbot uses where a provider's count is not known."""

from __future__ import annotations


def estimate_tokens(text: str) -> int:
    """Cheap token estimate: ~1 token per CJK character, ~4 characters per token otherwise.

    For the history budget and the demo model's usage; never for billing.
    """
    cjk = sum(1 for ch in text if ord(ch) > 0x2E80)
    return cjk + (len(text) - cjk + 3) // 4
