"""Chinese PII detection: validated, so look-alike numbers are left alone.

Mainland mobile numbers, landlines, 18-digit resident ID numbers (checksum and
birth date validated), bank card numbers (Luhn validated), e-mail addresses and
IP addresses (v4 and v6). Digit runs are bounded by non-digits, so numbers
embedded in Chinese text are found and parts of longer numbers are not.

Bank cards are the loosest rule (any 16-19 digits with a Luhn check digit would
do, and one number in ten passes Luhn by chance), so a card also needs an issuer
prefix that cards used in China carry — 3 (JCB, Diners), 4 (Visa), 5
(Mastercard), 6 (UnionPay 62, Discover), 2221-2720 (Mastercard), 81 (UnionPay),
95 (legacy domestic cards) — and an 18-digit number shaped like a resident ID (a
region code and a real birth date where an ID has them) is an ID: if its check
digit is wrong it is a mistyped ID, not a card, and is left alone like any
invalid ID. So order numbers that start with a date (2024…) stay readable for
the model that is asked about them; one that starts with 3-6 and passes Luhn by
chance is still taken for a card.

Text typed in full-width mode (１３８…, ａ＠ｂ．ｃｎ) is read as the ASCII it stands
for; positions are unchanged, so the masked span is the one the user typed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from imbot.moderation.normalise import fold_full_width

PLACEHOLDERS = {
    "mobile": "[手机号]",
    "landline": "[电话]",
    "id_card": "[身份证号]",
    "bank_card": "[银行卡号]",
    "email": "[邮箱]",
    "ip": "[IP地址]",
}

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_ID_CHECK = "10X98765432"
# First two digits of a resident ID: province-level divisions, 71 Taiwan, 81/82 Hong
# Kong/Macao (and 83 Taiwan residents' permits); 9 starts a foreigner's permanent
# residence ID, which has the same birth date and check digit.
_ID_REGION = re.compile(r"1[1-5]|2[1-3]|3[1-7]|4[1-6]|5[0-4]|6[1-5]|71|8[1-3]|9\d")
_CARD_ISSUER = re.compile(r"[3-6]|2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)|81|95")

_AREA3 = r"0(?:10|2\d)"  # Beijing and the 02x cities: 8-digit local numbers
_AREA4 = r"0[3-9]\d\d"  # everywhere else: 7 or 8 digits
_OPEN, _CLOSE = "[(（]", "[)）]"  # an IME types full-width brackets around ASCII digits
_LANDLINE = (  # local numbers start with 2-9; a space or hyphen may split them
    rf"(?<!\d)(?:"
    rf"(?:{_OPEN}{_AREA3}{_CLOSE}|{_AREA3}[- ]?)[2-9]\d{{3}}[- ]?\d{{4}}"
    rf"|(?:{_OPEN}{_AREA4}{_CLOSE}|{_AREA4}[- ]?)[2-9]\d{{2,3}}[- ]?\d{{4}}"
    rf")(?!\d)"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"

# In priority order: where two matches overlap, the earlier category wins. ASCII digits
# only (``re.ASCII``): full-width ones are folded first, other scripts' are not numbers here.
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.ASCII))
    for name, pattern in (
        ("email", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
        (
            "ipv6",  # validated by ipaddress; a colon may precede it ("IP:fe80::1")
            r"(?<![0-9A-Za-z.])(?<![0-9A-Fa-f]:)(?:[0-9A-Fa-f]|::)[0-9A-Fa-f:]{1,38}"
            rf"(?:(?<=:){_OCTET}(?:\.{_OCTET}){{3}})?(?![0-9A-Za-z:]|\.\d)",
        ),
        ("id_card", r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])"),
        ("bank_card", r"(?<![0-9A-Za-z])(?:\d[ -]?){15,18}\d(?![0-9A-Za-z])"),
        ("mobile", r"(?<![\d+])(?:\+?86[- ]?)?1[3-9]\d(?:[- ]?\d{4}){2}(?!\d)"),
        ("landline", _LANDLINE),
        ("ip", rf"(?<!\d)(?<!\d\.){_OCTET}(?:\.{_OCTET}){{3}}(?!\.?\d)"),  # not 1.2.3.4.5
    )
)
_CATEGORY = {"ipv6": "ip"}  # both IP versions are one category to configure and mask


@dataclass(frozen=True, slots=True)
class PiiHit:
    category: str
    start: int
    end: int


def _birth_date_valid(digits: str) -> bool:
    try:
        born = dt.date(int(digits[6:10]), int(digits[10:12]), int(digits[12:14]))
    except ValueError:
        return False
    return dt.date(1900, 1, 1) <= born <= dt.date.today()


def id_card_valid(value: str) -> bool:
    digits = value.upper()
    if len(digits) != 18 or not digits[:17].isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(digits[:17], _ID_WEIGHTS, strict=True))
    return _ID_CHECK[total % 11] == digits[17] and _birth_date_valid(digits)


def id_card_shaped(digits: str) -> bool:
    """An 18-digit number with an ID's region code and birth date, whatever its check digit."""
    return len(digits) == 18 and bool(_ID_REGION.match(digits)) and _birth_date_valid(digits)


