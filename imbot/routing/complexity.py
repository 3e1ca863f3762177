"""How hard a question is, from cheap features of its text and its conversation.

The route stage maps the score to a model level with the policy's bands
(``routing.levels``): small talk and lookups go to a cheap model, multi-step work to a
strong one. The score is a clipped weighted sum, so every decision is explained by its
``features`` (each in 0..1) and ``contributions`` (weight × value): an operator reading
``imbot route --explain`` sees *why* a message went where it went, and the weights are
one table (``WEIGHTS``), tuned on half of ``bench/data/routing_questions.jsonl`` and
reported on the other half (``python -m bench.routing``, docs/routing.md).

Cost is bounded: only the first ``WINDOW`` characters are read (the length feature
extrapolates to the whole text), every word list is one Aho-Corasick pass
(``pyahocorasick``, as the moderation lexicon), and the few regular expressions left
(syntax, not words) have bounded repeats, so no input makes them backtrack.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import ahocorasick

# Characters analysed: the intent of a message is in its start; a long paste (a log, a
# document) is scored by its opening and its total length.
WINDOW = 1000

# Every feature's weight: contribution = weight × value (value in 0..1), score =
# clip(BIAS + Σ contributions, 0, 1). Negative weights mark what cheap models answer well.
BIAS = 0.1
WEIGHTS: dict[str, float] = {
    "length": 0.30,  # more text to read (and usually to write), log-scaled
    "code_syntax": 0.45,  # fences, call syntax, stack traces, SQL, keywords
    "code_words": 0.15,  # programming vocabulary (python, 报错, 数据库, …)
    "math_syntax": 0.25,  # formulas, LaTeX, operators between numbers
    "math_words": 0.55,  # 证明/积分/方程/概率 …, prove/derivative/integral …
    "numbers": 0.15,  # several quantities: a word problem or a calculation to set up
    "analytical": 0.35,  # 为什么/分析/比较/权衡 …, why/compare/trade-off …
    "task": 0.25,  # a request to produce something (写个/实现/帮我写, write/implement)
    "code_task": 0.20,  # both: a request to write or fix code
    "output_size": 0.35,  # 一篇/详细/1000字/计划, essay/report/detailed/plan
    "constraints": 0.20,  # several questions, requirements, enumerations
    "lang_mixed": 0.05,  # Chinese and English mixed: usually technical terms
    "turns": 0.10,  # a long conversation carries context to keep straight
    "small_talk": -0.30,  # greetings, thanks, laughter, emoji
    "lookup": -0.15,  # one-line facts and translations (是什么意思/怎么说/translate)
    "brevity": -0.20,  # the user asks for a short answer (简单说/一句话/briefly)
}

# Occurrences at which a counted feature reaches 1 (more adds nothing).
_FULL = {
    "code_words": 3,
    "math_words": 2,
    "analytical": 2,
    "task": 1,
    "output_size": 2,
    "constraints": 3,
    "small_talk": 1,
    "lookup": 1,
    "brevity": 1,
}
_LENGTH_FULL = 400  # units (CJK characters + Latin words) at which ``length`` reaches 1
_TURNS_FULL = 20


def _split(words: str) -> tuple[str, ...]:
    return tuple(words.split())


def _split_bars(phrases: str) -> tuple[str, ...]:
    return tuple(phrases.split("|"))


# The word lists, matched case-insensitively. A Latin word must not be part of a longer
# Latin word (``\b`` would not do: CJK characters are word characters, so 用python写 has
# no boundary around ``python``); a trailing ``*`` lets the word be a prefix (sort*).
WORDS: Mapping[str, tuple[str, ...]] = {
    "code_words": (
        *_split(
            "代码 函数 脚本 报错 正则 算法 接口 数据库 线程 并发 缓存 复杂度 编程 部署 容器 爬虫"
        ),
        *_split("前端 后端 组件 链表 数组 单例 排序 字段 索引 微服务 内存 死循环 镜像 测试用例"),
        *_split("二分 递归 哈希"),
        *_split("python java javascript js go golang rust c++ sql mysql postgresql redis kafka"),
        *_split("docker dockerfile k8s kubectl react vue api rest fastapi bug regex code script"),
        *_split("function query algorithm database jvm gc tcp https shell bash linux git npm"),
        *_split("pip json csv crud endpoint thread sort* hash* recursi* palindrome"),
        "binary search",
        "linked list",
    ),
    "math_words": (
        *_split("证明 积分 导数 微分 求导 极限 极值 方程 概率 矩阵 特征值 特征向量 归纳法 无理数"),
        *_split("素数 质数 定理 单调 复利 推导 鸡兔同笼 贝叶斯 期望值 显著 算一下 算算 计算 列式"),
        *_split("prove proof derivative integral integrate probability equation theorem"),
        *_split("irrational prime primes matrix eigen* converge converges bayes calculate"),
        *_split("calculation compound ltv"),
    ),
    "asks_quantity": (
        *_split("多少 几个 几只 几桶 几天 多久 多远 多长时间"),
        "how much",
        "how many",
        "when",
    ),
    "analytical": (
        *_split("为什么 为啥 分析 比较 对比 步骤 设计 优化 权衡 推导 原理 机制 优缺点 利弊 影响"),
        *_split("评估 策略 方案 架构 排查 思路 过程 怎么选 哪个划算 一步一步 推理 怎么防止"),
        *_split("如何判断 原因"),
        *_split("why explain compare analyse analyze design trade-off tradeoff trade-offs"),
        *_split("tradeoffs architect* evaluate strategy optimise optimize vs"),
        *_split_bars(
            "step by step|pros and cons|walk through|walk me through|how does|how would you"
            "|show work|should i"
        ),
    ),
    "task": (
        *_split("写一个 写一篇 写一份 写一段 写个 帮我写 实现 制定 规划 review 改进 怎么改"),
        *_split("怎么解决 怎么优化 write implement build create design plan fix"),
        "make me",
    ),
    "output_size": (
        *_split(
            "一篇 详细 论文 议论文 散文 小说 总结 计划书 报告 大纲 框架 路线 计划 行程 每周 每天"
        ),
        *_split("分阶段 列出 都写 展开 prd 简历 essay report proposal article detailed"),
        *_split("itinerary plan include including"),
        *_split_bars("in detail|cover letter|each step|with tests"),
    ),
    "constraints": (
        *_split("要求 必须 不超过 至少 只能 并且 同时 还要 包括 并说明 再写 要有 要支持 怎么配合"),
        *_split("must without including with also"),
        *_split_bars("at least|at most|and explain"),
    ),
    "small_talk": (
        *_split(
            "你好 您好 在吗 早上好 晚上好 晚安 谢谢 感谢 多谢 哈哈 嘻嘻 嗯嗯 好的 收到 辛苦 拜拜"
        ),
        *_split("再见 无聊 笑死 哈喽 嗨 新年快乐 生日快乐 心情 陪我 好累 好饿 好冷"),
        *_split("hi hey hello yo thanks thank thx ty lol haha ok okay cool gn bye bored sup"),
        *_split_bars("good morning|good night|good evening|whats up|tell me a joke|how's your day"),
    ),
    "lookup": (
        *_split(
            "是什么意思 什么意思 怎么说 怎么讲 翻译 翻成 是谁 作者 在哪 哪里 是哪 多高 多远 多长"
        ),
        *_split(
            "多少度 什么时候 哪一年 几月几号 是什么梗 啥意思 等于多少 怎么读 用什么命令 英文怎么"
        ),
        *_split("translate convert"),
        *_split_bars(
            "what's the|whats the|what is the|who wrote|who is|how do you say|how tall"
            "|how many|when did|what year|capital of"
        ),
    ),
    "brevity": (
        *_split("简单说 简单讲 一句话 简短 简单解释 说一下就行 短一点 简单点 briefly short"),
        "in one sentence",
    ),
}

# What words cannot say: syntax. Every repeat is bounded, so none can backtrack far.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\ufeff]")
_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_LATIN_WORD = re.compile(r"[A-Za-z]+")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_EMOJI = re.compile(r"[\U0001f000-\U0001faff\u2600-\u27bf]")
_QUESTION_MARK = re.compile(r"[?？]+")
_CODE_BLOCK = re.compile(
    r"```|Traceback \(most recent call last\)|^\s{1,16}at [\w.$]{1,80}\("
    r"|(?<![A-Za-z])[A-Z][A-Za-z]{0,40}(?:Error|Exception):",
    re.MULTILINE,
)
# Code and formulas are written in ASCII (and a few maths symbols): their patterns run
# only over those runs of the text, one pattern at a time (an alternation of patterns
# that start differently is tried at every position; separately, each skips ahead).
_MATH_SYMBOLS = "∫∑∏√≠≤≥∞π²³×÷→·"
_SYNTAX_RUN = re.compile(rf"[\x21-\x7e{_MATH_SYMBOLS}][\x20-\x7e\t\n{_MATH_SYMBOLS}]{{0,{WINDOW}}}")
_CODE_TOKENS = tuple(
    re.compile(p, re.MULTILINE)
    for p in (
        r"(?<![A-Za-z0-9_])[A-Za-z_]\w{0,40}\([^()\n]{0,80}\)",  # call syntax: f(x), print(add(1, 2))
        r"=>|->|::|&&|\|\||[=!]==|\+\+",
        r"[;{}][ \t]*$",
        r"(?<![A-Za-z])[a-z]{1,30}_[a-z_]{1,30}",  # snake_case
        r"(?<![A-Za-z])[A-Za-z][a-z]{0,30}[A-Z][a-z]{1,30}",  # camelCase, PascalCase
        r"(?i:(?<![a-z])(?:def|class|function|func|fn)\s{1,4}\w{1,40}\s{0,4}[(:{])",
        r"(?i:(?<![a-z])(?:const|let|var)\s{1,4}\w{1,40}\s{0,4}=)",
        r"(?i:(?<![a-z])import\s{1,4}[\w.]{1,60}[ \t]*$)",
        r"\.\w{1,40}\(\)",
        r"(?:SELECT|FROM|WHERE|JOIN|GROUP BY|ORDER BY|INSERT INTO|CREATE TABLE)\s",
        r"#include|public static|\$\(|console\.|`[^`\n]{2,80}`",
    )
)
_MATH_TOKENS = tuple(
    re.compile(p)
    for p in (
        r"\\(?:frac|int|sum|sqrt|lim|alpha|beta|theta|pi|cdot|times)",
        rf"[{_MATH_SYMBOLS}]",
        r"[a-zA-Z]\^\d|\d\^\d|\^[a-zA-Z(]",
        r"\d\s{0,4}[-+*/×÷^]\s{0,4}\d",
        r"(?<![A-Za-z])[a-zA-Z]\s{0,4}=\s{0,4}[\d(a-zA-Z]",
        r"(?i:(?<![a-z])(?:lim|sin|cos|tan|log|ln|exp)\s{0,4}\()",
        r"[fg]\([a-z]\)",
    )
)
# The few word features that need a pattern.
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("task", re.compile(r"用[\w+#]{1,12}?写")),
    ("output_size", re.compile(r"\d{1,6}\s{0,4}(?:字|words?(?![a-z])|weeks?(?![a-z]))")),
    ("output_size", re.compile(r"list \d")),
    ("constraints", re.compile(r"[，,；;]\s{0,4}[再并]")),
    ("constraints", re.compile(r"^\s{0,8}\d{1,2}[.、)]", re.MULTILINE)),
    ("lookup", re.compile(r"what does .{1,30}? mean(?![a-z])")),
)


def _automaton(words: Mapping[str, Iterable[str]]) -> Any:
    """One automaton for every list: each word → (features it counts for, is a prefix)."""
    owners: dict[str, set[str]] = {}
    for feature, entries in words.items():
        for entry in entries:
            owners.setdefault(entry.lower(), set()).add(feature)
    automaton = ahocorasick.Automaton()
    for entry, features in owners.items():
        word = entry.rstrip("*")
        automaton.add_word(word, (len(word), tuple(sorted(features)), entry.endswith("*")))
    automaton.make_automaton()
    return automaton


_WORDS = _automaton(WORDS)


def _is_latin(ch: str) -> bool:
    return "a" <= ch <= "z"


def _word_counts(lowered: str) -> Counter[str]:
    """How many times each word feature's words occur (Latin words whole, or as prefix)."""
    counts: Counter[str] = Counter()
    last = len(lowered) - 1
    for end, (size, features, prefix) in _WORDS.iter(lowered):
        start = end - size + 1
        if _is_latin(lowered[start]) and start > 0 and _is_latin(lowered[start - 1]):
            continue
        if not prefix and _is_latin(lowered[end]) and end < last and _is_latin(lowered[end + 1]):
            continue
        counts.update(features)
    for feature, pattern in _PATTERNS:
        counts[feature] += _count(pattern, lowered)
    return counts


