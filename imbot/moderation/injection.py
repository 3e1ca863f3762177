"""Prompt-injection heuristics: weighted patterns in Chinese and English → a score in [0, 1]."""

from __future__ import annotations

import re

from imbot.moderation.normalise import fold_full_width

_RULES: tuple[tuple[str, float, re.Pattern[str]], ...] = tuple(
    (name, weight, re.compile(pattern, re.IGNORECASE))
    for name, weight, pattern in (
        (
            "ignore_previous_en",
            0.7,
            r"\b(ignore|disregard|forget)\b.{0,20}\b(previous|prior|above|earlier|all)\b.{0,20}\b(instructions?|prompts?|rules?|messages?)",
        ),
        (
            "ignore_previous_zh",
            0.7,
            r"(忽略|无视|忘记|忘掉|不要理会).{0,10}(之前|以上|上面|前面|先前|所有|全部).{0,10}(指令|指示|提示|规则|要求|设定|内容)",
        ),
        (
            "system_prompt_en",
            0.6,
            r"\b(reveal|show|print|repeat|output|tell me)\b.{0,30}\b(system prompt|initial instructions?|hidden instructions?|your instructions)",
        ),
        (
            "system_prompt_zh",
            0.6,
            r"(输出|显示|告诉我|重复|打印|泄露|复述).{0,12}(系统提示|系统提示词|系统指令|初始指令|你的设定|隐藏指令|提示词)",
        ),
        (
            "jailbreak_dan",
            0.5,
            r"(?<![A-Za-z])((?-i:DAN)|do anything now|developer mode|jailbreak)(?![A-Za-z])",
        ),
        (
            "jailbreak_roleplay_zh",
            0.5,
            r"(你现在是|从现在起你是|扮演|假装你是).{0,20}(没有任何限制|不受任何限制|没有限制|无限制|不受约束|越狱)",
        ),
        (
            "no_restrictions_en",
            0.4,
            r"\b(no|without any) (restrictions|limitations|filters|rules)\b",
        ),
        (
            "new_instructions",
            0.3,
            r"(new instructions?:|新的指令[:：]|system:|<\|im_start\|>|\[INST\])",
        ),
    )
)


# Every rule needs one of these words; most messages contain none, so one search decides.
# Searched in the lower-cased text without IGNORECASE (which makes ``re`` try every
# alternative at every position, 20× slower), unless the text holds one of the four
# non-ASCII letters that IGNORECASE also equates with an ASCII letter (İ ı ſ K).
_TRIGGER_WORDS = (
    r"ignore|disregard|forget|reveal|show|print|repeat|output|tell me|dan|do anything"
    r"|developer mode|jailbreak|restrictions|limitations|filters|rules|instruction|system"
    r"|inst|im_start"
)
_TRIGGERS_EN = re.compile(_TRIGGER_WORDS)
_TRIGGERS_EN_ANY_CASE = re.compile(_TRIGGER_WORDS, re.IGNORECASE)
_CASE_FOLDS_TO_ASCII = re.compile("[\u0130\u0131\u017f\u212a]")
_HAS_ASCII_LETTER = re.compile(r"[A-Za-z\u0130\u0131\u017f\u212a]")
_TRIGGERS_ZH = re.compile(
    r"忽略|无视|忘记|忘掉|不要理会|输出|显示|告诉我|重复|打印|泄露|复述|你现在是|从现在起|扮演|假装|指令"
)


def _has_trigger(text: str) -> bool:
    if _TRIGGERS_ZH.search(text) is not None:
        return True
    if _HAS_ASCII_LETTER.search(text) is None:
        return False
    if _CASE_FOLDS_TO_ASCII.search(text) is not None:
        return _TRIGGERS_EN_ANY_CASE.search(text) is not None
    return _TRIGGERS_EN.search(text.lower()) is not None


def injection_score(text: str) -> tuple[float, list[str]]:
    text = fold_full_width(text)  # "ｉｇｎｏｒｅ　ａｌｌ …" reads as ASCII
    if not _has_trigger(text):
        return 0.0, []
    score = 0.0
    rules: list[str] = []
    for name, weight, pattern in _RULES:
        if pattern.search(text):
            score += weight
            rules.append(name)
    return min(score, 1.0), rules
