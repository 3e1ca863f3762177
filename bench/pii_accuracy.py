"""PII recall and precision on a generated Chinese corpus (Faker zh_CN, fixed seed).

Positives: mobile numbers, 18-digit resident IDs, Luhn-valid bank cards, e-mail
addresses and IPv4 addresses from Faker, embedded in Chinese sentences with no
spaces around them. Negatives: checksum-invalid IDs, Luhn-invalid card numbers,
order numbers, prices, dates and version strings in the same kind of sentences.

    python -m bench.pii_accuracy
"""

from __future__ import annotations

import random

from faker import Faker

from bench.report import write_section
from streams.moderation.pii import find_pii, luhn_valid

TEMPLATES = ("我的{}请记一下", "联系方式是{}，谢谢", "{}是我的", "请把资料发到{}吧", "号码：{}。")


def _corpus(seed: int, n: int) -> list[tuple[str, str | None]]:
    fake = Faker("zh_CN")
    Faker.seed(seed)
    rng = random.Random(seed)
    items: list[tuple[str, str | None]] = []
    for _ in range(n):
        kind = rng.choice(["mobile", "id_card", "bank_card", "email", "ip", "negative"])
        if kind == "mobile":
            value = fake.phone_number()
        elif kind == "id_card":
            value = fake.ssn()
        elif kind == "bank_card":
            value = _card(fake)
        elif kind == "email":
            value = fake.email()
        elif kind == "ip":
            value = fake.ipv4()
        else:
            value = _negative(fake, rng)
        items.append((rng.choice(TEMPLATES).format(value), None if kind == "negative" else kind))
    return items


def _card(fake: Faker) -> str:
    """A Luhn-valid card number of a length banks in China issue (16-19 digits)."""
    while True:
        number = str(fake.credit_card_number())
        if 16 <= len(number) <= 19:
            return number


def _negative(fake: Faker, rng: random.Random) -> str:
    choice = rng.randrange(6)
    if choice == 0:  # an ID with a wrong check digit
        good = fake.ssn()
        return good[:17] + rng.choice([c for c in "0123456789X" if c != good[17]])
    if choice == 1:  # a card number with a wrong Luhn digit
        card = _card(fake)
        bad = card[:-1] + str((int(card[-1]) + rng.randint(1, 9)) % 10)
        return bad if not luhn_valid(bad) else card[:-1] + str((int(card[-1]) + 5) % 10)
    if choice == 2:
        return f"订单号{rng.randint(10**11, 10**12 - 1)}"  # 12 digits
    if choice == 3:
        return f"{rng.randint(1, 99999)}.{rng.randint(0, 99):02d}元"
    if choice == 4:
        return fake.date()
    return f"v{rng.randint(1, 9)}.{rng.randint(0, 20)}"


def measure(seed: int = 2026, n: int = 5000) -> dict[str, float]:
    tp = fp = fn = 0
    for text, expected in _corpus(seed, n):
        found = {h.category for h in find_pii(text)}
        if expected is None:
            fp += len(found)
        elif expected in found:
            tp += 1
            fp += len(found - {expected})
        else:
            fn += 1
            fp += len(found)
    return {
        "recall": tp / (tp + fn),
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def main() -> None:
    r = measure()
    body = (
        f"| recall | precision | true positives | false positives | missed |\n|---|---|---|---|---|\n"
        f"| **{r['recall']:.4f}** | **{r['precision']:.4f}** | {r['tp']:.0f} | {r['fp']:.0f} | {r['fn']:.0f} |\n\n"
        "5,000 generated sentences (Faker zh_CN, seed 2026): mobiles, resident IDs, bank cards, e-mails, IPv4, "
        "and look-alike negatives (invalid checksums, order numbers, prices, dates, versions). "
        "Targets: recall ≥ 0.99, precision ≥ 0.97."
    )
    print(body)
    write_section(
        "pii-accuracy", "Moderation: PII recall and precision", "python -m bench.pii_accuracy", body
    )


if __name__ == "__main__":
    main()
