"""A lean decoder forward for Llama, Qwen2 and Gemma 3 over many sequences at once.

Why: in transformers' own modules a SmolLM2 layer issues ~209 aten ops and a pass is dispatch-bound, so
verifying several tokens is not free. Here a layer is a handful of ops: fused QKV and gate/up
projections (kernels per device from `engine.kernels`), RoPE as one complex multiply on the CPU (q/k
rows are permuted to interleaved pairs at load, which leaves q.k unchanged), SDPA over per-sequence
position-indexed KV caches.

Contract: `forward_batch(segments, plan) -> [logits per segment]`. A `Segment` is some consecutive
tokens of one sequence at positions start..start+m-1 with that sequence's `SeqCache`; the projections of
all segments' rows run as one matmul, attention runs per segment. The pass writes K/V for every row's
position in every layer whose attention it runs; positions beyond what the caller committed are simply
overwritten later, so rejecting draft tokens costs nothing. `plan` (a `DraftPlan`) makes the pass a
draft: sub-layers skipped, low-bit weight copies, a vocabulary-subset head.

Batch invariance (what makes batched greedy output equal solo greedy output): every op is row-wise
except attention, and oneDNN's packed matmuls give bit-identical rows whatever M is (measured). SDPA's
multi-row kernel does not (rows differ by ~1e-7 from the 1-row result), so "exact" segments (decode and
verify rows) attend one row at a time; prefill chunks attend in one call, and their boundaries depend
on the prompt only, never on what else runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.gpu import rms_norm_fixed
from engine.head import GreedyHead
from engine.kernels import PRECISIONS, Linear, NativeLinear, make_linear
from engine.kvcache import SeqCache
from engine.pack import Packed, pack_dense
from engine.weights import ARCHS, ArchSpec, WeightSource, rotary_module, text_config

# Engine precisions: `reference` is fp32 on the dequantised weights (oneDNN on the CPU, the device's own
# kernels elsewhere); `native` multiplies the GGUF's own blocks with int8 activations quantised per block
# of 32 (llama.cpp's scheme), `native-f32` the same blocks with fp32 activations. Both native ones run our
# C++ kernels (engine/csrc/native.cpp) on the CPU, fp32 everywhere else (norms, RoPE, attention, KV).
ENGINE_PRECISIONS = ("reference", "native", "native-f32")
NATIVE_ACT = {"native": 1, "native-f32": 0}  # the kernels' ACT_Q8 / ACT_F32

SUPPORTED = tuple(ARCHS)


@dataclass
class Proj:
    """One precision's projections of a decoder layer."""

    qkv: Linear  # [(H + 2*Hkv) * D, hidden]
    o: Linear  # [hidden, H * D]
    gate_up: Linear  # [2 * inter, hidden]
    down: Linear  # [hidden, inter]

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes for k in (self.qkv, self.o, self.gate_up, self.down))


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [hidden]
    mlp_norm: torch.Tensor  # [hidden]
    proj: dict[str, Proj]  # precision -> projections; "full" always, draft precisions on first use
    rope: str  # layer type whose rotation table applies
    window: int | None  # sliding-window size (Gemma 3 local layers), None = global
    post_attn_norm: torch.Tensor | None = None
    post_mlp_norm: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None  # [D]
    k_norm: torch.Tensor | None = None  # [D]


@dataclass
class DraftHead:
    """A draft-only LM head over the `ids` rows of the vocabulary (the most frequent tokens, FR-Spec)."""

    ids: torch.Tensor  # [N] int64
    linear: Linear  # [N, hidden]


@dataclass(frozen=True, eq=False)
class DraftPlan:
    """One draft pass as a value, built once from a `DraftConfig` by `LeanModel.plan`: which sub-layers
    it skips, which weights it runs on, which head. Drafts with equal `key` batch together."""

    skip_attn: frozenset[int] = frozenset()
    skip_mlp: frozenset[int] = frozenset()
    precision: str = "full"
    head: DraftHead | None = None
    key: tuple = ()
    exit_layer: int = 0  # run layers [0, exit_layer) then the final norm and head (early exit); 0 = all
    # plan values of knobs declared after these fields (engine.knobs), by the name their `Knob.plan` gives
    extra: dict = field(default_factory=dict)


