"""Pack a model's weights into the native kernels' layouts, from the GGUF's own blocks, exactly.

Contract: `pack_gguf(path)` reads every projection, embedding and head tensor of a GGUF file and returns
`Packed` records (codes, scales, mins, format, group) whose dequantised values `scale * q + min` are
bit for bit what `gguf.quants.dequantize` gives for the block (and so what the fp32 reference path
computes with). Nothing is requantised: a 4-bit block stays 4-bit.

    GGUF type   kernel format   group   value
    Q4_1        Q4 (nibbles)    32      d * q + m                      (block bytes kept as they are)
    Q4_K        Q4 (nibbles)    32      (d * sc) * q - (dmin * mn)     (per 32-wide sub-block)
    Q4_0        Q4 (nibbles)    32      d * q - 8d                     (= d * (q - 8), exact)
    Q8_0        Q8 (int8)       32      d * q
    Q5_0        Q5 (5-bit)      32      d * (q - 16)                   (nibbles as Q4, then the 32 high bits)
    Q5_1        Q8 (int8)       32      d * q + m                      (rare: int8 codes suffice)
    Q6_K        Q8 (int8)       16      (d * sc) * (q - 32)
    F32/F16/BF16  F32           -       the value

The products d * sc, dmin * mn, 8d are exact in fp32 (at most 19 significant bits), so scales are
stored as fp32. `pack_dense(w, "q8_0")` quantises an fp32 matrix the way llama.cpp's Q8_0 does, for
models that come without GGUF blocks (tests' tiny models, a Hugging Face directory).

The packed tensors are cached next to the converted model (`native.safetensors`), so a later load maps
them in well under a second.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FMT_Q4, FMT_Q8, FMT_F32, FMT_Q5 = 0, 1, 2, 3
CACHE_FILE = "native.safetensors"
CACHE_VERSION = 2  # 2: Q5_0 kept as 5-bit codes (was int8)


@dataclass
class Packed:
    """One weight matrix [n, k] in a kernel format (see the module docstring)."""

    codes: torch.Tensor  # Q4: uint8 [n, k/2]; Q5: uint8 [n, k/32*20]; Q8: int8 [n, k]; F32: float32 [n, k]
    scales: torch.Tensor  # float32 [n, k/group] (empty for F32)
    mins: torch.Tensor  # float32 [n, k/32] or empty
    fmt: int
    group: int = 32
    source_type: str = ""  # the GGUF type it came from

    @property
    def shape(self) -> tuple[int, int]:
        n = self.codes.shape[0]
        width = self.codes.shape[1]
        return n, width * 2 if self.fmt == FMT_Q4 else width // 20 * 32 if self.fmt == FMT_Q5 else width

    def rows(self, idx: torch.Tensor) -> Packed:
        """A row subset (a permutation of q/k heads, a vocabulary prefix); blocks run along k, so whole
        rows move unchanged."""
        return Packed(self.codes[idx].contiguous(), _take(self.scales, idx), _take(self.mins, idx), self.fmt, self.group,
                      self.source_type)

    def dequantize(self) -> torch.Tensor:
        """[n, k] fp32: scale * q + min, in that order of operations (what GGUF's dequantisation computes)."""
        n, k = self.shape
        if self.fmt == FMT_F32:
            return self.codes.clone()
        if self.fmt == FMT_Q4:
            c = self.codes.view(n, k // 32, 16)
            q = torch.cat([c & 15, c >> 4], dim=-1).float()  # [n, k/32, 32]
        elif self.fmt == FMT_Q5:
            c = self.codes.view(n, k // 32, 20)
            nib = torch.cat([c[..., :16] & 15, c[..., :16] >> 4], dim=-1).int()
            high = c[..., 16:].int()  # 4 bytes, little-endian: byte j // 8, bit j % 8 for element j
            bit = (high.repeat_interleave(8, dim=-1) >> torch.arange(8).repeat(4)) & 1
            q = (nib | (bit << 4)).float() - 16.0
        else:
            q = self.codes.view(n, k // self.group, self.group).float()
        w = self.scales.view(n, -1, 1) * q.view(n, self.scales.shape[1], -1)
        if self.mins.numel():
            w = w.view(n, k // 32, 32) + self.mins.view(n, k // 32, 1)
        return w.reshape(n, k)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins))


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t[idx].contiguous() if t.numel() else t


def _f16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.float16).astype(np.float32)


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _empty() -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32)


def _nibbles_q4_1_order(q: np.ndarray) -> np.ndarray:
    """q [..., 32] values 0..15 -> [..., 16] bytes: byte j = q[j] | q[j + 16] << 4 (Q4_1's order)."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def pack_blocks(ttype: str, raw: np.ndarray, n: int, k: int) -> Packed:
    """Raw GGUF bytes of one tensor ([n, bytes per row] uint8, or float data) -> Packed."""
    if ttype in ("F32", "F16", "BF16"):
        if ttype == "BF16":
            w = torch.from_numpy(np.ascontiguousarray(raw).view(np.int16).astype(np.int32) << 16).view(torch.float32)
        else:
            w = _t(np.ascontiguousarray(raw).astype(np.float32))
        return Packed(w.reshape(n, k).contiguous(), _empty(), _empty(), FMT_F32, 32, ttype)
    blocks = np.ascontiguousarray(raw).reshape(n, -1)
    if ttype == "Q4_1":
        b = blocks.reshape(n, k // 32, 20)
        return Packed(_t(b[..., 4:].reshape(n, k // 2)), _t(_f16(b[..., 0:2]).reshape(n, k // 32)),
                      _t(_f16(b[..., 2:4]).reshape(n, k // 32)), FMT_Q4, 32, ttype)
    if ttype == "Q4_0":
        b = blocks.reshape(n, k // 32, 18)
        d = _f16(b[..., 0:2]).reshape(n, k // 32)
        return Packed(_t(b[..., 2:].reshape(n, k // 2)), _t(d), _t(d * np.float32(-8.0)), FMT_Q4, 32, ttype)
    if ttype == "Q4_K":
        from gguf.quants import Q4_K

        b = blocks.reshape(n * (k // 256), 144)
        d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])  # [B, 1]
        sc, mn = Q4_K.get_scale_min(b[:, 4:16])  # [B, 8] each
        scale = (d * sc.astype(np.float32)).reshape(n, k // 32)
        minus = -(dmin * mn.astype(np.float32)).reshape(n, k // 32)
        qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(n, k // 32, 32)  # sub-block order: low nibbles of a 32-byte chunk first
        return Packed(_t(_nibbles_q4_1_order(q).reshape(n, k // 2)), _t(scale), _t(minus), FMT_Q4, 32, ttype)
    if ttype == "Q8_0":
        b = blocks.reshape(n, k // 32, 34)
        return Packed(_t(b[..., 2:].view(np.int8).reshape(n, k)), _t(_f16(b[..., 0:2]).reshape(n, k // 32)), _empty(),
                      FMT_Q8, 32, ttype)
    if ttype == "Q5_0":  # the block's bytes reordered: 16 bytes of nibbles (Q4_1's order), then qh
        b = blocks.reshape(n * (k // 32), 22)
        codes = np.concatenate([b[:, 6:], b[:, 2:6]], axis=1).reshape(n, k // 32 * 20)
        return Packed(_t(codes), _t(_f16(b[:, 0:2]).reshape(n, k // 32)), _empty(), FMT_Q5, 32, ttype)
    if ttype == "Q5_1":
        b = blocks.reshape(n * (k // 32), 24)
        qh = np.ascontiguousarray(b[:, 4:8]).view(np.uint32).reshape(-1, 1) >> np.arange(32, dtype=np.uint32)
        qs = b[:, 8:].reshape(-1, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)
        q = ((qs & 0x0F).reshape(-1, 32) | (((qh & 1).astype(np.uint8)) << 4)).astype(np.int8)
        d, m = _f16(b[:, 0:2]).reshape(n, k // 32), _f16(b[:, 2:4]).reshape(n, k // 32)
        return Packed(_t(q.reshape(n, k)), _t(d), _t(m), FMT_Q8, 32, ttype)
    if ttype == "Q6_K":
        b = blocks.reshape(n * (k // 256), 210)
        ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], _f16(b[:, 208:210])
        scale = (d * scales.view(np.int8).astype(np.float32)).reshape(n, k // 16)
        ql = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        qh = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        q = (ql.reshape(-1, 2, 4, 32) | (qh.reshape(-1, 2, 4, 32) << 4)).astype(np.int8) - np.int8(32)
        return Packed(_t(q.reshape(n, k)), _t(scale), _empty(), FMT_Q8, 16, ttype)
    raise NotImplementedError(f"GGUF tensor type {ttype} has no native kernel yet")


def pack_dense(w: torch.Tensor, kind: str = "q8_0") -> Packed:
    """Quantise an fp32 matrix as llama.cpp does, for weights that come without GGUF blocks: 'q8_0'
    (d = max|w| / 127 per 32, q = round(w / d)) or 'q4_1' (d = (max - min) / 15, m = min per 32, q =
    round((w - m) / d)); d and m rounded to f16 as GGUF stores them. Rows whose length is not a multiple
    of 32 stay F32."""
    w = w.detach().float().contiguous()
    n, k = w.shape
    if kind not in ("q8_0", "q4_1"):
        raise ValueError(f"unknown dense packing {kind!r}")
    if k % 32:
        return Packed(w, _empty(), _empty(), FMT_F32, 32, "F32")
    g = w.view(n, k // 32, 32)
    if kind == "q4_1":
        lo, hi = g.amin(-1), g.amax(-1)
        d = ((hi - lo) / 15.0).half().float()
        m = lo.half().float()
        inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
        q = torch.round((g - m.unsqueeze(-1)) * inv.unsqueeze(-1)).clamp(0, 15).to(torch.uint8)
        codes = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2).contiguous()
        return Packed(codes, d.contiguous(), m.contiguous(), FMT_Q4, 32, "Q4_1")
    d = (g.abs().amax(-1) / 127.0).half().float()  # GGUF keeps d as f16
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(g * inv.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return Packed(q.view(n, k).contiguous(), d.contiguous(), _empty(), FMT_Q8, 32, "Q8_0")


# ---- GGUF files -------------------------------------------------------------------------------------

# GGUF tensor name (per layer) -> role; the roles are what the lean model fuses and calls.
LAYER_ROLES = {
    "attn_q": "q", "attn_k": "k", "attn_v": "v", "attn_output": "o",
    "ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down",
}


def pack_gguf(path: Path) -> dict[str, Packed]:
    """Every projection ('{i}.q' ... '{i}.down'), the embedding ('embed') and a separate head ('head')."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out: dict[str, Packed] = {}
    for t in reader.tensors:
        name = t.name
        if not name.endswith(".weight"):
            continue
        stem = name[: -len(".weight")]
        if stem == "token_embd":
            role = "embed"
        elif stem == "output":
            role = "head"
        elif stem.startswith("blk."):
            _, i, kind = stem.split(".", 2)
            if kind not in LAYER_ROLES:
                continue  # norms come from the reference weights (GGUF stores some with offsets folded in)
            role = f"{int(i)}.{LAYER_ROLES[kind]}"
        else:
            continue
        k, n = (int(x) for x in t.shape[:2])  # GGUF lists dims innermost first
        out[role] = pack_blocks(t.tensor_type.name, np.asarray(t.data), n, k)
    return out


def save_packed(packed: dict[str, Packed], path: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, list] = {}
    for role, p in packed.items():
        tensors[f"{role}.codes"] = p.codes
        if p.scales.numel():
            tensors[f"{role}.scales"] = p.scales
        if p.mins.numel():
            tensors[f"{role}.mins"] = p.mins
        info[role] = [p.fmt, p.group, p.source_type]
    tmp = path.with_suffix(".partial")
    save_file(tensors, str(tmp), metadata={"packed": json.dumps(info), "meta": json.dumps(meta | {"version": CACHE_VERSION})})
    tmp.replace(path)


def load_packed(path: Path) -> tuple[dict[str, Packed], dict] | None:
    """The cached packing (memory-mapped), or None when absent or from another version."""
    from safetensors import safe_open

    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata() or {}
        meta = json.loads(md.get("meta", "{}"))
        if meta.get("version") != CACHE_VERSION:
            return None
        info = json.loads(md["packed"])
        names = set(f.keys())
        out = {}
        for role, (fmt, group, src) in info.items():
            get = lambda s: f.get_tensor(f"{role}.{s}") if f"{role}.{s}" in names else _empty()  # noqa: E731
            out[role] = Packed(f.get_tensor(f"{role}.codes"), get("scales"), get("mins"), fmt, group, src)
    return out, meta
