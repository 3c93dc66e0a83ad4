"""Turning logits into the distribution we sample from, and drawing from it. Pure functions on tensors.

The target distribution of a request is `probs_from_logits(logits, params)`: softmax of logits /
temperature restricted to the top-k tokens and then to the top-p nucleus, renormalised. Speculative
sampling preserves exactly this distribution, so draft and target both go through the same function.
"""

from __future__ import annotations

import torch

from engine.config import SamplingParams


def probs_from_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [N, V] -> probs [N, V] (float32, rows sum to 1). temperature must be > 0."""
    assert logits.dim() == 2 and temperature > 0.0, (logits.shape, temperature)
    x = logits.float() / temperature
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]  # [N, 1]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, idx = torch.sort(x, dim=-1, descending=True)
        sorted_p = torch.softmax(sorted_x, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (the top token always stays).
        drop_sorted = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, idx, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    return torch.softmax(x, dim=-1)


def probs_for(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return probs_from_logits(logits, params.temperature, params.top_k, params.top_p)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """probs [N, V] -> token ids [N]."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request generator on the model's device: its draws do not depend on other requests."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
