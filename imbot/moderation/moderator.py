"""The ``Moderator``: one object that runs every detector over a message or an answer.

Built once per process from the policy's ``moderation:`` section (``ModerationConfig``):
the lexicons compiled into one Aho-Corasick automaton, the PII actions, the injection
threshold. ``check_input`` judges the user's message, ``check_output`` a model's answer;
both return a ``ModerationResult`` whose findings name rules, never a raw PII value.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import ahocorasick
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from imbot.core.envelope import Verdict
from imbot.core.errors import ConfigurationError
from imbot.moderation.injection import injection_score
from imbot.moderation.normalise import Normaliser, fold_full_width, load_variant_map
from imbot.moderation.pii import PLACEHOLDERS, find_pii

DATA_DIR = Path(__file__).with_name("data")
Action = Literal["allow", "mask", "block", "flag"]
RuleAction = Literal["block", "mask", "flag"]
PiiCategory = Literal["mobile", "landline", "id_card", "bank_card", "email", "ip"]
PiiAction = Literal["mask", "keep", "block"]
_SEVERITY = {"allow": 0, "flag": 1, "mask": 2, "block": 3}
_RULE_ACTIONS: dict[str, RuleAction] = {a: a for a in get_args(RuleAction)}


class LexiconFile(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    path: Path
    category: str = "prohibited"  # default for lines that name none
    action: RuleAction = "block"


class InjectionConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    threshold: float = 0.6
    action: Literal["block", "flag"] = "block"

    @field_validator("action", mode="before")
    @classmethod
    def _no_mask(cls, value: object) -> object:
        if value == "mask":
            raise ValueError(
                "'mask' cannot apply to prompt injection: the score is about the whole "
                "message, so masking would star out all of it; use 'block' or 'flag'"
            )
        return value


class ModerationConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    lexicons: tuple[LexiconFile, ...] = (LexiconFile(path=DATA_DIR / "sample_lexicon.txt"),)
    lexicon_words: tuple[str, ...] = ()  # inline words: category "prohibited", action block
    variants: Path | None = DATA_DIR / "t2s.txt"
    # category -> action; a category not named here is masked. An unknown category is an
    # error, not a silently ignored typo.
    pii: dict[PiiCategory, PiiAction] = Field(default_factory=dict)
    injection: InjectionConfig = InjectionConfig()
    leak_min_chars: int = 30  # an answer repeating this much of the system prompt is a leak


class Finding(BaseModel):
    model_config = ConfigDict(frozen=True)
    detector: str  # lexicon | pii | injection | leak | provider
    category: str
    rule: str  # lexicon entry id / pattern name — never the raw PII value
    action: RuleAction
    start: int
    end: int


class ModerationResult(BaseModel):
    model_config = ConfigDict(frozen=True)
    action: Action
    text: str  # the text after masking (equal to the input when nothing was masked)
    findings: tuple[Finding, ...] = ()
    score: float = 0.0  # prompt-injection score

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
            "score": round(self.score, 3),
            "findings": [f.model_dump(exclude={"start", "end"}) for f in self.findings],
        }


def _resolve(path: Path, base_dir: Path | None) -> Path:
    return (
        path
        if path.is_absolute() or base_dir is None or not (base_dir / path).exists()
        else base_dir / path
    )


class Moderator:
    def __init__(self, config: ModerationConfig, *, base_dir: Path | None = None) -> None:
        self.config = config
        try:
            self.variants = (
                load_variant_map(_resolve(config.variants, base_dir)) if config.variants else {}
            )
            entries = list(self._entries(config, base_dir))
        except OSError as exc:
            raise ConfigurationError(f"cannot read a moderation file: {exc}") from None
        self.normaliser = Normaliser(self.variants)
        self.automaton: Any = None
        # The longest lexicon word, normalised: a streamed answer is held back by at least
        # about this much (moderation.release).
        self.longest_word = 0
        if entries:
            automaton = ahocorasick.Automaton()
            for word, category, action in entries:
                norm = self.normaliser(word).text
                if not norm:
                    continue
                previous = automaton.get(norm, None)
                # Two entries that normalise alike (炸彈 and 炸弹): the stricter action stands.
                if previous is None or _SEVERITY[action] > _SEVERITY[previous[3]]:
                    automaton.add_word(norm, (len(norm), f"{category}:{word}", category, action))
                self.longest_word = max(self.longest_word, len(norm))
            automaton.make_automaton()
            self.automaton = automaton
        self.pii_actions: dict[str, PiiAction] = {
            cat: config.pii.get(cat, "mask") for cat in get_args(PiiCategory)
        }

    @staticmethod
    def _entries(
        config: ModerationConfig, base_dir: Path | None
    ) -> Iterator[tuple[str, str, RuleAction]]:
        for lexicon in config.lexicons:
            path = _resolve(lexicon.path, base_dir)
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                parts = [p.strip() for p in line.split("\t")]
                action: RuleAction = lexicon.action
                if len(parts) > 2 and parts[2]:
                    if parts[2] not in _RULE_ACTIONS:
                        # A typo must not quietly turn a block into the file's default.
                        raise ConfigurationError(
                            f"{path}:{number}: unknown action {parts[2]!r} "
                            f"(expected one of {', '.join(_RULE_ACTIONS)})"
                        )
                    action = _RULE_ACTIONS[parts[2]]
                category = parts[1] if len(parts) > 1 and parts[1] else lexicon.category
                yield parts[0], category, action
        for word in config.lexicon_words:
            yield word, "prohibited", "block"

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], *, base_dir: Path | None = None) -> Moderator:
        try:
            config = ModerationConfig.model_validate(dict(raw))
        except ValidationError as exc:
            raise ConfigurationError(f"invalid moderation config: {exc}") from None
        return cls(config, base_dir=base_dir)

    def word_may_span(self, before: str, after: str) -> bool:
        """Could a lexicon word begin in ``before`` and go on into text not written yet?

        ``before`` is the text up to a cut, ``after`` what follows it so far. A word that
        spans the cut and ends within ``after`` is whole in ``before + after``, so the
        review of that text finds it; only one that goes on past ``after`` can be missed.
        That needs ``after`` (normalised) shorter than the longest word, and an ending of
        ``before`` (normalised) that some word begins with.
        """
        if self.automaton is None:
            return False
        tail = self.normaliser(after).text
        if len(tail) + 1 >= self.longest_word:
            return False
        head = self.normaliser(before[-4 * self.longest_word :]).text
        return any(
            self.automaton.match(head[-k:] + tail)
            for k in range(1, min(len(head), self.longest_word - len(tail) - 1) + 1)
        )

    # -- detectors ---------------------------------------------------------------

    def _lexicon(self, text: str) -> list[Finding]:
        if self.automaton is None:
            return []
        norm = self.normaliser(text)
        findings: list[Finding] = []
        for last, (length, rule, category, action) in self.automaton.iter(norm.text):
            start, end = norm.span(last - length + 1, last + 1)
            findings.append(Finding(detector="lexicon", category=category, rule=rule, action=action,
                                    start=start, end=end))  # fmt: skip
        return findings

    def _pii(self, text: str) -> list[Finding]:
        findings = []
        for hit in find_pii(text):
            action = self.pii_actions[hit.category]
            if action == "keep":
                continue
            findings.append(Finding(detector="pii", category=f"pii.{hit.category}", rule=hit.category,
                                    action=action, start=hit.start, end=hit.end))  # fmt: skip
        return findings

    def _result(self, text: str, findings: list[Finding], score: float = 0.0) -> ModerationResult:
        action: Action = "allow"
        for f in findings:
            if _SEVERITY[f.action] > _SEVERITY[action]:
                action = f.action
        masked = _masked(text, findings) if findings else text
        return ModerationResult(action=action, text=masked, findings=tuple(findings), score=score)

    # -- public ----------------------------------------------------------------

    def check_input(self, text: str) -> ModerationResult:
        folded = fold_full_width(text)  # same positions; PII and injection read it as ASCII
        findings = self._lexicon(text) + self._pii(folded)
        score, rules = injection_score(folded)
        if score >= self.config.injection.threshold:
            findings.append(Finding(detector="injection", category="prompt_injection", rule="+".join(rules),
                                    action=self.config.injection.action, start=0, end=len(text)))  # fmt: skip
        return self._result(text, findings, score)

    def check_output(
        self, text: str, *, finish_reason: str | None = None, system_prompt: str | None = None
    ) -> ModerationResult:
        findings = self._lexicon(text) + self._pii(fold_full_width(text))
        if finish_reason == "content_filter":
            findings.append(Finding(detector="provider", category="provider_filter", rule="finish_reason",
                                    action="block", start=0, end=len(text)))  # fmt: skip
        if system_prompt and _leaks(text, system_prompt, self.config.leak_min_chars):
            findings.append(Finding(detector="leak", category="system_prompt_leak", rule="system_prompt",
                                    action="block", start=0, end=len(text)))  # fmt: skip
        return self._result(text, findings)


def _masked(text: str, findings: list[Finding]) -> str:
    """Masked findings replaced: PII by its placeholder, lexicon words by stars. Spans that
    overlap (a masked word inside an e-mail address) become one span."""
    spans: list[tuple[int, int, str | None]] = []  # start, end, placeholder
    for f in sorted((f for f in findings if f.action == "mask"), key=lambda f: f.start):
        placeholder = PLACEHOLDERS.get(f.rule) if f.detector == "pii" else None
        if spans and f.start < spans[-1][1]:
            start, end, previous = spans[-1]
            spans[-1] = (start, max(end, f.end), previous or placeholder)
        else:
            spans.append((f.start, f.end, placeholder))
    parts: list[str] = []
    pos = 0
    for start, end, placeholder in spans:
        parts += (text[pos:start], placeholder or "*" * (end - start))
        pos = end
    parts.append(text[pos:])
    return "".join(parts)


def _leaks(answer: str, secret: str, min_chars: int) -> bool:
    """Does ``answer`` repeat a long run of ``secret`` verbatim?"""
    need = min(min_chars, max(8, len(secret) * 3 // 4))
    if len(secret) < need:
        return False
    return any(secret[i : i + need] in answer for i in range(0, len(secret) - need + 1))


__all__ = [
    "DATA_DIR",
    "Finding",
    "ModerationConfig",
    "ModerationResult",
    "Moderator",
    "PiiCategory",
]
