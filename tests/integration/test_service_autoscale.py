"""Autoscaling for real on this machine: the Serve app with ModelReplica autoscaling between 1 and 2
replicas (one CPU each: the same `autoscaling_config` the Kubernetes manifests render), driven by load
until Serve adds the second replica, which then serves requests; none fails while it starts; idle, it
scales back to one."""

from __future__ import annotations

import os
import threading
import time
import uuid

import httpx
import pytest

from services.config import AppConfig, AutoscalingSettings, DeploymentSettings, DeploymentsConfig, GenerationConfig
from services.config import HttpConfig, LimitsConfig, RayActorOptions
from router.redis_server import free_port
from tests.serve_app import stop_serve_app

pytestmark = pytest.mark.slow

APP = "knnssd-autoscale"


def _replicas(serve) -> dict[str, int]:
    st = serve.status().applications[APP].deployments["ModelReplica"]
    return {str(k): v for k, v in st.replica_states.items()}


def test_replicas_scale_up_under_load_serve_from_both_and_scale_back(redis_url, tmp_path):
    import ray
    import redis
    from ray import serve

    from index.embed import MiniLMEmbedder
    from services.app import build_app
    from services.tenants import TenantStore
    from tests.integration.test_service_app import CONFIGS, write_index

    prefix = f"test:{uuid.uuid4().hex[:10]}:knnssd:"
    write_index(tmp_path, MiniLMEmbedder(progress=False), CONFIGS)
    port = free_port()
    scaling = AutoscalingSettings(
        min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=1, downscale_delay_s=4,
        look_back_period_s=2,
    )
    config = AppConfig(
        redis_url=redis_url, redis_prefix=prefix, index_path=str(tmp_path), http=HttpConfig(port=port),
        limits=LimitsConfig(default_rpm=0, default_tpm=0),
        generation=GenerationConfig(default_max_tokens=24),
        runtime={"max_running": 4, "calibrate": False},
        deployments=DeploymentsConfig(replica=DeploymentSettings(
            name="ModelReplica", autoscaling_config=scaling, max_ongoing_requests=4,
            ray_actor_options=RayActorOptions(num_cpus=1),
        )),
    )
    client = redis.Redis.from_url(redis_url)
    _, key = TenantStore(client, prefix=prefix).add("load", rpm=0, tpm=0)
    env = {"RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "HF_HUB_OFFLINE": "1"}
    # 2 real cores; Ray's CPU count is a scheduling budget, so 4 lets both replicas fit beside the others
    ray.init(address="local", num_cpus=4, include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=False)
    statuses: list[int] = []
    replicas_seen: set[str] = set()
    stop = threading.Event()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(config), name=APP, route_prefix="/")
        assert sum(_replicas(serve).values()) == 1

        def load() -> None:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                              timeout=120) as c:
                while not stop.is_set():
                    r = c.post("/v1/completions", json={"model": "smollm2", "prompt": "Count from 1 to 50.",
                                                          "max_tokens": 24, "temperature": 0})
                    statuses.append(r.status_code)
                    if r.status_code == 200:
                        replicas_seen.add(r.json()["knnssd"]["replica"])

        clients = [threading.Thread(target=load, daemon=True) for _ in range(4)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and _replicas(serve).get("RUNNING", 0) < 2:
            time.sleep(0.5)
        assert _replicas(serve).get("RUNNING", 0) == 2, _replicas(serve)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(replicas_seen) < 2:
            time.sleep(0.5)
        stop.set()
        for t in clients:
            t.join(timeout=120)
        assert len(replicas_seen) == 2, replicas_seen  # the new replica served requests
        assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))  # none failed meanwhile
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and sum(_replicas(serve).values()) > 1:
            time.sleep(1)
        assert _replicas(serve) == {"RUNNING": 1}  # idle: back to the minimum
    finally:
        stop.set()
        stop_serve_app(client, prefix)
