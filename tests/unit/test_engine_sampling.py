"""Speculative sampling through the engine's own step code (scheduler, drafter, decode, acceptance) on the
tiny model: the tokens committed after a fixed context follow the target's exact distribution, for a model
draft that differs from the target and for a prompt-lookup (one-hot) draft. About a second per case, so
CI checks the engine's path on every run; tests/integration/test_engine_sampling_real.py does the same on
the real model with the shipped config.

Power: 2000 samples per case; the chi-square test at level 1e-4 rejects, with probability >= 0.99, any
distribution at a chi-square distance sum (P - p)^2 / p >= 0.035 from the target (about a total-variation
distance of 0.06 on these few-token distributions). Each case also shows this power on the data: the same
counts reject the draft's own distribution (or the distribution a draft accepted without correction would
give) at 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import DraftConfig, SamplingParams
from engine.lean import Segment
from engine.sampling import probs_for
from tests.spec_sampling import chi2, fit_two_tokens, power, sample_after
from tests.tiny import tiny_engine

N = 2000
ALPHA = 1e-4
# The tiny model's logits are small: at temperature 0.1 its next-token distributions have a few tokens of
# weight (top ~0.4-0.6), where a wrong correction shows.
PARAMS = SamplingParams(temperature=0.1, max_new_tokens=2)


@pytest.fixture(scope="module")
def lean():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_engine().lean
    torch.set_num_threads(threads)


def test_the_stated_power_holds():
    assert power(N, 0.035, 12, ALPHA) >= 0.99


def _draft_probs(lean, context, params, draft: DraftConfig) -> torch.Tensor:
    from engine.draft import draft_plan

    plan = draft_plan(lean, draft)
    cache = lean.new_cache(len(context))
    with torch.inference_mode():
        out = lean.forward_batch([Segment(cache, 0, torch.tensor(context), "last", exact=False)], plan)[0]
    return probs_for(out, params)[0].double()


def _check(lean, context, draft, wrong):
    """x1 ~ p(.|context) and x2 ~ p(.|context, x1) for the most frequent x1; `wrong(p1)` is a
    distribution the counts of x1 must reject (the power check)."""
    outs, stats = sample_after(lean, context, PARAMS, draft, N)
    assert stats["drafted"] == N  # every request drafted at its first step (limit 1: max_new_tokens=2)
    assert 0.2 * N < stats["accepted"] < N  # both the accept and the reject path ran often
    fit = fit_two_tokens(lean, context, PARAMS, outs)
    print(f"\nx1: p={fit.pv1:.3g} (df {fit.df1}); x2 | x1={fit.mode}: p={fit.pv2:.3g} (df {fit.df2}, "
          f"n {sum(fit.c2.values())}); {stats}")
    assert fit.pv1 > ALPHA and fit.pv2 > ALPHA
    assert chi2(fit.c1, wrong(fit.p1))[0] < 1e-6


def test_model_draft_sampling_keeps_the_target_distribution(lean):
    """A draft that skips sub-layers: its distribution differs from the target's (about half of its
    tokens are accepted), so only a correct rejection-sampling correction gives the target's."""
    context = [5, 17, 33, 9, 5, 17, 40, 22, 5, 17]
    draft = DraftConfig(skip_attn=(1,), skip_mlp=(2,), max_draft=3, confidence=0.0)
    q = _draft_probs(lean, context, PARAMS, draft)
    _check(lean, context, draft, lambda p1: q)


def test_lookup_draft_sampling_keeps_the_target_distribution(lean):
    """Prompt lookup proposes token 125 (what followed "12 17" before), which the target gives 0.46: a
    one-hot draft accepted with probability p(125); rejections must resample from p without 125."""
    context = [12, 17, 125, 9, 12, 44, 12, 17]
    draft = DraftConfig(prompt_lookup=2, model_draft=False, max_draft=3)

    def accepted_uncorrected(p1):  # accept 125 w.p. p(125), else resample from p itself
        out = p1 * (1 - p1[125])
        out[125] += p1[125]
        return out

    _check(lean, context, draft, accepted_uncorrected)
