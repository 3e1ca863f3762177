"""Former home of the providers' wire helpers, now split by what they hold:
``adapters.sse`` (SSE framing), ``adapters.json_fields`` (lenient JSON reads),
``adapters.rate_limit_headers`` (rate-limit headers as retry hints) and
``adapters.provider_errors`` (HTTP status classes, refinement, redaction).

Nothing in ``imbot`` imports this module. It re-exports the old names only until
``tests/unit/adapters/test_wire.py`` imports them from their new modules; then delete it.
"""

from imbot.adapters.json_fields import as_int, as_str, loads_object
from imbot.adapters.provider_errors import classify_status, redact, refine_fatal
from imbot.adapters.rate_limit_headers import anthropic_reset_s, duration_s, openai_reset_s
from imbot.adapters.sse import SseEvent, SseParser

__all__ = [
    "SseEvent",
    "SseParser",
    "anthropic_reset_s",
    "as_int",
    "as_str",
    "classify_status",
    "duration_s",
    "loads_object",
    "openai_reset_s",
    "redact",
    "refine_fatal",
]
