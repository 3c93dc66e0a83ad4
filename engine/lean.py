"""A lean decoder forward for Llama, Qwen2 and Gemma 3, over weights taken from a transformers model.

Why: in transformers' own modules a SmolLM2 layer issues ~209 aten ops and a pass is dispatch-bound, so
verifying several tokens is not free. Here each layer is a handful of ops: fused QKV and gate/up
projections on weights prepacked once for oneDNN, RoPE as one complex multiply (q/k rows are permuted
to interleaved pairs at load, which leaves q.k unchanged), SDPA over a preallocated position-indexed KV
cache. `forward` can skip attention and/or MLP sub-layers, which is how the draft runs.

Contract: `LeanModel.forward(tokens, start, skip_attn, skip_mlp) -> logits [M, vocab]`, writing K/V for
positions start..start+M-1 of every layer whose attention it runs. Positions beyond what the caller
has committed are simply overwritten later: rejecting draft tokens costs nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "qwen2", "gemma3_text", "gemma3")


class PackedLinear:
    """y = x @ W.T (+ b) on a weight prepacked once for oneDNN.

    The packed path keeps small-M matmuls memory-bound (measured here: F.linear at M=4 costs ~2x M=1 per
    model pass, packed ~1.3x), which is what makes verifying several tokens nearly free. oneDNN picks the
    blocking from the batch-size hint: packed for M=1, an M=4 matmul costs 1.9x M=1; packed for M=8,
    1.3x at the same M=1 cost (a 3072x576 weight, 2 threads). Decoding runs M=1 and verifies 2-8 tokens.
    """

    PACK_FOR_M = 8

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.weight = weight.contiguous()  # [out, in], kept for reference and non-packed fallbacks
        self.bias = None if bias is None else bias.contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, self.PACK_FOR_M)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: [M, in] -> [M, out]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class Int8Linear:
    """y = x @ W.T with W quantized per output row to int8 (symmetric), for the draft only.

    `_weight_int8pack_mm` wants bf16 activations (fp32 ones are 5-6x slower here); int8 activations
    lose accuracy on AVX2, so only the weights are quantized. Memory: 1 byte per weight beside the fp32 copy.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # [out]
        self.weight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scales = scales.to(torch.bfloat16)
        self.bias = bias

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.scales.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x: [M, in] fp32 -> [M, out] fp32
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scales).float()
        return y if self.bias is None else y + self.bias


@dataclass
class DraftHead:
    """A draft-only LM head over a subset of the vocabulary (FR-Spec): rows of the most frequent tokens."""

    ids: torch.Tensor  # [N] int64, vocabulary ids of the rows
    linear: PackedLinear | Int8Linear  # [N, hidden]


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    mlp_norm: torch.Tensor  # [hidden]
    qkv: PackedLinear  # [(H + 2*Hkv) * D, hidden]
    o: PackedLinear  # [hidden, H * D]
    gate_up: PackedLinear  # [2 * inter, hidden]
    down: PackedLinear  # [hidden, inter]
    freqs: torch.Tensor  # [max_len, D/2] complex64 RoPE rotations for this layer
    window: int | None  # sliding-window size (Gemma 3 local layers), None = global
    # Gemma 3 only
    post_attn_norm: torch.Tensor | None = None
    post_mlp_norm: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [D]
    k_norm: torch.Tensor | None = None  # [D]
    int8: dict[str, Int8Linear] | None = None  # draft copies of qkv, o, gate_up, down


def _interleave_perm(d: int) -> torch.Tensor:
    # HF rotates (x_i, x_{i+d/2}) pairs; complex RoPE wants them adjacent.
    return torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).flatten()


def _permute_heads(w: torch.Tensor, n_heads: int, d: int) -> torch.Tensor:
    perm = _interleave_perm(d)
    shape = w.shape
    return w.reshape(n_heads, d, -1)[:, perm].reshape(shape)


