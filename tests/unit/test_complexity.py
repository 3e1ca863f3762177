"""The complexity scorer: what is cheap scores low, what needs a strong model scores high,
every feature pushes the way it claims, and hostile input is bounded and still scored.

The band used here is the default policy's (``light`` below 0.5), read from the policy
file, so the tests check what the route stage would decide.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from imbot.core.settings import DEFAULT_POLICY_FILE, load_policy
from imbot.routing.complexity import WEIGHTS, WINDOW, Complexity, score_complexity

LIGHT_BELOW = load_policy(DEFAULT_POLICY_FILE).routing.levels[0].below or 0.5


@pytest.mark.parametrize(
    "text",
    [
        "你好",
        "在吗",
        "谢谢啦🙏",
        "哈哈哈笑死",
        "晚安 明天见",
        "hi",
        "thanks!",
        "lol ok",
        "good morning 😊",
        "中国的首都是哪里",
        "“谢谢”用日语怎么说",
        "what's the capital of canada",
        "translate 'good luck' to french",
        "我今天去公园散步了，天气特别好，还看到好多小朋友在放风筝，心情一下就好了",
    ],
)
def test_small_talk_greetings_and_lookups_score_light(text: str) -> None:
    assert score_complexity(text).score < LIGHT_BELOW


@pytest.mark.parametrize(
    "text",
    [
        "证明根号2是无理数",
        "prove there are infinitely many primes",
        "求不定积分 ∫x^2·ln(x) dx，写出步骤",
        "用python写一个归并排序",
        "write a function in go that merges two sorted slices, with tests",
        "这个报错怎么解决\nTraceback (most recent call last):\n  File \"a.py\", line 3\nKeyError: 'id'",
        "```js\nconst x = await fetch(url)\n```\n为什么这里拿不到数据",
        "分析一下新能源车价格战对二手车市场的影响，并比较几种应对策略的利弊",
        "compare postgres and mongodb for an analytics workload, with trade-offs",
        "帮我写一篇1000字的议论文，题目是科技与人文",
        "设计一个支持百万并发的消息推送系统，说说架构和权衡",
    ],
)
def test_code_maths_and_multi_step_work_score_strong(text: str) -> None:
    assert score_complexity(text).score >= LIGHT_BELOW


# Each feature: a base text, the same text with the feature added, the feature that moves.
RAISES = [
    ("length", "帮我看看", "帮我看看" + "这个方案的每个部分" * 30),
    ("code_syntax", "这段怎么改", "这段怎么改 def load(path): return open(path).read()"),
    ("code_words", "这个怎么弄", "这个python脚本的报错怎么弄"),
    ("math_syntax", "帮我看看这个", "帮我看看这个 x^2 + 3x = 10"),
    ("math_words", "根号2是什么", "证明根号2是无理数"),
    ("numbers", "一共几个", "3个箱子每个12个苹果，拿走5个，一共几个"),
    ("analytical", "新能源车", "为什么新能源车降价，分析一下"),
    ("task", "排序", "帮我写个排序"),
    ("code_task", "讲讲排序", "用python写个排序"),
    ("output_size", "写点东西关于春天", "写一篇详细的文章关于春天"),
    ("constraints", "写个函数", "写个函数，要求不超过20行，必须有注释？还要处理空输入？"),
    ("lang_mixed", "这个接口返回什么", "这个 REST endpoint returns 什么"),
]
LOWERS = [
    ("small_talk", "今天吃什么", "哈哈你好 今天吃什么"),
    ("lookup", "苹果", "苹果用英文怎么说"),
    ("brevity", "解释一下区块链", "简单说一下区块链，一句话"),
]


@pytest.mark.parametrize(("feature", "base", "more"), RAISES)
def test_each_feature_raises_the_score(feature: str, base: str, more: str) -> None:
    before, after = score_complexity(base), score_complexity(more)
    assert after.features[feature] > before.features[feature]
    assert after.contributions[feature] > before.contributions[feature]
    assert after.score > before.score


@pytest.mark.parametrize(("feature", "base", "more"), LOWERS)
def test_light_markers_lower_the_score(feature: str, base: str, more: str) -> None:
    before, after = score_complexity(base), score_complexity(more)
    assert after.features[feature] > before.features[feature]
    assert after.contributions[feature] < 0
    assert after.score <= before.score


def test_turns_raise_the_score_of_the_same_text() -> None:
    text = "那第二种方法呢"
    first, later = score_complexity(text), score_complexity(text, turns=12)
    assert later.features["turns"] > first.features["turns"] == 0
    assert later.score > first.score


@given(text=st.text(max_size=300), turns=st.integers(min_value=-2, max_value=40))
def test_rescoring_with_turns_is_scoring_with_them(text: str, turns: int) -> None:
    """The route scores once without history and then with its turns: the same result
    as scoring the text with them from the start."""
    assert score_complexity(text).with_turns(turns) == score_complexity(text, turns=turns)


def test_latin_words_match_whole_even_next_to_chinese() -> None:
    """``go`` in ``good``/``google`` is not Go the language; ``python`` inside 用python写 is."""
    assert score_complexity("good morning").features["code_words"] == 0
    assert score_complexity("google一下").features["code_words"] == 0
    assert score_complexity("用python写").features["code_words"] > 0


@pytest.mark.parametrize("text", ["", "   ", "\n\t  \r\n", "\x00\x01\x02\x7f", "\u200b\ufeff"])
def test_empty_and_control_only_text_scores_zero(text: str) -> None:
    result = score_complexity(text)
    assert result.score == 0.0
    assert set(result.features) == set(WEIGHTS)
    assert not any(result.contributions.values())


@pytest.mark.parametrize(
    "text",
    [
        "好" * 65536,  # 64 Ki CJK characters
        "a(" * 32768,  # call syntax everywhere
        "😀" * 16384,  # only emoji (64 KiB in UTF-8)
        "\x00\x07\x1b" * 20000,
        "为什么" * 20000,  # one word feature, repeated
        "def f(x):\n    return x\n" * 3000,
        "Error: " * 9000 + "好" * 100,
        "\ud800abc",  # a lone surrogate (what a broken client can send)
    ],
)
def test_hostile_input_is_bounded_and_scored(text: str) -> None:
    result = score_complexity(text)
    assert 0.0 <= result.score <= 1.0
    assert all(0.0 <= v <= 1.0 for v in result.features.values())


def test_only_emoji_is_small_talk() -> None:
    result = score_complexity("😂😂😂👍")
    assert result.features["small_talk"] == 1.0
    assert result.score < LIGHT_BELOW


def test_a_long_paste_is_read_only_in_its_window_but_counts_its_length() -> None:
    """Past the window nothing is read (a question hidden at the end of a 64 KiB paste
    does not change the features), but the length feature sees the whole size."""
    chat = "今天天气不错，我们出去走走吧。" * 10
    paste = chat * 400
    hidden = paste + "证明根号2是无理数"
    assert len(paste) > WINDOW
    assert score_complexity(hidden).features == score_complexity(paste).features
    assert score_complexity(paste).features["length"] > score_complexity(chat).features["length"]


@pytest.mark.parametrize(
    "text", ["你好", "证明根号2是无理数", "```py\nprint(1)\n```", "", "😀" * 100]
)
def test_explanation_is_json_and_adds_up(text: str) -> None:
    result = score_complexity(text, turns=3)
    assert isinstance(result, Complexity)
    again = json.loads(
        json.dumps({"features": result.features, "contributions": result.contributions})
    )
    assert again == {"features": result.features, "contributions": result.contributions}
    assert set(result.features) == set(result.contributions) == set(WEIGHTS)
    for name, value in result.features.items():
        assert result.contributions[name] == pytest.approx(WEIGHTS[name] * value, abs=1e-4)
    assert 0.0 <= result.score <= 1.0


def test_score_is_deterministic() -> None:
    text = "帮我比较一下 Kafka 和 RabbitMQ 的优缺点"
    assert score_complexity(text) == score_complexity(text)
