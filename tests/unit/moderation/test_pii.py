"""PII detectors, one at a time: what is found (exactly which characters) and what is not."""

from __future__ import annotations

import pytest

from imbot.moderation import Moderator
from imbot.moderation.pii import (
    bank_card_valid,
    find_pii,
    id_card_shaped,
    id_card_valid,
    luhn_valid,
)


def luhn_complete(prefix: str) -> str:
    return next(prefix + d for d in "0123456789" if luhn_valid(prefix + d))


def mistyped_id_that_passes_luhn(first17: str) -> str:
    """An ID with a wrong check digit that happens to be Luhn-valid (one in ten are)."""
    for sequence in range(100, 1000):
        body = first17[:14] + str(sequence)
        candidate = luhn_complete(body)
        if not id_card_valid(candidate):
            return candidate
    raise AssertionError("unreachable")


# Gansu (62…) and Guangdong (44…) IDs start like UnionPay and Mastercard cards.
MISTYPED_GANSU_ID = mistyped_id_that_passes_luhn("62010219900307123")
MISTYPED_GUANGDONG_ID = mistyped_id_that_passes_luhn("44030519851231456")
UNIONPAY_18 = luhn_complete("62220212345678901")  # digits 7-14 are no birth date
UNIONPAY_19 = luhn_complete("622202123456789012")


def spans(text: str) -> list[tuple[str, str]]:
    """(category, the exact text that would be masked)."""
    return [(h.category, text[h.start : h.end]) for h in find_pii(text)]


def test_the_reviewers_case_an_id_shaped_number_is_never_a_card() -> None:
    for number in (MISTYPED_GANSU_ID, MISTYPED_GUANGDONG_ID):
        assert luhn_valid(number)
        assert not id_card_valid(number)
        assert id_card_shaped(number)
        assert not bank_card_valid(number)
        assert find_pii(f"身份证号{number}，请核对") == []


def test_an_18_digit_card_without_an_id_shape_is_still_a_card() -> None:
    assert not id_card_shaped(UNIONPAY_18)
    assert spans(f"卡号{UNIONPAY_18}转账") == [("bank_card", UNIONPAY_18)]


@pytest.mark.parametrize(
    "number",
    [
        luhn_complete("202411251234567"),  # an order number that starts with a date
        luhn_complete("110105194912310"),  # starts with 1: no card issuer uses it
        luhn_complete("700000123456789"),
        luhn_complete("0622021234567890"),
        luhn_complete("999912345678901234"),
    ],
)
def test_luhn_valid_numbers_without_a_card_issuer_prefix_are_not_cards(number: str) -> None:
    assert luhn_valid(number)
    assert find_pii(f"编号{number}") == []


@pytest.mark.parametrize(
    "card",
    [
        UNIONPAY_19,
        luhn_complete("622848001234567"),  # 16-digit UnionPay
        luhn_complete("411111111111111"),  # Visa
        luhn_complete("222100000000000"),  # Mastercard 2-series
        luhn_complete("955880123456789012"),  # legacy domestic 95…
    ],
)
def test_cards_of_the_issuers_used_in_china_are_masked(card: str) -> None:
    assert spans(f"我的卡{card}。") == [("bank_card", card)]


def test_card_number_in_groups_of_four_is_masked_whole() -> None:
    grouped = " ".join(UNIONPAY_19[i : i + 4] for i in range(0, 19, 4))
    assert spans(f"卡号 {grouped} 谢谢") == [("bank_card", grouped)]


def test_seventeen_digits_and_x_that_fail_the_id_check_are_not_a_card() -> None:
    first17 = luhn_complete("6103281957122276")  # the 17 digits alone pass Luhn
    assert not id_card_valid(first17 + "X")
    assert find_pii(f"{first17}X是我的") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("我的手机13812345678请联系", "13812345678"),
        ("打138-1234-5678找我", "138-1234-5678"),
        ("打138 1234 5678找我", "138 1234 5678"),
        ("打+86 13812345678找我", "+86 13812345678"),
        ("打+8613812345678找我", "+8613812345678"),
        ("手机１３８１２３４５６７８，谢谢", "１３８１２３４５６７８"),  # full-width digits
        ("19912345678是新号段", "19912345678"),
    ],
)
def test_mobile_numbers(text: str, expected: str) -> None:
    assert spans(text) == [("mobile", expected)]