class LeanModel:
    """Holds fused, packed weights and the KV cache; not thread-safe (one decode at a time)."""

    def __init__(self, hf_model: torch.nn.Module, max_seq_len: int = 2048):
        cfg = hf_model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        self.arch = cfg.model_type
        if self.arch not in SUPPORTED:
            raise NotImplementedError(f"lean forward supports {SUPPORTED}, not {self.arch!r}")
        self.gemma = self.arch.startswith("gemma3")
        base = hf_model.model
        base = getattr(base, "language_model", base)
        self.n_layers = cfg.num_hidden_layers
        self.dim = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.dim // self.n_heads
        self.vocab = cfg.vocab_size
        self.eps = cfg.rms_norm_eps
        self.context_length = int(getattr(cfg, "max_position_embeddings", max_seq_len))
        self.max_len = min(max_seq_len, self.context_length)
        self.scale = (
            cfg.query_pre_attn_scalar**-0.5 if self.gemma else 1.0 / math.sqrt(self.head_dim)
        )
        self.act = (lambda x: F.gelu(x, approximate="tanh")) if self.gemma else F.silu
        d = self.head_dim

        with torch.no_grad():
            self.embed = base.embed_tokens.weight.detach().float().contiguous()  # [vocab, hidden]
            # Gemma scales embeddings by sqrt(hidden), rounded to the weights' dtype as transformers does.
            self.embed_scale = float(torch.tensor(self.dim**0.5, dtype=torch.float32)) if self.gemma else 1.0
            self.final_norm = self._norm_weight(base.norm.weight)
            lm_head = hf_model.get_output_embeddings().weight.detach().float()
            self.lm_head = PackedLinear(lm_head)
            freqs_by_type = self._rope_tables(base, cfg)
            layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * self.n_layers
            window = getattr(cfg, "sliding_window", None)
            self.layers: list[LayerWeights] = []
            for i, layer in enumerate(base.layers):
                a, m = layer.self_attn, layer.mlp
                q_w = _permute_heads(a.q_proj.weight.detach().float(), self.n_heads, d)
                k_w = _permute_heads(a.k_proj.weight.detach().float(), self.n_kv, d)
                v_w = a.v_proj.weight.detach().float()
                bias = None
                if a.q_proj.bias is not None:
                    bias = torch.cat([
                        _permute_heads(a.q_proj.bias.detach().float(), self.n_heads, d),
                        _permute_heads(a.k_proj.bias.detach().float(), self.n_kv, d),
                        a.v_proj.bias.detach().float(),
                    ])
                ltype = layer_types[i]
                lw = LayerWeights(
                    attn_norm=self._norm_weight(layer.input_layernorm.weight),
                    mlp_norm=self._norm_weight(
                        layer.pre_feedforward_layernorm.weight if self.gemma else layer.post_attention_layernorm.weight
                    ),
                    qkv=PackedLinear(torch.cat([q_w, k_w, v_w]), bias),
                    o=PackedLinear(a.o_proj.weight.detach().float()),
                    gate_up=PackedLinear(torch.cat([m.gate_proj.weight.detach().float(), m.up_proj.weight.detach().float()])),
                    down=PackedLinear(m.down_proj.weight.detach().float()),
                    freqs=freqs_by_type.get(ltype, freqs_by_type["full_attention"]),
                    window=window if ltype == "sliding_attention" else None,
                )
                if self.gemma:
                    perm = _interleave_perm(d)
                    lw.post_attn_norm = self._norm_weight(layer.post_attention_layernorm.weight)
                    lw.post_mlp_norm = self._norm_weight(layer.post_feedforward_layernorm.weight)
                    lw.q_norm = self._norm_weight(a.q_norm.weight)[perm].contiguous()
                    lw.k_norm = self._norm_weight(a.k_norm.weight)[perm].contiguous()
                self.layers.append(lw)
        self._heads: dict[tuple[int, bool], DraftHead] = {}
        # [layers, 2 (k, v), Hkv, max_len, D]: position-indexed, never cloned or shifted.
        self.kv = torch.zeros(self.n_layers, 2, self.n_kv, self.max_len, d)

    # ---- draft-only weights, built on first use and kept beside the full ones ----------------------

    @property
    def int8_ready(self) -> bool:
        return all(lw.int8 is not None for lw in self.layers)

    def prepare_int8(self) -> int:
        """Build int8 copies of every layer's projections; returns the bytes they add."""
        for lw in self.layers:
            if lw.int8 is None:
                lw.int8 = {
                    name: Int8Linear(getattr(lw, name).weight, getattr(lw, name).bias)
                    for name in ("qkv", "o", "gate_up", "down")
                }
        return sum(q.nbytes for lw in self.layers for q in lw.int8.values())

    def draft_head(self, rows: int, int8: bool) -> DraftHead | None:
        """The draft head over the `rows` most frequent tokens, cached per (rows, int8). Frequency rank is
        the token id order: byte-level BPE vocabularies number tokens in merge order, which follows
        corpus frequency closely enough for a draft (FR-Spec ranks by counted frequency)."""
        if rows <= 0 and not int8:
            return None
        rows = self.vocab if rows <= 0 else min(rows, self.vocab)
        key = (rows, int8)
        if key not in self._heads:
            ids = torch.arange(rows)
            w = self.lm_head.weight[:rows]
            self._heads[key] = DraftHead(ids, Int8Linear(w) if int8 else PackedLinear(w))
        return self._heads[key]

    def draft_bytes(self) -> int:
        """Memory the draft-only weights add beside the full model (int8 copies and subset heads)."""
        layers = sum(q.nbytes for lw in self.layers if lw.int8 for q in lw.int8.values())
        heads = sum(
            h.linear.nbytes if isinstance(h.linear, Int8Linear) else h.linear.weight.numel() * 4
            for h in self._heads.values()
        )
        return layers + heads

    def _norm_weight(self, w: torch.Tensor) -> torch.Tensor:
        # Gemma's RMSNorm multiplies by (1 + w): fold the 1 in once.
        w = w.detach().float()
        return (w + 1.0 if self.gemma else w).contiguous()

    def _rope_tables(self, base: torch.nn.Module, cfg) -> dict[str, torch.Tensor]:
        """Complex RoPE rotations per layer type, taken from transformers' own rotary module so every
        scaling variant (default, linear, llama3, yarn...) matches it exactly."""
        pos = torch.arange(self.max_len).unsqueeze(0)
        probe = torch.zeros(1, 1, self.head_dim)
        tables: dict[str, torch.Tensor] = {}
        rotary = base.rotary_emb
        layer_types = sorted(set(getattr(cfg, "layer_types", None) or ["full_attention"]))
        for ltype in layer_types:
            try:
                cos, sin = rotary(probe, pos, layer_type=ltype)
            except TypeError:
                local = getattr(base, "rotary_emb_local", None)
                cos, sin = (local if (ltype == "sliding_attention" and local is not None) else rotary)(probe, pos)
            half = self.head_dim // 2
            tables[ltype] = torch.complex(cos[0, :, :half].float(), sin[0, :, :half].float()).contiguous()
        tables.setdefault("full_attention", next(iter(tables.values())))
        return tables

    # ---- hot path -------------------------------------------------------------------------------

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # x: [..., n], w: [n]
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)

    def _mask(self, start: int, m: int, window: int | None) -> torch.Tensor | None:
        """Additive [M, start+M] mask (0 = attend, -inf = not), or None when plain causal-over-cache
        suffices. Additive, built once per pass: SDPA would convert a boolean one in every layer."""
        end = start + m
        if m == 1 and (window is None or end <= window):
            return None
        q_pos = torch.arange(start, end).unsqueeze(1)
        k_pos = torch.arange(end).unsqueeze(0)
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        return torch.zeros(mask.shape).masked_fill_(~mask, float("-inf"))

    def forward(
        self,
        tokens: torch.Tensor,  # [M] int64
        start: int,
        skip_attn: frozenset[int] = frozenset(),
        skip_mlp: frozenset[int] = frozenset(),
        last_only: bool = False,
        int8: bool = False,
        head: DraftHead | None = None,
    ) -> torch.Tensor:  # [M, vocab] (or [1, vocab] with last_only)
        """Full-vocabulary logits. `int8` and `head` are draft-only: int8 weight copies (see
        `prepare_int8`) and a vocabulary-subset head, whose logits are -inf outside its rows."""
        x = self.hidden(tokens, start, skip_attn, skip_mlp, int8)
        if last_only:
            x = x[-1:]
        if head is None:
            return self.lm_head(x)
        sub = head.linear(x)  # [M, N]
        out = torch.full((x.shape[0], self.vocab), float("-inf"))
        out[:, head.ids] = sub
        return out

    def hidden(
        self,
        tokens: torch.Tensor,  # [M] int64
        start: int,
        skip_attn: frozenset[int] = frozenset(),
        skip_mlp: frozenset[int] = frozenset(),
        int8: bool = False,
    ) -> torch.Tensor:  # [M, hidden], after the final norm
        m = tokens.shape[0]
        assert not int8 or self.int8_ready, "call prepare_int8() first"
        assert tokens.dim() == 1 and 0 <= start and start + m <= self.max_len, (tokens.shape, start, self.max_len)
        x = F.embedding(tokens, self.embed)  # [M, hidden]
        if self.gemma:
            x = x * self.embed_scale
        masks: dict[int | None, torch.Tensor | None] = {}
        for i, lw in enumerate(self.layers):
            if i not in skip_attn:
                if lw.window not in masks:
                    masks[lw.window] = self._mask(start, m, lw.window)
                x.add_(self._attention(x, lw, i, start, start + m, masks[lw.window], int8))
            if i not in skip_mlp:
                gate_up, down = (lw.int8["gate_up"], lw.int8["down"]) if int8 else (lw.gate_up, lw.down)
                y = gate_up(self._rms(x, lw.mlp_norm))  # [M, 2*inter]
                g, u = y.chunk(2, dim=-1)
                y = down(self.act(g).mul_(u))  # [M, hidden]
                if lw.post_mlp_norm is not None:
                    y = self._rms(y, lw.post_mlp_norm)
                x.add_(y)
        return self._rms(x, self.final_norm)

    def _attention(self, x, lw: LayerWeights, i: int, start: int, end: int, mask, int8: bool) -> torch.Tensor:
        m = x.shape[0]
        h_, hk, d = self.n_heads, self.n_kv, self.head_dim
        qkv_lin, o_lin = (lw.int8["qkv"], lw.int8["o"]) if int8 else (lw.qkv, lw.o)
        qkv = qkv_lin(self._rms(x, lw.attn_norm))  # [M, (H + 2Hkv) * D], fresh: edited in place below
        qk = qkv[:, : (h_ + hk) * d].view(m, h_ + hk, d)
        if lw.q_norm is not None:
            qk[:, :h_] = self._rms(qk[:, :h_], lw.q_norm)
            qk[:, h_:] = self._rms(qk[:, h_:], lw.k_norm)
        # Every op here costs dispatch time comparable to its arithmetic, so RoPE rotates q and k in place
        # and K and V go to the cache in one copy.
        torch.view_as_complex(qk.view(m, h_ + hk, d // 2, 2)).mul_(lw.freqs[start:end].unsqueeze(1))
        self.kv[i, :, :, start:end] = qkv[:, h_ * d :].view(m, 2, hk, d).permute(1, 2, 0, 3)
        q = qk[:, :h_].transpose(0, 1).unsqueeze(0)  # [1, H, M, D]
        k = self.kv[i, 0, :, :end].unsqueeze(0)  # [1, Hkv, end, D]
        v = self.kv[i, 1, :, :end].unsqueeze(0)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=hk != h_)
        y = o_lin(o[0].transpose(0, 1).reshape(m, h_ * d))  # [M, hidden]
        if lw.post_attn_norm is not None:
            y = self._rms(y, lw.post_attn_norm)
        return y
