"""The real Serve application end to end: local Ray, a real Redis, the bundled SmolLM2 and a small real index
(MiniLM centroids of the default corpus), driven over HTTP with httpx and the unchanged `openai` client.

One app per module (starting Ray and loading the model is the expensive part); requests stay short.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from engine.config import DraftConfig
from services.config import AppConfig, DeploymentSettings, DeploymentsConfig, GenerationConfig, HttpConfig, LimitsConfig
from router.redis_server import free_port
from tests.serve_app import stop_serve_app
from services.keys import router_key_prefix
from tests.timing import Window, with_growing_window

pytestmark = pytest.mark.slow

MODEL = "smollm2"
ROOT = Path(__file__).resolve().parents[2]
CODE_PROMPT = "Write a Python function that returns the n-th Fibonacci number using iteration."
WINDOW_S = 3.0
MAX_TOKENS_CAP = 256
BODY_LIMIT = 200_000
# Draft configs per domain for the test index (lossless whatever they are; they only change speed).
CONFIGS = {
    "code": DraftConfig(skip_mlp=(22, 24, 26, 27), max_draft=4),
    "math": DraftConfig(skip_mlp=(24, 26), max_draft=3),
}
DEFAULT_CFG = DraftConfig(skip_mlp=(26, 27), max_draft=4)


def served_weights_hash() -> str:
    """The bundled model's weights hash: the router refuses index versions built for other weights."""
    from engine.load import resolve_model_dir, weights_hash

    return weights_hash(resolve_model_dir(MODEL)[0])


def served_precision() -> str:
    """The precision the default app's replicas run (native on a CPU): the router refuses index versions
    measured at another precision, so the test artefacts say this one."""
    return AppConfig().served_precision()


def write_index(root: Path, embedder, configs: dict[str, DraftConfig], per_domain: int = 8) -> str:
    """A real artefact: MiniLM centroids of the first prompts of each default-corpus domain."""
    from index.artefact import DomainEntry, IndexManifest, new_version, now_iso, write_artefact
    from index.centroids import build_index
    from index.corpus import load_corpus

    corpus = load_corpus(ROOT / "index" / "data" / "default")
    vectors = {name: embedder.embed([r.text for r in recs[:per_domain]]) for name, recs in corpus.domains.items()}
    index, labels = build_index(vectors, k=2)
    return write_manifest(root, index, labels, embedder.id, embedder.dim, corpus.hash, configs)


def write_manifest(root, index, labels, embedder_id, dim, corpus_hash, configs, *, model_hash=None,
                   fallback=None) -> str:
    from index.artefact import DomainEntry, IndexManifest, new_version, now_iso, write_artefact

    domains = {
        name: DomainEntry(name=name, config=configs.get(name, DEFAULT_CFG), speedup=1.0, acceptance=0.5,
                          mean_accepted_tokens=1.5, n_prompts=8, n_centroids=labels.count(name))
        for name in sorted(set(labels))
    }
    manifest = IndexManifest(
        version=new_version(), created_at=now_iso(), model_id=MODEL, model_hash=model_hash or served_weights_hash(),
        embedder_id=embedder_id, embedder_dim=dim, representation="minilm", corpus_hash=corpus_hash,
        distance_threshold=0.1, fallback_config=fallback or DraftConfig.plain(), domains=domains,
        precision=served_precision(),
    )
    write_artefact(root, manifest, index, labels)
    return manifest.version


@pytest.fixture(scope="module")
def service(redis_url, tmp_path_factory):
    import ray
    import redis
    from ray import serve

    from index.embed import MiniLMEmbedder
    from services.app import build_app
    from services.tenants import TenantStore

    prefix = f"test:{uuid.uuid4().hex[:10]}:knnssd:"
    index_root = tmp_path_factory.mktemp("index")
    version = write_index(index_root, MiniLMEmbedder(progress=False), CONFIGS)
    port = free_port()
    config = AppConfig(
        redis_url=redis_url,
        redis_prefix=prefix,
        index_path=str(index_root),
        http=HttpConfig(port=port, max_body_bytes=BODY_LIMIT),
        limits=LimitsConfig(window_s=WINDOW_S, default_max_prompt_tokens=0),  # the model's context is the limit
        generation=GenerationConfig(default_max_tokens=16, max_tokens_limit=MAX_TOKENS_CAP),
        deployments=DeploymentsConfig(
            replica=DeploymentSettings(name="ModelReplica", max_ongoing_requests=2, max_queued_requests=1),
        ),
    )
    client = redis.Redis.from_url(redis_url)
    store = TenantStore(client, prefix=prefix)
    _, key = store.add("main", rpm=0, tpm=0)
    _, tight_key = store.add("tight", rpm=1, tpm=0)
    _, admin_key = store.add("ops", admin=True)  # /metrics needs an admin tenant's key

    env = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "HF_HUB_OFFLINE": "1"}
    ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name="knnssd-test", route_prefix="/")
        yield {
            "url": f"http://127.0.0.1:{port}", "key": key, "tight_key": tight_key, "admin_key": admin_key,
            "config": config,
            "index_root": index_root, "version": version, "redis_url": redis_url, "prefix": prefix,
        }
    finally:
        stop_serve_app(client, prefix)


