"""The index build pipeline: corpus -> embeddings -> centroids -> general config -> per-domain search
(own config vs the general one) -> artefact.

`build(settings)` runs it in one process (or a local process pool with `workers > 1`); the Ray job
passes its own `runner` that fans the measurements out as Ray tasks. A runner first measures the general
candidates on all domains' prompts together (`index.select`; shards of the prompts may run in parallel)
and picks the general config, which becomes the manifest's fallback; then it searches every domain,
passing the general config so that a domain keeps its own config only when it beats the general one by
more than the noise. Nothing is written until every domain has finished, and the artefact write itself
is atomic, so a failed build leaves the previous CURRENT version untouched.
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
from index.artefact import DomainEntry, GeneralEntry, IndexManifest, new_version, now_iso, write_artefact
from index.centroids import build_index as build_centroid_index
from index.centroids import similarity_threshold
from index.corpus import Corpus, Record, load_corpus
from index.embed import Embedder, make_embedder
from index.search import DomainResult, SearchEngine, SearchSettings, StepProgress, load_engine, search_domain
from index.select import (
    GENERAL_CANDIDATES, GeneralChoice, Measurement, SelectSettings, choose_general, general_prompts, measure_prompts,
)  # fmt: skip

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
    progress: bool = Field(True, description="Show progress bars (off: INFO log lines at each stage and every 30 s instead).")
    general: bool = Field(
        True,
        description="Measure a general config on all domains' prompts (it becomes the fallback) and keep a domain's own config only when it "
        "beats the general one by more than the noise; False: the older procedure (plain fallback, each domain its searched config).",
    )
    general_candidates: dict[str, DraftConfig] = Field(
        default_factory=lambda: dict(GENERAL_CANDIDATES), description="Candidates for the general config, by name (plain is always measured beside them)."
    )
    # The choice against the general config measures more than the search does (more prompts, more
    # tokens); by default it scales with the search's own measurement settings.
    general_prompts: int | None = Field(None, ge=1, description="Prompts per domain in the general config's measurement (None: measure_prompts + 1).")
    confirm_prompts: int | None = Field(None, ge=1, description="Prompts per domain on which its own config is compared with the general one (None: 2 x measure_prompts).")
    select_rounds: int | None = Field(None, ge=1, description="Interleaved rounds of the general and own-vs-general measurements, fastest run counts (None: min(measure_rounds, 2)).")
    select_tokens: int | None = Field(None, ge=2, description="Tokens per run in the general and own-vs-general measurements (None: 2 x max_new_tokens).")
    select_level: float = Field(0.9, gt=0.0, lt=1.0, description="Two-sided confidence level of the bootstrap intervals of those measurements.")

    def select_settings(self) -> SelectSettings:
        return SelectSettings(
            general_prompts=self.general_prompts or self.measure_prompts + 1,
            confirm_prompts=self.confirm_prompts or 2 * self.measure_prompts,
            rounds=self.select_rounds or min(self.measure_rounds, 2),
            max_new_tokens=self.select_tokens or 2 * self.max_new_tokens,
            level=self.select_level,
            seed=self.seed,
        )

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


class GeneralResult(BaseModel):
    """The general stage's outcome: the choice and the per-prompt timings it was made from."""

    choice: GeneralChoice = Field(description="The general config and every candidate's measured speedup.")
    measurement: Measurement = Field(description="Per-prompt timings of plain and every candidate (all domains' prompts).")
    seconds: float = Field(0.0, description="Wall time of the general stage.")


# A runner measures the general config (unless settings.general is off), searches every domain and reports
# which model it ran on: (identity, results) or (identity, results, general result or None).
Runner = Callable[
    [Mapping[str, Sequence[Record]], SearchSettings, BuildSettings],
    "tuple[EngineIdentity, dict[str, DomainResult]] | tuple[EngineIdentity, dict[str, DomainResult], GeneralResult | None]",
]
# Measures shards of the general prompts (one Measurement per shard, in the same order).
ShardMeasurer = Callable[[list[list[tuple[str, Record]]], SelectSettings, dict[str, DraftConfig]], list[Measurement]]


@dataclass
class BuildResult:
    path: Path
    manifest: IndexManifest
    results: dict[str, DomainResult]
    seconds: float
    general: GeneralResult | None = None


