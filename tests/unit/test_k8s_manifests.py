"""The committed k8s/ manifests: up to date with `knnssd k8s render`, valid offline, and wired consistently.

Core kinds (and the pod templates nested in the RayService) are checked against the Kubernetes JSON
schemas bundled with `kubernetes-validate`, in strict mode (unknown fields are errors); the KubeRay kinds
against the strict models of `deploy.k8s_models` and their JSON Schema export in k8s/schemas/; the
`serveConfigV2` string against Ray's own `ServeDeploySchema` and the service's `AppConfig`.
"""

from __future__ import annotations

import base64
import json
import shlex
from pathlib import Path, PurePosixPath

import pytest
import yaml

from deploy import k8s
from services.config import AppConfig
from deploy.k8s_models import CUSTOM_KINDS, Kustomization, RayJob, RayService

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
KUBE_VERSION = "1.30.0"  # the oldest Kubernetes the manifests promise to work on


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]


def _all_docs() -> dict[str, list[dict]]:
    return {p.name: _docs(p.name) for p in sorted(K8S.glob("*.yaml")) if p.name != k8s.TENANTS_FILE}


def _rayservice() -> dict:
    (doc,) = _docs("rayservice.yaml")
    return doc


def _shape(schema) -> list:
    """What a JSON Schema constrains (property names per object, closed objects), not how pydantic words it."""
    out = []
    if isinstance(schema, dict):
        if "properties" in schema:
            out.append((tuple(sorted(schema["properties"])), schema.get("additionalProperties"), tuple(schema.get("required", ()))))
        for v in schema.values():
            out += _shape(v)
    elif isinstance(schema, list):
        for v in schema:
            out += _shape(v)
    return sorted(out, key=repr)


def _same(rel: str, committed: str, rendered: str) -> bool:
    if rel.startswith("schemas/"):  # pydantic versions word schemas differently; compare what they allow
        return _shape(json.loads(committed)) == _shape(json.loads(rendered))
    return committed == rendered


def test_committed_manifests_are_up_to_date():
    rendered = k8s.render()
    stale = [rel for rel, text in rendered.items()
             if not (K8S / rel).exists() or not _same(rel, (K8S / rel).read_text(), text)]
    assert stale == [], f"k8s/ is stale ({stale}): run `knnssd k8s render` and commit the result"
    on_disk = {str(p.relative_to(K8S)) for p in K8S.rglob("*") if p.is_file() and p.suffix in (".yaml", ".json")}
    assert on_disk == set(rendered), "k8s/ holds files the renderer does not write (remove them)"


def test_core_kinds_are_valid_kubernetes():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    checked = []
    for name, docs in _all_docs().items():
        for doc in docs:
            if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
                continue
            kv.validate(doc, KUBE_VERSION, strict=True)
            checked.append(doc["kind"])
    assert sorted(checked) == ["Namespace", "PersistentVolumeClaim", "Service", "Service", "StatefulSet"]


def test_pod_templates_inside_the_rayservice_are_valid_kubernetes():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    templates = [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]
    for i, tpl in enumerate(templates):
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": tpl}
        kv.validate(pod_template, KUBE_VERSION, strict=True)
    with pytest.raises(kv.ValidationError):  # strict mode really rejects an unknown field
        bad = json.loads(json.dumps(templates[0]))
        bad["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "x"}, "template": bad}, KUBE_VERSION, strict=True)


def test_the_generated_tenants_secret_is_valid_kubernetes():
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the test extra")
    (kust,) = _docs("kustomization.yaml")
    (gen,) = kust["secretGenerator"]
    data = {f: base64.b64encode((K8S / f).read_bytes()).decode() for f in gen["files"]}
    secret = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",  # what kustomize makes of it
              "metadata": {"name": gen["name"], "namespace": kust["namespace"]}, "data": data}
    kv.validate(secret, KUBE_VERSION, strict=True)


def test_kuberay_kinds_validate_against_the_models_and_the_pinned_schemas():
    import jsonschema

    schemas = {p.name: json.loads(p.read_text()) for p in (K8S / "schemas").glob("*.json")}
    seen = []
    for docs in _all_docs().values():
        for doc in docs:
            model = CUSTOM_KINDS.get((doc["apiVersion"], doc["kind"]))
            if model is None:
                continue
            model.model_validate(doc)
            schema = schemas[f"{doc['kind'].lower()}_{doc['apiVersion'].split('/')[-1]}.json"]
            jsonschema.Draft202012Validator(schema).validate(doc)
            seen.append(doc["kind"])
    assert sorted(seen) == ["Kustomization", "RayJob", "RayService"]


@pytest.mark.parametrize(
    "path, value",
    [
        (("spec", "rayClusterConfig", "enableInTreeAutoScaling"), True),  # misspelt field
        (("spec", "serveConfig"), "x"),  # the old v1alpha1 field name
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "minReplicas"), "1"),  # string, not int
        (("spec", "rayClusterConfig", "workerGroupSpecs", 0, "minReplicas"), 9),  # above maxReplicas
        (("spec", "rayClusterConfig", "autoscalerOptions", "upscalingMode"), "Fast"),
    ],
)
def test_the_kuberay_models_reject_mistakes(path, value):
    from pydantic import ValidationError

    doc = _rayservice()
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValidationError):
        RayService.model_validate(doc)


