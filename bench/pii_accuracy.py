"""PII recall and precision on a generated Chinese corpus (devtools.pii_corpus), as a
table for docs/benchmarks.md.

    python -m bench.pii_accuracy
"""

from __future__ import annotations

from bench.report import write_section
from imbot.devtools.pii_corpus import NEGATIVES, POSITIVE_KINDS, measure


def main() -> None:
    r = measure()
    rows = [
        f"| {kind} | {r['total'][kind]} | {r['found'][kind] / r['total'][kind]:.4f} "
        f"| {r['false'][kind]} |"
        for kind in POSITIVE_KINDS
    ]
    negative_rows = [
        f"| {label} | {r['total'][label]} | {r['false'][label]} |" for label, _ in NEGATIVES
    ]
    body = "\n".join(
        [
            "| recall | precision | true positives | false positives | missed |",
            "|---|---|---|---|---|",
            f"| **{r['recall']:.4f}** | **{r['precision']:.4f}** | {r['tp']} | {r['fp']} "
            f"| {r['fn']} |",
            "",
            "| kind | sentences | recall (exact span) | false positives in them |",
            "|---|---|---|---|",
            *rows,
            "",
            "| look-alike negative | sentences | false positives |",
            "|---|---|---|",
            *negative_rows,
            "",
            "5,000 generated sentences (Faker zh_CN, seed 2026): mobiles (some with separators "
            "or +86), landlines (real area codes, brackets, separators), resident IDs, bank "
            "cards (UnionPay and international, some grouped), e-mails, IPv4, IPv6 (full and "
            "compressed), and the look-alike negatives above (one in ten checksum-invalid IDs "
            "passes Luhn and must still not become a card). A hit counts only with the right "
            "category and exactly the value's span. Expected false positives: long order "
            "numbers that start with a card issuer's prefix (3-6, 2221-2720, 81, 95) "
            "and pass Luhn by chance: without context they cannot be told from a card, and "
            "masking them is the safe side. Targets: recall ≥ 0.99, precision ≥ 0.97.",
        ]
    )
    print(body)
    write_section(
        "pii-accuracy", "Moderation: PII recall and precision", "python -m bench.pii_accuracy", body
    )


if __name__ == "__main__":
    main()