@pytest.fixture(scope="module")
def http(service):
    with httpx.Client(base_url=service["url"], headers={"Authorization": f"Bearer {service['key']}"},
                      timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def oa(service):
    return openai.OpenAI(base_url=service["url"] + "/v1", api_key=service["key"], max_retries=0, timeout=120)


def complete(http, prompt=CODE_PROMPT, **kw):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, **kw}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r


def sse_events(lines) -> list[str]:
    return [line[len("data: "):] for line in lines if line.startswith("data: ")]


# ---------------------------------------------------------------- the happy paths


def test_health_models_and_auth(service, http):
    r = httpx.get(service["url"] + "/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = http.get("/v1/models")
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [MODEL]
    for headers in ({}, {"Authorization": "Bearer sk-knnssd-wrong"}, {"Authorization": f"Basic {service['key']}"}):
        r = httpx.post(service["url"] + "/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers=headers,
                       timeout=30)
        assert r.status_code == 401, (headers, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=service["url"] + "/v1", api_key="sk-nope", max_retries=0).models.list()


def test_completion_with_the_openai_client(service, oa):
    raw = oa.completions.with_raw_response.create(model=MODEL, prompt=CODE_PROMPT, max_tokens=12, temperature=0)
    resp = raw.parse()
    assert resp.choices[0].text.strip() and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 5 and 1 <= resp.usage.completion_tokens <= 12
    info = resp.model_extra["knnssd"]
    assert info["domain"] == "code" and info["config_id"] == CONFIGS["code"].config_id
    assert info["index_version"] == service["version"] and info["speculative"] is True
    assert info["stats"]["drafted"] > 0 and 0 <= info["acceptance_rate"] <= 1
    assert raw.headers["x-knnssd-domain"] == "code"
    assert raw.headers["x-knnssd-config-id"] == CONFIGS["code"].config_id
    assert float(raw.headers["x-knnssd-acceptance"]) == pytest.approx(info["acceptance_rate"], abs=1e-3)


def test_chat_with_the_openai_client(oa):
    resp = oa.chat.completions.create(
        model=MODEL, max_tokens=12, temperature=0,
        messages=[{"role": "system", "content": "You are brief."},
                  {"role": "user", "content": "A train travels 60 km in 1.5 hours. What is its average speed?"}],
    )
    msg = resp.choices[0].message
    assert msg.role == "assistant" and msg.content.strip()
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.model_extra["knnssd"]["domain"] == "math"


def test_streaming_matches_the_plain_response_and_ends_with_usage_and_done(http, oa):
    body = {"model": MODEL, "prompt": CODE_PROMPT, "max_tokens": 16, "temperature": 0}
    whole = complete(http, **{k: v for k, v in body.items() if k not in ("model", "prompt")}).json()
    with http.stream("POST", "/v1/completions",
                     json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-knnssd-domain"] == "code"
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1] if c["choices"])
    assert text == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]

    # the openai client's own streaming, chat flavour
    stream = oa.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                        max_tokens=8, temperature=0, stream=True,
                                        stream_options={"include_usage": True})
    parts, last = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        last = chunk
    assert "".join(parts).strip() and last.usage is not None and last.usage.completion_tokens >= 1


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_speculative_on_and_off_give_identical_greedy_text(oa, endpoint):
    def run(spec: bool):
        kw = dict(model=MODEL, max_tokens=16, temperature=0, extra_body={"speculative": spec})
        if endpoint == "completions":
            r = oa.completions.create(prompt=CODE_PROMPT, **kw)
            return r.choices[0].text, r.model_extra["knnssd"]
        r = oa.chat.completions.create(messages=[{"role": "user", "content": CODE_PROMPT}], **kw)
        return r.choices[0].message.content, r.model_extra["knnssd"]

    spec_text, spec_info = run(True)
    plain_text, plain_info = run(False)
    assert spec_text == plain_text and spec_text.strip()
    assert spec_info["speculative"] is True and spec_info["stats"]["drafted"] > 0
    assert plain_info["speculative"] is False and plain_info["config_id"] == "plain"
    assert plain_info["stats"]["drafted"] == 0