@dataclass(frozen=True, slots=True)
class Complexity:
    """A score and its explanation (both dicts are JSON-serialisable: str → float)."""

    score: float  # 0.0 (small talk) .. 1.0 (hard multi-step work)
    features: dict[str, float]  # every feature's value, in 0..1
    contributions: dict[str, float]  # how much each feature added to the score
    empty: bool = False  # no text to score: 0 whatever the history

    def with_turns(self, turns: int) -> Complexity:
        """The same text scored with ``turns`` earlier turns (``score_complexity(text,
        turns=turns)`` without reading the text again)."""
        if self.empty:
            return self
        return _scored({**self.features, "turns": _saturate(max(0, turns), _TURNS_FULL)})


def _saturate(count: int, full: int) -> float:
    """``count`` occurrences as a value in 0..1, full at ``full``."""
    return min(1.0, count / full)


def _count(pattern: re.Pattern[str], text: str) -> int:
    """Matches of ``pattern`` (``subn`` counts in C, without a match object each)."""
    return pattern.subn("", text)[1]


def _count_upto(patterns: Iterable[re.Pattern[str]], text: str, limit: int) -> int:
    """Matches of the patterns, counting no further than ``limit`` (the feature's full
    value): a text made of matches costs no more than one without."""
    found = 0
    for pattern in patterns:
        found += sum(1 for _ in islice(pattern.finditer(text), limit - found))
        if found >= limit:
            break
    return found


