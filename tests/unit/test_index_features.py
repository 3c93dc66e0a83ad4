"""Prompt statistics: length, repeats, code, passage-then-question, turns."""

from __future__ import annotations

import math

from index.features import FEATURE_NAMES, prompt_stats


def test_short_question():
    s = prompt_stats("Why is the sky blue?")
    assert s.words == 6 and s.repeat3 == 0.0 and s.code_lines == 0.0 and not s.passage_question and s.turns == 1
    assert len(s.vector()) == len(FEATURE_NAMES) and math.isclose(s.vector()[0], math.log1p(6))


def test_passage_followed_by_a_question():
    passage = " ".join(f"The river town number {i} built a new bridge last year." for i in range(12))
    s = prompt_stats(f"Answer using the passage.\n\n{passage}\n\nQuestion: when was the bridge built?")
    assert s.passage_question and s.words > 100
    assert not prompt_stats(f"Summarise this.\n\n{passage}").passage_question  # no question at the end
    assert s.repeat3 > 0.5  # the passage repeats itself


def test_code_and_chat_turns():
    code = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n"
    assert prompt_stats(f"Add type hints.\n\n{code}").code_lines >= 0.6
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "a plan?"}]
    assert prompt_stats(messages=msgs).turns == 3
