"""Acceptance maths of speculative decoding, isolated from any model. Pure functions on tensors.

Terms (as in vLLM's rejection sampler). The draft proposed tokens d_1..d_k. The target (full model)
gave a distribution for each of the k+1 positions after the committed prefix.
- accepted: the longest prefix d_1..d_n the target agrees with (greedy: d_i == argmax p_i;
  sampling: d_i kept with probability min(1, p_i(d_i) / q_i(d_i))).
- recovered: when d_{n+1} is rejected, one token drawn from the residual norm(max(p - q, 0)) in its place
  (greedy: the target's argmax).
- bonus: when all k are accepted, one token drawn from the target at position k+1 for free.
So a step always commits n + 1 tokens. Lossless: greedy output equals the target's argmax chain; sampled
output follows the target distribution exactly (Leviathan et al. 2023; Chen et al. 2023).

A draft token chosen greedily has a one-hot draft distribution (q_i = 1 at d_i): pass `draft_probs=None`.
Then acceptance is p_i(d_i) and the residual is p_i with d_i removed, renormalised.
"""

from __future__ import annotations

import torch


def greedy_verify(draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, list[int]]:
    """draft_tokens [k], target_logits [k+1, V] -> (n accepted, committed tokens: d_1..d_n + one more)."""
    assert target_logits.shape[0] == draft_tokens.shape[0] + 1, (draft_tokens.shape, target_logits.shape)
    return greedy_verify_ids(draft_tokens, target_logits.argmax(dim=-1))


def greedy_verify_ids(draft_tokens: torch.Tensor, target_ids: torch.Tensor) -> tuple[int, list[int]]:
    """draft_tokens [k], the target's greedy tokens [k+1] -> (n accepted, committed tokens)."""
    k = draft_tokens.shape[0]
    assert target_ids.shape[0] == k + 1, (draft_tokens.shape, target_ids.shape)
    target = target_ids.cpu()  # [k+1]
    mismatch = (draft_tokens.cpu() != target[:k]).nonzero()
    n = int(mismatch[0, 0]) if mismatch.numel() else k
    return n, target[: n + 1].tolist()


def rejection_sample(
    draft_tokens: torch.Tensor,  # [k] int64
    draft_probs: torch.Tensor | None,  # [k, V], or None for greedy (one-hot) drafts
    target_probs: torch.Tensor,  # [k+1, V]
    uniforms: torch.Tensor,  # [k] in [0, 1): one per draft token, for the accept test
    generator: torch.Generator | None,  # draws the recovered or bonus token
) -> tuple[int, list[int]]:
    """Returns (n accepted, committed tokens: d_1..d_n followed by a recovered or bonus token)."""
    k = draft_tokens.shape[0]
    assert target_probs.shape[0] == k + 1 and uniforms.shape[0] == k
    dev = target_probs.device
    draft_tokens, uniforms = draft_tokens.to(dev), uniforms.to(dev)
    rows = torch.arange(k, device=dev)
    p_d = target_probs[rows, draft_tokens]  # [k]
    q_d = torch.ones(k, device=dev) if draft_probs is None else draft_probs[rows, draft_tokens]
    # u < p/q  <=>  u * q < p ; q_d > 0 always holds since the draft sampled d from q.
    accept = uniforms * q_d < p_d  # [k]
    rejected = (~accept).nonzero()
    n = int(rejected[0, 0]) if rejected.numel() else k
    out = draft_tokens[:n].tolist()
    if n == k:
        out.append(int(torch.multinomial(target_probs[k], 1, generator=generator)))
        return n, out
    p = target_probs[n]
    if draft_probs is None:
        residual = p.clone()
        residual[draft_tokens[n]] = 0.0
    else:
        residual = (p - draft_probs[n]).clamp_min(0.0)
    total = residual.sum()
    if total <= 0:  # p == q exactly on the support: any rejection is measure-zero, fall back to p
        residual, total = p, p.sum()
    out.append(int(torch.multinomial(residual / total, 1, generator=generator)))
    return n, out
