"""Cheap prompt statistics that bear on which draft pays: how long the prompt is, how much of it repeats,
whether it is a passage followed by a question, whether it is code, how many chat turns it has.

MiniLM reads only the first 256 word pieces of a prompt, so long prompts that differ in what follows
(a passage and then a question, a file and then an edit request) look alike to it; these statistics see
the whole text. They are pure functions of the text (no model), microseconds per prompt.

`scripts/route_features_experiment.py` measures them as routing signals (appended to the embedding, or a
second stage after the nearest domain). They did not help (README, "Domain data and the index"), so the
router does not use them; the experiment and this module stay so the measurement can be repeated when
the engine, the corpus or the configs change.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

_WORD = re.compile(r"\w+|[^\w\s]")
_CODE_LINE = re.compile(r"[{};=()\[\]<>]|^\s{2,}\S|^\s*(def|class|import|from|return|function|const|let|var|func|package|SELECT|CREATE|if|for|while)\b")
_QUESTION_START = re.compile(r"^\s*(question\s*:|what|why|how|when|where|who|which|can|could|is|are|does|do|did|should|if)\b", re.I)


@dataclass(frozen=True)
class PromptStats:
    """Statistics of one prompt's whole text (all turns of a chat)."""

    words: int  # words and punctuation marks
    repeat3: float  # share of word trigrams that already occurred earlier in the prompt (self-similarity)
    code_lines: float  # share of non-empty lines that look like code
    passage_question: bool  # a passage of 100+ words followed by a short final part asking a question
    turns: int  # chat messages (1 for a plain prompt)

    def vector(self) -> list[float]:
        """Numeric form, in `FEATURE_NAMES` order: log length, repeats, code, passage-question, log turns."""
        return [math.log1p(self.words), self.repeat3, self.code_lines, float(self.passage_question), math.log(max(self.turns, 1))]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


FEATURE_NAMES = ("log_words", "repeat3", "code_lines", "passage_question", "log_turns")


def _text(prompt: str | None, messages: Sequence[Mapping[str, Any]] | None) -> tuple[str, int]:
    if messages is None:
        return prompt or "", 1
    parts = []
    for m in messages:
        c = m.get("content") if isinstance(m, Mapping) else getattr(m, "content", "")
        parts.append(c if isinstance(c, str) else str(c or ""))
    return "\n\n".join(parts), len(messages)


def prompt_stats(prompt: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None) -> PromptStats:
    text, turns = _text(prompt, messages)
    words = _WORD.findall(text.lower())
    grams = list(zip(words, words[1:], words[2:]))
    seen: set[tuple[str, str, str]] = set()
    rep = 0
    for g in grams:
        rep += g in seen
        seen.add(g)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    code = sum(bool(_CODE_LINE.search(ln)) for ln in lines) / len(lines) if lines else 0.0
    # passage then question: a long text whose last paragraph is short and asks something
    paras = [p for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
    last = paras[-1] if paras else ""
    head_words = len(_WORD.findall(" ".join(paras[:-1])))
    pq = head_words >= 100 and len(_WORD.findall(last)) <= 60 and ("?" in last or bool(_QUESTION_START.search(last)))
    return PromptStats(words=len(words), repeat3=rep / len(grams) if grams else 0.0, code_lines=code, passage_question=pq, turns=turns)
