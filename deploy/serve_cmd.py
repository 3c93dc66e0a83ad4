"""`knnssd serve`: the whole service on this machine in one command.

Starts a local Ray that listens on loopback only, with token auth on (`deploy.ray_local`: nothing of Ray
is reachable from another machine, and local processes need the per-run token), finds the Redis at the
config's URL or starts its own `redis-server` (`router.redis_server`: on the URL's port when that is free,
its data kept in an append-only file under `$KNNSSD_CACHE/redis`, restarted if it dies), resolves the index
(the config's `index_path`, else the shipped default), creates the dev tenant with a known key, runs the
Serve app (`services.app.build_app`) and blocks, printing the URL, the key and a curl line. Ctrl-C or
SIGTERM (what `docker stop`, systemd and process managers send) shuts Serve, Ray and a Redis it started
down cleanly; `ray.init` installs its own SIGTERM handler (Ray's core aborts the process), so ours is
installed again after it.

`--write-serve-config` regenerates `deploy/serve_config.yaml` (for `serve run` / `serve deploy`) from
the AppConfig defaults (`deploy.serve_config`); a test checks the shipped file is up to date.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer

from deploy.serve_config import SERVE_CONFIG_PATH, render_serve_config

DEV_TENANT = "dev"
DEV_KEY = "sk-knnssd-dev"  # documented in the README; override with --dev-key or $KNNSSD_DEV_KEY


def ensure_dev_tenant(store, key: str, name: str = DEV_TENANT):
    """Make `key` authenticate as tenant `name` in Redis (add it, or replace a dev tenant with another key)."""
    if not key:
        raise ValueError("the dev key must not be empty")
    tenant = store.authenticate(key)
    if tenant is not None:
        if tenant.name != name:
            raise ValueError(f"the dev key already belongs to tenant {tenant.name!r}; pass another --dev-key")
        return tenant
    if store.get(name) is not None:
        store.remove(name)
    tenant, _ = store.add(name, key=key)
    return tenant


def check_index(index_root: Path, model_hash: str | None = None, spec=None) -> None:
    """Load and verify the index once before starting (a clear error now beats a failing Router replica)."""
    from index.artefact import ArtefactError, load_artefact

    try:
        art = load_artefact(index_root)
    except ArtefactError as exc:
        from services.routing import default_index_root

        raise typer.BadParameter(
            f"no usable index at {index_root}: {exc}. Build one with `knnssd index build --data index/data/default "
            f"--out {default_index_root()}` (used by default from there), or point `index_path` in a --config "
            "file (or $KNNSSD_INDEX) at an artefact root.", param_hint="index_path"
        ) from None
    m = art.manifest
    _say(f"index: {index_root} (version {m.version}, {len(m.domains)} domains: {', '.join(sorted(m.domains))})")
    from router.reload import IncompatibleArtefact, validate_manifest

    try:  # the router refuses such an index; say so now, clearly
        validate_manifest(m, expect_model_hash=model_hash, spec=spec)
    except IncompatibleArtefact as exc:
        raise typer.BadParameter(
            f"the index at {index_root} does not fit the served model: {exc}. Build one for this model with "
            "`knnssd index build`.", param_hint="index_path"
        ) from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _say(msg: str) -> None:
    typer.echo(msg, err=True)


def _raise_interrupt(signum, frame):  # SIGTERM -> the same clean shutdown as Ctrl-C
    raise KeyboardInterrupt


def _stop_signals_interrupt() -> None:
    """SIGTERM and SIGINT both raise KeyboardInterrupt in the main thread (the clean shutdown path)."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # Ctrl-C must stop it even when started from a shell that ignores SIGINT for background jobs (a
    # non-interactive `cmd &`, nohup wrappers, CI runners): Python keeps an inherited SIG_IGN otherwise.
    signal.signal(signal.SIGINT, signal.default_int_handler)


REDIS_CHECK_S = 1.0  # how often `knnssd serve` checks that the Redis it started is still running