FULL = DraftPlan(key=("full",))
_EMPTY = torch.empty(0)


@dataclass
class Segment:
    """Consecutive tokens of one sequence in a batched pass."""

    cache: SeqCache
    start: int  # position of the first token
    tokens: torch.Tensor  # [m] int64 on the model's device
    want: str = "all"  # rows returned: "all" | "last" logits, "argmax" | "argmax_last" greedy tokens, "hidden", "none"
    exact: bool = True  # attend one row at a time (batch-invariant); False: one causal call (prefill)
    out: torch.Tensor | None = field(default=None, repr=False)


def _interleave_perm(d: int) -> torch.Tensor:
    # HF rotates (x_i, x_{i+d/2}) pairs; the complex multiply wants them adjacent.
    return torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).flatten()


def _permute_heads(w: torch.Tensor, n_heads: int, d: int) -> torch.Tensor:
    shape = w.shape
    return w.reshape(n_heads, d, -1)[:, _interleave_perm(d)].reshape(shape)


class LeanModel:
    """Fused weights and the forward; not thread-safe (one caller at a time, e.g. one decode thread)."""

    def __init__(
        self,
        source: WeightSource | torch.nn.Module,
        config=None,
        *,
        max_seq_len: int = 2048,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        rotary=None,
        generic: bool = False,
        greedy_head: bool = True,
        precision: str = "reference",
        packed: dict[str, Packed] | None = None,
    ):
        if isinstance(source, torch.nn.Module):  # a transformers model (tests, tiny random models)
            config = source.config
            base = source.model
            rotary = getattr(base, "language_model", base).rotary_emb
            source = WeightSource.from_module(source)
        cfg = text_config(config)
        self.arch = cfg.model_type
        if self.arch not in ARCHS:
            raise NotImplementedError(f"lean forward supports {SUPPORTED}, not {self.arch!r}")
        spec: ArchSpec = ARCHS[self.arch]
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = dtype
        if precision not in ENGINE_PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; expected one of {ENGINE_PRECISIONS}")
        self.precision = precision
        self.native = None  # the C++ kernels' module when a native precision runs
        if precision != "reference":
            if self.device.type != "cpu" or dtype != torch.float32 or generic:
                raise ValueError(f"precision {precision!r} runs on the CPU in float32 (got {self.device}, {dtype})")
            from engine.ext import native

            self.native = native()
            self.act_mode = NATIVE_ACT[precision]
        self.generic = generic  # device-generic kernels even on the CPU (tests of the GPU code path)
        self.source = source
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
            cfg.query_pre_attn_scalar**-0.5 if spec.scale_from == "query_pre_attn_scalar" else 1.0 / math.sqrt(self.head_dim)
        )
        self.act = (lambda x: F.gelu(x, approximate="tanh")) if spec.act == "gelu_tanh" else F.silu
        # RoPE as one complex multiply where complex tensors are fast (CPU fp32), cos/sin elsewhere.
        self.complex_rope = self.device.type == "cpu" and dtype == torch.float32 and not generic
        self._prefix = source.prefix()
        self._lm_head_name = "lm_head.weight" if source.has("lm_head.weight") else self._prefix + "embed_tokens.weight"
        d = self.head_dim
        self.packed = None
        if self.native is not None:
            self.packed = packed if packed is not None else self._pack_source("q8_0")
        with torch.no_grad():
            # Gemma scales embeddings by sqrt(hidden), rounded to the weights' dtype as transformers does.
            self.embed_scale = float(torch.tensor(self.dim**0.5, dtype=dtype)) if spec.embed_scaled else 1.0
            self.final_norm = self._norm(self._prefix + "norm.weight")
            if self.native is None:
                self.embed = source.get(self._prefix + "embed_tokens.weight").to(self.device, dtype).contiguous()
                self.lm_head = make_linear(source.get(self._lm_head_name), None, "full", self.device, dtype, generic)
            else:
                self.embed = None  # rows are dequantised from the packed embedding per pass
                self.embed_native = NativeLinear(self.native, [self.packed["embed"]])
                # a tied head multiplies by the embedding's own tiles (the kernels' copy is made once)
                head = self.embed_native.qw[0] if "head" not in self.packed else self.packed["head"]
                self.lm_head = NativeLinear(self.native, [head], act=self.act_mode)
            self.rope = self._rope_tables(rotary if rotary is not None else rotary_module(config), cfg)
            if self.native is not None:  # [max_len, D/2, 2] (cos, sin) pairs for the C++ attention
                self.rope_pairs = {k: torch.view_as_real(v).contiguous() for k, v in self.rope.items()}
            layer_types = getattr(cfg, "layer_types", None) or ["full_attention"] * self.n_layers
            window = getattr(cfg, "sliding_window", None)
            self.layers: list[LayerWeights] = []
            for i in range(self.n_layers):
                ltype = layer_types[i]
                p = self._layer_prefix(i)
                lw = LayerWeights(
                    attn_norm=self._norm(p + spec.attn_norm + ".weight"),
                    mlp_norm=self._norm(p + spec.mlp_norm + ".weight"),
                    proj={"full": self._build_proj(i, "full")},
                    rope=ltype if ltype in self.rope else "full_attention",
                    window=window if ltype == "sliding_attention" else None,
                )
                if spec.post_attn_norm:
                    lw.post_attn_norm = self._norm(p + spec.post_attn_norm + ".weight")
                    lw.post_mlp_norm = self._norm(p + spec.post_mlp_norm + ".weight")
                if spec.qk_norm:
                    perm = _interleave_perm(d).to(self.device)
                    lw.q_norm = self._norm(p + "self_attn.q_norm.weight")[perm].contiguous()
                    lw.k_norm = self._norm(p + "self_attn.k_norm.weight")[perm].contiguous()
                self.layers.append(lw)
            if self.packed is not None:  # the layers' QWs hold their own (tiled) copies; keep what heads reuse
                self.packed = {k: v for k, v in self.packed.items() if k in ("embed", "head")}
        # Exact greedy argmax from an int8 head plus an fp32 recheck (engine.head): CPU fp32 only, where
        # the int8 kernel exists and the fp32 head rows can be read back.
        self.greedy_head = None
        if greedy_head and self.native is None and self.device.type == "cpu" and dtype == torch.float32 and not generic:
            with torch.no_grad():
                tied = self._lm_head_name == self._prefix + "embed_tokens.weight"
                self.greedy_head = GreedyHead(self.embed if tied else source.get(self._lm_head_name).contiguous())
        self._heads: dict[tuple[int, str], DraftHead] = {}
        self._plans: dict[tuple, DraftPlan] = {}
        self._scratch: SeqCache | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, **kw) -> LeanModel:
        """From a Hugging Face model directory, reading safetensors lazily (no transformers model)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        return cls(WeightSource.from_dir(Path(model_dir)), config, **kw)

    # ---- weights --------------------------------------------------------------------------------

    def _layer_prefix(self, i: int) -> str:
        return f"{self._prefix}layers.{i}."

    def _norm(self, name: str) -> torch.Tensor:
        w = self.source.get(name)
        # Gemma's RMSNorm multiplies by (1 + w): fold the 1 in once.
        return (w + 1.0 if self.spec.norm_plus_one else w).to(self.device, self.dtype).contiguous()

    def _fused(self, i: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """fp32 fused weights of layer i (QKV with q/k rows permuted for the complex RoPE, gate+up)."""
        g, p, d = self.source.get, self._layer_prefix(i) + "self_attn.", self.head_dim
        has_bias = self.source.has(p + "q_proj.bias")
        bias = None
        if has_bias:
            bias = torch.cat([
                _permute_heads(g(p + "q_proj.bias"), self.n_heads, d),
                _permute_heads(g(p + "k_proj.bias"), self.n_kv, d),
                g(p + "v_proj.bias"),
            ])
        qkv = torch.cat([
            _permute_heads(g(p + "q_proj.weight"), self.n_heads, d),
            _permute_heads(g(p + "k_proj.weight"), self.n_kv, d),
            g(p + "v_proj.weight"),
        ])
        m = self._layer_prefix(i) + "mlp."
        return {
            "qkv": (qkv, bias),
            "o": (g(p + "o_proj.weight"), None),
            "gate_up": (torch.cat([g(m + "gate_proj.weight"), g(m + "up_proj.weight")]), None),
            "down": (g(m + "down_proj.weight"), None),
        }

    def _head_packed(self) -> Packed:
        return self.packed["head"] if "head" in self.packed else self.packed["embed"]

    def _qk_rows(self, p: Packed, n_heads: int) -> Packed:
        """GGUF q/k rows in the lean forward's interleaved-pair order (a row permutation: blocks intact)."""
        if self.spec.gguf_qk_interleaved:
            return p
        d = self.head_dim
        idx = (torch.arange(n_heads).unsqueeze(1) * d + _interleave_perm(d).unsqueeze(0)).flatten()
        return p.rows(idx)

    def _pack_source(self, kind: str) -> dict[str, Packed]:
        """Packed weights made from fp32 ones (models without GGUF blocks), in GGUF's row order: Llama's
        q/k rows interleaved, the others as they are (so `_qk_rows` applies as for a real GGUF)."""
        g, out = self.source.get, {}
        out["embed"] = pack_dense(g(self._prefix + "embed_tokens.weight"), kind)
        if self._lm_head_name != self._prefix + "embed_tokens.weight":
            out["head"] = pack_dense(g(self._lm_head_name), kind)
        names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                 "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
        for i in range(self.n_layers):
            for role, name in names.items():
                w = g(self._layer_prefix(i) + name + ".weight")
                if role in ("q", "k") and self.spec.gguf_qk_interleaved:
                    w = _permute_heads(w, self.n_heads if role == "q" else self.n_kv, self.head_dim)
                out[f"{i}.{role}"] = pack_dense(w, kind)
        return out

    def _native_proj(self, i: int) -> Proj:
        pk, p = self.packed, self._layer_prefix(i) + "self_attn."
        biases = None
        if self.source.has(p + "q_proj.bias"):
            d = self.head_dim
            biases = [_permute_heads(self.source.get(p + "q_proj.bias"), self.n_heads, d),
                      _permute_heads(self.source.get(p + "k_proj.bias"), self.n_kv, d), self.source.get(p + "v_proj.bias")]
        ext, act = self.native, self.act_mode
        return Proj(
            qkv=NativeLinear(ext, [self._qk_rows(pk[f"{i}.q"], self.n_heads), self._qk_rows(pk[f"{i}.k"], self.n_kv), pk[f"{i}.v"]],
                             biases, act),
            o=NativeLinear(ext, [pk[f"{i}.o"]], act=act),
            gate_up=NativeLinear(ext, [pk[f"{i}.gate"], pk[f"{i}.up"]], act=act),
            down=NativeLinear(ext, [pk[f"{i}.down"]], act=act),
        )

    def _build_proj(self, i: int, precision: str) -> Proj:
        if self.native is not None:
            return self._native_proj(i)
        fused = self._fused(i)
        return Proj(**{name: make_linear(w, b, precision, self.device, self.dtype, self.generic) for name, (w, b) in fused.items()})

    def prepare(self, precision: str) -> int:
        """Build every layer's `precision` draft copies (once); returns the bytes they take."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}")
        if self.native is not None:
            return 0  # native drafts run on the same packed blocks (int8/int4 mean int8 activations there)
        with torch.no_grad():
            for i, lw in enumerate(self.layers):
                if precision not in lw.proj:
                    lw.proj[precision] = self._build_proj(i, precision)
        return sum(lw.proj[precision].nbytes for lw in self.layers)

    def quantization_error(self, precision: str) -> float:
        """Mean relative weight error of a draft precision's projections (0 for 'full')."""
        if self.native is not None:
            return 0.0
        self.prepare(precision)
        errs = [getattr(k, "error", 0.0) for lw in self.layers for k in vars(lw.proj[precision]).values()]
        return float(sum(errs) / len(errs))

    def draft_head(self, rows: int, precision: str = "full") -> DraftHead | None:
        """The draft head over the `rows` most frequent tokens (0 = all), cached. Frequency rank is the
        token id order: byte-level BPE vocabularies number tokens in merge order, which follows corpus
        frequency closely enough for a draft (FR-Spec ranks by counted frequency)."""
        rows = self.vocab if rows <= 0 else min(rows, self.vocab)
        if rows == self.vocab and precision == "full":
            return None
        key = (rows, precision)
        if key not in self._heads:
            if self.native is not None:
                act = self.act_mode if precision == "full" else 1
                lin = NativeLinear(self.native, [self._head_packed().rows(torch.arange(rows))], act=act)
                self._heads[key] = DraftHead(torch.arange(rows, device=self.device), lin)
                return self._heads[key]
            w = self.source.get(self._lm_head_name)[:rows]
            with torch.no_grad():
                lin = make_linear(w, None, precision, self.device, self.dtype, self.generic)
            self._heads[key] = DraftHead(torch.arange(rows, device=self.device), lin)
        return self._heads[key]

    def plan(self, skip_attn=(), skip_mlp=(), precision: str = "full", head_rows: int = 0, exit_layer: int = 0,
             **extra) -> DraftPlan:  # fmt: skip
        """The draft pass for these arguments (weights built on first use), cached by its key. The
        arguments come from the knobs' declarations (`DraftConfig.plan_args`), which also validate them
        against the model (`DraftConfig.check`, called by `engine.draft.draft_plan`); `extra` carries a
        knob's values that no field here names, for the pass code that reads them (`DraftPlan.extra`)."""
        key = (tuple(sorted(skip_attn)), tuple(sorted(skip_mlp)), precision, head_rows, exit_layer, *sorted(extra.items()))
        if key not in self._plans:
            if precision != "full":
                self.prepare(precision)
            # Low-bit drafts score with an int8 head: 4-bit rows of a head that GGUF keeps in 8 bits (SmolLM2's
            # Q8_0 embedding) cost most of the draft's acceptance for little time.
            head_precision = "int8" if precision == "int4" else precision
            self._plans[key] = DraftPlan(
                frozenset(skip_attn), frozenset(skip_mlp), precision, self.draft_head(head_rows, head_precision), key,
                exit_layer if exit_layer < self.n_layers else 0, dict(extra),
            )
        return self._plans[key]

    def draft_bytes(self) -> int:
        """Memory the draft-only weights add beside the full model (low-bit copies and subset heads)."""
        layers = sum(p.nbytes for lw in self.layers for prec, p in lw.proj.items() if prec != "full")
        return layers + sum(h.linear.nbytes for h in self._heads.values())

    def _rope_tables(self, rotary, cfg) -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """RoPE rotations per layer type from transformers' own rotary module: complex [max_len, D/2] on
        the CPU in fp32, else (cos, sin) [max_len, D/2] in the model's dtype."""
        pos = torch.arange(self.max_len).unsqueeze(0)
        probe = torch.zeros(1, 1, self.head_dim)
        half = self.head_dim // 2
        tables: dict = {}
        for ltype in sorted(set(getattr(cfg, "layer_types", None) or ["full_attention"])):
            try:
                cos, sin = rotary(probe, pos, layer_type=ltype)
            except TypeError:
                cos, sin = rotary(probe, pos)
            cos, sin = cos[0, :, :half].float(), sin[0, :, :half].float()
            if self.complex_rope:
                tables[ltype] = torch.complex(cos, sin).contiguous()
            else:
                tables[ltype] = (cos.to(self.device, self.dtype).contiguous(), sin.to(self.device, self.dtype).contiguous())
        tables.setdefault("full_attention", next(iter(tables.values())))
        return tables

    # ---- caches ---------------------------------------------------------------------------------

    def new_cache(self, capacity: int = 0) -> SeqCache:
        return SeqCache(self.n_layers, self.n_kv, self.head_dim, self.max_len, self.device, self.dtype, capacity)

    def cache_bytes_per_token(self) -> int:
        return self.n_layers * 2 * self.n_kv * self.head_dim * torch.finfo(self.dtype).bits // 8

    # ---- hot path -------------------------------------------------------------------------------

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # x: [..., n], w: [n]
        if self.generic or self.device.type != "cpu":
            return rms_norm_fixed(x, w, self.eps)  # batch-invariant rows off the CPU fast path (engine.gpu)
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)

    def _rotate(self, qk: torch.Tensor, rows) -> None:
        """In place: qk [N, heads, D] rotated by rows ([N, D/2] complex, or (cos, sin) [N, D/2])."""
        n, h, d = qk.shape
        if self.complex_rope:
            torch.view_as_complex(qk.view(n, h, d // 2, 2)).mul_(rows.unsqueeze(1))
            return
        cos, sin = rows[0].unsqueeze(1), rows[1].unsqueeze(1)  # [N, 1, D/2]
        pairs = qk.view(n, h, d // 2, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        ra, rb = a * cos - b * sin, a * sin + b * cos
        a.copy_(ra)
        b.copy_(rb)

    def _pass_layers(self, plan: DraftPlan) -> list[tuple[int, LayerWeights]]:
        """The decoder layers `plan`'s pass runs, with their indices (both forwards loop over this)."""
        return list(enumerate(self.layers[: plan.exit_layer or self.n_layers]))

    def forward_batch(self, segments: list[Segment], plan: DraftPlan | None = None) -> list[torch.Tensor | None]:
        """One pass over every segment's rows; returns per segment its logits rows (or hidden states)."""
        plan = plan or FULL
        if self.native is not None:
            return self._forward_native(segments, plan)
        dev = self.device
        if len(segments) == 1:
            s = segments[0]
            tokens = s.tokens
            positions = torch.arange(s.start, s.start + s.tokens.shape[0], device=dev)
        else:
            tokens = torch.cat([s.tokens for s in segments])
            positions = torch.cat([torch.arange(s.start, s.start + s.tokens.shape[0], device=dev) for s in segments])
        for s in segments:
            s.cache.ensure(s.start + s.tokens.shape[0])
        x = F.embedding(tokens, self.embed)  # [N, hidden]
        if self.embed_scale != 1.0:
            x = x * self.embed_scale
        rows: dict[str, object] = {}
        masks: dict[tuple[int, int | None], torch.Tensor | None] = {}
        for i, lw in self._pass_layers(plan):
            proj = lw.proj[plan.precision]
            if i not in plan.skip_attn:
                if lw.rope not in rows:
                    t = self.rope[lw.rope]
                    rows[lw.rope] = t[positions] if isinstance(t, torch.Tensor) else (t[0][positions], t[1][positions])
                x.add_(self._attention(x, lw, proj, i, segments, rows[lw.rope], masks))
            if i not in plan.skip_mlp:
                y = proj.gate_up(self._rms(x, lw.mlp_norm))  # [N, 2*inter]
                g, u = y.chunk(2, dim=-1)
                y = proj.down(self.act(g).mul_(u))  # [N, hidden]
                if lw.post_mlp_norm is not None:
                    y = self._rms(y, lw.post_mlp_norm)
                x.add_(y)
        x = self._rms(x, self.final_norm)
        return self._outputs(x, segments, plan.head)

    def _forward_native(self, segments: list[Segment], plan: DraftPlan) -> list[torch.Tensor | None]:
        """The same pass on packed weights: one C++ call per sub-layer (norm, fused projections, RoPE, K/V
        write, attention row by row, output projection, residual), so nothing per op runs in Python."""
        ext = self.native
        seg, r = [], 0
        for s in segments:
            m = s.tokens.shape[0]
            s.cache.ensure(s.start + m)
            seg.append((r, s.start, m))
            r += m
        tokens = segments[0].tokens if len(segments) == 1 else torch.cat([s.tokens for s in segments])
        x = self.embed_native.qw[0].dequant_rows(tokens)  # [N, hidden]
        if self.embed_scale != 1.0:
            x.mul_(self.embed_scale)
        seg_t = torch.tensor(seg, dtype=torch.int64)
        caches = [s.cache.kv for s in segments]
        act = self.act_mode if plan.precision == "full" else 1  # int8/int4 drafts: int8 activations
        empty = _EMPTY
        h_, hk, d, eps = self.n_heads, self.n_kv, self.head_dim, self.eps
        act_fn = 1 if self.spec.act == "gelu_tanh" else 0
        for i, lw in self._pass_layers(plan):
            p = lw.proj["full"]
            if i not in plan.skip_attn:
                ext.attn_block(
                    x, lw.attn_norm, p.qkv.qw, p.qkv.biases,
                    empty if lw.q_norm is None else lw.q_norm, empty if lw.k_norm is None else lw.k_norm,
                    p.o.qw[0], empty if lw.post_attn_norm is None else lw.post_attn_norm, self.rope_pairs[lw.rope],
                    seg_t, caches, i, h_, hk, d, lw.window or 0, self.scale, eps, act,
                )
            if i not in plan.skip_mlp:
                ext.mlp_block(x, lw.mlp_norm, p.gate_up.qw, p.down.qw[0],
                              empty if lw.post_mlp_norm is None else lw.post_mlp_norm, act_fn, eps, act)
        x = ext.rms_norm(x, self.final_norm, eps)
        return self._outputs(x, segments, plan.head)

    def _outputs(self, x: torch.Tensor, segments: list[Segment], head: DraftHead | None) -> list[torch.Tensor | None]:
        """Per segment: logits rows ("all"/"last"), greedy tokens ("argmax"/"argmax_last", exact, without
        the full head where `greedy_head` exists), hidden rows, or None. One head call per kind."""
        kinds: dict[str, list[int]] = {"logits": [], "argmax": [], "hidden": []}
        spans: list[tuple[str, int, int] | None] = []
        r = 0
        for s in segments:
            m = s.tokens.shape[0]
            rows = range(r, r + m) if s.want in ("all", "hidden", "argmax") else [r + m - 1]
            kind = {"all": "logits", "last": "logits", "hidden": "hidden", "argmax": "argmax", "argmax_last": "argmax"}.get(s.want)
            if kind is None:
                spans.append(None)
            else:
                if kind == "argmax" and (head is not None or self.greedy_head is None):
                    kind = "argmax_via_logits"
                    kinds.setdefault(kind, [])
                spans.append((kind, len(kinds[kind]), len(rows)))
                kinds[kind].extend(rows)
            r += m
        out: dict[str, torch.Tensor] = {}
        for kind, picks in kinds.items():
            if not picks:
                continue
            h = x if len(picks) == x.shape[0] else x[torch.tensor(picks, device=x.device)]
            if kind == "hidden":
                out[kind] = h
            elif kind == "argmax":
                out[kind] = self.greedy_head.argmax(h, self.lm_head)  # [P]
            else:
                logits = self._logits(h, head)
                out[kind] = logits.argmax(dim=-1) if kind == "argmax_via_logits" else logits
        return [None if sp is None else out[sp[0]][sp[1] : sp[1] + sp[2]] for sp in spans]

    def _logits(self, h: torch.Tensor, head: DraftHead | None) -> torch.Tensor:  # [P, hidden] -> [P, vocab]
        if head is None:
            return self.lm_head(h)
        out = torch.full((h.shape[0], self.vocab), float("-inf"), device=h.device, dtype=h.dtype)
        out[:, head.ids] = head.linear(h).to(h.dtype)
        return out

    def _mask(self, start: int, m: int, window: int | None) -> torch.Tensor | None:
        """Additive [m, start+m] causal (and window) mask for a prefill chunk; None when m == 1."""
        end = start + m
        if m == 1 and (window is None or end <= window):
            return None
        q_pos = torch.arange(start, end, device=self.device).unsqueeze(1)
        k_pos = torch.arange(end, device=self.device).unsqueeze(0)
        keep = k_pos <= q_pos
        if window is not None:
            keep &= k_pos > q_pos - window
        return torch.zeros(keep.shape, device=self.device, dtype=self.dtype).masked_fill_(~keep, float("-inf"))

    def _attention(self, x, lw: LayerWeights, proj: Proj, i: int, segments, rope_rows, masks) -> torch.Tensor:
        n = x.shape[0]
        h_, hk, d = self.n_heads, self.n_kv, self.head_dim
        qkv = proj.qkv(self._rms(x, lw.attn_norm))  # [N, (H + 2Hkv) * D], fresh: edited in place below
        qk = qkv[:, : (h_ + hk) * d].view(n, h_ + hk, d)
        if lw.q_norm is not None:
            qk[:, :h_] = self._rms(qk[:, :h_], lw.q_norm)
            qk[:, h_:] = self._rms(qk[:, h_:], lw.k_norm)
        self._rotate(qk, rope_rows)
        kv = qkv[:, h_ * d :].view(n, 2, hk, d)
        gqa = hk != h_
        outs: list[torch.Tensor] = []
        r = 0
        for si, s in enumerate(segments):
            m = s.tokens.shape[0]
            start, end = s.start, s.start + m
            cache = s.cache.kv[i]  # [2, Hkv, cap, D]
            cache[:, :, start:end] = kv[r : r + m].permute(1, 2, 0, 3)
            if s.exact or m == 1:
                for j in range(m):
                    p = start + j
                    lo = 0 if lw.window is None else max(0, p + 1 - lw.window)
                    q = qk[r + j, :h_].unsqueeze(0).unsqueeze(2)  # [1, H, 1, D]
                    o = F.scaled_dot_product_attention(
                        q, cache[0, :, lo : p + 1].unsqueeze(0), cache[1, :, lo : p + 1].unsqueeze(0),
                        scale=self.scale, enable_gqa=gqa,
                    )
                    outs.append(o.view(1, h_ * d))
            else:
                key = (si, lw.window)
                if key not in masks:
                    masks[key] = self._mask(start, m, lw.window)
                q = qk[r : r + m, :h_].transpose(0, 1).unsqueeze(0)  # [1, H, m, D]
                o = F.scaled_dot_product_attention(
                    q, cache[0, :, :end].unsqueeze(0), cache[1, :, :end].unsqueeze(0),
                    attn_mask=masks[key], scale=self.scale, enable_gqa=gqa,
                )
                outs.append(o[0].transpose(0, 1).reshape(m, h_ * d))
            r += m
        y = proj.o(outs[0] if len(outs) == 1 else torch.cat(outs))  # [N, hidden]
        if lw.post_attn_norm is not None:
            y = self._rms(y, lw.post_attn_norm)
        return y

    # ---- one sequence (benchmarks, analysis, tests) ---------------------------------------------

    EXACT_ROWS = 33  # single-sequence calls up to this many tokens attend row by row, like verify

    def forward(
        self,
        tokens: torch.Tensor,  # [M] int64
        start: int,
        *,
        last_only: bool = False,
        plan: DraftPlan | None = None,
        cache: SeqCache | None = None,
    ) -> torch.Tensor:  # [M, vocab] (or [1, vocab] with last_only)
        """One sequence's pass on `cache` (default: a scratch cache of this model), the draft `plan`'s
        when given. Full-vocabulary logits; a subset head's are -inf outside its rows."""
        if cache is None:
            if self._scratch is None:
                self._scratch = self.new_cache()
            cache = self._scratch
        tokens = tokens.to(self.device)
        seg = Segment(cache, start, tokens, "last" if last_only else "all", exact=tokens.shape[0] <= self.EXACT_ROWS)
        return self.forward_batch([seg], plan)[0]

    def hidden(self, tokens: torch.Tensor, start: int = 0, cache: SeqCache | None = None) -> torch.Tensor:
        """[M, hidden] after the final norm, full model."""
        if cache is None:
            if self._scratch is None:
                self._scratch = self.new_cache()
            cache = self._scratch
        seg = Segment(cache, start, tokens.to(self.device), "hidden", exact=False)
        return self.forward_batch([seg])[0]
