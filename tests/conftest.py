"""Shared fixtures: a real Redis (found or started), the real bundled model loaded once per session."""

from __future__ import annotations

import os
import uuid

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def redis_url():
    from router.redis_server import find_or_start_redis

    url, proc = find_or_start_redis(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    yield url
    if proc is not None:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def redis_prefix(redis_url):
    """A key prefix unique to one test; every key under it is deleted afterwards."""
    import redis

    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    yield prefix
    r = redis.Redis.from_url(redis_url)
    keys = list(r.scan_iter(match=prefix + "*"))
    if keys:
        r.delete(*keys)


@pytest.fixture(scope="session")
def smollm2():
    """The real bundled SmolLM2-135M, loaded once (converted to the safetensors cache on first use)."""
    import torch

    from engine.generate import Engine

    torch.set_num_threads(2)
    return Engine.load("smollm2", max_seq_len=1024)


# Every precision the engine's full (verify) pass offers. The bit-exactness tests run at each
# (tests/integration/test_engine_exact_real.py): a new precision is one more name here and its load in
# `engine_at_precision`.
ENGINE_PRECISIONS = ("reference",)


@pytest.fixture(scope="session", params=ENGINE_PRECISIONS)
def engine_at_precision(request, smollm2):
    """The real SmolLM2 at each precision of ENGINE_PRECISIONS ('reference': fp32, oneDNN-packed on the CPU)."""
    if request.param == "reference":
        return smollm2
    raise NotImplementedError(f"no loader for precision {request.param!r}")