class OwnRedis:
    """The Redis `knnssd serve` started (None when it uses one that was already there): restarted on the
    same port and data directory if it dies, stopped with the service."""

    def __init__(self, url: str, proc, data_dir: Path | None) -> None:
        self.url, self.proc, self.data_dir = url, proc, data_dir
        self.restarts = 0

    def check(self) -> None:
        if self.proc is None or self.proc.poll() is None:
            return
        from router.redis_server import loopback_port, start_redis_server

        code = self.proc.returncode
        port = loopback_port(self.url)
        try:
            _, self.proc = start_redis_server(port=port, data_dir=self.data_dir)
        except RuntimeError as exc:  # e.g. the port was taken meanwhile: say so, try again next time
            _say(f"redis: the Redis started here exited (code {code}) and could not be restarted: {exc}")
            return
        self.restarts += 1
        kept = f", data from {self.data_dir}" if self.data_dir else ", nothing kept"
        _say(f"redis: the Redis started here exited (code {code}); restarted on port {port}{kept}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # redis-server flushes its append-only file on SIGTERM
            self.proc.wait(timeout=10)


def _ray_processes() -> set[str]:
    """Names of this process's descendants that are Ray's own (GCS, raylet, its agents, workers by role)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - Ray installs it
        return set()
    seen = set()
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                cmd = proc.cmdline()
                seen.add(cmd[0].split()[0] if cmd and cmd[0].startswith("ray::") else proc.name())
        except psutil.Error:
            pass
    return seen


# Processes of the local Ray that share our process group and exit at once on SIGTERM (Serve's workers live in
# groups of their own, so the controller and replicas are not among them).
GROUP_SIGNAL_WITNESSES = {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"}
SIGNAL_SPREAD_S = 1.0  # how long they take to go when the stop signal was sent to the whole group


def _ray_stops_by_itself(witnesses: set[str]) -> bool:
    """True when one of `witnesses` (Ray's processes seen running once the service was up) goes within
    SIGNAL_SPREAD_S: the stop signal reached the whole process group or cgroup (systemd's default KillMode),
    Ray is stopping by itself, and Serve's graceful shutdown would only wait 30 s for its controller."""
    if not witnesses:
        return False
    deadline = time.monotonic() + SIGNAL_SPREAD_S
    while witnesses <= _ray_processes():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def start_own_redis(url: str) -> OwnRedis:
    """The Redis at `url`, or one started here keeping its data under the cache directory."""
    from engine.load import cache_dir
    from router.redis_server import DataDirBusy, find_or_start_redis

    data_dir: Path | None = cache_dir() / "redis"
    try:
        found, proc = find_or_start_redis(url, data_dir=data_dir, same_port=True)
    except DataDirBusy as exc:
        _say(f"warning: {exc} (another `knnssd serve`?); this one starts a Redis that keeps nothing")
        data_dir = None
        found, proc = find_or_start_redis(url, same_port=True)
    return OwnRedis(found, proc, data_dir if proc is not None else None)


def serve(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="Service config YAML (services.config.AppConfig)."),
    host: Optional[str] = typer.Option(None, "--host", help="Address to bind (default: the config's, 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", min=1, max=65535, help="HTTP port (default: the config's, 8000)."),
    dev_key: str = typer.Option(
        os.environ.get("KNNSSD_DEV_KEY", DEV_KEY), "--dev-key", help="API key of the dev tenant (default $KNNSSD_DEV_KEY or sk-knnssd-dev)."
    ),
    no_dev_tenant: bool = typer.Option(False, "--no-dev-tenant", help="Do not create the dev tenant."),
    ray_address: str = typer.Option(
        "local", "--ray-address", help="Ray to run on: 'local' starts a private local instance; 'auto' or an address joins a cluster."
    ),
    device: Optional[str] = typer.Option(None, "--device", help="Model replicas' device: cpu, cuda, cuda:N or auto (default: the config's, auto)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16, float16 or auto (default: the config's, auto: fp32 on CPU, bf16 on GPU)."),
    precision: Optional[str] = typer.Option(
        None, "--precision", help="auto, reference, native or native-f32 (default: the config's, auto: native on a CPU for a GGUF model)."
    ),
    write_serve_config: bool = typer.Option(
        False, "--write-serve-config", help=f"Regenerate {SERVE_CONFIG_PATH.name} from the config defaults and exit."
    ),
) -> None:
    """Run the OpenAI-compatible service locally: Ray, Redis, the bundled model and the default index."""
    if write_serve_config:
        SERVE_CONFIG_PATH.write_text(render_serve_config())
        _say(f"wrote {SERVE_CONFIG_PATH}")
        return

    local = ray_address == "local"
    if local:
        from deploy.ray_local import local_ray_env

        os.environ.update(local_ray_env())
    else:  # joining a cluster: its own auth settings apply
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from services.config import AppConfig
    from services.routing import resolve_index_root
    from services.tenants import TenantStore

    cfg = AppConfig.load(config)
    if device or dtype or precision:  # validated again: a GPU device reserves a GPU for each replica
        cfg = cfg.with_engine(device, dtype, precision)
    if host or port:
        cfg = cfg.model_copy(update={"http": cfg.http.model_copy(update={k: v for k, v in (("host", host), ("port", port)) if v})})
    own = start_own_redis(cfg.redis_url)
    if own.proc is None:
        _say(f"redis: {own.url}")
    else:
        kept = f"data kept in {own.data_dir}" if own.data_dir else "keeps nothing"
        _say(f"redis: {own.url} (started here, {kept}; stops with the service)")
    cfg = cfg.model_copy(update={"redis_url": own.url})

    _stop_signals_interrupt()
    ray_started = False
    witnesses: set[str] = set()
    try:
        source = cfg.model_path or cfg.model
        _say(f"model: {source} (the first start converts the bundled GGUF once, ~30 s)")
        from engine.load import resolve_model_dir, weights_hash

        model_dir, _ = resolve_model_dir(source)  # fails fast on an unknown model; replicas then load in <1 s
        index_root = resolve_index_root(cfg)
        from router.reload import ModelSpec

        check_index(index_root, weights_hash(model_dir), ModelSpec.from_model_dir(model_dir))
        cfg = cfg.model_copy(update={"index_path": str(index_root)})

        if not no_dev_tenant:
            if dev_key == DEV_KEY and not _is_loopback(cfg.http.host):
                _say(f"warning: the dev tenant uses the documented key {DEV_KEY} on {cfg.http.host}; "
                     "pass --dev-key or --no-dev-tenant for anything reachable by others")
            client = cfg.redis_client()
            try:
                ensure_dev_tenant(TenantStore(client, prefix=cfg.redis_prefix), dev_key)
            finally:
                client.close()

        import ray
        from ray import serve

        from services.app import build_app

        t0 = time.perf_counter()
        env = {k: os.environ[k] for k in ("RAY_AUTH_MODE", "HF_HUB_OFFLINE", "KNNSSD_CACHE") if k in os.environ}
        from deploy.ray_local import HOOK, LOCAL_INIT

        runtime_env: dict = {"env_vars": env}
        if local:
            runtime_env["worker_process_setup_hook"] = HOOK
        ray.init(address=ray_address, runtime_env=runtime_env, log_to_driver=True,
                 **(LOCAL_INIT if local else {"include_dashboard": False}))
        ray_started = True
        _stop_signals_interrupt()  # ray.init replaced our SIGTERM handler with one that aborts the process
        serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
        _say("starting the app...")
        serve.run(build_app(cfg), name=cfg.serve.name, route_prefix=cfg.serve.route_prefix)

        shown_host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::") else cfg.http.host
        base = f"http://{shown_host}:{cfg.http.port}"
        key = dev_key if not no_dev_tenant else "$KNNSSD_API_KEY"
        _say("")
        _say(f"KNN-SSD serving is up in {time.perf_counter() - t0:.0f} s at {base}/v1 (model {cfg.model!r})")
        if not no_dev_tenant:
            _say(f"dev tenant {DEV_TENANT!r}, API key: {dev_key}")
        _say("try:")
        _say(f"  curl -s {base}/v1/completions -H 'Authorization: Bearer {key}' \\\n"
             "    -H 'Content-Type: application/json' \\\n"
             f"    -d '{{\"model\": \"{cfg.model}\", \"prompt\": \"Why is the sky blue?\", \"max_tokens\": 32, \"temperature\": 0}}'")
        _say("Ctrl-C stops it.")
        if local:
            witnesses = GROUP_SIGNAL_WITNESSES & _ray_processes()
        while True:
            time.sleep(REDIS_CHECK_S)
            own.check()
    except KeyboardInterrupt:
        _say("\nshutting down...")
    finally:
        # a second Ctrl-C or SIGTERM must not cut the shutdown short (a process manager's SIGKILL still does)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if ray_started:
            import ray

            from ray import serve

            try:
                if not (local and _ray_stops_by_itself(witnesses)):
                    serve.shutdown()  # graceful: requests in flight finish
            finally:
                ray.shutdown()
        own.stop()
        _say("stopped.")


if __name__ == "__main__":  # python -m deploy.serve_cmd
    typer.run(serve)
    sys.exit(0)