def test_seeded_sampling_is_reproducible(oa):
    kw = dict(model=MODEL, prompt="Tell me a story about a cat.", max_tokens=8, temperature=0.8, top_p=0.95,
              seed=7, extra_body={"top_k": 40})
    a, b = oa.completions.create(**kw), oa.completions.create(**kw)
    assert a.choices[0].text == b.choices[0].text and a.choices[0].text.strip()


# ---------------------------------------------------------------- limits and errors


def test_rate_limit_then_recovery(service):
    """rpm=1 in the app's WINDOW_S window: the second request inside it is refused, and after Retry-After
    one is admitted again. The window is the running app's, so a run whose two requests took longer than
    the window (a machine too busy to tell) is repeated with a fresh tenant, never failed."""
    import redis

    from services.tenants import TenantStore

    url = service["url"] + "/v1/completions"
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1, "temperature": 0}
    keys = iter([service["tight_key"]])

    def scenario(window_s: float) -> None:
        key = next(keys, None)
        if key is None:  # a later attempt: a tenant of its own, with an empty window
            client = redis.Redis.from_url(service["redis_url"])
            key = TenantStore(client, prefix=service["prefix"]).add(f"tight-{uuid.uuid4().hex[:6]}", rpm=1, tpm=0)[1]
            client.close()
        headers = {"Authorization": f"Bearer {key}"}
        w = Window(window_s)
        assert httpx.post(url, json=body, headers=headers, timeout=60).status_code == 200
        r = httpx.post(url, json=body, headers=headers, timeout=60)
        w.expect(r.status_code == 429, r.text)
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert r.headers["x-ratelimit-limit-requests"] == "1" and r.headers["x-ratelimit-remaining-requests"] == "0"
        retry = float(r.headers["retry-after"])
        assert 0 < retry <= window_s + 1
        time.sleep(retry + 0.2)
        assert httpx.post(url, json=body, headers=headers, timeout=60).status_code == 200

    with_growing_window(scenario, (WINDOW_S,) * 3)


