"""Issue 22, finding 6: the Redis that `knnssd serve` starts keeps its data under the cache directory, so
tenants added with the real `knnssd tenants add` and their usage survive a restart of that Redis (a clean
stop, a kill -9, and the restart `knnssd serve` makes by itself when its Redis dies). Real redis-server
processes; no Ray (the whole `knnssd serve` with its own Redis is tests/integration/test_serve_sigterm.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import redis
from typer.testing import CliRunner

from deploy.serve_cmd import start_own_redis
from deploy.tenants_cli import tenants_app
from router.redis_server import DataDirBusy, free_port, redis_answers, start_redis_server
from services.tenants import TenantStore
from services.usage import UsageStore

PREFIX = "knnssd:"


def add_tenant(url: str, name: str) -> str:
    """`knnssd tenants add NAME --redis-url URL`, as an operator runs it; returns the printed key."""
    res = CliRunner().invoke(tenants_app, ["add", name, "--redis-url", url, "--rpm", "7"])
    assert res.exit_code == 0, res.output
    return res.stdout.strip().splitlines()[-1]


def stop(proc: subprocess.Popen, sig: int) -> None:
    proc.send_signal(sig)
    proc.wait(timeout=10)


def tenant_and_usage(url: str, key: str) -> tuple[str | None, int]:
    client = redis.Redis.from_url(url)
    try:
        tenant = TenantStore(client, prefix=PREFIX, cache_s=0).authenticate(key)
        used = UsageStore(client, PREFIX).get(tenant.id).total.total_tokens if tenant else 0
        return (tenant.name if tenant else None), used
    finally:
        client.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_tenants_and_usage_survive_a_restart_of_a_redis_with_a_data_dir(tmp_path, sig):
    data = tmp_path / "redis"
    url, proc = start_redis_server(data_dir=data)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    proc2 = None
    try:
        key = add_tenant(url, "alice")
        client = redis.Redis.from_url(url)
        tenant = TenantStore(client, prefix=PREFIX).authenticate(key)
        assert UsageStore(client, PREFIX).record(tenant.id, 11, 31)
        client.close()
        assert tenant_and_usage(url, key) == ("alice", 42)
        stop(proc, sig)  # a reply means the write reached the kernel: even kill -9 loses nothing
        assert not redis_answers(url)
        url2, proc2 = start_redis_server(port=port, data_dir=data)
        assert url2 == url
        assert tenant_and_usage(url, key) == ("alice", 42)
        assert list(data.glob("appendonlydir/*.aof")), sorted(p.name for p in data.rglob("*"))
    finally:
        for p in (proc, proc2):
            if p is not None and p.poll() is None:
                stop(p, signal.SIGTERM)


def test_without_a_data_dir_nothing_is_kept(tmp_path):
    """The contrast (and what tests and benches still get): a restart starts empty."""
    url, proc = start_redis_server()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    proc2 = None
    try:
        key = add_tenant(url, "bob")
        stop(proc, signal.SIGTERM)
        _, proc2 = start_redis_server(port=port)
        assert tenant_and_usage(url, key) == (None, 0)
    finally:
        for p in (proc, proc2):
            if p is not None and p.poll() is None:
                stop(p, signal.SIGTERM)


def test_one_data_dir_serves_one_redis_at_a_time(tmp_path):
    url, proc = start_redis_server(data_dir=tmp_path)
    try:
        with pytest.raises(DataDirBusy):
            start_redis_server(data_dir=tmp_path)
    finally:
        stop(proc, signal.SIGTERM)
    _, proc = start_redis_server(data_dir=tmp_path)  # free again once that Redis is gone
    stop(proc, signal.SIGTERM)


def test_knnssd_serve_restarts_its_own_redis_with_its_data(tmp_path, monkeypatch):
    """`knnssd serve`'s Redis: on the configured loopback port, data under $KNNSSD_CACHE/redis, and started
    again (same port, same data) when it dies; a Redis that was already there is used as it is."""
    monkeypatch.setenv("KNNSSD_CACHE", str(tmp_path))
    port = free_port()
    own = start_own_redis(f"redis://127.0.0.1:{port}/0")
    try:
        assert own.proc is not None and own.url == f"redis://127.0.0.1:{port}/0"
        assert own.data_dir == tmp_path / "redis"
        key = add_tenant(own.url, "carol")
        own.check()  # alive: nothing to do
        first = own.proc
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=10)
        own.check()
        assert own.proc is not first and own.restarts == 1 and redis_answers(own.url)
        assert tenant_and_usage(own.url, key) == ("carol", 0)

        found = start_own_redis(own.url)  # a second serve finds this Redis answering: uses it, starts nothing
        assert found.proc is None and found.url == own.url
    finally:
        own.stop()
    deadline = time.monotonic() + 5
    while redis_answers(own.url):
        assert time.monotonic() < deadline, "the Redis started here outlived stop()"
        time.sleep(0.05)
