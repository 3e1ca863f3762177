"""PII recall and precision on a generated Chinese corpus (Faker zh_CN, fixed seed).

Positives, embedded in Chinese sentences (mostly with no spaces around them):
mobile numbers (Faker, some written 138-1234-5678, 138 1234 5678 or with +86),
landlines (real area codes; 010-62345678, (0755)26123456, full-width brackets,
spaces), 18-digit resident IDs (Faker), Luhn-valid bank cards (UnionPay 62…
and Faker's international ones, some in groups of four), e-mail addresses, IPv4
and IPv6 addresses (full and compressed). A positive counts only if a hit has
its category and exactly its span — what gets masked is what the user typed;
any other hit is a false positive.

Negatives in the same kind of sentences: checksum-invalid IDs (one in ten of
them passes Luhn), Luhn-invalid cards, order numbers (12 digits; 16-19 digits
that start with a date; 19 digits with any leading digit, as marketplaces issue
them — one in ten of the long ones is Luhn-valid by chance, and those that also
start with a card issuer's prefix are masked as cards: the known cost of the card
rule), service numbers (400-820-8820, 95588), prices, dates, times, versions,
MAC addresses, @-mentions and image names like icon@2x.png.

Shared by the accuracy test (tests/unit/moderation/test_pii_accuracy.py) and the
benchmark that reports it (``python -m bench.pii_accuracy``).
"""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from faker import Faker

from imbot.moderation.pii import find_pii, luhn_valid

TEMPLATES = (
    "我的{}请记一下",
    "联系方式是{}，谢谢",
    "{}是我的",
    "请把资料发到{}吧",
    "号码：{}。",
    "麻烦核对一下 {} 好吗？",
    "（{}）已登记",
)
POSITIVE_KINDS = ("mobile", "landline", "id_card", "bank_card", "email", "ipv4", "ipv6")
CATEGORY = {"ipv4": "ip", "ipv6": "ip"}  # find_pii reports both versions as "ip"
# Real area codes: 010 and 02x have 8-digit local numbers, the 4-digit codes 7 or 8.
AREA_CODES = ("010", "020", "021", "022", "023", "024", "025", "027", "028", "029", "0311",
              "0351", "0371", "0411", "0431", "0451", "0512", "0531", "0571", "0591", "0731",
              "0755", "0769", "0871", "0898", "0931", "0991")  # fmt: skip


class Hit(Protocol):
    """What a PII finder reports (read-only, as moderation.pii.PiiHit is)."""

    @property
    def category(self) -> str: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...


def _corpus(seed: int, n: int) -> list[tuple[str, str, tuple[int, int] | None]]:
    """(sentence, kind — a positive kind or a negative's label —, span of a positive's value)."""
    fake = Faker("zh_CN")
    Faker.seed(seed)
    rng = random.Random(seed)
    makers: dict[str, Callable[[], str]] = {
        "mobile": lambda: _mobile(fake, rng),
        "landline": lambda: _landline(rng),
        "id_card": fake.ssn,
        "bank_card": lambda: _card(fake, rng),
        "email": fake.email,
        "ipv4": fake.ipv4,
        "ipv6": lambda: _ipv6(fake, rng),
    }
    items: list[tuple[str, str, tuple[int, int] | None]] = []
    for _ in range(n):
        kind = rng.choice([*POSITIVE_KINDS, "negative", "negative"])
        template = rng.choice(TEMPLATES)
        start = template.index("{}")
        if kind == "negative":
            kind, make = rng.choice(NEGATIVES)
            items.append((template.format(make(fake, rng)), kind, None))
        else:
            value = makers[kind]()
            items.append((template.format(value), kind, (start, start + len(value))))
    return items


def _mobile(fake: Faker, rng: random.Random) -> str:
    number = str(fake.phone_number())
    style = rng.randrange(10)
    if style == 0:
        return f"{number[:3]}-{number[3:7]}-{number[7:]}"
    if style == 1:
        return f"{number[:3]} {number[3:7]} {number[7:]}"
    if style == 2:
        return f"+86 {number}"
    return number


def _landline(rng: random.Random) -> str:
    area = rng.choice(AREA_CODES)
    digits = 8 if len(area) == 3 else rng.choice((7, 8))
    local = str(rng.randint(2, 8)) + "".join(str(rng.randrange(10)) for _ in range(digits - 1))
    style = rng.randrange(5)
    if style == 0:
        return f"({area}){local}"
    if style == 1:
        return f"（{area}）{local}"  # full-width brackets, as an IME types them
    if style == 2:
        return area + local
    if style == 3:
        return f"{area} {local[:-4]} {local[-4:]}"
    return f"{area}-{local}"


