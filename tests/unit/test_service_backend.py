"""The gateway/model seam: payloads survive pickling (they cross Ray processes) and check themselves."""

from __future__ import annotations

import pickle

import pytest

from engine.config import SamplingParams
from services.backend import BackendChunk, BackendRequest, RouteInfo, Usage, normalize_finish_reason


def test_payloads_pickle():
    req = BackendRequest(request_id="r1", tenant="t", model="m", sampling=SamplingParams(max_new_tokens=3, seed=1),
                         messages=[{"role": "user", "content": "hi"}], speculative=False, index_version="v2")
    assert pickle.loads(pickle.dumps(req)) == req
    chunk = BackendChunk(text="x", tokens=1, finish_reason="stop", usage=Usage(2, 1),
                         route=RouteInfo(domain="code", config_id="c", index_version=4), stats={"drafted": 1})
    back = pickle.loads(pickle.dumps(chunk))
    assert back == chunk and back.is_last and back.route.index_version == "4" and back.usage.total_tokens == 3


def test_request_needs_exactly_one_input():
    sp = SamplingParams()
    with pytest.raises(ValueError):
        BackendRequest(request_id="r", tenant="t", model="m", sampling=sp)
    with pytest.raises(ValueError):
        BackendRequest(request_id="r", tenant="t", model="m", sampling=sp, prompt="a", messages=[])


def test_finish_reasons():
    # the engine emits "stop" and "length" (OpenAI's own); a stream that ended without its last chunk is "stop"
    assert [normalize_finish_reason(r) for r in ("stop", None, "length")] == ["stop", "stop", "length"]
