"""The Ray job entrypoint: rebuild the index on a Ray cluster and publish the new version.

    ray job submit --working-dir . -- python -m index.job --data index/data/default --out /shared/index \\
        [--budget N] [--workers N] [--num-cpus-per-task N] [--redis-url redis://...]

The general config's measurement runs as `--workers` Ray tasks (shards of its prompts), then each
domain's search (and its comparison with the general config) runs as one Ray task; each task loads the
engine once and `--workers` caps how many run at a time. The driver embeds, clusters, writes the
artefact atomically and only then publishes (Redis key plus a pub/sub message). A failed build exits non-zero, never publishes and never touches CURRENT.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from index.build import BuildSettings, EngineIdentity, _domain_bar, build, domain_kwargs, general_stage, summary_table
from index.corpus import Record
from index.search import DomainResult, SearchSettings
from index.select import SelectSettings

log = logging.getLogger("index.job")


def _task_setup(threads: int):
    """In a Ray task: offline hub, torch threads, and INFO logging (so progress lines reach the driver)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    torch.set_num_threads(max(1, threads))


def _search_task(model: str, threads: int, name: str, records: list[Record], search: SearchSettings, kw: dict | None = None):
    """Body of one Ray task: load the engine, search one domain (against the general config in `kw`)."""
    _task_setup(threads)
    from index.search import load_engine, search_domain

    engine = load_engine(model)
    return EngineIdentity.of(engine), search_domain(engine, name, records, search, progress=False, **(kw or {}))


def _measure_task(model: str, threads: int, items: list, sel: SelectSettings, candidates: dict):
    """Body of one Ray task: load the engine, measure one shard of the general config's prompts."""
    _task_setup(threads)
    from index.search import StepProgress, load_engine
    from index.select import measure_prompts

    engine = load_engine(model)
    with StepProgress(f"general config shard ({len(items)} prompts)", len(items) * sel.rounds * (1 + len(candidates)), False) as bar:
        return measure_prompts(engine, items, candidates, sel, on_run=lambda: bar.advance(description="general config shard"))


