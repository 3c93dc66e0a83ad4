"""Build runners: who measures the general config and searches every domain, and where.

`Runner` is the one interface `index.build.build` calls. Its implementations:
- InProcessRunner: this process on one engine (`workers` 1; per-domain progress bars).
- ProcessPoolRunner: `workers` spawned local processes.
- RayRunner: Ray tasks, at most `workers` in flight (the Ray job, index/job.py).
The two parallel ones differ only in where a task runs (a `TaskPool`); what they run is `run_pooled`:
the general config's measurement in `workers` shards, then one task per domain, and the task bodies are
the same functions in a pool process and in a Ray worker.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, Field

from engine.config import DraftConfig
from index.corpus import Record
from index.search import DomainResult, SearchEngine, SearchSettings, StepProgress, load_engine, search_domain
from index.select import GeneralChoice, Measurement, SelectSettings, choose_general, general_prompts, measure_prompts
from index.settings import BuildSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineIdentity:
    """What the manifest records about the model the configs were searched on."""

    model_id: str
    weights_hash: str
    num_layers: int
    precision: str = "reference"  # the engine precision the configs were measured at

    @classmethod
    def of(cls, engine: SearchEngine) -> EngineIdentity:
        return cls(str(engine.model_id), str(engine.weights_hash), int(engine.num_layers), str(getattr(engine, "precision", "reference")))


class GeneralResult(BaseModel):
    """The general stage's outcome: the choice and the per-prompt timings it was made from."""

    choice: GeneralChoice = Field(description="The general config and every candidate's measured speedup.")
    measurement: Measurement = Field(description="Per-prompt timings of plain and every candidate (all domains' prompts).")
    seconds: float = Field(0.0, description="Wall time of the general stage.")


RunnerOutput = tuple[EngineIdentity, dict[str, DomainResult]] | tuple[EngineIdentity, dict[str, DomainResult], GeneralResult | None]


class Runner(Protocol):
    """Measures the general config (unless settings.general is off), searches every domain and reports
    which model it ran on: (identity, results) or (identity, results, general result or None). Any
    function of this signature is one (tests pass fakes)."""

    def __call__(self, domains: Mapping[str, Sequence[Record]], search: SearchSettings, settings: BuildSettings) -> RunnerOutput: ...


# Measures shards of the general prompts (one Measurement per shard, in the same order).
ShardMeasurer = Callable[[list[list[tuple[str, Record]]], SelectSettings, dict[str, DraftConfig]], list[Measurement]]


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


# ---------------------------------------------------------------------------------------------- in process


class InProcessRunner:
    """Everything in this process on one engine: `engine`, else `model` loaded on first use."""

    def __init__(self, model: str, engine: SearchEngine | None = None, precision: str = "auto"):
        self.model = model
        self.engine = engine
        self.precision = precision

    def __call__(self, domains: Mapping[str, Sequence[Record]], search: SearchSettings, settings: BuildSettings) -> RunnerOutput:
        if self.engine is None:
            self.engine = load_engine(self.model, self.precision)
        eng = self.engine
        general = general_stage(domains, settings, measure_shards_with(eng, settings.progress)) if settings.general else None
        kw = domain_kwargs(settings, general)
        results = {name: search_domain(eng, name, recs, search, progress=settings.progress, **kw) for name, recs in domains.items()}
        return EngineIdentity.of(eng), results, general


# ---------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Worker:
    """How a task sets up the process it runs in: the model, torch threads, and whether it logs INFO lines
    (a Ray task's reach the driver's log; a local pool's only with progress bars off, where they would
    otherwise break the bar)."""

    model: str
    threads: int
    log_lines: bool
    precision: str = "auto"


_ENGINES: dict[tuple[str, str], SearchEngine] = {}


def worker_engine(w: Worker) -> SearchEngine:
    """This process's engine, loaded once: a pool process, and a Ray worker reused by Ray, run many tasks."""
    if (w.model, w.precision) not in _ENGINES:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        if w.log_lines:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
        import torch

        torch.set_num_threads(max(1, w.threads))
        _ENGINES[w.model, w.precision] = load_engine(w.model, w.precision)
    return _ENGINES[w.model, w.precision]


def search_task(w: Worker, name: str, records: list[Record], search: SearchSettings, kw: dict) -> tuple[EngineIdentity, DomainResult]:
    """One domain's search (against the general config in `kw`)."""
    engine = worker_engine(w)
    return EngineIdentity.of(engine), search_domain(engine, name, records, search, progress=False, **kw)


def measure_task(w: Worker, items: list[tuple[str, Record]], sel: SelectSettings, candidates: dict[str, DraftConfig]) -> Measurement:
    """One shard of the general config's measurement."""
    return measure_shards_with(worker_engine(w), progress=False)([items], sel, candidates)[0]


