"""Reply splitting: byte limit, character boundaries, preferred cut points, exact reassembly."""

from __future__ import annotations

import random
import unicodedata

import pytest

from imbot.sender.split import part_end, split_reply


def _check(text: str, parts: list[str], max_bytes: int) -> None:
    assert "".join(parts) == text  # nothing dropped, added or reordered
    assert all(len(p.encode("utf-8")) <= max_bytes for p in parts)
    assert all(parts) or parts == [""]


def test_short_and_empty_replies_are_one_part() -> None:
    assert split_reply("你好") == ["你好"]
    assert split_reply("") == [""]


def test_a_reply_of_exactly_the_limit_is_one_part() -> None:
    text = "长" * 1000  # 3,000 bytes
    assert split_reply(text, 3000) == [text]
    assert len(split_reply(text + "。", 3000)) == 2


def test_ten_thousand_character_reply_splits_and_reassembles_in_order() -> None:
    paragraphs = []
    for p in range(120):
        sentences = [f"这是第{p}段的第{s}句话，用来测试长回复的切分！" for s in range(4)]
        paragraphs.append("".join(sentences))
    text = "\n\n".join(paragraphs)[:10_000]
    assert len(text) == 10_000
    parts = split_reply(text, 3000)
    _check(text, parts, 3000)
    assert len(parts) >= 10  # ~28,000 bytes
    assert all(p.endswith("\n\n") for p in parts[:-1])  # paragraph ends preferred
    assert all(not p[0].isspace() for p in parts)  # the whitespace stays with the part it closes


def test_sentence_ends_when_there_are_no_paragraphs() -> None:
    text = "".join(f"句子{i}。" for i in range(2000))
    parts = split_reply(text, 3000)
    _check(text, parts, 3000)
    assert all(p.endswith("。") for p in parts[:-1])


def test_line_breaks_beat_sentence_ends() -> None:
    text = "".join(f"第{i}行。还有一句。\n" for i in range(600))
    parts = split_reply(text, 3000)
    _check(text, parts, 3000)
    assert all(p.endswith("\n") for p in parts[:-1])


def test_closing_quotes_and_spaces_stay_with_the_sentence_they_close() -> None:
    text = "他说：“今天很好。”" * 400 + " Done. " * 10
    parts = split_reply(text, 1000)
    _check(text, parts, 1000)
    assert all(p.endswith("。”") for p in parts[:-1])

    english = "Version 3.14 is out. It is faster. " * 200
    parts = split_reply(english, 500)
    _check(english, parts, 500)
    assert all(p.endswith(". ") for p in parts[:-1])  # never after "3."
    assert all(p.startswith(("Version", "It")) for p in parts)


def test_commas_and_spaces_when_there_are_no_sentence_ends() -> None:
    words = " ".join(f"word{i}" for i in range(2000))
    parts = split_reply(words, 1000)
    _check(words, parts, 1000)
    assert all(p.endswith(" ") for p in parts[:-1])
    assert all(not p[0].isspace() for p in parts)

    clauses = "，".join(f"分句{i}" for i in range(2000))
    parts = split_reply(clauses, 1000)
    _check(clauses, parts, 1000)
    assert all(p.endswith("，") for p in parts[:-1])


def test_a_late_boundary_is_not_taken_if_it_leaves_a_tiny_part() -> None:
    text = "短句。" + "长" * 3000
    parts = split_reply(text, 3000)
    _check(text, parts, 3000)
    assert len(parts[0].encode()) == 3000  # a hard cut, not a 9-byte first part


def test_hard_cut_is_between_characters_of_every_utf8_length() -> None:
    for ch, size in (("a", 1), ("é", 2), ("长", 3), ("😀", 4)):
        text = ch * 2500
        parts = split_reply(text, 3001)
        _check(text, parts, 3001)
        assert all(len(p.encode()) == 3001 // size * size for p in parts[:-1])


def test_combining_marks_and_emoji_sequences_are_kept_whole() -> None:
    accented = "e\u0301" * 1000  # é as e + combining acute
    parts = split_reply(accented, 301)
    _check(accented, parts, 301)
    assert all(not unicodedata.combining(p[0]) for p in parts)

    family = "👨\u200d👩\u200d👧" * 300  # one emoji, five code points
    parts = split_reply(family, 200)
    _check(family, parts, 200)
    assert all(p.startswith("👨") and p.endswith("👧") for p in parts)


def test_whitespace_runs_are_kept_exactly() -> None:
    text = "第一段。\n\n   \n\n\n第二段。" * 300 + "\t\t  \n"
    parts = split_reply(text, 500)
    _check(text, parts, 500)
    whitespace_only = " " * 1200
    parts = split_reply(whitespace_only, 500)
    _check(whitespace_only, parts, 500)


@pytest.mark.parametrize("seed", range(5))
def test_random_text_always_reassembles_within_the_limit(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = [*"abc xyz.,!?;，。！？；…\n\t”）é长字😀", "\u0301", "\u200d", "\n\n"]
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 3000)))
        max_bytes = rng.randint(4, 400)
        _check(text, split_reply(text, max_bytes), max_bytes)


def test_a_limit_below_one_character_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        split_reply("abc", 3)


def test_resuming_at_any_part_boundary_cuts_the_rest_the_same_way() -> None:
    text = "".join(f"第{i}段：这里有一些内容，用来测试分段！\n\n" for i in range(300))
    parts = split_reply(text, 1000)
    start = 0
    for part in parts:
        end = part_end(text, start, 1000)
        assert text[start:end] == part
        start = end
    assert start == len(text)


def test_a_part_refused_as_too_large_splits_further_at_half_the_limit() -> None:
    text = "".join(f"句子{i}。" for i in range(1000))
    first = part_end(text, 0, 3000)
    smaller = part_end(text, 0, 1500)
    assert 0 < smaller < first
    assert len(text[:smaller].encode()) <= 1500
    assert text[:smaller].endswith("。")
