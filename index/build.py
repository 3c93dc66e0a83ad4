"""The index build pipeline: corpus -> embeddings -> centroids -> per-domain search -> artefact.

`build(settings)` runs it in one process (or a local process pool with `workers > 1`); the Ray job
passes its own `runner` that fans the per-domain searches out as Ray tasks. Nothing is written until
every domain's search has finished, and the artefact write itself is atomic, so a failed build leaves
the previous CURRENT version untouched.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.config import DraftConfig
from index.artefact import DomainEntry, IndexManifest, new_version, now_iso, write_artefact
from index.centroids import build_index as build_centroid_index
from index.centroids import similarity_threshold
from index.corpus import Corpus, Record, load_corpus
from index.embed import Embedder, make_embedder
from index.search import DomainResult, SearchEngine, SearchSettings, load_engine, search_domain

log = logging.getLogger(__name__)

SEARCH_REPORT_FILE = "search.json"


class BuildSettings(BaseModel):
    """Settings of one index build (CLI flags and the Ray job map onto these)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: Path = Field(description="Data directory: one <domain>.jsonl per domain.")
    out: Path = Field(description="Artefact root: versions are written under <out>/versions, <out>/CURRENT names the current one.")
    k: int = Field(2, ge=1, description="k-means centroids per domain (clamped to the domain's number of prompts).")
    representation: Literal["minilm", "llm-hidden"] = Field(
        "minilm", description="Prompt representation: the bundled MiniLM sentence embedder, or the LLM's mean-pooled last hidden state."
    )
    budget: int = Field(24, ge=1, description="Candidate draft configs screened per domain.")
    workers: int = Field(1, ge=1, description="Domains searched in parallel (local processes or Ray tasks), each loading the engine once.")
    seed: int = Field(0, description="Seed for k-means and the search; the same seed and data reproduce the screening.")
    model: str = Field("smollm2", description="Engine model name (bundled name or a Hugging Face model directory).")
    max_new_tokens: int = Field(32, ge=2, description="Tokens generated per measured run when comparing against plain decoding.")
    measure_prompts: int = Field(3, ge=1, description="Prompts per domain whose tokens/s is measured.")
    screen_prompts: int = Field(4, ge=1, description="Prompts per domain whose greedy continuation screens candidates.")
    n_measure: int = Field(2, ge=1, description="Best screened candidates per domain that are measured.")
    measure_rounds: int = Field(3, ge=1, description="Interleaved measurement rounds; each (config, prompt) keeps its fastest run.")
    layer_profile_prompts: int = Field(2, ge=0, description="Prompts per domain for the per-layer agreement plot (0 disables it).")
    threshold_quantile: float = Field(
        0.02, ge=0.0, le=1.0, description="The router's fallback threshold is this quantile of corpus prompts' similarity to their nearest centroid..."
    )
    threshold_margin: float = Field(0.05, ge=0.0, description="...minus this margin (cosine similarity).")
    progress: bool = Field(True, description="Show progress bars.")

    def search_settings(self) -> SearchSettings:
        return SearchSettings(
            budget=self.budget,
            seed=self.seed,
            max_new_tokens=self.max_new_tokens,
            measure_prompts=self.measure_prompts,
            screen_prompts=self.screen_prompts,
            n_measure=self.n_measure,
            measure_rounds=self.measure_rounds,
            layer_profile_prompts=self.layer_profile_prompts,
        )


@dataclass(frozen=True)
class EngineIdentity:
    """What the manifest records about the model the configs were searched on."""

    model_id: str
    weights_hash: str
    num_layers: int

    @classmethod
    def of(cls, engine: SearchEngine) -> EngineIdentity:
        return cls(str(engine.model_id), str(engine.weights_hash), int(engine.num_layers))


# A runner searches every domain and reports which model it searched on.
Runner = Callable[[Mapping[str, Sequence[Record]], SearchSettings, BuildSettings], tuple[EngineIdentity, dict[str, DomainResult]]]


@dataclass
class BuildResult:
    path: Path
    manifest: IndexManifest
    results: dict[str, DomainResult]
    seconds: float


# ---------------------------------------------------------------------------------------------- runners


class _EngineHolder:
    """Loads the engine at most once per process."""

    def __init__(self, model: str, engine: SearchEngine | None = None):
        self.model = model
        self._engine = engine

    def get(self) -> SearchEngine:
        if self._engine is None:
            self._engine = load_engine(self.model)
        return self._engine


def in_process_runner(holder: _EngineHolder) -> Runner:
    def run(domains, search, settings):
        eng = holder.get()
        return EngineIdentity.of(eng), {
            name: search_domain(eng, name, recs, search, progress=settings.progress) for name, recs in domains.items()
        }

    return run


_WORKER_ENGINE: SearchEngine | None = None


def _worker_init(model: str, threads: int) -> None:
    global _WORKER_ENGINE
    import torch

    torch.set_num_threads(threads)
    _WORKER_ENGINE = load_engine(model)


def _worker_search(name: str, records: list[Record], search: SearchSettings) -> tuple[EngineIdentity, DomainResult]:
    assert _WORKER_ENGINE is not None
    return EngineIdentity.of(_WORKER_ENGINE), search_domain(_WORKER_ENGINE, name, records, search, progress=False)


