"""Acceptance maths, tested two ways: exact greedy tables, and the sampled distribution (chi-square)."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from engine.sampling import probs_from_logits
from engine.verify import greedy_verify, rejection_sample

V = 6


def logits_with_argmax(argmaxes: list[int]) -> torch.Tensor:
    """[len, V] logits whose row i has its maximum at argmaxes[i]."""
    x = torch.zeros(len(argmaxes), V)
    x[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 5.0
    return x


@pytest.mark.parametrize(
    "draft, target, n, committed",
    [
        ([1, 2, 3], [1, 2, 3, 4], 3, [1, 2, 3, 4]),  # all accepted + bonus
        ([1, 2, 3], [1, 5, 3, 4], 1, [1, 5]),  # second rejected, recovered = target argmax
        ([1, 2, 3], [0, 2, 3, 4], 0, [0]),  # first rejected
        ([1, 2, 3], [1, 2, 0, 4], 2, [1, 2, 0]),
        ([], [4], 0, [4]),  # nothing drafted: a plain step
        ([5], [5, 5], 1, [5, 5]),
    ],
)
def test_greedy_verify_table(draft, target, n, committed):
    got_n, got = greedy_verify(torch.tensor(draft, dtype=torch.long), logits_with_argmax(target))
    assert (got_n, got) == (n, committed)


def test_rejection_sample_exact_cases():
    p = torch.tensor([[0.0, 1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0], [0, 0, 0, 1.0, 0, 0]])
    q = torch.tensor([[0.0, 1.0, 0, 0, 0, 0], [0, 0, 0, 1.0, 0, 0]])
    g = torch.Generator().manual_seed(0)
    # draft 1 has p/q = 1 -> always accepted; draft 2 has p(3) = 0 -> always rejected, residual = p = token 2
    n, out = rejection_sample(torch.tensor([1, 3]), q, p, torch.tensor([0.999, 0.0]), g)
    assert (n, out) == (1, [1, 2])
    # greedy (one-hot) drafts: acceptance probability is p(d)
    p2 = torch.tensor([[0.3, 0.7, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1.0]])
    assert rejection_sample(torch.tensor([1]), None, p2, torch.tensor([0.69]), g) == (1, [1, 5])
    n, out = rejection_sample(torch.tensor([1]), None, p2, torch.tensor([0.71]), g)
    assert n == 0 and out == [0]  # residual after removing token 1 is all on token 0


def _first_token_distribution(p, q, draft_is_greedy: bool, samples: int, seed: int) -> torch.Tensor:
    """Empirical distribution of the first committed token after one draft token."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V)
    target = torch.stack([p, p])  # position 2 (bonus) is irrelevant for the first token
    for _ in range(samples):
        if draft_is_greedy:
            d, qd = q.argmax().view(1), None
        else:
            d, qd = torch.multinomial(q, 1, generator=g), q.unsqueeze(0)
        _, out = rejection_sample(d, qd, target, torch.rand(1, generator=g), g)
        counts[out[0]] += 1
    return counts


@pytest.mark.parametrize("draft_is_greedy", [False, True])
def test_rejection_sampling_keeps_target_distribution(draft_is_greedy):
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(V) * 1.5, dim=0)
    q = torch.softmax(torch.randn(V) * 1.5, dim=0)  # a deliberately different draft
    n = 20000
    counts = _first_token_distribution(p, q, draft_is_greedy, n, seed=7)
    assert chisquare(counts.numpy(), (p * n).numpy()).pvalue > 1e-3
    # Power check: the draft's own distribution is clearly rejected by the same test.
    wrong = q if not draft_is_greedy else torch.nn.functional.one_hot(q.argmax(), V).float() * 0.5 + p * 0.5
    assert chisquare(counts.numpy(), (wrong * n).numpy()).pvalue < 1e-6


