"""Batch-invariant rows on devices whose kernels are not, device timing, and one transfer per step.

Why: the engine's losslessness under batching and speculation rests on a row's result not depending on
how many rows share its pass (`engine.lean`). On the CPU the oneDNN-packed fp32 matmuls give that
(measured); `F.linear` elsewhere does not: cuBLAS picks its kernel, tiles and split-K by M, and MKL's
fp32 GEMM on the CPU already differs in the last bits between M = 1 and M = 2. A verify over 1 + k rows,
or sequences sharing a pass, would then drift by an ulp from plain decoding and, over many layers and a
bf16 argmax, change a greedy token.

Fixed-shape rows: every projection and every RMSNorm of the device-generic path runs on chunks of
exactly `FIXED_ROWS` rows (the last chunk zero-padded). A kernel then always sees one shape, so its
choice of algorithm, tiling and reduction order is fixed, and a row's result depends on its own values
only, never on its neighbours or its place in the chunk (checked on the CPU in tests, and on a GPU by
`probe`, which `scripts/gpu_check.sh` runs). Why 64: one chunk holds a step of 8 requests that each
verify 8 rows, and a bf16 GEMM of 64 rows should still be bound by reading the weights on a current
GPU (ridge point ~180 rows on an H200 by its data sheet; not yet measured here), so the padding is
compute the device had spare; prefill chunks of 128 rows take two chunks. Elementwise ops, gathers and
argmax are row-wise by nature; attention already runs per row for decode and verify rows
(`engine.lean`).

`python -m engine.gpu probe --device cuda` prints and writes the invariance probe: `F.linear(x[:1], W)`
against `F.linear(x, W)[:1]` for M = 1..16 (plain kernels, for the record) and the same for the
fixed-shape linear and RMSNorm the engine uses (these must hold).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

FIXED_ROWS = 64


def _chunks(x: torch.Tensor, rows: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """fn over x [N, ...] in chunks of exactly `rows` rows (the last zero-padded) -> [N, ...]."""
    n = x.shape[0]
    if n == rows:
        return fn(x.contiguous())  # one memory layout for every chunk (q/k norms get strided views)
    if n < rows:
        return fn(_pad_rows(x, rows))[:n]
    full = n - n % rows
    outs = [fn(x[i : i + rows].contiguous()) for i in range(0, full, rows)]
    if full < n:
        outs.append(fn(_pad_rows(x[full:], rows))[: n - full])
    return torch.cat(outs)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [n, ...] zero-padded to [rows, ...] (one kernel)."""
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, rows - x.shape[0]))


class FixedRowsLinear:
    """A linear kernel run on chunks of exactly `rows` rows, so every row sees one GEMM shape
    (batch-invariant rows; see the module docstring). Wraps any `engine.kernels.Linear`."""

    def __init__(self, inner, rows: int = FIXED_ROWS):
        self.inner = inner
        self.rows = rows
        self.out_features = inner.out_features
        self.nbytes = inner.nbytes

    def __getattr__(self, name):  # weight, bias, error, ... of the wrapped kernel
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
        return _chunks(x, self.rows, self.inner)


def rms_norm_fixed(x: torch.Tensor, w: torch.Tensor, eps: float, rows: int = FIXED_ROWS) -> torch.Tensor:
    """`F.rms_norm` over the last dim, on chunks of exactly `rows` rows of x's first dim (a reduction
    kernel may split its work by how many outputs there are, which would change a row's sum order)."""
    return _chunks(x, rows, lambda c: F.rms_norm(c, (c.shape[-1],), w, eps))


# ---- timing and transfers ------------------------------------------------------------------------------


def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (CUDA launches return before the work is done)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def device_clock(device: torch.device | str | None) -> float:
    """`time.perf_counter()` after the device's queued work is done: a pass timed between two of these
    is what the device spent, not what launching it cost."""
    sync(device)
    return time.perf_counter()


