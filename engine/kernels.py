"""Linear kernels, chosen per device and precision from one table. Pure torch; y = x @ W.T (+ b).

Why several: the verify pass must be exact and batch-invariant (a row's result may not depend on how
many rows share the matmul), the draft only has to be cheap.
- `OneDnnLinear` (CPU, fp32): weights prepacked once for oneDNN. Rows are bit-identical whether a
  matmul has 2 or 128 rows; a single row goes through the two-row kernel, since on Zen 4 (AVX-512)
  oneDNN computes one row of a k=1536 product with another kernel whose bits differ (on AVX2 it did
  not). A 4-8 row matmul costs ~1.1-1.3x a 1-row one (AVX2), which is what makes verifying several tokens
  nearly free. MKL's `F.linear` is neither (rows differ with M).
- `DenseLinear` (any device, any float dtype): `F.linear` / cuBLAS; the GPU verify and the
  device-generic path tests run on the CPU. Wrapped in `engine.gpu.FixedRowsLinear` there (fixed-shape
  row chunks), since cuBLAS and MKL rows are not batch-invariant by themselves.
- `Int8Linear` / `Int4Linear` (CPU drafts): weight-only int8 per output row, or int4 per group of 32
  inputs (asymmetric min/max, the layout of GGUF Q4_1: a Q4_1 model's fp32 weights are exactly such
  groups, so its int4 draft sees the bundled bits again), both with bf16 activations, which is what
  `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu` are fast at (their fp32 paths are 5-16x slower).
  On other devices a low-bit draft falls back to `DenseLinear` in bf16.
- `NativeLinear` (CPU, `native` precisions): the GGUF's own quantised blocks (`engine.pack`) multiplied by
  our C++ kernels (`engine/csrc/native.cpp`), fp32 or int8 activations, batch-invariant by construction.
  One call may hold several weights over the same input (fused QKV, gate/up) with outputs side by side.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from engine.gpu import FixedRowsLinear

PRECISIONS = ("full", "int8", "int4")
INT4_GROUP = 32


class Linear(Protocol):
    out_features: int
    nbytes: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...  # [M, in] -> [M, out]


class OneDnnLinear:
    """fp32 weight prepacked for oneDNN (CPU). Packed for a batch hint of 8 rows: packed for M=1, a
    4-row matmul costs 1.9x a 1-row one; packed for 8, 1.2-1.3x at the same 1-row cost."""

    PACK_FOR_M = 8

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.float().contiguous(), self.PACK_FOR_M)
        self.bias = None if bias is None else bias.float().contiguous()
        self.nbytes = weight.numel() * 4

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            # oneDNN takes another kernel for one row on some CPUs (on Zen 4 AVX-512, k=1536: a row's bits
            # differ from the same row among others), which would make a verify row differ from plain
            # decoding's; as the first of two rows it is computed as in every wider call (M = 2..128 checked)
            return torch.ops.mkldnn._linear_pointwise(x.expand(2, -1).contiguous(), self.packed, self.bias, "none", [], "")[:1]
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class DenseLinear:
    """`F.linear` on the weight's own device and dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, device=None, dtype=None):
        self.weight = weight.to(device=device, dtype=dtype).contiguous()
        self.bias = None if bias is None else bias.to(device=device, dtype=dtype).contiguous()
        self.out_features = self.weight.shape[0]
        self.nbytes = self.weight.numel() * self.weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        return y if y.dtype == x.dtype else y.to(x.dtype)


