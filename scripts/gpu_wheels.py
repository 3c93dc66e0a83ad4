"""Gather the wheels the GPU check needs beyond the GPU machine's own packages into one folder to send
along with the source tree (the device machine has no network; what travels is limited to 64 MiB).

    .venv/bin/python scripts/gpu_wheels.py            # -> gpu_wheels/ (git-ignored), prints sizes
    .venv/bin/python scripts/gpu_wheels.py --all      # also the engine's packages the image already has

The GPU machine's python3 (3.12, x86-64) holds a CUDA build of torch, transformers, safetensors,
tokenizers, numpy, typer, rich, pyyaml, pytest, pytest-timeout, matplotlib and httpx; it lacks pydantic
(and its parts) and gguf, which the engine imports. Versions are the ones installed here (this venv is
what CI tests), as cp312 manylinux wheels. Never torch: the machine's CUDA build must stay.
`scripts/gpu_check.sh` installs the folder into a private target directory (`pip --target`, no deps, no
index) and puts it first on PYTHONPATH, so nothing of the machine's own environment is replaced.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# What the GPU image lacks: pydantic with its parts (engine.config, every config model) and gguf
# (converting a bundled GGUF model). typing-extensions rides along: pydantic needs a recent one.
MISSING = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions", "gguf")
# --all: the rest of what the engine and the check import beyond torch, for a machine that lacks them or
# has other versions (the image's transformers is older than the one CI tests).
ENGINE = ("transformers", "tokenizers", "huggingface-hub", "hf-xet", "safetensors", "accelerate", "typer",
          "shellingham", "annotated-doc", "rich", "markdown-it-py", "mdurl", "pygments", "click", "pyyaml")
NEVER = ("torch",)
LIMIT_MB = 64
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def wanted(all_engine: bool) -> list[str]:
    names = list(MISSING) + (list(ENGINE) if all_engine else [])
    assert not set(names) & set(NEVER)
    pins = []
    for name in names:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            raise SystemExit(f"{name} is not installed here; run this with the project's venv (.venv/bin/python)")
    return pins


def download(pins: list[str], dest: Path, python_version: str = "3.12") -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           python_version, "--implementation", "cp", "-d", str(dest), "-q"]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd + pins, check=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "gpu_wheels")
    ap.add_argument("--all", action="store_true", help="also the engine's packages the GPU image already has")
    ap.add_argument("--python-version", default="3.12", help="the GPU machine's python (3.12)")
    args = ap.parse_args(argv)
    pins = wanted(args.all)
    download(pins, args.out, args.python_version)
    wheels = sorted(args.out.glob("*.whl"))
    bad = [w.name for w in wheels if w.name.split("-")[0].lower() in NEVER]
    if bad:
        raise SystemExit(f"refusing to send {bad}: the GPU machine keeps its own CUDA build")
    total = 0
    for w in wheels:
        size = w.stat().st_size
        total += size
        print(f"{size / 2**20:8.2f} MiB  {w.name}")
    print(f"{total / 2**20:8.2f} MiB  in {len(wheels)} wheels in {args.out} (limit {LIMIT_MB} MiB with the source tree)")
    return 0 if total < LIMIT_MB * 2**20 else 1


if __name__ == "__main__":
    raise SystemExit(main())
