"""Exact greedy argmax without the full fp32 LM head. Pure functions on tensors (CPU).

The LM head is a fifth of a SmolLM2 pass and most of a Gemma 3 pass, yet greedy decoding only needs
the argmax. `GreedyHead` scores every token with a weight-only int8 copy of the head (a quarter of the
bytes), bounds how far each int8 logit can be from the exact one, keeps the tokens whose upper bound
reaches the best lower bound (typically a handful), and recomputes only those in fp32. The bound:

    |y_r - y8_r| <= ||h||_1 * s_r * (1/2 + 127 * (2^-8 + 2^-12)) + 2^-7 * |y8_r|

for row r with scale s_r (weights rounded to s_r * q, |q| <= 127): half a step of weight rounding,
bf16 rounding of the activations (the int8 kernel takes bf16), fp32 accumulation, and bf16 rounding
of the kernel's output; every term is over-estimated. So the true argmax is always a candidate, and
the answer is the argmax of the fp32 recheck, `(W[c] * h).sum(-1)`, whose value for a (row, token) pair
does not depend on which other pairs are computed (measured), so greedy output stays batch-invariant.
The int8 kernel pays for one or two rows (plain decoding: ~3 ms of a ~42 ms SmolLM2 pass here); for
more rows (verify) the fp32 head scores them and only tokens within its rounding error of the best are
rechecked, so plain decoding and verification return the same tokens; against the fp32 head's own
argmax they can differ only where two logits tie to ~1e-6 (tested on a long real decode).
"""

from __future__ import annotations

import torch

_REL = 0.5 + 127.0 * (2.0**-8 + 2.0**-12)


def _bf16_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 values >= x (x > 0), so x / scale never exceeds 127 after rounding."""
    b = x.to(torch.bfloat16)
    low = b.float() < x
    return torch.where(low, torch.nextafter(b, torch.full_like(b, float("inf"))), b)


class GreedyHead:
    def __init__(self, weight: torch.Tensor):  # [V, D] fp32 (the full head's weights, kept by reference)
        self.weight = weight
        w = weight.float()
        scale = _bf16_up((w.abs().amax(dim=1) / 127.0).clamp_min(1e-12))  # [V] bf16
        self.q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale
        self.coef = scale.float() * (_REL * 1.01)  # [V]
        self.wmax = float(w.abs().max())
        self.nbytes = self.q.numel() + scale.numel() * 2
        self.candidates = 0  # rechecked (row, token) pairs so far, for reports
        self.rows = 0

    MAX_INT8_ROWS = 2  # past this many rows the int8 kernel and the bound cost more than the fp32 head

    def argmax(self, h: torch.Tensor, full_head=None) -> torch.Tensor:
        """h [P, D] fp32 -> [P] int64: the exact greedy token of each row (the recheck's argmax). Up to
        MAX_INT8_ROWS rows score with int8; more rows use `full_head` (the fp32 head) for the scores and
        recheck the tokens within its fp32 rounding of the best, so both ways return the same token."""
        if h.shape[0] > self.MAX_INT8_ROWS and full_head is not None:
            y = full_head(h)  # [P, V] fp32
            # |fp32 dot - recheck| <= 2 * D * 2^-24 * sum|w||h| (two orderings of one length-D sum)
            err = h.abs().sum(-1) * (self.wmax * 2.0 * h.shape[1] * 2.0**-24 * 1.01)  # [P]
            lo = y.max(dim=-1).values - 2.0 * err
            return self._recheck(h, *(y >= lo.unsqueeze(1)).nonzero(as_tuple=True))
        y = torch.ops.aten._weight_int8pack_mm(h.to(torch.bfloat16), self.q, self.scale).float()  # [P, V]
        err = torch.mul(self.coef, h.abs().sum(-1, keepdim=True)).add_(y.abs(), alpha=2.0**-7)  # [P, V]
        lo = (y - err).amax(dim=-1, keepdim=True)  # [P, 1]: the best lower bound of each row
        return self._recheck(h, *((y + err) >= lo).nonzero(as_tuple=True))

    def _recheck(self, h: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Candidates (row r, token c), row-major with tokens ascending -> each row's best token in fp32."""
        vals = (self.weight[c] * h[r]).sum(-1)  # [C]
        self.candidates += int(r.numel())
        self.rows += h.shape[0]
        best = torch.full((h.shape[0],), float("-inf"), dtype=vals.dtype).scatter_reduce(0, r, vals, "amax")
        # first candidate (lowest token id) reaching its row's best: what argmax over all tokens returns
        hit = vals == best[r]
        idx = torch.full((h.shape[0],), c.numel(), dtype=torch.long).scatter_reduce(
            0, r[hit], torch.arange(c.numel())[hit], "amin"
        )
        return c[idx]
