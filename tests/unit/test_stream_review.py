"""The review of an answer still being written: what may be shown before it is whole."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from imbot.core import topics
from imbot.core.envelope import Envelope, Partial
from imbot.core.settings import DEFAULT_POLICY_FILE, load_policy
from imbot.moderation import Moderator
from imbot.moderation.release import CLAUSE_BREAKS, CLOSERS, SENTENCE_ENDS, release_point
from imbot.streams.stages import ReviewStream
from tests.envelopes import direct_envelope

POLICY = load_policy(DEFAULT_POLICY_FILE)
MODERATOR = Moderator.from_config(POLICY.moderation, base_dir=DEFAULT_POLICY_FILE.parent)
BLOCKED_WORD = "炸弹制作"  # in the default policy's lexicon
assert MODERATOR.check_output(f"好的，{BLOCKED_WORD}。").action == "block"


def test_only_whole_sentences_are_released() -> None:
    text = "第一句。第二句！第三句还没写完"
    assert release_point(text, max_hold_chars=100) == len("第一句。第二句！")
    # A cut the caller finds unsafe falls back to the sentence before.
    unsafe_last = release_point(text, max_hold_chars=100, safe=lambda cut: cut < 8)
    assert unsafe_last == len("第一句。")
    assert release_point(text, max_hold_chars=100, safe=lambda _cut: False) == 0
    assert release_point("Hello world. Next", max_hold_chars=100) == len("Hello world.")
    assert release_point("version 3.5 is", max_hold_chars=100) == 0
    # Closing marks go with their sentence; the very end may still be growing.
    assert release_point("（括号里的话。）然后", max_hold_chars=100) == len("（括号里的话。）")
    assert release_point("刚写完一句。", max_hold_chars=100) == 0


def test_a_sentence_too_long_to_hold_is_released_at_its_last_clause_break() -> None:
    text = "开头。" + "很长的一句，" * 10 + "尾巴"
    cut = release_point(text, max_hold_chars=20)
    assert text[cut - 1] == "，"
    assert cut == len(text) - len("尾巴")
    assert release_point("开头。" + "x" * 50, max_hold_chars=20) == len("开头。")  # no break


chars = st.sampled_from([*"你好世界模型回答abc ，。！？.\n）", *SENTENCE_ENDS])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.text(chars, max_size=80), st.integers(1, 30))
def test_a_cut_is_always_at_a_sentence_end_or_a_clause_break(text: str, hold: int) -> None:
    cut = release_point(text, max_hold_chars=hold)
    assert 0 <= cut < max(1, len(text))
    if cut:
        assert text[cut - 1] in SENTENCE_ENDS | CLAUSE_BREAKS | CLOSERS | {"."}


def test_a_word_that_could_go_on_past_the_text_holds_the_cut() -> None:
    """炸弹制作 is in the default lexicon: a cut right after 炸弹 (a sentence end the
    normaliser drops, then 制) could let the word's beginning out before its end is written."""
    assert MODERATOR.word_may_span("好的。炸弹。", "制")
    assert not MODERATOR.word_may_span("好的。炸弹。", "制作方法")  # whole: the review sees it
    assert not MODERATOR.word_may_span("今天天气很好。", "明")
    text = "好的，我来讲讲。炸弹。制"
    safe_cut = release_point(
        text, max_hold_chars=100, safe=lambda at: not MODERATOR.word_may_span(text[:at], text[at:])
    )
    assert safe_cut == len("好的，我来讲讲。")


def _review() -> ReviewStream:
    return ReviewStream(POLICY, MODERATOR)


def _chunk(text: str) -> Envelope:
    return direct_envelope().model_copy(update={"partial": Partial(text=text)})


async def test_a_lexicon_word_split_across_tokens_is_never_shown() -> None:
    """The model writes the word a token at a time; the review sees the text so far each
    time. No released text ever holds any part of the word that the user could read as
    its beginning, and the stream ends with the configured reply once it is whole."""
    review = _review()
    opening = (
        "这是一个很普通的开头。我们先说说天气，今天晴朗，适合出门散步。"
        "下午可能有风，记得带件外套，也别忘了多喝水。"
    )
    answer = opening + "然后我们讨论一下" + BLOCKED_WORD + "的事情。"
    shown = ""
    blocked_at = None
    for end in range(1, len(answer) + 1):  # one character per token: every split
        [*emits] = await review.handle(_chunk(answer[:end]), deadline=0)
        for emit in emits:
            assert emit.topic == topics.CHUNKS_REVIEWED
            partial = emit.envelope.partial
            assert partial is not None
            if emit.envelope.reply is not None:
                assert emit.envelope.reply.kind == "blocked_output"
                assert emit.envelope.reply.text == POLICY.replies.blocked_output
                assert partial.text == ""
                blocked_at = blocked_at or end
                continue
            assert partial.text.startswith(shown)  # each release extends the last
            shown = partial.text
    assert blocked_at == answer.index(BLOCKED_WORD) + len(BLOCKED_WORD)
    # Whole sentences before the word, nothing of the sentence that holds it.
    assert shown
    assert opening.startswith(shown)
    assert shown[-1] in SENTENCE_ENDS
    assert BLOCKED_WORD[0] not in shown


async def test_personal_data_is_masked_in_what_is_shown() -> None:
    review = _review()
    text = "请拨打13812345678联系我们。" + "后面还有很多很多很多的内容，" * 4
    [emit] = await review.handle(_chunk(text), deadline=0)
    assert emit.envelope.partial is not None
    shown = emit.envelope.partial.text
    assert shown.startswith("请拨打")
    assert "13812345678" not in shown


async def test_nothing_is_released_until_a_sentence_ends_beyond_the_hold() -> None:
    review = _review()
    assert await review.handle(_chunk("短短一句。"), deadline=0) == []
    typing = direct_envelope().model_copy(update={"partial": Partial(kind="typing")})
    [emit] = await review.handle(typing, deadline=0)
    assert emit.envelope == typing