class TaskPool(Protocol):
    """Where the parallel runners' tasks run."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Start fn(*args); a hashable handle."""

    def wait(self, handles: list) -> list:
        """Those of `handles` that have finished (at least one; blocks until then)."""

    def result(self, handle: Any) -> Any:
        """The task's value; a failed task raises here, which fails the build."""


def run_pooled(pool: TaskPool, w: Worker, domains: Mapping[str, Sequence[Record]], search: SearchSettings, settings: BuildSettings) -> RunnerOutput:
    """The general measurement in `settings.workers` shards, then one task per domain with at most
    `settings.workers` in flight."""

    def shards_as_tasks(shards, sel, candidates):
        return [pool.result(h) for h in [pool.submit(measure_task, w, list(sh), sel, candidates) for sh in shards]]

    general = general_stage(domains, settings, shards_as_tasks, settings.workers) if settings.general else None
    kw = domain_kwargs(settings, general)
    pending = list(domains.items())
    in_flight: dict[Any, str] = {}
    results: dict[str, DomainResult] = {}
    ident: EngineIdentity | None = None
    with domain_bar(len(pending), settings.progress) as advance:
        while pending or in_flight:
            while pending and len(in_flight) < settings.workers:
                name, recs = pending.pop(0)
                in_flight[pool.submit(search_task, w, name, list(recs), search, kw)] = name
            for handle in pool.wait(list(in_flight)):
                name = in_flight.pop(handle)
                ident, res = pool.result(handle)
                results[name] = res
                advance(name, res)
    assert ident is not None
    return ident, results, general


# ---------------------------------------------------------------------------------------------- pools


class _Processes:
    """A TaskPool over a local process pool."""

    def __init__(self, ex: ProcessPoolExecutor):
        self.ex = ex

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self.ex.submit(fn, *args)

    def wait(self, handles: list) -> list:
        return list(wait_futures(handles, return_when=FIRST_COMPLETED).done)

    def result(self, handle: Future) -> Any:
        return handle.result()


class ProcessPoolRunner:
    """`workers` spawned local processes, each loading the engine once and taking its share of the cores."""

    def __call__(self, domains: Mapping[str, Sequence[Record]], search: SearchSettings, settings: BuildSettings) -> RunnerOutput:
        import multiprocessing as mp

        w = Worker(settings.model, threads=max(1, (os.cpu_count() or 1) // settings.workers), log_lines=not settings.progress,
                   precision=settings.precision)
        with ProcessPoolExecutor(settings.workers, mp_context=mp.get_context("spawn")) as ex:
            return run_pooled(_Processes(ex), w, domains, search, settings)


class _RayTasks:
    """A TaskPool of Ray tasks, each reserving `num_cpus`; never retried (a failed task fails the build)."""

    def __init__(self, num_cpus: float):
        import ray

        self.ray = ray
        self.num_cpus = num_cpus
        self._remote: dict[Callable[..., Any], Any] = {}

    def submit(self, fn: Callable[..., Any], *args: Any) -> Any:
        if fn not in self._remote:
            self._remote[fn] = self.ray.remote(num_cpus=self.num_cpus, max_retries=0)(fn)
        return self._remote[fn].remote(*args)

    def wait(self, handles: list) -> list:
        return self.ray.wait(handles, num_returns=1)[0]

    def result(self, handle: Any) -> Any:
        return self.ray.get(handle)


class RayRunner:
    """Ray tasks on the cluster `ray.init` connected to, each reserving `num_cpus_per_task` CPUs (also its
    torch threads)."""

    def __init__(self, num_cpus_per_task: float = 1.0):
        self.num_cpus_per_task = num_cpus_per_task

    def __call__(self, domains: Mapping[str, Sequence[Record]], search: SearchSettings, settings: BuildSettings) -> RunnerOutput:
        w = Worker(settings.model, threads=max(1, int(self.num_cpus_per_task)), log_lines=True, precision=settings.precision)
        return run_pooled(_RayTasks(self.num_cpus_per_task), w, domains, search, settings)


def local_runner(settings: BuildSettings, engine: SearchEngine | None = None) -> Runner:
    """The runner of a local build: this process for one worker (on `engine` when given), else a process pool."""
    return InProcessRunner(settings.model, engine, settings.precision) if settings.workers == 1 else ProcessPoolRunner()


# ---------------------------------------------------------------------------------------------- progress


@contextmanager
def domain_bar(total: int, enabled: bool):
    """Progress over whole domains for the parallel runners, where per-domain bars would interleave:
    yields advance(name, result)."""
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


def _domain_line(name: str, res: DomainResult) -> str:
    how = f" ({res.choice.source})" if res.choice is not None else ""
    return f"{name}: {res.config.config_id}{how} speedup {res.speedup:.2f}x ({res.seconds:.0f} s)"
