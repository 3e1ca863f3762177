"""Moderation (interim minimal version: inline lexicon block list only).

Placeholder until the full library (lexicon files, evasions, PII, injection)
lands; it implements the same API so the stages run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from core.envelope import Verdict

Action = Literal["allow", "mask", "block", "flag"]


class Finding(BaseModel):
    model_config = ConfigDict(frozen=True)
    detector: str
    category: str
    rule: str
    action: Literal["block", "mask", "flag"]
    start: int
    end: int


class ModerationResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    action: Action
    text: str
    findings: tuple[Finding, ...] = ()
    score: float = 0.0

    def categories(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.category for f in self.findings))

    def rules(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(f.rule for f in self.findings))

    def as_verdict(self) -> Verdict:
        return Verdict(
            action=self.action,
            categories=self.categories(),
            rules=self.rules(),
            text=self.text,
            score=self.score,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "categories": list(self.categories()),
            "rules": list(self.rules()),
            "text": self.text,
        }


class Moderator:
    def __init__(self, words: tuple[str, ...]) -> None:
        self.words = words

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], *, base_dir: Path | None = None) -> Moderator:
        return cls(tuple(raw.get("lexicon_words", ())))

    def _check(self, text: str) -> ModerationResult:
        findings = tuple(
            Finding(
                detector="lexicon",
                category="prohibited",
                rule=f"word:{i}",
                action="block",
                start=pos,
                end=pos + len(w),
            )
            for i, w in enumerate(self.words)
            if (pos := text.find(w)) >= 0
        )
        return ModerationResult(
            action="block" if findings else "allow", text=text, findings=findings
        )

    def check_input(self, text: str) -> ModerationResult:
        return self._check(text)

    def check_output(
        self, text: str, *, finish_reason: str | None = None, system_prompt: str | None = None
    ) -> ModerationResult:
        return self._check(text)