def luhn_valid(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    if not 16 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def bank_card_valid(number: str) -> bool:
    digits = "".join(c for c in number if c.isdigit())
    return (
        luhn_valid(digits) and _CARD_ISSUER.match(digits) is not None and not id_card_shaped(digits)
    )


# Image names such as icon@2x.png look like addresses; these are not top-level domains.
_FILE_SUFFIXES = frozenset({"png", "jpg", "jpeg", "gif", "webp", "svg", "bmp", "ico", "tiff"})


def email_valid(candidate: str) -> bool:
    return candidate.rsplit(".", 1)[-1].lower() not in _FILE_SUFFIXES


def ipv6_valid(candidate: str) -> bool:
    """A parseable IPv6 address with at least two groups and a digit: ``::1``, ``std::cout``
    and hex words such as ``cafe::beef`` are not worth masking (or not addresses)."""
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    groups = [g for g in candidate.split(":") if g]
    return len(groups) >= 2 and any(c.isdigit() for c in candidate)


_VALIDATORS: dict[str, Callable[[str], bool]] = {
    "email": email_valid,
    "id_card": id_card_valid,
    "bank_card": bank_card_valid,
    "ipv6": ipv6_valid,
}

# What a text must contain before a category's pattern is worth running: most messages
# contain none of these, so a few searches decide.
_NUMBER_HINT = re.compile(r"[0-9](?:[- ]?[0-9]){6}")  # 7 digits: every phone, ID and card
_IPV6_HINT = re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f:]|::[0-9A-Fa-f]")
_IPV4_HINT = re.compile(r"[0-9]\.[0-9]")
_HINTS: dict[str, Callable[[str], bool]] = {
    "email": lambda text: "@" in text,
    "ipv6": lambda text: ":" in text and _IPV6_HINT.search(text) is not None,
    "ip": lambda text: _IPV4_HINT.search(text) is not None,
}


def find_pii(text: str) -> list[PiiHit]:
    """Non-overlapping hits, in text order; earlier categories win overlaps."""
    text = fold_full_width(text)
    numbers = _NUMBER_HINT.search(text) is not None
    taken: list[tuple[int, int]] = []
    hits: list[PiiHit] = []
    for name, pattern in _PATTERNS:
        hint = _HINTS.get(name)
        if not (hint(text) if hint is not None else numbers):
            continue
        validate = _VALIDATORS.get(name)
        for match in pattern.finditer(text):
            start, end = match.span()
            if validate is not None and not validate(match.group()):
                continue
            if any(start < e and s < end for s, e in taken):
                continue
            taken.append((start, end))
            hits.append(PiiHit(_CATEGORY.get(name, name), start, end))
    return sorted(hits, key=lambda h: h.start)
