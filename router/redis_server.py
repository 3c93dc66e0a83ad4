"""Find a Redis that answers, or start a throwaway `redis-server` (no persistence) and return its URL.

`knnssd serve`, `knnssd bench route` and the test suite rely on this, so a machine without a running
Redis still works as long as the `redis-server` binary exists. It sits on the router's floor so that
the router bench can use it without importing the services above it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import redis


def redis_answers(url: str, timeout: float = 0.5) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout).ping())
    except (redis.RedisError, OSError):
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis_server(port: int | None = None, wait_s: float = 10.0) -> tuple[str, subprocess.Popen]:
    """Start `redis-server` on 127.0.0.1 and wait until it answers PING. The caller owns the process."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("no Redis answers and `redis-server` is not installed (apt-get install redis-server)")
    port = port or free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if redis_answers(url):
            return url, proc
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server on port {port} did not answer within {wait_s}s")


def find_or_start_redis(url: str = "redis://127.0.0.1:6379/0") -> tuple[str, subprocess.Popen | None]:
    """Return (url, process): the given Redis if it answers (process None), else one started here."""
    if redis_answers(url):
        return url, None
    return start_redis_server()