def _luhn_complete(prefix: str) -> str:
    return next(prefix + d for d in "0123456789" if luhn_valid(prefix + d))


def _card(fake: Faker, rng: random.Random) -> str:
    """A Luhn-valid card number of a length banks in China issue (16-19 digits): half of
    them UnionPay (62…), as most cards in China are, half Faker's international brands."""
    if rng.random() < 0.5:
        length = rng.choice((16, 19))
        number = _luhn_complete("62" + "".join(str(rng.randrange(10)) for _ in range(length - 3)))
    else:
        while not 16 <= len(number := str(fake.credit_card_number())) <= 19:
            pass
    if rng.random() < 0.2:
        return " ".join(number[i : i + 4] for i in range(0, len(number), 4))
    return number


def _ipv6(fake: Faker, rng: random.Random) -> str:
    address = str(fake.ipv6())
    if rng.random() < 0.5:  # a run of zero groups, written compressed (2001:db8::1)
        groups = address.split(":")
        start = rng.randrange(7)
        for i in range(start, min(8, start + rng.randint(2, 3))):
            groups[i] = "0"
        address = ipaddress.IPv6Address(":".join(groups)).compressed
    return address


def _mistyped_id(fake: Faker, rng: random.Random) -> str:
    good = str(fake.ssn())
    return good[:17] + rng.choice([c for c in "0123456789X" if c != good[17]])


def _luhn_invalid_card(fake: Faker, rng: random.Random) -> str:
    card = _card(fake, rng).replace(" ", "")
    return next(card[:-1] + d for d in "0123456789" if not luhn_valid(card[:-1] + d))


def _digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randrange(10)) for _ in range(n))


NEGATIVES: tuple[tuple[str, Callable[[Faker, random.Random], str]], ...] = (
    ("ID with a wrong check digit", _mistyped_id),
    ("card number with a wrong Luhn digit", _luhn_invalid_card),
    ("12-digit order number", lambda f, r: f"订单号{r.randint(10**11, 10**12 - 1)}"),
    (
        "order number starting with a date (16-19 digits)",
        lambda f, r: f"订单{f.date(pattern='%Y%m%d')}{_digits(r, r.randint(8, 11))}",
    ),
    (
        "marketplace order number (19 digits, any leading digit)",
        lambda f, r: f"订单编号{r.randint(1, 9)}{_digits(r, 18)}",
    ),
    (
        "service number (400-820-8820, 95588, …)",
        lambda f, r: r.choice(("400-820-8820", "4008208820", "95588", "10086", "12315")),
    ),
    ("price", lambda f, r: f"{r.randint(1, 99999)}.{r.randint(0, 99):02d}元"),
    ("date", lambda f, r: str(f.date())),
    ("time", lambda f, r: f"{r.randint(0, 23):02d}:{r.randint(0, 59):02d}:{r.randint(0, 59):02d}"),
    ("version", lambda f, r: f"v{r.randint(1, 9)}.{r.randint(0, 20)}.{r.randint(0, 9)}"),
    ("MAC address", lambda f, r: str(f.mac_address())),
    ("@-mention", lambda f, r: f"@{f.name()} 你看"),
    ("image name (icon@2x.png)", lambda f, r: f"{f.word()}@2x.png"),
)


def measure(
    seed: int = 2026, n: int = 5000, find: Callable[[str], Sequence[Hit]] = find_pii
) -> dict[str, Any]:
    tp = fp = fn = 0
    missed: Counter[str] = Counter()
    found_by_kind: Counter[str] = Counter()
    false_by_kind: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for text, kind, span in _corpus(seed, n):
        total[kind] += 1
        hits = {(h.category, h.start, h.end) for h in find(text)}
        if span is not None:
            expected = (CATEGORY.get(kind, kind), *span)
            if expected in hits:
                tp += 1
                found_by_kind[kind] += 1
                hits.discard(expected)
            else:
                fn += 1
                missed[kind] += 1
        fp += len(hits)
        false_by_kind[kind] += len(hits)
    return {
        "recall": tp / (tp + fn),
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "total": total,
        "found": found_by_kind,
        "missed": missed,
        "false": false_by_kind,
    }