def test_serve_config_v2_is_the_app_config_and_ray_accepts_it():
    from ray.serve.schema import ServeDeploySchema

    cfg = k8s.K8sConfig()
    serve = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    assert serve == cfg.app.serve_config()
    parsed = ServeDeploySchema.parse_obj(serve)
    assert [a.import_path for a in parsed.applications] == ["services.app:build_app"]
    assert parsed.http_options.host == "0.0.0.0"
    (app,) = serve["applications"]
    assert AppConfig.model_validate(app["args"]["config"]) == cfg.app
    deps = {d["name"]: d for d in app["deployments"]}
    rep = deps["ModelReplica"]
    assert rep["ray_actor_options"]["num_gpus"] == 1 and "num_replicas" not in rep
    assert rep["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2.0}
    assert deps["Gateway"]["ray_actor_options"]["num_gpus"] == 0


def test_gpu_worker_group_autoscales_with_gpu_requests_and_limits():
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    (group,) = cluster["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (1, 4)
    (c,) = group["template"]["spec"]["containers"]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    # the Serve autoscaler can never ask for more GPUs than the worker group can add
    serve = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    rep = serve["applications"][0]["deployments"][2]
    assert rep["autoscaling_config"]["max_replicas"] * rep["ray_actor_options"]["num_gpus"] <= group["maxReplicas"]


def test_pods_mount_the_shared_volume_the_secret_and_reach_redis():
    cfg = k8s.K8sConfig()
    (pvc,) = _docs("data-pvc.yaml")
    svc, headless, sts = _docs("redis.yaml")
    (kust,) = _docs("kustomization.yaml")
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    for tpl in [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster["workerGroupSpecs"])]:
        spec = tpl["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["data"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
        assert vols["tenants"]["secret"]["secretName"] == kust["secretGenerator"][0]["name"]
        c = spec["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        assert PurePosixPath(mounts["data"]) in PurePosixPath(cfg.app.index_path).parents
        assert mounts["tenants"] == str(PurePosixPath(cfg.app.tenants_file).parent)
        assert {"name": "REDIS_URL", "value": cfg.app.redis_url} in c["env"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == k8s.APP_UID
    # Redis: the URL names the Service, which selects the StatefulSet's pods; data on a claim template
    assert cfg.app.redis_url.startswith(f"redis://{svc['metadata']['name']}:6379/")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert headless["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == headless["metadata"]["name"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] in {m["name"] for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert "--appendonly" in sts["spec"]["template"]["spec"]["containers"][0]["args"]


def test_kustomization_ties_the_deployable_manifests_together():
    (raw,) = _docs("kustomization.yaml")
    kust = Kustomization.model_validate(raw)
    assert all((K8S / r).exists() for r in kust.resources)
    assert k8s.RAYJOB_FILE not in kust.resources  # applying it would start a rebuild
    for name in kust.resources:
        for doc in _docs(name):
            if doc["kind"] != "Namespace":
                assert doc["metadata"]["namespace"] == kust.namespace
            else:
                assert doc["metadata"]["name"] == kust.namespace


def test_rayjob_rebuilds_on_the_service_cluster_and_publishes():
    from index.job import parse_args

    cfg = k8s.K8sConfig()
    (doc,) = _docs(k8s.RAYJOB_FILE)
    job = RayJob.model_validate(doc)
    assert job.spec.cluster_selector == {"ray.io/cluster": k8s.RAYCLUSTER_PLACEHOLDER}
    assert job.spec.shutdown_after_job_finishes is False and job.spec.submission_mode == "K8sJobMode"
    assert job.metadata.namespace == cfg.namespace and job.metadata.generate_name
    argv = shlex.split(job.spec.entrypoint)
    assert argv[:3] == ["python", "-m", "index.job"]
    args = parse_args(argv[3:])
    assert (args.data, args.out) == ("/data/domains", "/data/index") and args.out == cfg.app.index_path
    assert args.redis_url == cfg.app.redis_url and args.model == cfg.app.model
    # the README's substitution yields a valid RayJob for a real cluster name
    filled = yaml.safe_load((K8S / k8s.RAYJOB_FILE).read_text().replace(k8s.RAYCLUSTER_PLACEHOLDER, "knnssd-raycluster-ab12c"))
    assert RayJob.model_validate(filled).spec.cluster_selector["ray.io/cluster"] == "knnssd-raycluster-ab12c"
    assert "RAYCLUSTER_NAME" in (K8S / k8s.RAYJOB_FILE).read_text().split("apiVersion")[0]  # the header says how


def test_tenants_file_is_a_keyless_placeholder():
    from services.tenants import load_tenants_file

    assert load_tenants_file(K8S / k8s.TENANTS_FILE) == []
    text = (K8S / k8s.TENANTS_FILE).read_text()
    assert "sk-" not in text and "key_hash" not in text
    assert "knnssd tenants add" in text  # it says how to add one
