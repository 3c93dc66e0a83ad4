"""Find a Redis that answers, or start a `redis-server` of our own and return its URL.

`knnssd serve`, `knnssd bench route` and the test suite rely on this, so a machine without a running
Redis still works as long as the `redis-server` binary exists. It sits on the router's floor so that
the router bench can use it without importing the services above it.

A Redis started with a `data_dir` keeps its data there in an append-only file (fsync once a second), so
a restart of that Redis, or of the service that started it, finds every key again (tenants, usage, rate
windows); one directory serves one Redis at a time (a lock file held by the redis-server process itself).
Without `data_dir` it keeps nothing (tests, benches).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import redis

LOCK_NAME = "redis.lock"


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping())
    except (redis.RedisError, OSError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class DataDirBusy(RuntimeError):
    """Another Redis already keeps its data in this directory."""


def _lock_data_dir(data_dir: Path) -> int:
    """An open, flock-ed descriptor on the directory's lock file; raises DataDirBusy when it is taken. The
    redis-server inherits it, so the lock lasts exactly as long as that Redis (even if its starter dies)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirBusy(f"another Redis keeps its data in {data_dir}") from None
    return fd


def start_redis_server(
    port: int | None = None, wait_s: float = 10.0, data_dir: str | os.PathLike[str] | None = None
) -> tuple[str, subprocess.Popen]:
    """Start `redis-server` on 127.0.0.1 and wait until it answers PING. The caller owns the process.

    With `data_dir`, the data lives there (append-only file, `appendfsync everysec`: a crash loses at most
    the last second of writes) and is loaded again by the next Redis started on it; without, nothing is
    kept."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("no Redis answers and `redis-server` is not installed (apt-get install redis-server)")
    port = port or free_port()
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    lock_fd = None
    if data_dir is None:
        args += ["--appendonly", "no"]
    else:
        path = Path(data_dir).expanduser().resolve()
        lock_fd = _lock_data_dir(path)
        os.chmod(path, 0o700)  # tenants' key hashes and usage: this user's only
        args += ["--dir", str(path), "--appendonly", "yes", "--appendfsync", "everysec"]
    try:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                pass_fds=() if lock_fd is None else (lock_fd,))
    finally:
        if lock_fd is not None:
            os.close(lock_fd)  # the child holds the lock now
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if redis_answers(url):
            return url, proc
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"redis-server on port {port} did not answer within {wait_s}s")


def loopback_port(url: str) -> int | None:
    """The port of a redis:// URL on this machine's loopback, else None."""
    u = urlparse(url)
    if u.scheme != "redis" or u.hostname not in ("127.0.0.1", "localhost", "::1") or u.password:
        return None
    return u.port or 6379


def find_or_start_redis(
    url: str = "redis://127.0.0.1:6379/0", data_dir: str | os.PathLike[str] | None = None, same_port: bool = False
) -> tuple[str, subprocess.Popen | None]:
    """Return (url, process): the given Redis if it answers (process None), else one started here. With
    `same_port`, the new Redis takes the URL's own port when the URL is on loopback and that port is free
    (so other commands find it at the same URL), else a free one. `data_dir`: see `start_redis_server`."""
    if redis_answers(url):
        return url, None
    port = loopback_port(url) if same_port else None
    if port is None or not port_is_free(port):
        return start_redis_server(data_dir=data_dir)
    _, proc = start_redis_server(port=port, data_dir=data_dir)
    return url, proc  # the URL as given (its database number included) now answers