class Int8Linear:
    """Weight-only int8, symmetric per output row; bf16 activations (int8 activations lose accuracy
    without VNNI)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        w = weight.float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)  # [out]
        self.weight = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scales = scales.to(torch.bfloat16)
        self.bias = None if bias is None else bias.float()
        self.out_features = w.shape[0]
        self.nbytes = self.weight.numel() + self.scales.numel() * 2
        self.error = _relative_error(w, self.weight.float() * scales[:, None])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [M, in] fp32 -> [M, out] fp32
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scales).float()
        return y if self.bias is None else y + self.bias


class Int4Linear:
    """Weight-only int4, asymmetric per group of 32 inputs: w = (q - 8) * scale + zero, q in 0..15.
    `error` is the relative Frobenius error of the quantised weight (0 up to rounding for weights that
    came from GGUF Q4_1 blocks)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group: int = INT4_GROUP):
        w = weight.float()
        n, k = w.shape
        if k % group:
            raise ValueError(f"int4 needs in_features ({k}) divisible by the group size {group}")
        wg = w.view(n, k // group, group)
        lo, hi = wg.amin(-1), wg.amax(-1)  # [n, k/g]
        scale = ((hi - lo) / 15.0).clamp_min(1e-12)
        q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15)
        self.error = _relative_error(w, (q * scale[..., None] + lo[..., None]).view(n, k))
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).view(n, k), group)
        # [k/g, n, 2] (scale, zero) with zero = lo + 8 * scale, for the kernel's (q - 8) convention
        self.scales_zeros = torch.stack([scale, lo + 8.0 * scale], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.group = group
        self.bias = None if bias is None else bias.float()
        self.out_features, self.in_features = n, k
        self.nbytes = self.packed.numel() + self.scales_zeros.numel() * 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, self.group, self.scales_zeros)
        y = y.float()
        return y if self.bias is None else y + self.bias


def _relative_error(w: torch.Tensor, approx: torch.Tensor) -> float:
    return float((w - approx).norm() / w.norm().clamp_min(1e-12))


def make_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    precision: str,
    device: torch.device,
    dtype: torch.dtype,
    generic: bool = False,
) -> Linear:
    """The kernel for one projection: `precision` 'full' is the verify's exact kernel for (device,
    dtype); 'int8'/'int4' are draft-only and exist on the CPU (elsewhere they fall back to bf16).
    `generic` forces the device-generic kernel (`F.linear`), which is how GPU code paths run on a CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {PRECISIONS}")
    cpu = device.type == "cpu" and not generic
    if precision == "full":
        if cpu and dtype == torch.float32:
            return OneDnnLinear(weight, bias)
        if not cpu:  # device-generic: F.linear rows depend on M; fixed-shape chunks make them not (engine.gpu)
            return FixedRowsLinear(DenseLinear(weight, bias, device=device, dtype=dtype))
        return DenseLinear(weight, bias, device=device, dtype=dtype)
    if cpu and precision == "int8":
        return Int8Linear(weight, bias)
    if cpu and precision == "int4" and weight.shape[1] % INT4_GROUP == 0 and weight.shape[0] % 16 == 0:
        return Int4Linear(weight, bias)
    dense = DenseLinear(weight, bias, device=device, dtype=torch.bfloat16 if device.type != "cpu" else dtype)
    return dense if cpu else FixedRowsLinear(dense)


class NativeLinear:
    """Packed GGUF blocks (one or more weights side by side over the same input) through the C++ kernels.
    `act` is the kernels' activation mode (ACT_F32 or ACT_Q8)."""

    def __init__(self, ext, parts: list, biases: list | None = None, act: int = 0):
        self.ext = ext
        # a part is a `Packed` (tiled into a new QW here: a copy) or an existing QW, shared (a tied head)
        self.qw = [p if isinstance(p, ext.QW) else ext.QW(p.codes, p.scales, p.mins, p.fmt, p.group) for p in parts]
        empty = torch.empty(0)
        self.biases = [empty if b is None else b.float().contiguous() for b in (biases or [None] * len(parts))]
        if all(b.numel() == 0 for b in self.biases):
            self.biases = []
        self.act = act
        self.out_features = sum(q.n for q in self.qw)
        self.in_features = self.qw[0].k
        self.nbytes = sum(q.nbytes() for q in self.qw) + sum(b.numel() * 4 for b in self.biases)

    def __call__(self, x: torch.Tensor, act: int | None = None) -> torch.Tensor:  # [M, in] fp32 -> [M, out]
        return self.ext.linear(x.float().contiguous(), self.qw, self.biases, self.act if act is None else act)