def _length(cjk: int, latin: int, window: str, total_chars: int) -> float:
    """The log-scaled size in units (a CJK character or a Latin word ≈ one unit of
    meaning), extrapolated from the window to the whole text."""
    units = (cjk + latin) * (total_chars / len(window))
    return min(1.0, math.log1p(units) / math.log1p(_LENGTH_FULL))


def _language(cjk: int, latin: int) -> float:
    """1.0 when Chinese and English words are both present in quantity (code-switching)."""
    if cjk == 0 or latin == 0:
        return 0.0
    return 1.0 if latin >= 2 and cjk >= 4 else 0.5


def _small_talk(hits: int, window: str, length: float) -> float:
    """Greetings, thanks, laughter or emoji in a short message; nothing in a long one
    (a long message that says thanks at the end is still about its content)."""
    if length > 0.7:
        return 0.0
    return _saturate(hits + min(2, _count(_EMOJI, window)), _FULL["small_talk"])


def _features(window: str, total_chars: int, turns: int) -> dict[str, float]:
    cjk = _CJK.subn("", window)[1]
    latin = _count(_LATIN_WORD, window)
    length = _length(cjk, latin, window, total_chars)
    words = _word_counts(window.lower())
    code_block = _CODE_BLOCK.search(window) is not None
    syntax = "\n".join(_SYNTAX_RUN.findall(window))
    numbers = _count(_NUMBER, window)
    questions = _count(_QUESTION_MARK, window)
    code_words = _saturate(words["code_words"], _FULL["code_words"])
    task = _saturate(words["task"], _FULL["task"])
    counted = {
        name: _saturate(words[name], _FULL[name])
        for name in ("math_words", "analytical", "output_size", "lookup", "brevity")
    }
    several = numbers > 3 or words["asks_quantity"] > 0
    return {
        "length": round(length, 4),
        "code_syntax": 1.0 if code_block else _saturate(_count_upto(_CODE_TOKENS, syntax, 3), 3),
        "code_words": code_words,
        "math_syntax": _saturate(_count_upto(_MATH_TOKENS, syntax, 2), 2),
        "math_words": counted["math_words"],
        "numbers": _saturate(max(0, numbers - 2), 3) if several else 0.0,
        "analytical": counted["analytical"],
        "task": task,
        "code_task": 1.0 if task and (code_words or code_block) else 0.0,
        "output_size": counted["output_size"],
        "constraints": _saturate(
            words["constraints"] + max(0, questions - 1), _FULL["constraints"]
        ),
        "lang_mixed": _language(cjk, latin),
        "turns": _saturate(max(0, turns), _TURNS_FULL),
        "small_talk": _small_talk(words["small_talk"], window, length),
        "lookup": counted["lookup"],
        "brevity": counted["brevity"],
    }


def _zero() -> Complexity:
    zeros = dict.fromkeys(WEIGHTS, 0.0)
    return Complexity(score=0.0, features=zeros, contributions=dict(zeros), empty=True)


def _scored(features: dict[str, float]) -> Complexity:
    contributions = {name: round(WEIGHTS[name] * value, 4) for name, value in features.items()}
    raw = BIAS + sum(contributions.values())
    return Complexity(
        score=round(min(1.0, max(0.0, raw)), 4), features=features, contributions=contributions
    )


def score_complexity(text: str, *, turns: int = 0) -> Complexity:
    """Score ``text`` (the user's message) given ``turns`` earlier turns in its history
    window. Empty, whitespace-only or control-character-only text scores 0."""
    window = _CONTROL.sub(" ", text[:WINDOW])
    if not window.strip():
        return _zero()
    return _scored(_features(window, max(len(text), 1), turns))
