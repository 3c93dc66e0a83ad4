"""The Ray job entrypoint: rebuild the index on a Ray cluster and publish the new version.

    ray job submit --working-dir . -- python -m index.job --data index/data/default --out /shared/index \\
        [--budget N] [--workers N] [--num-cpus-per-task N] [--redis-url redis://...]

The general config's measurement runs as `--workers` Ray tasks (shards of its prompts), then each
domain's search (and its comparison with the general config) runs as one Ray task
(index.runners.RayRunner); each worker process loads the engine once and `--workers` caps how many
tasks run at a time. The driver embeds, clusters, writes the artefact atomically and only then
publishes (Redis key plus a pub/sub message). A failed build exits non-zero, never publishes and never
touches CURRENT.

Every build setting is a flag, generated from index.settings.BuildSettings as those of
`knnssd index build` are; only `--workers` defaults differently here (JOB_DEFAULTS).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from index.options import add_arguments, flag_values, flags, validate
from index.settings import BuildSettings

log = logging.getLogger("index.job")

# The job's own defaults for build settings, as data (BuildSettings declares each setting once): on a
# cluster each domain search is a Ray task with CPUs of its own, so two run at once; a local build
# defaults to one (see BuildSettings.workers).
JOB_DEFAULTS = {"workers": 2}
BUILD_FLAGS = flags(BuildSettings, defaults=JOB_DEFAULTS)


def parser() -> argparse.ArgumentParser:
    """Every build setting as a flag (the same names as `knnssd index build`), then the job's own."""
    p = argparse.ArgumentParser(prog="python -m index.job", description=__doc__.split("\n\n")[0])
    add_arguments(p, BUILD_FLAGS)
    p.add_argument("--num-cpus-per-task", type=float, default=1.0, help="Ray CPUs reserved per search task (also its torch threads).")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"), help="Publish the new version here (default $REDIS_URL; none: do not publish).")
    p.add_argument("--redis-prefix", default="", help="Prefix for the Redis key and channel (tests).")
    p.add_argument("--ray-address", default=None, help="Ray address (default: the cluster the job runs in, else a local one).")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The job's arguments, with the validated BuildSettings as `args.settings`. A build whose index the
    serving router would refuse is a usage error: the job exists to publish to the routers."""
    p = parser()
    args = p.parse_args(argv)
    try:
        args.settings = validate(BuildSettings, flag_values(BUILD_FLAGS, args))
    except ValueError as e:
        p.error(str(e))
    why = args.settings.unservable()
    if why:
        p.error(why)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    import ray
    from rich.console import Console

    from index.build import build, summary_table
    from index.publish import publish_version
    from index.runners import RayRunner

    ray.init(address=args.ray_address, ignore_reinit_error=True, log_to_driver=True)
    try:
        result = build(args.settings, runner=RayRunner(args.num_cpus_per_task))
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
