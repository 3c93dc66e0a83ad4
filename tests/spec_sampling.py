"""Statistical checks of speculative sampling through the engine's own step code.

`sample_after(model, context, params, draft, n)` runs n seeded requests that all stand at the same fixed
context (its K/V computed once and copied into each request's cache), batched in one `Scheduler`, and
returns the tokens each committed after the context. Every draft, verify, acceptance and commit runs
through `engine.schedule` / `engine.decode` / `engine.draft` / `engine.verify` exactly as in serving
(seeded sampled requests draft deterministically, so batching them does not change what each draws).
`exact_next` gives the target's exact next-token distribution at a context; `chi2` compares counts with
it. Only the start of each request is arranged by hand (`at_context`): the engine has no way to begin a
sampled request at a fixed token after the prompt, since its first token is itself a sample.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from scipy.stats import chisquare, ncx2

from engine.config import DraftConfig, RuntimeSettings, SamplingParams
from engine.decode import Sequence
from engine.lean import LeanModel, Segment
from engine.sampling import probs_for
from engine.schedule import Scheduler


def exact_next(model: LeanModel, context: list[int], params: SamplingParams) -> torch.Tensor:
    """The target's processed next-token distribution after `context` [V] (float64, on the CPU)."""
    with torch.inference_mode():
        logits = model.forward(torch.tensor(context), 0, last_only=True, cache=model.new_cache(len(context)))
    return probs_for(logits, params)[0].double().cpu()


def context_kv(model: LeanModel, context: list[int]) -> torch.Tensor:
    """K/V of context[:-1], computed as a prefill computes it (one chunk)."""
    cache = model.new_cache(len(context))
    with torch.inference_mode():
        model.forward_batch([Segment(cache, 0, torch.tensor(context[:-1], device=model.device), "none", exact=False)])
    return cache.kv[:, :, :, : len(context) - 1].clone()


def at_context(
    model: LeanModel, context: list[int], kv: torch.Tensor, params: SamplingParams, draft: DraftConfig
) -> Sequence:
    """A request whose prompt is `context`, already prefilled: the cache holds context[:-1] (copied from
    `kv`) and the next pass feeds context[-1], as after a prefill. No EOS: every request commits its
    tokens, so the counted outcomes are exactly the next tokens."""
    seq = Sequence(model, context, params, draft, frozenset())
    n = len(context) - 1
    seq.cache.ensure(n)
    seq.cache.kv[:, :, :, :n] = kv
    seq.prefilled, seq.pos, seq.cur = len(context), n, context[-1]
    return seq


def sample_after(
    model: LeanModel,
    context: list[int],
    params: SamplingParams,
    draft: DraftConfig,
    n: int,
    batch: int = 64,
    seed0: int = 0,
) -> tuple[list[list[int]], dict[str, int]]:
    """n requests (seeds seed0..seed0+n-1) decoding `params.max_new_tokens` tokens after `context`;
    returns their tokens and summed stats (drafted, accepted)."""
    kv = context_kv(model, context)
    outs: list[list[int]] = []
    totals = Counter()
    for lo in range(0, n, batch):
        sched = Scheduler(model, RuntimeSettings(max_running=batch, max_waiting=batch, calibrate=False))
        seqs = [at_context(model, context, kv, params.model_copy(update={"seed": seed0 + i}), draft)
                for i in range(lo, min(lo + batch, n))]
        for s in seqs:
            sched.submit(s)
        while sched.has_work():
            sched.step()
        for s in seqs:
            outs.append([t for o in s.outbox for t in o.token_ids])
            totals.update(drafted=s.stats.drafted, accepted=s.stats.accepted)
    return outs, dict(totals)


def chi2(counts: Counter, probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """(p-value, degrees of freedom) of counts against `probs`, tokens with small expected counts merged
    into one cell (so the chi-square approximation holds). A count outside the support fails outright."""
    n = sum(counts.values())
    if any(float(probs[t]) == 0.0 for t in counts):
        return 0.0, 0
    order = sorted(range(probs.shape[0]), key=lambda t: -float(probs[t]))
    big = [t for t in order if float(probs[t]) * n >= min_expected]
    rest_p = 1.0 - sum(float(probs[t]) for t in big)
    obs = [counts.get(t, 0) for t in big]
    exp = [float(probs[t]) * n for t in big]
    if rest_p * n >= 1e-9:
        obs.append(n - sum(obs))
        exp.append(rest_p * n)
    exp = [e * n / sum(exp) for e in exp]  # exact totals: scipy refuses float drift
    if len(obs) < 2:
        return 1.0, 0
    return float(chisquare(obs, exp).pvalue), len(obs) - 1


@dataclass(frozen=True)
class TwoTokenFit:
    """How sampled pairs (x1, x2) fit the target: x1 against p1 = p(. | context), and x2, over the samples
    whose x1 was the most frequent one (`mode`), against p2 = p(. | context, mode); pv/df from `chi2`."""

    c1: Counter
    p1: torch.Tensor
    mode: int
    c2: Counter
    p2: torch.Tensor
    pv1: float
    df1: int
    pv2: float
    df2: int


def fit_two_tokens(model: LeanModel, context: list[int], params: SamplingParams, outs: list[list[int]]) -> TwoTokenFit:
    """The chi-square fits of the first two tokens each sample committed after `context` (`sample_after`)."""
    p1 = exact_next(model, context, params)
    c1 = Counter(o[0] for o in outs)
    mode = c1.most_common(1)[0][0]
    p2 = exact_next(model, context + [mode], params)
    c2 = Counter(o[1] for o in outs if o[0] == mode)
    (pv1, df1), (pv2, df2) = chi2(c1, p1), chi2(c2, p2)
    return TwoTokenFit(c1, p1, mode, c2, p2, pv1, df1, pv2, df2)


def power(n: int, effect: float, df: int, alpha: float) -> float:
    """Chance that the chi-square test at level `alpha` rejects a distribution whose distance from the
    target is `effect` = sum (P - p)^2 / p, with n samples (noncentral chi-square, lambda = n * effect)."""
    from scipy.stats import chi2 as chi2_dist

    crit = chi2_dist.ppf(1 - alpha, df)
    return float(ncx2.sf(crit, df, n * effect))
