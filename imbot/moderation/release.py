"""How much of an answer still being written may be shown (docs/streaming.md).

A chunk shown to the user cannot be taken back, and Easemob does not moderate stream
messages, so the output review runs on the whole text so far before each chunk and
releases only a prefix that no later text can turn into a finding:

* it ends at a sentence's end (or, for a sentence longer than ``max_hold_chars``, at its
  last clause break), so the unfinished sentence is held back;
* it stays ``hold_chars`` short of the text's end: a lexicon word (or a PII value) that
  began before the cut is then whole inside the reviewed text, and caught there, before
  the cut is released. ``hold_chars`` is at least the review's longest word.

The cut only moves forward as the text grows (``release_point`` of a longer text with
the same beginning is never smaller), so each chunk is the previous one plus more.
"""

from __future__ import annotations

# Characters after which a sentence has ended.
SENTENCE_ENDS = frozenset("。！？!?；;…\n")
# Inside a long sentence: where a clause ends.
CLAUSE_BREAKS = frozenset("，,、：:）)」』 \t")


def release_point(text: str, *, hold_chars: int, max_hold_chars: int) -> int:
    """The length of the prefix of ``text`` (an answer still growing) that may be shown."""
    limit = len(text) - max(0, hold_chars)
    if limit <= 0:
        return 0
    cut = 0
    for i in range(limit - 1, -1, -1):
        ch = text[i]
        if ch in SENTENCE_ENDS or (ch == "." and i + 1 < len(text) and text[i + 1] in " \n"):
            cut = i + 1
            break
    if limit - cut <= max_hold_chars:
        return cut
    # A sentence too long to hold: its last clause break, else everything up to the limit.
    for i in range(limit - 1, cut - 1, -1):
        if text[i] in CLAUSE_BREAKS:
            return i + 1
    return limit
