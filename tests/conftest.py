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
    """The real bundled SmolLM2-135M at the default precision (native on a CPU: its own GGUF blocks),
    loaded once (converted to the safetensors cache and packed on first use)."""
    import torch

    from engine.generate import Engine

    torch.set_num_threads(2)
    return Engine.load("smollm2", max_seq_len=1024)


@pytest.fixture(scope="session")
def smollm2_ref():
    """The same model at the `reference` precision (fp32 on the dequantised weights): what is compared with
    transformers and llama.cpp F32."""
    import torch

    from engine.generate import Engine

    torch.set_num_threads(2)
    return Engine.load("smollm2", max_seq_len=1024, precision="reference")


# Every precision the engine's full (verify) pass offers. The bit-exactness tests run at each
# (tests/integration/test_engine_exact_real.py): a new precision is one more name here.
ENGINE_PRECISIONS = ("reference", "native", "native-f32")


@pytest.fixture(scope="session", params=ENGINE_PRECISIONS)
def engine_at_precision(request, smollm2, smollm2_ref):
    """The real SmolLM2 at each precision of ENGINE_PRECISIONS."""
    if request.param == "reference":
        return smollm2_ref
    if request.param == smollm2.precision:
        return smollm2
    import torch

    from engine.generate import Engine

    torch.set_num_threads(2)
    return Engine.load("smollm2", max_seq_len=1024, precision=request.param)