def process_pool_runner(domains, search: SearchSettings, settings: BuildSettings):
    """`workers` spawned processes, each loading the engine once and searching whole domains."""
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // settings.workers)
    results: dict[str, DomainResult] = {}
    ident: EngineIdentity | None = None
    with _domain_bar(len(domains), settings.progress) as advance:
        with ProcessPoolExecutor(settings.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(settings.model, threads)) as ex:
            futs = {ex.submit(_worker_search, name, list(recs), search): name for name, recs in domains.items()}
            for fut in as_completed(futs):
                ident, res = fut.result()
                results[futs[fut]] = res
                advance(futs[fut], res)
    assert ident is not None
    return ident, results


def _domain_bar(total: int, enabled: bool):
    """Progress over whole domains (for parallel runners, where per-domain bars would interleave)."""
    from contextlib import contextmanager

    @contextmanager
    def cm():
        if not enabled:
            yield lambda name, res: None
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as prog:
            task = prog.add_task("searching domains", total=total)

            def advance(name: str, res: DomainResult) -> None:
                prog.advance(task)
                prog.console.log(f"{name}: {res.config.config_id} speedup {res.speedup:.2f}x ({res.seconds:.0f} s)")

            yield advance

    return cm()


# ---------------------------------------------------------------------------------------------- pipeline


def embed_corpus(corpus: Corpus, embedder: Embedder) -> dict:
    """Embeddings per domain, [n_prompts, dim] float32 unit rows."""
    texts = [r.text for r in corpus.records]
    vecs = embedder.embed(texts)
    out, i = {}, 0
    for name, recs in corpus.domains.items():
        out[name] = vecs[i : i + len(recs)]
        i += len(recs)
    return out


def build(
    settings: BuildSettings,
    runner: Runner | None = None,
    embedder: Embedder | None = None,
    engine: SearchEngine | None = None,
) -> BuildResult:
    """Run the whole pipeline and write (and make CURRENT) a new artefact version under settings.out."""
    t0 = time.perf_counter()
    corpus = load_corpus(settings.data)
    log.info("corpus %s: %d prompts in %d domains", settings.data, len(corpus), len(corpus.domains))
    holder = _EngineHolder(settings.model, engine)

    if embedder is None:
        embedder = make_embedder(
            settings.representation, engine=holder.get() if settings.representation == "llm-hidden" else None, progress=settings.progress
        )
    vectors = embed_corpus(corpus, embedder)
    index, labels = build_centroid_index(vectors, settings.k, seed=settings.seed)
    threshold = similarity_threshold(index, labels, vectors, settings.threshold_quantile, settings.threshold_margin)

    if runner is None:
        runner = in_process_runner(holder) if settings.workers == 1 else process_pool_runner
    ident, results = runner(corpus.domains, settings.search_settings(), settings)
    missing = sorted(set(corpus.domains) - set(results))
    if missing:
        raise RuntimeError(f"search returned no result for domains {missing}")

    domains = {
        name: DomainEntry(
            name=name,
            config=r.config,
            speedup=r.speedup,
            acceptance=r.acceptance,
            mean_accepted_tokens=r.mean_accepted_tokens,
            n_prompts=len(corpus.domains[name]),
            n_centroids=labels.count(name),
        )
        for name, r in sorted(results.items())
    }
    for entry in domains.values():
        entry.config.check_layers(ident.num_layers)
    manifest = IndexManifest(
        version=new_version(),
        created_at=now_iso(),
        model_id=ident.model_id,
        model_hash=ident.weights_hash,
        embedder_id=embedder.id,
        embedder_dim=embedder.dim,
        representation=settings.representation,
        corpus_hash=corpus.hash,
        distance_threshold=round(threshold, 4),
        # Far from every domain nothing was measured, and plain decoding is never slower than itself.
        fallback_config=DraftConfig.plain(),
        domains=domains,
    )
    seconds = time.perf_counter() - t0
    report = {
        "settings": json.loads(settings.model_dump_json()),
        "build_seconds": round(seconds, 2),
        "num_layers": ident.num_layers,
        "domains": {name: json.loads(r.model_dump_json()) for name, r in sorted(results.items())},
    }
    from index.plot import PLOT_FILE, render_plot

    png = render_plot(results, title=f"{manifest.model_id} · {manifest.version} · {manifest.representation}")
    extra = {SEARCH_REPORT_FILE: json.dumps(report, indent=1).encode(), PLOT_FILE: png}
    path = write_artefact(settings.out, manifest, index, labels, extra_files=extra)
    return BuildResult(path=path, manifest=manifest, results=results, seconds=time.perf_counter() - t0)


def summary_table(result: BuildResult):
    """A rich table of the per-domain configs found (for the CLI and the job log)."""
    from rich.table import Table

    t = Table(title=f"index {result.manifest.version} ({result.seconds:.0f} s) -> {result.path}")
    for col in ("domain", "config", "skip attn", "skip mlp", "max draft", "conf", "speedup", "accept", "tok/step", "prompts", "centroids"):
        t.add_column(col)
    for name, e in result.manifest.domains.items():
        c = e.config
        t.add_row(
            name,
            c.config_id,
            ",".join(map(str, c.skip_attn)) if c.enabled else "-",
            ",".join(map(str, c.skip_mlp)) if c.enabled else "-",
            str(c.max_draft) if c.enabled else "-",
            f"{c.confidence:.2f}" if c.enabled else "-",
            f"{e.speedup:.2f}x",
            f"{e.acceptance:.2f}",
            f"{e.mean_accepted_tokens:.2f}",
            str(e.n_prompts),
            str(e.n_centroids),
        )
    return t