@pytest.mark.parametrize(
    "text",
    [
        "号码12812345678",  # no 12x mobile prefix
        "号码1381234567",  # 10 digits
        "号码138123456789",  # 12 digits
        "号码23812345678",  # does not start with 1
        "编号9913812345678",  # inside a longer number
        "价格13812元",
        "客服热线10086",
    ],
)
def test_not_mobile_numbers(text: str) -> None:
    assert find_pii(text) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("座机010-62345678", "010-62345678"),
        ("座机01062345678转", "01062345678"),
        ("电话(0755)26123456", "(0755)26123456"),
        ("电话（0571）88881234，谢谢", "（0571）88881234"),
        ("电话021 6234 5678", "021 6234 5678"),
        ("电话0571-8888123", "0571-8888123"),  # 7-digit local number
        ("电话（０１０）６２３４５６７８", "（０１０）６２３４５６７８"),  # all full-width
    ],
)
def test_landlines(text: str, expected: str) -> None:
    assert spans(text) == [("landline", expected)]


@pytest.mark.parametrize(
    "text",
    [
        "号码010-1234567",  # Beijing numbers have 8 digits
        "号码010-12345678",  # local numbers do not start with 1
        "号码0123-4567890",  # no area code 012x
        "号码000-12345678",
        "号码02012345",  # too short
        "号码0755-123456789",  # too long
        "热线400-820-8820",  # a company's service number, not a landline
        "热线4008208820",
        "拨打95588",
        "日期2024-11-25",
    ],
)
def test_not_landlines(text: str) -> None:
    assert find_pii(text) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("邮箱zhang.san@example.com.cn收", "zhang.san@example.com.cn"),
        ("发到 li_si+bot@qq.com 吧", "li_si+bot@qq.com"),
        ("发到a@b.cn。", "a@b.cn"),
        ("邮箱ｚｈａｎｇ＠ｅｘａｍｐｌｅ．ｃｏｍ谢谢", "ｚｈａｎｇ＠ｅｘａｍｐｌｅ．ｃｏｍ"),
    ],
)
def test_emails(text: str, expected: str) -> None:
    assert spans(text) == [("email", expected)]


@pytest.mark.parametrize(
    "text",
    [
        "user@localhost",  # no top-level domain
        "@张三 你看一下",  # a mention
        "a@b.c",  # one-letter top-level domain
        "foo@@bar.com",
        "图标icon@2x.png太小",  # an image name
        "邮箱是 name at example dot com",
    ],
)
def test_not_emails(text: str) -> None:
    assert find_pii(text) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("服务器192.168.1.20挂了", "192.168.1.20"),
        ("服务器是10.0.0.1.", "10.0.0.1"),  # a sentence's ASCII full stop is not an octet
        ("地址2001:db8:85a3::8a2e:370:7334无法访问", "2001:db8:85a3::8a2e:370:7334"),
        ("IP:2001:0db8:0000:0000:0000:ff00:0042:8329", "2001:0db8:0000:0000:0000:ff00:0042:8329"),
        ("地址是fe80::1ff:fe23:4567:890a，", "fe80::1ff:fe23:4567:890a"),
        ("映射地址::ffff:192.168.1.1可以", "::ffff:192.168.1.1"),
        ("IPv6 2001:DB8::1 up", "2001:DB8::1"),
    ],
)
def test_ip_addresses(text: str, expected: str) -> None:
    assert spans(text) == [("ip", expected)]


@pytest.mark.parametrize(
    "text",
    [
        "版本1.2.3.4.5发布",
        "地址192.168.1.256",  # no such octet
        "时间12:30:45开会",
        "网卡00:1A:2B:3C:4D:5E",  # a MAC address
        "用std::vector就行",
        "cafe::beef",  # hex words, no digit
        "本机::1",  # loopback: not personal
        "比分3:2",
        "1:2:3:4:5:6:7",  # seven groups, no ::
    ],
)
def test_not_ip_addresses(text: str) -> None:
    assert find_pii(text) == []


def test_overlapping_candidates_resolve_to_one_category() -> None:
    valid_id = "11010519491231002X"
    assert spans(f"身份证{valid_id}") == [("id_card", valid_id)]
    # Several kinds in one message, each masked where it is.
    text = f"电话13812345678，邮箱a@b.cn，IP 10.1.2.3，卡{UNIONPAY_19}"
    assert spans(text) == [
        ("mobile", "13812345678"),
        ("email", "a@b.cn"),
        ("ip", "10.1.2.3"),
        ("bank_card", UNIONPAY_19),
    ]


def test_masked_text_keeps_everything_around_the_number() -> None:
    moderator = Moderator.from_config({})
    result = moderator.check_input(f"身份证{MISTYPED_GANSU_ID}，座机（0755）26123456。")
    assert result.text == f"身份证{MISTYPED_GANSU_ID}，座机[电话]。"
    assert result.categories() == ("pii.landline",)
