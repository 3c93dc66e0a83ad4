"""Issue 22, findings 1 and 6 on a real `knnssd serve` process: with no Redis at its URL it starts its own,
keeping its data under the cache directory; a tenant added with `knnssd tenants add` survives a kill -9 of
that Redis (serve restarts it on the same port with the same data); and SIGTERM, what `docker stop`, systemd
and process managers send, is a clean stop: "shutting down", exit code 0, no process of its own left (Ray's
agents and the Redis included) and every port it listened on closed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis
import yaml

from router.redis_server import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
KNNSSD = str(Path(sys.executable).parent / "knnssd")


def wait_for_output(path: Path, needle: str, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while needle not in (text := path.read_text()):
        assert proc.poll() is None and time.monotonic() < deadline, f"no {needle!r} in:\n{text[-3000:]}"
        time.sleep(0.3)
    return text


def family(pid: int) -> dict[int, str]:
    """pid -> name of the process and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    return {p.pid: p.name() for p in [root, *root.children(recursive=True)]}


def listening(pids) -> set[tuple[str, int]]:
    import psutil

    return {(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.pid in pids}


def alive(pids) -> dict[int, str]:
    import psutil

    out = {}
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                out[pid] = " ".join(p.cmdline())[:120] or p.name()
        except psutil.NoSuchProcess:
            pass
    return out


def accepts(ip: str, port: int) -> bool:
    host = "127.0.0.1" if ip in ("0.0.0.0", "") else "::1" if ip == "::" else ip
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def assert_all_gone(seen: dict[int, str], ports: set[tuple[str, int]], wait_s: float = 15.0) -> None:
    """After a SIGTERM: every process of `seen` exits within `wait_s` and none of `ports` accepts any more."""
    deadline = time.monotonic() + wait_s
    while (left := alive(seen)) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not left, f"still running after SIGTERM: {left}"
    assert not [p for p in ports if accepts(*p)], "ports still open"


def kill_leftovers(proc: subprocess.Popen, seen: dict[int, str]) -> None:
    """Never leave strays behind for the rest of the suite: the serve process group, then what is left of `seen`."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid in alive(seen):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigterm_stops_knnssd_serve_cleanly_and_its_redis_keeps_tenants(tmp_path):
    from engine.load import cache_dir, resolve_model_dir
    from services.tenants import TenantStore

    resolve_model_dir("smollm2")  # converted once into the shared cache, which the run below reuses
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "models").symlink_to(cache_dir() / "models", target_is_directory=True)
    redis_port, api_port = free_port(), free_port()
    url = f"redis://127.0.0.1:{redis_port}/0"  # nothing answers there: serve starts its own Redis on it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"redis_url": url}))
    env = {**os.environ, "KNNSSD_CACHE": str(cache)}
    env.pop("KNNSSD_DEV_KEY", None)
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([KNNSSD, "serve", "--config", str(tmp_path / "config.yaml"), "--port", str(api_port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, str] = {}
    try:
        text = wait_for_output(log, "Ctrl-C stops it", proc, 300)
        assert f"redis: {url} (started here, data kept in {cache / 'redis'}" in text, text[-3000:]
        assert "Content-Type: application/json" in text  # the curl line it prints works on a strict server

        # a tenant added by the operator's command, used over HTTP
        added = subprocess.run([KNNSSD, "tenants", "add", "alice", "--redis-url", url], capture_output=True,
                               text=True, env=env, timeout=60)
        assert added.returncode == 0, added.stderr
        key = added.stdout.strip().splitlines()[-1]
        body = {"model": "smollm2", "prompt": "Say yes.", "max_tokens": 2}
        api = f"http://127.0.0.1:{api_port}/v1/completions"
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.post(api, json=body, headers=headers, timeout=120).status_code == 200

        # its Redis dies: serve starts it again on the same port, with the same data
        redis_pid = next(pid for pid, name in family(proc.pid).items() if name.startswith("redis-server"))
        os.kill(redis_pid, signal.SIGKILL)
        wait_for_output(log, f"restarted on port {redis_port}", proc, 30)
        client = redis.Redis.from_url(url)
        tenant = TenantStore(client, prefix="knnssd:", cache_s=0).authenticate(key)
        client.close()
        assert tenant is not None and tenant.name == "alice"
        assert httpx.post(api, json=body, headers=headers, timeout=120).status_code == 200

        # SIGTERM, to the serve process alone (as `kill -TERM $P`, docker stop and systemd send it)
        seen = family(proc.pid)
        names = set(seen.values())
        assert "raylet" in names and "gcs_server" in names and any(n.startswith("redis-server") for n in names)
        ports = listening(seen)
        assert any(p == api_port for _, p in ports) and any(p == redis_port for _, p in ports), ports
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        took = time.monotonic() - t0
        out = log.read_text()
        tail = out[out.rindex("Ctrl-C stops it"):]
        assert code == 0, tail[-3000:]
        assert "shutting down" in tail and "stopped." in tail and "SIGTERM received" not in tail, tail[-3000:]
        assert_all_gone(seen, ports)
        print(f"\nSIGTERM: stopped in {took:.1f} s, {len(seen)} processes and {len(ports)} ports gone")
    finally:
        kill_leftovers(proc, seen)


def test_sigterm_to_the_whole_process_group_stops_it_cleanly_too(tmp_path, redis_url):
    """systemd's default (KillMode=control-group) signals every process of the service at once: Ray's own
    processes stop by themselves, so `knnssd serve` does not wait for Serve's controller (it would only
    time out after 30 s), and still stops everything with exit code 0."""
    import uuid

    api_port = free_port()
    prefix = f"test:{uuid.uuid4().hex[:10]}:knnssd:"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"redis_url": redis_url, "redis_prefix": prefix}))
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([KNNSSD, "serve", "--config", str(tmp_path / "config.yaml"), "--port", str(api_port)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, str] = {}
    try:
        wait_for_output(log, "Ctrl-C stops it", proc, 300)
        seen = family(proc.pid)
        ports = listening(seen)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=120)
        took = time.monotonic() - t0
        tail = log.read_text().split("Ctrl-C stops it", 1)[1]
        assert code == 0 and "stopped." in tail and "SIGTERM received" not in tail, tail[-3000:]
        assert_all_gone(seen, ports)
        print(f"\nSIGTERM to the group: stopped in {took:.1f} s")
        assert took < 25  # not Serve's 30 s controller timeout on top
    finally:
        kill_leftovers(proc, seen)
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=prefix[: -len("knnssd:")] + "*"))
        if keys:
            client.delete(*keys)
        client.close()
