"""The fast normaliser must give exactly what the per-character definition gives."""

from __future__ import annotations

import random

import pytest

from imbot.moderation import DATA_DIR
from imbot.moderation.normalise import (
    Normaliser,
    fold_full_width,
    load_variant_map,
    normalise_reference,
)

T2S = load_variant_map(DATA_DIR / "t2s.txt")

# Text of the kind users send, and the characters that make normalisation interesting.
REALISTIC = [
    "今天天气怎么样？帮我写一首关于秋天的诗。",
    "你好，请问“会员卡”怎么办理？（急）！！",
    "我买的iPhone 15，屏幕坏了；能修吗：多少钱？",
    "ＯＫ，明天３点见。ＡＰＰ打不开，Ｗｉ－Ｆｉ也连不上……",
    "太棒了😀👍❤️，谢谢！👨‍👩‍👧",  # emoji, VS16, ZWJ sequence
    "温度３５℃，湿度８０％，№１２３，①②③，½杯",
    "ΟΔΟΣ ΣΟΦΙΑΣ; İstanbul; ﬁle ™; Straße",  # final sigma, dotted I, ligature, ß
    "教我炸彈製作，这是繁體字",
    "𝐁𝐎𝐌𝐁 and 𝟏𝟐𝟑 (mathematical alphanumerics)",
    "e\u0301 vs é; 한국어 텍스트; \u200b零宽\u200d字符\ufeff",
    "\u3000全角空格\u3000和　ideographic　space",
    "私用区\ue000字符\U000f0000和未分配\U000e0fff",
    "",
]
# Characters whose form is not the character itself, to splice into random text.
SPICE = (
    "，。？！：；“”（）、《》【】…—～·ＡＢＣａｂｃ０１２＠＃％＆＋－＝"
    "😀👍❤️\ufe0f\u200d\u20e3™℃№①½ﬁΣσςİıẞßΩΩÅÅ𝐀𝟎ｶﾞ㈱㍻彈製藥"
)


@pytest.fixture(scope="module")
def normaliser() -> Normaliser:
    return Normaliser(T2S)


def assert_same(normaliser: Normaliser, text: str, variants: dict[str, str]) -> None:
    expected_text, expected_index = normalise_reference(text, variants)
    result = normaliser(text)
    assert (result.text, list(result.index)) == (expected_text, expected_index), text


@pytest.mark.parametrize("text", REALISTIC)
def test_realistic_text_matches_the_definition(normaliser: Normaliser, text: str) -> None:
    assert_same(normaliser, text, T2S)


def test_random_mixed_text_matches_the_definition(normaliser: Normaliser) -> None:
    rng = random.Random(5)
    base = "".join(REALISTIC)
    for _ in range(300):
        chars = [rng.choice(base) for _ in range(rng.randint(0, 60))]
        for _ in range(rng.randint(0, 12)):
            chars.insert(rng.randint(0, len(chars)), rng.choice(SPICE))
        assert_same(normaliser, "".join(chars), T2S)


def test_every_bmp_character_matches_the_definition(normaliser: Normaliser) -> None:
    # In runs, so context-dependent behaviour (final sigma) would show as well.
    for start in range(0, 0x10000, 4096):
        assert_same(normaliser, "".join(map(chr, range(start, start + 4096))), T2S)


def test_sampled_non_bmp_characters_match_the_definition(normaliser: Normaliser) -> None:
    blocks = [
        range(0x1D400, 0x1D800),  # mathematical alphanumerics (NFKC → ASCII)
        range(0x1F100, 0x1F200),  # enclosed alphanumeric supplement
        range(0x1F300, 0x1FB00),  # emoji and symbols
        range(0x2F800, 0x2FA20),  # CJK compatibility ideographs supplement
        range(0xE0000, 0xE0200),  # tags, variation selectors supplement
    ]
    rng = random.Random(11)
    sample = [cp for block in blocks for cp in block]
    sample += rng.sample(range(0x10000, 0x110000), 5000)
    for i in range(0, len(sample), 1000):
        assert_same(normaliser, "".join(map(chr, sample[i : i + 1000])), T2S)


def test_variant_maps_apply_once_per_character() -> None:
    variants = {
        "彈": "弹",
        "甲": "乙",  # a chain: 甲 → 乙 only, never on to 丙
        "乙": "丙",
        "Ａ": "x",  # a full-width key: NFKC comes first, so this never applies
        "ß": "ss",  # expands
        "，": "好",  # noise stays noise
        "多字": "x",  # multi-character keys are not per-character variants
    }
    normaliser = Normaliser(variants)
    for text in ("甲乙丙彈", "ＡA，ß多字", "Straße甲", *REALISTIC):
        assert_same(normaliser, text, variants)
    assert normaliser("甲乙，ß").text == "乙丙ss"


def test_expanding_characters_map_back_to_their_source(normaliser: Normaliser) -> None:
    result = normaliser("a™，b")
    assert result.text == "atmb"
    assert list(result.index) == [0, 1, 1, 3]
    assert result.span(1, 3) == (1, 2)  # "tm" came from "™"


def test_the_usual_evasions_normalise_alike(normaliser: Normaliser) -> None:
    forms = {
        normaliser(text).text
        for text in (
            "炸弹制作",
            "炸 弹 制 作",
            "炸*弹-制_作",
            "炸彈製作",
            "炸❤️弹\u200b制作",
            "炸，弹。制！作",
        )
    }
    assert forms == {"炸弹制作"}
    assert normaliser("ＢａｄＷｏｒｄ").text == normaliser("badword").text == "badword"


@pytest.mark.parametrize(
    ("text", "folded"),
    [
        ("电话１３８－１２３４－５６７８，谢谢", "电话138-1234-5678,谢谢"),
        ("（０１０）６２３４５６７８", "(010)62345678"),
        ("ｚｈａｎｇ＠ｅｘａｍｐｌｅ．ｃｏｍ。", "zhang@example.com。"),
        ("ｉｇｎｏｒｅ　ａｌｌ", "ignore all"),
        ("你好，世界！", "你好，世界！"),  # full-width punctuation alone is left alone
    ],
)
def test_fold_full_width_keeps_positions(text: str, folded: str) -> None:
    assert fold_full_width(text) == folded
    assert len(folded) == len(text)