TOO_LONG = "hello " * 9000  # > 8192 tokens: refused by the replica's engine, not by the gateway
BAD_INPUTS = [
    # (description, path, body (dict, or raw str), status, code)
    ("malformed JSON", "/v1/completions", '{"model": "smollm2", "prompt": ', 400, "invalid_json"),
    ("empty body", "/v1/completions", "", 400, "invalid_json"),
    ("body not an object", "/v1/completions", "[1, 2]", 400, None),
    ("missing model", "/v1/completions", {"prompt": "x"}, 400, "missing_required_parameter"),
    ("missing prompt", "/v1/completions", {"model": MODEL}, 400, "missing_required_parameter"),
    ("prompt wrong type", "/v1/completions", {"model": MODEL, "prompt": 5}, 400, "invalid_value"),
    ("empty prompt", "/v1/completions", {"model": MODEL, "prompt": ""}, 400, "invalid_value"),
    ("max_tokens zero", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "invalid_value"),
    ("max_tokens as string", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "ten"}, 400,
     "invalid_value"),
    ("max_tokens above cap", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": MAX_TOKENS_CAP + 1},
     400, "invalid_value"),
    ("temperature > 2", "/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 3}, 400, "invalid_value"),
    ("top_p zero", "/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "invalid_value"),
    ("top_k negative", "/v1/completions", {"model": MODEL, "prompt": "x", "top_k": -1}, 400, "invalid_value"),
    ("n > 1", "/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "unsupported_parameter"),
    ("five stop strings", "/v1/completions", {"model": MODEL, "prompt": "x", "stop": list("abcde")}, 400,
     "invalid_value"),
    ("stream_options without stream", "/v1/completions",
     {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "invalid_value"),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, 404, "model_not_found"),
    ("body too large", "/v1/completions", {"model": MODEL, "prompt": "x" * (BODY_LIMIT + 10)}, 413,
     "payload_too_large"),
    ("prompt longer than the context", "/v1/completions", {"model": MODEL, "prompt": TOO_LONG}, 400,
     "context_length_exceeded"),
    ("streamed prompt longer than the context", "/v1/completions",
     {"model": MODEL, "prompt": TOO_LONG, "stream": True}, 400, "context_length_exceeded"),
    ("chat: no messages", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "invalid_value"),
    ("chat: unknown role", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
     400, "invalid_value"),
    ("chat: tools", "/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400,
     "unsupported_parameter"),
]


def test_bad_inputs_each_get_their_status_and_the_service_keeps_serving(http):
    assert len(BAD_INPUTS) >= 15
    good = {"model": MODEL, "prompt": "Say yes.", "max_tokens": 1, "temperature": 0}
    for desc, path, body, status, code in BAD_INPUTS:
        if isinstance(body, str):
            r = http.post(path, content=body, headers={"content-type": "application/json"})
        else:
            r = http.post(path, json=body)
        assert r.status_code == status, (desc, r.status_code, r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], (desc, err)
        if code is not None:
            assert err["code"] == code, (desc, err)
        ok = http.post("/v1/completions", json=good)
        assert ok.status_code == 200, (desc, ok.text)
    assert http.get("/v1/completions").status_code == 405
    assert http.get("/v1/nope").status_code == 404


def test_no_free_replica_is_a_503_and_the_service_recovers(service, http):
    """Replica: at most 2 ongoing (decoded together) and 1 queued at the gateway's handle. A long stream
    holds one; a burst of 8 more at once overflows the rest, and the overflow is refused with 503 at once
    rather than queued without bound."""
    url = service["url"] + "/v1/completions"
    headers = {"Authorization": f"Bearer {service['key']}"}
    long_body = {"model": MODEL, "prompt": "Count from 1 to 500, separated by commas.", "max_tokens": 200, "temperature": 0, "stream": True}
    statuses: list[int] = []
    burst = threading.Barrier(8)

    def short():
        burst.wait()
        r = httpx.post(url, json={"model": MODEL, "prompt": "Hi.", "max_tokens": 8, "temperature": 0},
                       headers=headers, timeout=120)
        statuses.append(r.status_code)
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "service_unavailable" and int(r.headers["retry-after"]) >= 1

    with httpx.stream("POST", url, json=long_body, headers=headers, timeout=120) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # decoding has started
        threads = [threading.Thread(target=short) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert 503 in statuses and statuses.count(200) >= 1, statuses
    complete(http, max_tokens=2)


# ---------------------------------------------------------------- index hot reload, metrics


def test_new_index_version_reaches_the_router_without_restart(service, http):
    from index.artefact import load_artefact
    from index.publish import publish_version

    old = load_artefact(service["index_root"])
    new_cfg = {"code": DraftConfig(skip_mlp=(25, 27), max_draft=2)}
    url, headers = service["url"] + "/v1/completions", {"Authorization": f"Bearer {service['key']}"}
    body = {"model": MODEL, "prompt": CODE_PROMPT, "max_tokens": 16, "temperature": 0, "stream": True}
    with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as r:  # in flight across the swap
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        version = write_manifest(service["index_root"], old.index, old.labels, old.manifest.embedder_id,
                                 old.manifest.embedder_dim, old.manifest.corpus_hash, new_cfg)
        publish_version(service["redis_url"], version, service["index_root"] / "versions" / version,
                        prefix=router_key_prefix(service["prefix"]))
        events = sse_events([*lines])
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert final["knnssd"]["index_version"] == service["version"] and final["choices"][0]["finish_reason"]

    deadline = time.monotonic() + 20
    while True:
        info = complete(http, max_tokens=1).json()["knnssd"]
        if info["index_version"] == version:
            break
        assert time.monotonic() < deadline, f"router still on {info['index_version']}"
        time.sleep(0.3)
    assert info["config_id"] == new_cfg["code"].config_id


def test_metrics_carry_speculative_routing_and_http_counters(service, http):
    complete(http, max_tokens=4)
    r = http.get("/metrics", headers={"Authorization": f"Bearer {service['admin_key']}"})
    assert r.status_code == 200
    text = r.text
    for name in ("knnssd_spec_decode_drafts_total", "knnssd_spec_decode_draft_tokens_total",
                 "knnssd_spec_decode_accepted_tokens_total", "knnssd_route_decisions_total",
                 "knnssd_http_requests_total", "knnssd_time_to_first_token_seconds_bucket",
                 "knnssd_replica_queue_depth"):
        assert name in text, name
    drafted = [line for line in text.splitlines()
               if line.startswith("knnssd_spec_decode_draft_tokens_total{") and 'domain="code"' in line]
    assert drafted and float(drafted[0].rsplit(" ", 1)[1]) > 0
    assert 'status="401"' in text and 'status="429"' in text

    usage = http.get("/v1/usage").json()  # the caller's own counters, kept in Redis
    assert usage["tenant"] == "main" and usage["total"]["requests"] >= 10
    assert usage["total"]["completion_tokens"] > 0
