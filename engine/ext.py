"""Build and load the engine's C++ kernels (engine/csrc/native.cpp) for this machine.

Three builds of one source: `avx2` (-mavx2 -mfma -mf16c), `avx512` (the same 8-lane code with AVX-512
VNNI's dpbusd for the int8 dot products) and `scalar` (portable C++ emulating the AVX2 build's 8-lane order
exactly). All give the same bits: the integer dot products are exact, and every float operation is the same
8-lane sequence. `native()` returns the build the CPU runs fastest (`best_build`: AVX-512 with VNNI ->
avx512, AVX2 or AVX-512 without VNNI -> avx2, else scalar).
Builds live under `$KNNSSD_CACHE/ext/<torch version>-<source hash>/`, compiled once by the machine's gcc
(`docker/install.sh` runs `python -m engine.ext` so a service never compiles on a request path).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from functools import cache
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "native.cpp"
BUILDS = {
    "avx2": ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"],
    # The avx2 code with VNNI's dpbusd for the int8 dot products (exact integers either way: same bits).
    "avx512": ["-O3", "-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512vnni",
               "-fopenmp", "-ffp-contract=off"],
    "scalar": ["-O3", "-fopenmp", "-ffp-contract=off", "-DKNNSSD_SCALAR"],
}


def capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def best_build() -> str:
    """The build this CPU runs: AVX-512 with VNNI (Ice Lake, Zen 4 and later) takes avx512; other AVX2 and
    AVX-512 machines (both have AVX2+FMA) take avx2; the rest scalar."""
    if capability() == "AVX512" and torch.cpu._is_vnni_supported():
        return "avx512"
    return "avx2" if capability() in ("AVX2", "AVX512") else "scalar"


def runnable_builds() -> list[str]:
    """Every build this CPU can run, the portable one first (what install compiles and tests compare)."""
    best = best_build()
    return ["scalar"] + (["avx2"] if best in ("avx2", "avx512") else []) + (["avx512"] if best == "avx512" else [])


def _build_dir(kind: str) -> Path:
    from engine.load import cache_dir

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(BUILDS[kind]).encode()).hexdigest()[:12]
    return cache_dir() / "ext" / f"torch{torch.__version__}-{digest}" / kind


@cache
def load(kind: str | None = None, verbose: bool = False):
    """The compiled module of one build (compiled on first use, ~40 s; then loaded from the cache)."""
    from torch.utils.cpp_extension import load as load_ext

    kind = kind or best_build()
    if kind not in BUILDS:
        raise ValueError(f"unknown build {kind!r}; expected one of {sorted(BUILDS)}")
    out = _build_dir(kind)
    out.mkdir(parents=True, exist_ok=True)
    fresh = not any(out.glob("*.so"))
    t0 = time.perf_counter()
    if fresh:
        print(f"compiling the {kind} kernels into {out} (once)", file=sys.stderr)
    mod = load_ext(
        name=f"knnssd_native_{kind}",
        sources=[str(SOURCE)],
        extra_cflags=BUILDS[kind],
        extra_ldflags=["-fopenmp"],
        build_directory=str(out),
        verbose=verbose,
    )
    if fresh:
        print(f"compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return mod


def native():
    return load(best_build())


def main() -> None:
    """`python -m engine.ext`: compile every build this machine can run (install time)."""
    kinds = runnable_builds()
    for kind in kinds:
        load(kind)
    print(f"engine kernels ready: {', '.join(kinds)} (CPU capability {capability()}, threads {torch.get_num_threads()})")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
