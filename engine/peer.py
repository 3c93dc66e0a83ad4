"""llama.cpp as a peer in the engine bench: the same GGUF, the same prompt token ids, greedy, same threads.

Optional: needs `llama-cpp-python` (`pip install -e ".[peer]"`, built from source with the machine's own
CPU flags: `CMAKE_ARGS="-DGGML_NATIVE=ON"`); nothing else in the project imports it. `PeerDecoder`s
decode token ids greedily and return the new ids (EOS excluded, as the engine counts), timed by the
bench beside our methods. Besides the GGUF's own type, F32 and Q8_0 copies are made once with
llama.cpp's own quantize API (cached under `$KNNSSD_CACHE/peer/`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

# llama.cpp ftype ids for the copies we make (llama.h's llama_ftype)
PEER_TYPES = ("own", "Q8_0", "F32")


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def parse_peer(value: str | None) -> list[str]:
    """`--peer llama.cpp` (all types) or `llama.cpp:own,Q8_0`; '' / None: no peer. Raises ValueError."""
    if not value:
        return []
    name, _, types = value.partition(":")
    if name != "llama.cpp":
        raise ValueError(f"unknown peer {name!r}; the only peer is 'llama.cpp' (optionally llama.cpp:own,Q8_0,F32)")
    chosen = [t.strip() for t in types.split(",") if t.strip()] if types else list(PEER_TYPES)
    bad = [t for t in chosen if t not in PEER_TYPES]
    if bad:
        raise ValueError(f"unknown llama.cpp types {bad}; choose from {PEER_TYPES}")
    return chosen


def _gguf_type(path: Path) -> str:
    """The file's own type as llama.cpp names it (general.file_type: Q4_1, Q4_K_M, ...), else its commonest
    projection type."""
    from collections import Counter

    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.file_type")
    if field is not None:
        name = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
        return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    counts = Counter(t.tensor_type.name for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2)
    return counts.most_common(1)[0][0]


def _quantized(src: Path, kind: str, out_dir: Path) -> Path:
    import llama_cpp

    ftype = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "F32": llama_cpp.LLAMA_FTYPE_ALL_F32}[kind]
    out = out_dir / f"{src.stem}.{kind}.gguf"
    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.allow_requantize = True  # from the GGUF's own blocks, as `llama-quantize --allow-requantize`
        tmp = out.with_suffix(".partial")
        if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize {src} to {kind}")
        tmp.replace(out)
    return out


@dataclass
class PeerDecoder:
    """One llama.cpp model: `decode(ids, max_new_tokens)` greedy, its prompt evaluated from scratch."""

    label: str  # e.g. "llama.cpp Q4_1"
    path: Path
    threads: int
    eos: frozenset[int]
    n_ctx: int = 4096

    def __post_init__(self):
        import llama_cpp

        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):
            self.llm = llama_cpp.Llama(str(self.path), n_threads=self.threads, n_threads_batch=self.threads,
                                       n_ctx=self.n_ctx, verbose=False)

    def decode(self, ids: list[int], max_new_tokens: int) -> list[int]:
        self.llm.reset()  # no prefix reuse between runs: every run evaluates its prompt, as ours do
        out: list[int] = []
        for tok in self.llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if tok in self.eos or len(ids) + len(out) >= self.n_ctx:
                break
            out.append(int(tok))
            if len(out) >= max_new_tokens:
                break
        return out


def llama_cpp_peers(model: str, types: list[str], threads: int, eos: frozenset[int], n_ctx: int = 4096) -> list[PeerDecoder]:
    """Decoders for the bundled model's GGUF at the given types ('own' is the file's own type)."""
    from engine.load import cache_dir, gguf_source, joined_gguf

    parts = gguf_source(model)
    if parts is None:
        raise ValueError(f"--peer llama.cpp needs a bundled GGUF model, not {model!r}")
    out_dir = cache_dir() / "peer"
    out_dir.mkdir(parents=True, exist_ok=True)
    src = joined_gguf(parts, out_dir / (parts[0].parent.parent.name + ".gguf"))
    own = _gguf_type(src)
    peers = []
    for t in types:
        path = src if t == "own" else _quantized(src, t, out_dir)
        peers.append(PeerDecoder(f"llama.cpp {own if t == 'own' else t}", path, threads, eos, n_ctx))
    return peers
