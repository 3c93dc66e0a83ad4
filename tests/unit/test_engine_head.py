"""The exact greedy head: int8 scores, an error bound, an fp32 recheck of the few candidates."""

from __future__ import annotations

import torch

from engine.head import GreedyHead


def _recheck_argmax(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """The reference: argmax of the fp32 recheck over every token."""
    return torch.stack([(w * row).sum(-1).argmax() for row in h])


def _weights_and_rows(seed: int, vocab: int, rows: int, dim: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded random head weights (vocab x dim, small as trained heads are) and hidden rows (rows x dim)."""
    torch.manual_seed(seed)
    return torch.randn(vocab, dim) * 0.05, torch.randn(rows, dim) * scale


def test_argmax_equals_the_full_fp32_argmax_with_few_candidates():
    w, h = _weights_and_rows(0, 5000, 40, 96, 3)
    head = GreedyHead(w)
    got = head.argmax(h)
    assert torch.equal(got, _recheck_argmax(w, h))
    assert torch.equal(got, (h @ w.T).argmax(-1))
    assert head.candidates < 40 * 50  # a handful per row, not the vocabulary


def test_near_ties_and_exact_ties_resolve_like_argmax():
    w, h = _weights_and_rows(1, 300, 12, 64, 1)
    w[7] = w[200] + 1e-6  # near tie
    w[150] = w[20]  # exact tie: the lower id wins, as argmax does
    h[0] = w[200] * 40
    h[1] = w[20] * 40
    assert torch.equal(GreedyHead(w).argmax(h), _recheck_argmax(w, h))
    assert int(GreedyHead(w).argmax(h[1:2])[0]) == 20


def test_rows_do_not_depend_on_the_other_rows():
    w, h = _weights_and_rows(2, 4096, 17, 128, 2)
    head = GreedyHead(w)
    together = head.argmax(h)
    alone = torch.cat([head.argmax(h[i : i + 1]) for i in range(17)])
    assert torch.equal(together, alone)


def test_many_rows_through_the_fp32_head_give_the_same_tokens():
    """Verify passes score many rows with the fp32 head and recheck near-best tokens: the same answer as
    the int8 path row by row, ties included."""
    w, h = _weights_and_rows(3, 3000, 9, 64, 2)
    w[150] = w[20]
    h[4] = w[20] * 40
    head = GreedyHead(w)
    via_fp32 = head.argmax(h, lambda x: x @ w.T)
    row_by_row = torch.cat([head.argmax(h[i : i + 1]) for i in range(9)])
    assert torch.equal(via_fp32, row_by_row) and torch.equal(via_fp32, _recheck_argmax(w, h))
    assert int(via_fp32[4]) == 20