def ray_runner(num_cpus_per_task: float):
    """A build runner that fans work out as Ray tasks, at most `settings.workers` in flight: first the
    general config's measurement in `workers` shards, then one task per domain."""
    import ray

    remote = ray.remote(num_cpus=num_cpus_per_task, max_retries=0)(_search_task)
    remote_measure = ray.remote(num_cpus=num_cpus_per_task, max_retries=0)(_measure_task)
    threads = max(1, int(num_cpus_per_task))

    def run(domains: Mapping[str, Sequence[Record]], search: SearchSettings, settings: BuildSettings):
        def shards_as_tasks(shards, sel, candidates):
            return ray.get([remote_measure.remote(settings.model, threads, list(sh), sel, candidates) for sh in shards])

        general = general_stage(domains, settings, shards_as_tasks, settings.workers) if settings.general else None
        kw = domain_kwargs(settings, general)
        pending = list(domains.items())
        in_flight: dict = {}
        results: dict[str, DomainResult] = {}
        ident: EngineIdentity | None = None
        with _domain_bar(len(pending), settings.progress) as advance:
            while pending or in_flight:
                while pending and len(in_flight) < settings.workers:
                    name, recs = pending.pop(0)
                    in_flight[remote.remote(settings.model, threads, name, list(recs), search, kw)] = name
                done, _ = ray.wait(list(in_flight), num_returns=1)
                for ref in done:
                    name = in_flight.pop(ref)
                    ident, res = ray.get(ref)  # a failed task raises here and fails the build
                    results[name] = res
                    advance(name, res)
        assert ident is not None
        return ident, results, general

    return run


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m index.job", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="Data directory: one <domain>.jsonl per domain.")
    p.add_argument("--out", required=True, help="Artefact root (versions/ and CURRENT).")
    p.add_argument("--budget", type=int, default=24, help="Candidate draft configs screened per domain.")
    p.add_argument("--workers", type=int, default=2, help="Domain searches running at once (Ray tasks).")
    p.add_argument("--num-cpus-per-task", type=float, default=1.0, help="Ray CPUs reserved per search task (also its torch threads).")
    p.add_argument("--seed", type=int, default=0, help="Seed for k-means and the search.")
    p.add_argument("--k", type=int, default=2, help="Centroids per domain.")
    p.add_argument("--model", default="smollm2", help="Engine model name or Hugging Face model directory.")
    p.add_argument("--representation", default="minilm", choices=["minilm", "llm-hidden"], help="Prompt representation.")
    p.add_argument("--max-new-tokens", type=int, default=32, help="Tokens per measured run.")
    p.add_argument("--measure-prompts", type=int, default=3, help="Prompts per domain measured for tokens/s.")
    p.add_argument("--screen-prompts", type=int, default=4, help="Prompts per domain used for screening.")
    p.add_argument("--n-measure", type=int, default=2, help="Best screened candidates measured per domain.")
    p.add_argument("--measure-rounds", type=int, default=3, help="Interleaved measurement rounds (fastest run counts).")
    p.add_argument("--layer-profile-prompts", type=int, default=2, help="Prompts for the per-layer profile (0: off).")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="Publish the new version here (default $REDIS_URL; none: do not publish).")
    p.add_argument("--redis-prefix", default="", help="Prefix for the Redis key and channel (tests).")
    p.add_argument("--ray-address", default=None, help="Ray address (default: the cluster the job runs in, else a local one).")
    p.add_argument("--no-general", action="store_true", help="The older procedure: no general config (fallback plain), each domain its searched config.")
    p.add_argument("--general-prompts", type=int, default=None, help="Prompts per domain in the general config's measurement (default: measure-prompts + 1).")
    p.add_argument("--confirm-prompts", type=int, default=None, help="Prompts per domain comparing its own config with the general one (default: 2 x measure-prompts).")
    p.add_argument("--select-rounds", type=int, default=None, help="Interleaved rounds of those two measurements (default: min(measure-rounds, 2)).")
    p.add_argument("--select-tokens", type=int, default=None, help="Tokens per run in those two measurements (default: 2 x max-new-tokens).")
    p.add_argument("--no-progress", action="store_true", help="No progress bars: log lines at each stage and every 30 s instead.")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import ray
    from rich.console import Console

    from index.publish import publish_version

    settings = BuildSettings(
        data=args.data,
        out=args.out,
        k=args.k,
        representation=args.representation,
        budget=args.budget,
        workers=args.workers,
        seed=args.seed,
        model=args.model,
        max_new_tokens=args.max_new_tokens,
        measure_prompts=args.measure_prompts,
        screen_prompts=args.screen_prompts,
        n_measure=args.n_measure,
        measure_rounds=args.measure_rounds,
        layer_profile_prompts=args.layer_profile_prompts,
        progress=not args.no_progress,
        general=not args.no_general,
        general_prompts=args.general_prompts,
        confirm_prompts=args.confirm_prompts,
        select_rounds=args.select_rounds,
        select_tokens=args.select_tokens,
    )
    ray.init(address=args.ray_address, ignore_reinit_error=True, log_to_driver=True)
    try:
        result = build(settings, runner=ray_runner(args.num_cpus_per_task))
    except Exception:
        log.exception("index build failed: nothing published, CURRENT unchanged")
        return 1
    finally:
        ray.shutdown()
    Console(width=240).print(summary_table(result))  # every knob column stays readable in the job log
    log.info("artefact %s written to %s in %.1f s", result.manifest.version, result.path, result.seconds)
    if args.redis_url:
        payload = publish_version(args.redis_url, result.manifest.version, result.path, prefix=args.redis_prefix)
        log.info("published %s", payload)
    else:
        log.info("no --redis-url: not published")
    return 0


if __name__ == "__main__":
    sys.exit(main())
