"""`knnssd k8s render`: a changed config changes exactly what it should; bad configs fail; the seeding init step."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from deploy import k8s
from deploy.k8s import K8sConfig
from tests.models import nested_models, undescribed_fields


def _flatten(node, prefix=()) -> dict[tuple, object]:
    """Leaf paths of a YAML document; the serveConfigV2 string is parsed and flattened too."""
    out: dict[tuple, object] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "serveConfigV2":
                v = yaml.safe_load(v)
            out.update(_flatten(v, (*prefix, k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.update(_flatten(v, (*prefix, i)))
    else:
        out[prefix] = node
    return out


def _changes(before: dict[str, str], after: dict[str, str]) -> dict[str, dict[tuple, tuple]]:
    diff = {}
    for name in before:
        if before[name] == after[name]:
            continue
        a = _flatten(list(yaml.safe_load_all(before[name])))
        b = _flatten(list(yaml.safe_load_all(after[name])))
        diff[name] = {p: (a.get(p), b.get(p)) for p in a.keys() | b.keys() if a.get(p) != b.get(p)}
    return diff


def test_a_changed_config_changes_exactly_the_expected_fields():
    before = k8s.render(K8sConfig())
    after = k8s.render(K8sConfig.model_validate({
        "image": "registry.example.com/knnssd:1.2.0",
        "gpu_workers": {"max_replicas": 8},
        "app": {"deployments": {"replica": {"autoscaling_config": {"target_ongoing_requests": 3}}}},
    }))
    assert set(before) == set(after)
    rc = (0, "spec", "rayClusterConfig")
    head = (*rc, "headGroupSpec", "template", "spec")
    worker = (*rc, "workerGroupSpecs", 0)
    app = (0, "spec", "serveConfigV2", "applications", 0)
    new = "registry.example.com/knnssd:1.2.0"
    assert _changes(before, after) == {
        "rayservice.yaml": {
            (*worker, "maxReplicas"): (4, 8),
            (*head, "initContainers", 0, "image"): ("knnssd:0.1.0", new),
            (*head, "containers", 0, "image"): ("knnssd:0.1.0", new),
            (*worker, "template", "spec", "containers", 0, "image"): ("knnssd:0.1.0", new),
            (*app, "args", "config", "deployments", "replica", "autoscaling_config", "target_ongoing_requests"): (2.0, 3.0),
            (*app, "deployments", 2, "autoscaling_config", "target_ongoing_requests"): (2.0, 3.0),
        }
    }


def test_app_settings_flow_into_the_job_and_every_pod():
    cfg = K8sConfig.model_validate({
        "name": "ssd", "namespace": "prod",
        "app": {"redis_prefix": "prod:knnssd:", "model_path": "/models/qwen"},
        "rebuild": {"budget": 8, "extra_args": ["--k", "3"]},
    })
    files = k8s.render(cfg)
    assert cfg.app.redis_url == "redis://ssd-redis:6379/0"  # the cluster defaults follow the name
    job = yaml.safe_load(files[k8s.RAYJOB_FILE])
    assert job["metadata"]["namespace"] == "prod" and job["metadata"]["generateName"] == "ssd-rebuild-index-"
    ep = job["spec"]["entrypoint"]
    assert "--redis-prefix prod: " in ep and "--model /models/qwen" in ep and ep.endswith("--no-progress --k 3")
    assert "--budget 8" in ep
    svc = next(yaml.safe_load_all(files["redis.yaml"]))
    assert svc["metadata"] == {"name": "ssd-redis", "namespace": "prod",
                               "labels": {"app.kubernetes.io/name": "ssd", "app.kubernetes.io/component": "redis"}}
    assert yaml.safe_load(files["kustomization.yaml"])["namespace"] == "prod"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"app": {"redis_url": "redis://127.0.0.1:6379/0"}}, "points at the pod itself"),
        ({"app": {"http": {"host": "127.0.0.1"}}}, "not reachable"),
        ({"app": {"index_path": "/tmp/index"}}, "under the data volume"),
        ({"app": {"deployments": {"replica": {"autoscaling_config": {"max_replicas": 5}}}}}, "GPU worker group holds at most 4"),
        ({"gpu_workers": {"gpus_per_worker": 0}}, "holds at most 0"),
        ({"gpu_workers": {"min_replicas": 5, "max_replicas": 2}}, "max_replicas"),
        ({"imagee": "x"}, "imagee"),
        ({"app": {"deployment": {}}}, "deployment"),
        ({"name": "Bad_Name"}, "name"),
    ],
)
def test_bad_configs_are_refused(data, message):
    with pytest.raises(ValidationError, match=message):
        K8sConfig.model_validate(data)


def test_a_cpu_only_cluster_is_a_valid_config():
    cfg = K8sConfig.model_validate({"gpu_workers": {"gpus_per_worker": 0},
                                    "app": {"deployments": {"replica": {"ray_actor_options": {"num_gpus": 0}}}}})
    worker = yaml.safe_load(k8s.render(cfg)["rayservice.yaml"])["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    assert "nvidia.com/gpu" not in worker["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_every_config_field_has_a_description():
    from deploy import k8s_models

    seen: set = set()
    nested_models(K8sConfig, seen)
    for model in k8s_models.CUSTOM_KINDS.values():
        nested_models(model, seen)
    assert undescribed_fields(seen) == []


def test_cli_renders_a_config_file_and_keeps_an_existing_tenants_file(tmp_path):
    from deploy.cli import app

    conf = tmp_path / "k8s.yaml"
    conf.write_text("image: example/knnssd:2\ngpu_workers: {max_replicas: 6}\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / k8s.TENANTS_FILE).write_text("tenants: []  # mine\n")
    res = CliRunner().invoke(app, ["k8s", "render", "--config", str(conf), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / k8s.TENANTS_FILE).read_text() == "tenants: []  # mine\n"
    rs = yaml.safe_load((out / "rayservice.yaml").read_text())
    assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] == 6
    assert (out / "schemas" / "rayservice_v1.json").exists()
    conf.write_text("gpu_workers: {max_replicas: 0}\n")
    res = CliRunner().invoke(app, ["k8s", "render", "--config", str(conf), "--out", str(out)])
    assert res.exit_code == 1 and "max_replicas" in res.output


def _fake_index(root: Path) -> Path:
    (root / "versions" / "v1").mkdir(parents=True)
    (root / "versions" / "v1" / "manifest.json").write_text("{}")
    (root / "CURRENT").write_text("v1\n")
    return root


def test_seed_fills_an_empty_volume_once(tmp_path):
    src = _fake_index(tmp_path / "image-index")
    domains, index = tmp_path / "vol" / "domains", tmp_path / "vol" / "index"
    done = k8s.seed_data(domains, index, index_source=src)
    assert len(done) == 2
    assert sorted(p.name for p in domains.iterdir()) == sorted(p.name for p in k8s.bundled_domains_dir().glob("*.jsonl"))
    assert (index / "CURRENT").read_text() == "v1\n" and (index / "versions" / "v1" / "manifest.json").exists()
    assert not list(index.glob(".CURRENT.*"))
    # a rebuilt index and the user's own data are never overwritten
    (index / "CURRENT").write_text("v2\n")
    for f in domains.iterdir():
        f.unlink()
    (domains / "mine.jsonl").write_text("{}\n")
    assert k8s.seed_data(domains, index, index_source=src) == []
    assert (index / "CURRENT").read_text() == "v2\n" and [p.name for p in domains.iterdir()] == ["mine.jsonl"]


def test_seed_without_a_default_index_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no default index"):
        k8s.seed_data(tmp_path / "d", tmp_path / "i", index_source=tmp_path / "missing")


def test_the_readme_cluster_config_example_renders():
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"```yaml\n *# cluster\.yaml\n(.*?) *```", readme, re.S)
    assert block, "README: the Kubernetes section's cluster.yaml example is missing"
    example = "\n".join(line[3:] if line.startswith("   ") else line for line in block.group(1).splitlines())
    cfg = K8sConfig.model_validate(yaml.safe_load(example))
    rs = yaml.safe_load(k8s.render(cfg)["rayservice.yaml"])
    assert rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] == 8
    assert yaml.safe_load(rs["spec"]["serveConfigV2"])["applications"][0]["deployments"][2]["autoscaling_config"]["max_replicas"] == 8


def test_a_gpu_device_reserves_a_gpu_in_the_render():
    """An app on `device: cuda` reserves a GPU per replica in serveConfigV2 even when its config says 0, and
    a GPU replica accepts as many requests as its runtime batches."""
    cfg = K8sConfig.model_validate({"app": {"engine": {"device": "cuda"}, "runtime": {"max_running": 12},
                                            "deployments": {"replica": {"ray_actor_options": {"num_gpus": 0}}}}})
    serve_cfg = yaml.safe_load(yaml.safe_load(k8s.render(cfg)["rayservice.yaml"])["spec"]["serveConfigV2"])
    rep = {d["name"]: d for d in serve_cfg["applications"][0]["deployments"]}["ModelReplica"]
    assert rep["ray_actor_options"]["num_gpus"] == 1 and rep["max_ongoing_requests"] == 12
    default = yaml.safe_load(yaml.safe_load(k8s.render(K8sConfig())["rayservice.yaml"])["spec"]["serveConfigV2"])
    rep = {d["name"]: d for d in default["applications"][0]["deployments"]}["ModelReplica"]
    assert rep["ray_actor_options"]["num_gpus"] == 1 and rep["max_ongoing_requests"] >= 8
