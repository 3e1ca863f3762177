"""How much of an answer still being written may be shown (docs/streaming.md).

A chunk shown to the user cannot be taken back, and Easemob does not moderate stream
messages, so the output review runs on the whole text so far before each chunk and
releases only a prefix that no later text can turn into a finding:

* it ends where a sentence ends (with the closing brackets and quotes after it); a
  sentence still being written is held back, unless it has grown longer than
  ``max_hold_chars`` since the last sentence end: then it is released up to its last
  clause break (，、：, a space …), so a long sentence does not keep the user waiting;
* the cut is ``safe``: the caller's check that no word of the review's lexicon begins
  before the cut and goes on into text not written yet (``Moderator.word_may_span``). A
  word that spans the cut and ends in the text written so far is whole in the reviewed
  text, and caught there before anything is released. PII values (digits, addresses)
  never run across a sentence end or a clause break.

Each released prefix is reviewed again as part of every later text; the sender sends
only what goes beyond what the stream already shows, so a cut that falls back (a later
sentence end that is not safe yet) sends nothing.
"""

from __future__ import annotations

from collections.abc import Callable

# Characters after which a sentence has ended.
SENTENCE_ENDS = frozenset("。！？!?；;…\n")
# Closing marks that belong to the sentence they follow.
CLOSERS = frozenset("）)」』”’\"'】]")
# Inside a long sentence: where a clause ends.
CLAUSE_BREAKS = frozenset("，,、：:）)」』 \t")


def _sentence_ends(text: str, start: int, stop: int) -> list[int]:
    """Cut positions after whole sentences in ``text[start:stop]``, latest first."""
    cuts = []
    i = start
    while i < stop:
        ch = text[i]
        ended = ch in SENTENCE_ENDS or (ch == "." and i + 1 < len(text) and text[i + 1] in " \n")
        i += 1
        if ended:
            while i < len(text) and text[i] in CLOSERS:
                i += 1
            if i <= stop:
                cuts.append(i)
    return cuts[::-1]


def release_point(
    text: str, *, max_hold_chars: int, safe: Callable[[int], bool] = lambda _cut: True
) -> int:
    """The length of the prefix of ``text`` (an answer still growing) that may be shown."""
    # A cut needs a character after it: the text could still be finishing that sentence.
    stop = len(text) - 1
    if stop <= 0:
        return 0
    sentences = _sentence_ends(text, 0, stop)
    last = sentences[0] if sentences else 0
    candidates = list(sentences)
    if stop - last > max_hold_chars:
        # A sentence too long to hold: its clause breaks come first.
        clauses = [i + 1 for i in range(last, stop) if text[i] in CLAUSE_BREAKS]
        candidates = clauses[::-1] + candidates
    for cut in candidates:
        if cut > 0 and safe(cut):
            return cut
    return 0
