from __future__ import annotations

from imbot.devtools.pii_corpus import measure


def test_pii_recall_and_precision_on_a_generated_corpus() -> None:
    result = measure(seed=7, n=2000)
    assert result["recall"] >= 0.99, result
    assert result["precision"] >= 0.97, result
