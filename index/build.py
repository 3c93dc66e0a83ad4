"""The index build pipeline: corpus -> embeddings -> centroids -> general config -> per-domain search
(own config vs the general one) -> artefact.

`build(settings)` runs it with a local runner (this process, or a process pool with `workers > 1`); the
Ray job passes a `RayRunner` (index.runners has the runner interface and all three). A runner first
measures the general candidates on all domains' prompts together (`index.select`; shards of the prompts
may run in parallel) and picks the general config, which becomes the manifest's fallback; then it
searches every domain, passing the general config so that a domain keeps its own config only when it
beats the general one by more than the noise. Nothing is written until every domain has finished, and
the artefact write itself is atomic, so a failed build leaves the previous CURRENT version untouched.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from engine.config import DraftConfig
from index.artefact import DomainEntry, GeneralEntry, IndexManifest, new_version, now_iso, write_artefact
from index.centroids import build_index as build_centroid_index
from index.centroids import similarity_threshold
from index.corpus import Corpus, load_corpus
from index.embed import Embedder, make_embedder
from index.runners import EngineIdentity, GeneralResult, Runner, local_runner
from index.search import DomainResult, SearchEngine, load_engine
from index.settings import BuildSettings

# BuildSettings, EngineIdentity and GeneralResult are re-exported: callers and tests import them from here.
__all__ = ["BuildResult", "BuildSettings", "EngineIdentity", "GeneralResult", "build", "embed_corpus", "manifest_table", "summary_table"]

log = logging.getLogger(__name__)

SEARCH_REPORT_FILE = "search.json"


@dataclass
class BuildResult:
    path: Path
    manifest: IndexManifest
    results: dict[str, DomainResult]
    seconds: float
    general: GeneralResult | None = None


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
    if engine is None and settings.representation == "llm-hidden":
        engine = load_engine(settings.model, settings.precision)  # it embeds the prompts, and a local runner reuses it
    if embedder is None:
        embedder = make_embedder(settings.representation, engine=engine, progress=settings.progress)
    vectors = embed_corpus(corpus, embedder)
    index, labels = build_centroid_index(vectors, settings.k, seed=settings.seed)
    threshold = similarity_threshold(index, labels, vectors, settings.threshold_quantile, settings.threshold_margin)

    if runner is None:
        runner = local_runner(settings, engine)
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
        entry.config.check(ident.num_layers)
    manifest = IndexManifest(
        version=new_version(),
        created_at=now_iso(),
        model_id=ident.model_id,
        model_hash=ident.weights_hash,
        precision=ident.precision,
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


def _knobs(c: DraftConfig) -> list[str]:
    """Every DraftConfig knob as table cells ('-' where plain decoding has none); the columns are
    `DraftConfig.report_columns()`, one per knob whose declaration names one (engine.config)."""
    return c.report_cells()


def _ratio(r) -> str:
    return f"{r.value:.2f}x [{r.low:.2f}, {r.high:.2f}]" if r is not None else "-"


def manifest_table(m: IndexManifest, title: str = ""):
    """A rich table of an artefact: the general config, then each domain's config with every knob, where
    it came from, its measured speedup over plain (with its interval) and its own config over the general."""
    from rich.table import Table

    t = Table(title=title or f"index {m.version} ({m.model_id}, {m.representation}, threshold {m.distance_threshold:.3f})")
    for col in ("domain", "source", *DraftConfig.report_columns(), "vs plain [CI]", "own/general [CI]", "accept", "tok/step", "prompts", "centroids"):
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
