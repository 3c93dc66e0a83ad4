"""Service config: a description on every field, YAML loading, and a Serve config Ray itself accepts."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services import config as cfgmod
from services.config import AppConfig
from tests.models import nested_models, undescribed_fields


def test_every_field_has_a_description():
    seen: set = set()
    nested_models(AppConfig, seen)
    assert {cfgmod.DeploymentSettings, cfgmod.AutoscalingSettings, cfgmod.RayActorOptions, cfgmod.LimitsConfig} <= seen
    assert undescribed_fields(seen) == []


def test_from_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(
        "model: smollm2\n"
        "redis_url: redis://example:6379/1\n"
        "limits: {default_rpm: 5, window_s: 2}\n"
        "http: {port: 9000, max_body_bytes: 2048}\n"
        "deployments:\n"
        "  replica:\n"
        "    name: ModelReplica\n"
        "    autoscaling_config: {min_replicas: 1, max_replicas: 8, target_ongoing_requests: 2}\n"
        "    max_ongoing_requests: 4\n"
        "    ray_actor_options: {num_cpus: 2, num_gpus: 1}\n"
    )
    c = AppConfig.from_yaml(p)
    assert c.redis_url == "redis://example:6379/1" and c.limits.default_rpm == 5 and c.limits.window_s == 2
    assert c.http.port == 9000 and c.deployments.replica.ray_actor_options.num_gpus == 1
    assert c.deployments.gateway.name == "Gateway"  # untouched sections keep their defaults
    assert AppConfig.model_validate(c.model_dump()) == c
    p.write_text("limits: {default_rmp: 5}\n")
    with pytest.raises(ValidationError):  # typos are errors, not silently ignored
        AppConfig.from_yaml(p)
    p.write_text("")
    assert AppConfig.from_yaml(p) == AppConfig()


def test_redis_url_default_from_env(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://elsewhere:1/0")
    assert AppConfig().redis_url == "redis://elsewhere:1/0"


def test_autoscaling_bounds():
    with pytest.raises(ValidationError):
        cfgmod.AutoscalingSettings(min_replicas=3, max_replicas=2)


def test_serve_config_is_valid_for_ray():
    schema = pytest.importorskip("ray.serve.schema")
    c = AppConfig()
    c.deployments.replica.autoscaling_config = cfgmod.AutoscalingSettings(min_replicas=1, max_replicas=3)
    sc = c.serve_config()
    parsed = schema.ServeDeploySchema.parse_obj(sc)
    app = parsed.applications[0]
    assert app.import_path == "services.app:build_app" and app.route_prefix == "/"
    deps = {d["name"]: d for d in sc["applications"][0]["deployments"]}
    assert set(deps) == {"Gateway", "Router", "ModelReplica"}
    assert "num_replicas" not in deps["ModelReplica"] and deps["ModelReplica"]["autoscaling_config"]["max_replicas"] == 3
    assert deps["Gateway"]["num_replicas"] == 1
    # the builder gets the whole config back
    assert AppConfig.model_validate(sc["applications"][0]["args"]["config"]) == c


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_a_gpu_device_reserves_a_gpu_and_takes_what_it_batches(device):
    """`device: cuda` with the default `num_gpus: 0` made Ray hide the GPU from the replica (it then failed
    at load, and `auto` ran on the CPU); a GPU replica must also accept `max_running` requests."""
    c = AppConfig.model_validate({"engine": {"device": device}})
    rep = c.deployments.replica
    assert rep.ray_actor_options.num_gpus == 1 and rep.max_ongoing_requests >= c.runtime.max_running == 8
    entry = {d["name"]: d for d in c.serve_config()["applications"][0]["deployments"]}["ModelReplica"]
    assert entry["ray_actor_options"]["num_gpus"] == 1 and entry["max_ongoing_requests"] == 8
    assert AppConfig.model_validate(c.model_dump()) == c  # stable once lifted
    # a fraction the operator chose stays; a larger batch lifts max_ongoing_requests with it
    c = AppConfig.model_validate({"engine": {"device": device}, "runtime": {"max_running": 16},
                                  "deployments": {"replica": {"name": "ModelReplica", "ray_actor_options": {"num_gpus": 0.5}}}})
    assert c.deployments.replica.ray_actor_options.num_gpus == 0.5 and c.deployments.replica.max_ongoing_requests == 16


def test_cpu_and_auto_devices_reserve_no_gpu():
    for device in ("cpu", "auto"):
        rep = AppConfig.model_validate({"engine": {"device": device}}).deployments.replica
        assert rep.ray_actor_options.num_gpus == 0 and rep.max_ongoing_requests == 8  # runtime.max_running


def test_with_engine_validates_again():
    """`knnssd serve --device cuda` goes through `with_engine` (a plain model_copy skipped validation)."""
    c = AppConfig().with_engine(device="cuda")
    assert c.engine.device == "cuda" and c.engine.dtype == "auto"
    assert c.deployments.replica.ray_actor_options.num_gpus == 1 and c.deployments.replica.max_ongoing_requests == 8
    assert AppConfig().with_engine(dtype="bfloat16").deployments.replica.ray_actor_options.num_gpus == 0
