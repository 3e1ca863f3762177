"""Moderation: sensitive words, prompt injection, PII masking, output review.

Pure and in-process: the stages call ``Moderator.check_input`` on the user's
message before anything leaves for a model, and ``check_output`` on the answer.
The mask mapping never leaves the process; findings carry categories and rule
names, never a raw PII value.

Where things are: ``moderator`` (the ``Moderator``, its config and results),
``normalise`` (folding and variant maps the lexicon matches through), ``pii``
(the PII patterns and their checksums), ``injection`` (the prompt-injection
score), ``metrics``. This package's names are re-exported here, so callers write
``from imbot.moderation import Moderator``.
"""

from __future__ import annotations

from imbot.moderation.moderator import (
    DATA_DIR,
    Finding,
    ModerationConfig,
    ModerationResult,
    Moderator,
    PiiCategory,
)

__all__ = [
    "DATA_DIR",
    "Finding",
    "ModerationConfig",
    "ModerationResult",
    "Moderator",
    "PiiCategory",
]