def general_stage(domains: Mapping[str, Sequence[Record]], settings: BuildSettings, measure_shards: ShardMeasurer, n_shards: int = 1) -> GeneralResult:
    """Measure the general candidates on `general_prompts` prompts of every domain (split into `n_shards`
    shards measured by `measure_shards`, e.g. in parallel), then choose the general config."""
    t0 = time.perf_counter()
    sel = settings.select_settings()
    items = general_prompts(domains, sel)
    n = max(1, min(n_shards, len(items)))
    shards = [items[i::n] for i in range(n)]
    log.info("general config: %d candidates on %d prompts (%d domains), %d shard(s)", len(settings.general_candidates), len(items), len(domains), n)
    parts = measure_shards(shards, sel, dict(settings.general_candidates))
    m = parts[0]
    for part in parts[1:]:
        m = m.merge(part)
    choice = choose_general(m, sel)
    log.info("general config: %s (%s) %s", choice.name, choice.config.config_id, choice.reason)
    return GeneralResult(choice=choice, measurement=m, seconds=round(time.perf_counter() - t0, 3))


def domain_kwargs(settings: BuildSettings, general: GeneralResult | None) -> dict:
    """search_domain's extra arguments when a general config was measured."""
    if general is None:
        return {}
    return {"extra": dict(settings.general_candidates), "general": general.choice.config, "select": settings.select_settings()}


def measure_shards_with(engine: SearchEngine, progress: bool) -> ShardMeasurer:
    """A ShardMeasurer running every shard in this process on `engine`."""

    def run(shards, sel, candidates):
        total = sum(len(sh) for sh in shards) * sel.rounds * (1 + len(candidates))
        with StepProgress("general config", total, progress) as bar:
            return [measure_prompts(engine, sh, candidates, sel, on_run=lambda: bar.advance(description="general config")) for sh in shards]

    return run


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
        general = general_stage(domains, settings, measure_shards_with(eng, settings.progress)) if settings.general else None
        kw = domain_kwargs(settings, general)
        results = {name: search_domain(eng, name, recs, search, progress=settings.progress, **kw) for name, recs in domains.items()}
        return EngineIdentity.of(eng), results, general

    return run


_WORKER_ENGINE: SearchEngine | None = None


def _worker_init(model: str, threads: int) -> None:
    global _WORKER_ENGINE
    import torch

    torch.set_num_threads(threads)
    _WORKER_ENGINE = load_engine(model)


def _worker_search(name: str, records: list[Record], search: SearchSettings, kw: dict) -> tuple[EngineIdentity, DomainResult]:
    assert _WORKER_ENGINE is not None
    return EngineIdentity.of(_WORKER_ENGINE), search_domain(_WORKER_ENGINE, name, records, search, progress=False, **kw)


def _worker_measure(items: list[tuple[str, Record]], sel: SelectSettings, candidates: dict[str, DraftConfig]) -> Measurement:
    assert _WORKER_ENGINE is not None
    return measure_prompts(_WORKER_ENGINE, items, candidates, sel)