def test_bonus_token_follows_the_last_target_row():
    """All k drafted tokens accepted: the bonus token comes from the target's row k (the position after the
    last draft), not from any earlier row. Rows 0 and 1 differ here, so the wrong row is rejected."""
    torch.manual_seed(2)
    p0 = torch.softmax(torch.randn(V) * 1.5, dim=0)
    p1 = torch.softmax(torch.randn(V) * 1.5, dim=0)
    target = torch.stack([p0, p1])
    g = torch.Generator().manual_seed(3)
    n, counts = 8000, torch.zeros(V)
    d = p0.argmax().view(1)
    for _ in range(n):
        # a draft token with q = p0: always accepted (u * q < p), so every second token is a bonus
        k, out = rejection_sample(d, p0.unsqueeze(0), target, torch.rand(1, generator=g) * 0.999, g)
        assert k == 1 and out[0] == int(d)
        counts[out[1]] += 1
    assert chisquare(counts.numpy(), (p1 * n).numpy()).pvalue > 1e-3
    assert chisquare(counts.numpy(), (p0 * n).numpy()).pvalue < 1e-6


def test_probs_from_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05, 0.0 + 1e-9]]))
    p = probs_from_logits(logits, 1.0, top_k=2)
    assert torch.allclose(p, torch.tensor([[0.5 / 0.7, 0.2 / 0.7, 0, 0, 0, 0]]), atol=1e-6)
    p = probs_from_logits(logits, 1.0, top_p=0.8)  # 0.5 + 0.2 < 0.8 -> the 0.15 token is kept too
    assert torch.allclose(p[0, :3], torch.tensor([0.5, 0.2, 0.15]) / 0.85, atol=1e-6)
    assert p[0, 3:].sum() == 0
    p = probs_from_logits(logits, 1.0, top_p=0.01)  # the top token always survives
    assert p[0, 0] == 1.0
    hot = probs_from_logits(logits, 0.5)
    assert hot[0, 0] > 0.5  # lower temperature sharpens


def test_prompt_lookup_ngram():
    from engine.draft import lookup_ngram

    h = torch.tensor([5, 6, 7, 8, 9, 1, 5, 6, 7])
    assert lookup_ngram(h, 3, 4).tolist() == [8, 9, 1, 5]  # "5 6 7" seen before, followed by 8 9 1 5
    assert lookup_ngram(h, 3, 2).tolist() == [8, 9]
    assert lookup_ngram(torch.tensor([1, 2, 3, 4]), 3, 4).numel() == 0  # no earlier occurrence
    # falls back to shorter n-grams, preferring the latest occurrence
    assert lookup_ngram(torch.tensor([3, 1, 3, 2, 9, 3]), 2, 1).tolist() == [2]


def test_prompt_too_long_error_pickles():
    import pickle

    from engine.decode import PromptTooLongError

    e = pickle.loads(pickle.dumps(PromptTooLongError(5000, 4096)))
    assert (e.prompt_tokens, e.limit) == (5000, 4096) and "4095" in str(e)


def test_config_id_is_stable_across_added_knobs():
    import hashlib
    import json

    from engine.config import DraftConfig

    c = DraftConfig(skip_mlp=(3, 1), quantize="int8")
    # the id as computed before `model_draft` existed: artefacts and caches store such ids
    legacy = {k: v for k, v in c.model_dump(mode="json").items() if k not in ("model_draft", "early_exit")}
    expect = "ssd-" + hashlib.sha256(json.dumps(legacy, sort_keys=True).encode()).hexdigest()[:10]
    assert c.config_id == expect
    assert DraftConfig(skip_mlp=(1, 3), quantize="int8", model_draft=False).config_id != expect
    assert DraftConfig(skip_mlp=(1, 3), quantize="int8", early_exit=20).config_id != expect
    assert DraftConfig.plain().config_id == "plain"


def test_a_knob_added_with_a_default_changes_no_id():
    from pydantic import Field

    from engine.config import DraftConfig

    class WithNewKnob(DraftConfig):  # a knob added later, as a new field with a default
        new_knob: int = Field(0, description="a knob that did not exist when ids were stored")

    for c in (DraftConfig(skip_mlp=[1, 3], quantize="int8"), DraftConfig(prompt_lookup=3, model_draft=False)):
        same = WithNewKnob(**c.model_dump())
        assert same.config_id == c.config_id
        assert WithNewKnob(**c.model_dump(), new_knob=2).config_id != c.config_id
