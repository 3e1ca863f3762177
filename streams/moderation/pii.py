"""Chinese PII detection: validated, so look-alike numbers are left alone.

Mainland mobile numbers, landlines, 18-digit resident ID numbers (checksum and
birth date validated), bank card numbers (Luhn validated), e-mail addresses and
IPv4 addresses. Digit runs are bounded by non-digits, so numbers embedded in
Chinese text are found and parts of longer numbers are not.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

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

_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("email", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")),
    ("id_card", re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")),
    ("bank_card", re.compile(r"(?<!\d)(?:\d[ -]?){15,18}\d(?!\d)")),
    ("mobile", re.compile(r"(?<![\d+])(?:\+?86[- ]?)?1[3-9]\d(?:[- ]?\d{4}){2}(?!\d)")),
    ("landline", re.compile(r"(?<!\d)(?:\(0\d{2,3}\)|0\d{2,3})[- ]?\d{7,8}(?!\d)")),
    (
        "ip",
        re.compile(
            r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d.])"
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class PiiHit:
    category: str
    start: int
    end: int


def id_card_valid(value: str) -> bool:
    digits = value.upper()
    if len(digits) != 18 or not digits[:17].isdigit():
        return False
    total = sum(int(d) * w for d, w in zip(digits[:17], _ID_WEIGHTS, strict=True))
    if _ID_CHECK[total % 11] != digits[17]:
        return False
    try:
        born = dt.date(int(digits[6:10]), int(digits[10:12]), int(digits[12:14]))
    except ValueError:
        return False
    return dt.date(1900, 1, 1) <= born <= dt.date.today()


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


_CANDIDATE = re.compile(r"\d{3}|@|\d\.\d")  # no digit run, no @, no dotted number: nothing to find
_VALIDATORS = {"id_card": id_card_valid, "bank_card": luhn_valid}


def find_pii(text: str) -> list[PiiHit]:
    """Non-overlapping hits, in text order; earlier categories win overlaps."""
    if _CANDIDATE.search(text) is None:
        return []
    taken: list[tuple[int, int]] = []
    hits: list[PiiHit] = []
    for category, pattern in _PATTERNS:
        for match in pattern.finditer(text):
            start, end = match.span()
            validate = _VALIDATORS.get(category)
            if validate is not None and not validate(match.group()):
                continue
            if any(start < e and s < end for s, e in taken):
                continue
            taken.append((start, end))
            hits.append(PiiHit(category, start, end))
    return sorted(hits, key=lambda h: h.start)