def process_pool_runner(domains, search: SearchSettings, settings: BuildSettings):
    """`workers` spawned processes, each loading the engine once: shards of the general measurement,
    then whole domains."""
    import multiprocessing as mp

    threads = max(1, (os.cpu_count() or 1) // settings.workers)
    results: dict[str, DomainResult] = {}
    ident: EngineIdentity | None = None
    with ProcessPoolExecutor(settings.workers, mp_context=mp.get_context("spawn"), initializer=_worker_init, initargs=(settings.model, threads)) as ex:

        def shards_in_pool(shards, sel, candidates):
            return [f.result() for f in [ex.submit(_worker_measure, sh, sel, candidates) for sh in shards]]

        general = general_stage(domains, settings, shards_in_pool, settings.workers) if settings.general else None
        kw = domain_kwargs(settings, general)
        with _domain_bar(len(domains), settings.progress) as advance:
            futs = {ex.submit(_worker_search, name, list(recs), search, kw): name for name, recs in domains.items()}
            for fut in as_completed(futs):
                ident, res = fut.result()
                results[futs[fut]] = res
                advance(futs[fut], res)
    assert ident is not None
    return ident, results, general


def _domain_bar(total: int, enabled: bool):
    """Progress over whole domains (for parallel runners, where per-domain bars would interleave)."""
    from contextlib import contextmanager

    @contextmanager
    def cm():
        if not enabled:
            done = [0]

            def log_line(name: str, res: DomainResult) -> None:
                done[0] += 1
                log.info("domain %d/%d %s", done[0], total, _domain_line(name, res))

            yield log_line
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as prog:
            task = prog.add_task("searching domains", total=total)

            def advance(name: str, res: DomainResult) -> None:
                prog.advance(task)
                prog.console.log(_domain_line(name, res))

            yield advance

    return cm()


def _domain_line(name: str, res: DomainResult) -> str:
    how = f" ({res.choice.source})" if res.choice is not None else ""
    return f"{name}: {res.config.config_id}{how} speedup {res.speedup:.2f}x ({res.seconds:.0f} s)"


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
    out = runner(corpus.domains, settings.search_settings(), settings)
    ident, results = out[0], out[1]
    general: GeneralResult | None = out[2] if len(out) > 2 else None
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
            source=r.choice.source if r.choice else None,
            measured=r.choice.speedup if r.choice else None,
            vs_general=r.choice.own_vs_general if r.choice else None,
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
        # Far from every domain: the general config, measured on all domains' prompts together. A runner
        # that measured none (tests, older runners) leaves plain decoding, which is never slower than itself.
        fallback_config=general.choice.config if general else DraftConfig.plain(),
        domains=domains,
        general=(
            GeneralEntry(
                name=general.choice.name,
                speedup=general.choice.speedup,
                candidates={c.name: c.speedup for c in general.choice.candidates},
                max_new_tokens=settings.select_settings().max_new_tokens,
            )
            if general
            else None
        ),
    )
    seconds = time.perf_counter() - t0
    report = {
        "settings": json.loads(settings.model_dump_json()),
        "build_seconds": round(seconds, 2),
        "num_layers": ident.num_layers,
        "domains": {name: json.loads(r.model_dump_json()) for name, r in sorted(results.items())},
        "general": json.loads(general.model_dump_json()) if general else None,
    }
    from index.plot import PLOT_FILE, render_plot

    png = render_plot(
        results, title=f"{manifest.model_id} · {manifest.version} · {manifest.representation}", general=manifest.general
    )
    extra = {SEARCH_REPORT_FILE: json.dumps(report, indent=1).encode(), PLOT_FILE: png}
    path = write_artefact(settings.out, manifest, index, labels, extra_files=extra)
    return BuildResult(path=path, manifest=manifest, results=results, seconds=time.perf_counter() - t0, general=general)


# DraftConfig's knobs, short headers: skipped attention / MLP layers, draft weights, draft LM-head rows,
# prompt-lookup n-gram, model draft when lookup finds nothing, max draft tokens, confidence, adaptive.
KNOB_COLUMNS = ("config", "skip attn", "skip mlp", "quant", "vocab", "lookup", "model", "max", "conf", "adaptive")


def _knobs(c: DraftConfig) -> list[str]:
    """Every DraftConfig knob as table cells ('-' where plain decoding has none)."""
    if not c.enabled:
        return ["plain", *["-"] * (len(KNOB_COLUMNS) - 1)]
    return [
        c.config_id,
        ",".join(map(str, c.skip_attn)) or "-",
        ",".join(map(str, c.skip_mlp)) or "-",
        c.quantize,
        str(c.draft_vocab or "all"),
        str(c.prompt_lookup or "-"),
        "yes" if c.model_draft else "no",
        str(c.max_draft),
        f"{c.confidence:.2f}",
        f"{c.target_acceptance:.2f}" if c.adaptive else "no",
    ]


def _ratio(r) -> str:
    return f"{r.value:.2f}x [{r.low:.2f}, {r.high:.2f}]" if r is not None else "-"


def manifest_table(m: IndexManifest, title: str = ""):
    """A rich table of an artefact: the general config, then each domain's config with every knob, where
    it came from, its measured speedup over plain (with its interval) and its own config over the general."""
    from rich.table import Table

    t = Table(title=title or f"index {m.version} ({m.model_id}, {m.representation}, threshold {m.distance_threshold:.3f})")
    for col in ("domain", "source", *KNOB_COLUMNS, "vs plain [CI]", "own/general [CI]", "accept", "tok/step", "prompts", "centroids"):
        t.add_column(col, no_wrap=True)
    g = m.general
    t.add_row(
        "(general)", g.name if g else "none (older build)", *_knobs(m.fallback_config), _ratio(g.speedup) if g else "-", "-", "-", "-", "-", "-"
    )
    for name, e in m.domains.items():
        speed = _ratio(e.measured) if e.measured is not None else f"{e.speedup:.2f}x"
        t.add_row(
            name,
            e.source or "searched",
            *_knobs(e.config),
            speed,
            _ratio(e.vs_general),
            f"{e.acceptance:.2f}",
            f"{e.mean_accepted_tokens:.2f}",
            str(e.n_prompts),
            str(e.n_centroids),
        )
    return t


def summary_table(result: BuildResult):
    """A rich table of the configs found (for the CLI and the job log)."""
    return manifest_table(result.manifest, title=f"index {result.manifest.version} ({result.seconds:.0f} s) -> {result.path}")