def to_host(outs: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The 1-D integer outputs of a pass (greedy tokens per segment) moved to the CPU in one transfer;
    other outputs (logits, None) unchanged. One device-to-host sync per step instead of one per
    sequence."""
    picks = [i for i, o in enumerate(outs) if o is not None and o.dim() == 1 and not o.is_floating_point() and o.device.type != "cpu"]
    if not picks:
        return list(outs)
    flat = torch.cat([outs[i] for i in picks]).cpu()
    res = list(outs)
    r = 0
    for i in picks:
        n = outs[i].shape[0]
        res[i] = flat[r : r + n]
        r += n
    return res


def to_device(rows: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """CPU tensors [n_i] -> views on `device`, moved in one transfer (a copy from the host waits for the
    device's queue, so one per step rather than one per sequence)."""
    if device.type == "cpu" or not rows:
        return list(rows)
    flat = torch.cat(list(rows)).to(device)
    out, r = [], 0
    for t in rows:
        out.append(flat[r : r + t.shape[0]])
        r += t.shape[0]
    return out


# ---- the probe --------------------------------------------------------------------------------------

# Qwen2.5-Coder-0.5B's projection shapes (in, out): fused QKV, o, fused gate/up, down.
PROBE_SHAPES = ((896, 1152), (896, 896), (896, 9728), (4864, 896))


def probe(device: str = "cuda", dtype: torch.dtype = torch.bfloat16, max_m: int = 16, rows: int = FIXED_ROWS,
          shapes: Sequence[tuple[int, int]] = PROBE_SHAPES, seed: int = 0) -> dict:
    """Row invariance on `device`: for M = 1..max_m, is row 0 of an M-row op bit-identical to the op on
    that row alone? For plain `F.linear` (what cuBLAS/MKL do by themselves), the fixed-shape linear and
    RMSNorm the engine runs, and per-row attention. Also each row at other places in the chunk."""
    dev = torch.device(device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    report: dict = {"device": str(dev), "dtype": str(dtype).replace("torch.", ""), "rows": rows, "max_m": max_m, "checks": {}}
    if dev.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(dev)
    report["torch"] = torch.__version__

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dev, dtype)

    def check(name: str, op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, positional: bool = False) -> None:
        """Row 0 of op(x[:M]) against op(x[:1]) for every M; and every row of op(x) against that row alone
        (positional ops, whose row i sits at position i: against row i of op(x[:i+1]))."""
        one = op(x[:1])
        outs = [op(x[:m]) for m in range(1, max_m + 1)]
        same = [torch.equal(o[:1], one) for o in outs]
        if positional:
            every_row = all(torch.equal(outs[-1][i], outs[i][i]) for i in range(max_m))
        else:
            every_row = all(torch.equal(outs[-1][i : i + 1], op(x[i : i + 1])) for i in range(max_m))
        diff = max(float((o[:1].float() - one.float()).abs().max()) for o in outs)
        report["checks"][name] = {"identical": all(same) and every_row, "identical_m": [m for m, s in enumerate(same, 1) if s],
                                  "every_row_alone": every_row, "max_abs_diff": diff}

    with torch.inference_mode():
        for k, n in shapes:
            w, x = rnd(n, k) * k**-0.5, rnd(max_m, k)
            check(f"F.linear {k}->{n}", lambda t, w=w: F.linear(t, w), x)
            check(f"fixed-rows linear {k}->{n}", FixedRowsLinear(_Plain(w), rows), x)
        hidden = shapes[0][0]
        w = 1.0 + 0.1 * rnd(hidden)
        x = rnd(max_m, hidden)
        check("F.rms_norm", lambda t: F.rms_norm(t, (hidden,), w, 1e-6), x)
        check("fixed-rows rms_norm", lambda t: rms_norm_fixed(t, w, 1e-6, rows), x)
        # Attention. Prefill chunks attend in one causal call over M query rows (their boundaries depend on
        # the prompt alone, so this need not be invariant; recorded); decode and verify rows attend one
        # call per row, whose shape depends on the row's position only: that call must be deterministic.
        h, hk, d, ctx = 14, 2, 64, 300
        kv = rnd(2, hk, ctx, d)
        q = rnd(max_m, h, d)

        def causal(t: torch.Tensor) -> torch.Tensor:  # t: [m, H, D] at positions ctx - max_m + 0..m-1
            m = t.shape[0]
            end = ctx - max_m + m
            mask = torch.ones(m, end, dtype=torch.bool, device=dev).tril(end - m)
            o = F.scaled_dot_product_attention(t.transpose(0, 1).unsqueeze(0), kv[0, :, :end].unsqueeze(0),
                                               kv[1, :, :end].unsqueeze(0), attn_mask=mask, enable_gqa=True)
            return o[0].transpose(0, 1)

        def per_row(t: torch.Tensor) -> torch.Tensor:  # the same rows, one call each (what decode/verify do)
            m = t.shape[0]
            outs = []
            for j in range(m):
                end = ctx - max_m + j + 1
                outs.append(F.scaled_dot_product_attention(t[j].view(1, h, 1, d), kv[0, :, :end].unsqueeze(0),
                                                           kv[1, :, :end].unsqueeze(0), enable_gqa=True).view(1, h, d))
            return torch.cat(outs)

        check("sdpa causal multi-row", causal, q, positional=True)
        check("per-row sdpa", per_row, q, positional=True)
    report["engine_rows_invariant"] = all(
        c["identical"] for name, c in report["checks"].items() if name.startswith(("fixed-rows", "per-row"))
    )
    return report


class _Plain:
    def __init__(self, w: torch.Tensor):
        self.w, self.out_features, self.nbytes = w, w.shape[0], w.numel() * w.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)


def print_probe(report: dict) -> None:
    print(f"invariance probe on {report.get('gpu', report['device'])} ({report['dtype']}, torch {report['torch']}), "
          f"M = 1..{report['max_m']}, fixed chunks of {report['rows']} rows")
    for name, c in report["checks"].items():
        ms = c["identical_m"]
        print(f"  {name:<30} {'identical' if c['identical'] else 'DIFFERS'}  "
              f"(row 0 identical at M in {ms if len(ms) < report['max_m'] else 'all'}; max |diff| {c['max_abs_diff']:.3g})")
    print(f"engine rows batch-invariant: {report['engine_rows_invariant']}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m engine.gpu", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("probe", help="row-invariance probe of the kernels on a device")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-m", type=int, default=16)
    p.add_argument("--json", default=None, help="write the report here")
    args = ap.parse_args(argv)
    report = probe(args.device, getattr(torch, args.dtype), args.max_m)
    print_probe(report)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0 if report["engine_rows_invariant"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
