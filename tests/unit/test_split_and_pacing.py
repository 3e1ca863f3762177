from __future__ import annotations

import asyncio
import time

import pytest

from sender.pacing import Pacer
from sender.split import split_reply


def test_short_reply_is_one_part() -> None:
    assert split_reply("你好") == ["你好"]
    assert split_reply("") == [""]


def test_long_reply_splits_below_the_byte_limit_and_joins_back_exactly() -> None:
    text = "".join(f"第{i}段。这里有一些内容，用来测试分段！\n\n" for i in range(400))
    parts = split_reply(text, 3000)
    assert len(parts) > 1
    assert "".join(parts) == text
    assert all(len(p.encode()) <= 3000 for p in parts)


def test_parts_end_on_paragraph_or_sentence_boundaries_when_possible() -> None:
    text = "".join(f"句子{i}。" for i in range(2000))
    parts = split_reply(text, 3000)
    assert all(p.endswith("。") for p in parts[:-1])


def test_text_without_boundaries_is_cut_between_characters() -> None:
    text = "长" * 5000  # 3 bytes each, no separators
    parts = split_reply(text, 3000)
    assert "".join(parts) == text
    assert all(len(p.encode()) <= 3000 for p in parts)
    for p in parts:
        p.encode().decode()  # never inside a UTF-8 sequence


def test_ten_thousand_characters_reassemble_in_order() -> None:
    text = "".join(chr(0x4E00 + (i % 500)) for i in range(10_000))
    parts = split_reply(text, 3000)
    assert "".join(parts) == text


async def test_pacer_never_exceeds_its_rate() -> None:
    pacer = Pacer(rate=200, burst=1)
    started = time.monotonic()
    await asyncio.gather(*(pacer.acquire() for _ in range(41)))
    # 41 calls at 200/s with a burst of 1 need at least 40 intervals of 5 ms
    assert time.monotonic() - started >= 40 / 200 * 0.95


def test_pacer_rejects_a_nonsense_rate() -> None:
    with pytest.raises(ValueError, match="positive"):
        Pacer(rate=0)
