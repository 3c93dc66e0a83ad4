"""Per-sequence KV caches, position-indexed: K/V of position p live at index p of every layer.

One `SeqCache` per running sequence. Rejected draft positions are never cleared: they sit beyond what
the sequence has committed and the next pass that reaches them overwrites them. Capacity grows by
doubling (a copy of what is there, at most log2(context) times), so a short request does not hold a
full-context buffer; memory follows what requests actually use.
"""

from __future__ import annotations

import torch


class SeqCache:
    """kv: [layers, 2 (k, v), Hkv, capacity, D] in the model's dtype and device."""

    MIN_CAPACITY = 256

    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_len: int, device, dtype, capacity: int = 0):
        self.shape = (layers, 2, kv_heads, head_dim)
        self.max_len = max_len
        self.device, self.dtype = device, dtype
        self.kv = self._alloc(self._round(max(capacity, 1)))

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def _round(self, n: int) -> int:
        cap = self.MIN_CAPACITY
        while cap < n:
            cap *= 2
        return min(cap, self.max_len)

    def _alloc(self, cap: int) -> torch.Tensor:
        layers, two, hkv, d = self.shape
        # never read before written (each pass writes its positions before attending to them)
        return torch.empty(layers, two, hkv, cap, d, device=self.device, dtype=self.dtype)

    def ensure(self, end: int) -> None:
        """Make positions [0, end) addressable."""
        if end > self.max_len:
            raise ValueError(f"position {end - 1} is beyond the cache's maximum length {self.max_len}")
        if end <= self.capacity:
            return
        bigger = self._alloc(self._round(end))
        bigger[:, :, :, : self.capacity] = self.kv
        self.kv = bigger
