"""Strict pydantic models of the KubeRay kinds the manifests use (RayService, RayJob) and of a Kustomization.

They are the offline schema check for what `knnssd k8s render` writes: every model forbids unknown keys
and types are strict, so a misspelt or misplaced field (`enableInTreeAutoScaling`, `serveConfig`,
`minReplica`) fails validation instead of being silently dropped by the operator. Field names follow
the `ray.io/v1` Go types of KubeRay v1.5.1 (`ray-operator/apis/ray/v1/{rayservice,rayjob,raycluster}_types.go`),
the first release whose RayService/RayJob support Ray token authentication (`authOptions`); the manifests
use only fields that exist since then. Pod templates, services and other core-Kubernetes objects nested
inside are typed as plain mappings here and validated against the Kubernetes schemas instead (see
`tests/unit/test_k8s_manifests.py`). `k8s/schemas/*.json` holds these models exported as JSON Schema.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

KUBERAY_VERSION = "v1.5.1"
CLUSTER_SELECTOR_KEY = "ray.io/cluster"  # the only clusterSelector key the RayJob controller reads

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

Object = dict[str, Any]  # a nested core-Kubernetes object (PodTemplateSpec, Service, ...), validated elsewhere


class _KubeRay(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, alias_generator=to_camel, populate_by_name=True)


class ObjectMeta(_KubeRay):
    """The metadata the manifests set (a subset of Kubernetes' ObjectMeta)."""

    name: str | None = Field(None, max_length=63, description="Object name (DNS label).")
    generate_name: str | None = Field(None, max_length=58, description="Name prefix; the API server appends a suffix.")
    namespace: str | None = Field(None, max_length=63, description="Namespace (DNS label).")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations.")

    @model_validator(mode="after")
    def _names(self) -> ObjectMeta:
        if (self.name is None) == (self.generate_name is None):
            raise ValueError("exactly one of name and generateName must be set")
        if self.name is not None and not _DNS_LABEL.match(self.name):
            raise ValueError(f"name {self.name!r} is not a DNS label")
        if self.generate_name is not None and not _DNS_LABEL.match(self.generate_name + "x"):
            raise ValueError(f"generateName {self.generate_name!r} is not a DNS label prefix")
        if self.namespace is not None and not _DNS_LABEL.match(self.namespace):
            raise ValueError(f"namespace {self.namespace!r} is not a DNS label")
        for k, v in self.labels.items():
            name = k.rsplit("/", 1)[-1]
            prefix = k.rsplit("/", 1)[0] if "/" in k else None
            if len(name) > 63 or not _LABEL_VALUE.match(name) or not name:
                raise ValueError(f"label key {k!r} is invalid")
            if prefix is not None and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
                raise ValueError(f"label key prefix {prefix!r} is invalid")
            if len(v) > 63 or not _LABEL_VALUE.match(v):
                raise ValueError(f"label value {v!r} (key {k!r}) is invalid")
        return self


# ---------------------------------------------------------------------------------------- RayCluster


class AuthOptions(_KubeRay):
    mode: Literal["disabled", "token"] | None = Field(None, description="Ray authentication mode (KubeRay's default: token).")


class AutoscalerOptions(_KubeRay):
    resources: Object | None = Field(None, description="Autoscaler container ResourceRequirements.")
    image: str | None = Field(None, description="Autoscaler image override.")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = Field(None, description="Autoscaler pull policy.")
    security_context: Object | None = Field(None, description="Autoscaler container SecurityContext.")
    idle_timeout_seconds: int | None = Field(None, ge=0, le=2**31 - 1, description="Seconds before an idle worker is removed.")
    upscaling_mode: Literal["Default", "Aggressive", "Conservative"] | None = Field(None, description="Upscaling rate limit.")
    version: Literal["v1", "v2"] | None = Field(None, description="Autoscaler version (default by Ray version).")
    env: list[Object] = Field(default_factory=list, description="Autoscaler container env.")
    env_from: list[Object] = Field(default_factory=list, description="Autoscaler container envFrom.")
    volume_mounts: list[Object] = Field(default_factory=list, description="Autoscaler container volume mounts.")


class HeadGroupSpec(_KubeRay):
    template: Object = Field(description="Head PodTemplateSpec.")
    head_service: Object | None = Field(None, description="Head Service override.")
    enable_ingress: bool | None = Field(None, description="Create an Ingress for the head service.")
    resources: dict[str, str] = Field(default_factory=dict, description="Ray resources of the head (overrides rayStartParams).")
    labels: dict[str, str] = Field(default_factory=dict, description="Ray node labels of the head.")
    ray_start_params: dict[str, str] = Field(default_factory=dict, description="`ray start` parameters (strings).")
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] | None = Field(None, description="Head service type.")


class WorkerGroupSpec(_KubeRay):
    suspend: bool | None = Field(None, description="Suspend the group (RayJob internal).")
    group_name: str = Field(description="Group name, unique in the cluster.")
    replicas: int | None = Field(None, ge=0, le=2**31 - 1, description="Desired pods (the autoscaler changes it).")
    min_replicas: int = Field(ge=0, le=2**31 - 1, description="Fewest pods.")
    max_replicas: int = Field(ge=0, le=2**31 - 1, description="Most pods.")
    idle_timeout_seconds: int | None = Field(None, ge=0, le=2**31 - 1, description="Per-group idle timeout (autoscaler v2).")
    resources: dict[str, str] = Field(default_factory=dict, description="Ray resources of the group.")
    labels: dict[str, str] = Field(default_factory=dict, description="Ray node labels of the group.")
    ray_start_params: dict[str, str] = Field(default_factory=dict, description="`ray start` parameters (strings).")
    template: Object = Field(description="Worker PodTemplateSpec.")
    scale_strategy: Object | None = Field(None, description="Which pods to remove.")
    num_of_hosts: int | None = Field(None, ge=1, description="Hosts per replica (multi-host).")

    @model_validator(mode="after")
    def _bounds(self) -> WorkerGroupSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"worker group {self.group_name}: maxReplicas < minReplicas")
        if self.replicas is not None and not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(f"worker group {self.group_name}: replicas outside [minReplicas, maxReplicas]")
        return self


class RayClusterSpec(_KubeRay):
    upgrade_strategy: Object | None = Field(None, description="RayCluster upgrade strategy.")
    auth_options: AuthOptions | None = Field(None, description="Ray token authentication.")
    suspend: bool | None = Field(None, description="Suspend the cluster.")
    managed_by: Literal["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"] | None = Field(None, description="Managing controller.")
    autoscaler_options: AutoscalerOptions | None = Field(None, description="Ray autoscaler settings.")
    head_service_annotations: dict[str, str] = Field(default_factory=dict, description="Annotations of the head service.")
    enable_in_tree_autoscaling: bool | None = Field(None, description="Run the Ray autoscaler sidecar.")
    gcs_fault_tolerance_options: Object | None = Field(None, description="GCS fault tolerance.")
    head_group_spec: HeadGroupSpec = Field(description="The head pod.")
    ray_version: str | None = Field(None, description="Ray version in the image.")
    worker_group_specs: list[WorkerGroupSpec] = Field(default_factory=list, description="Worker groups.")

    @field_validator("worker_group_specs")
    @classmethod
    def _unique_groups(cls, v: list[WorkerGroupSpec]) -> list[WorkerGroupSpec]:
        names = [g.group_name for g in v]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate worker group names: {names}")
        return v


# ---------------------------------------------------------------------------------------- RayService


class RayServiceUpgradeStrategy(_KubeRay):
    type: Literal["NewCluster", "NewClusterWithIncrementalUpgrade", "None"] | None = Field(None, description="Upgrade type.")
    cluster_upgrade_options: Object | None = Field(None, description="Incremental upgrade options.")


class RayServiceSpec(_KubeRay):
    ray_cluster_deletion_delay_seconds: int | None = Field(None, ge=0, description="Delay before old clusters are deleted.")
    service_unhealthy_second_threshold: int | None = Field(None, description="Deprecated, unused.")
    deployment_unhealthy_second_threshold: int | None = Field(None, description="Deprecated, unused.")
    serve_service: Object | None = Field(None, description="Serve Service override.")
    upgrade_strategy: RayServiceUpgradeStrategy | None = Field(None, description="Zero-downtime upgrade strategy.")
    serve_config_v2: str = Field(description="The Serve config (multi-application) as a YAML string.")
    ray_cluster_config: RayClusterSpec = Field(description="The cluster the applications run on.")
    exclude_head_pod_from_serve_svc: bool | None = Field(None, description="Keep the head out of the serve service.")


class RayService(_KubeRay):
    api_version: Literal["ray.io/v1"] = Field(description="API version.")
    kind: Literal["RayService"] = Field(description="Kind.")
    metadata: ObjectMeta = Field(description="Metadata.")
    spec: RayServiceSpec = Field(description="Spec.")


# ---------------------------------------------------------------------------------------- RayJob


class RayJobSpec(_KubeRay):
    active_deadline_seconds: int | None = Field(None, ge=1, le=2**31 - 1, description="Deadline of the whole RayJob.")
    backoff_limit: int | None = Field(None, ge=0, description="Retries (each creates a new cluster).")
    ray_cluster_spec: RayClusterSpec | None = Field(None, description="A cluster created for the job.")
    submitter_pod_template: Object | None = Field(None, description="Submitter PodTemplateSpec (default: head image).")
    metadata: dict[str, str] = Field(default_factory=dict, description="Ray job metadata.")
    cluster_selector: dict[str, str] = Field(default_factory=dict, description="Run on an existing RayCluster.")
    submitter_config: Object | None = Field(None, description="Submitter Job settings.")
    managed_by: Literal["ray.io/kuberay-operator", "kueue.x-k8s.io/multikueue"] | None = Field(None, description="Managing controller.")
    deletion_strategy: Object | None = Field(None, description="Cleanup after the job ends.")
    entrypoint: str = Field(min_length=1, description="Command the Ray job runs.")
    runtime_env_yaml: str | None = Field(None, alias="runtimeEnvYAML", description="Runtime env as YAML.")
    job_id: str | None = Field(None, description="Ray submission id.")
    submission_mode: Literal["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"] | None = Field(
        None, description="How KubeRay submits the job."
    )
    entrypoint_resources: str | None = Field(None, description="Custom resources for the entrypoint (JSON).")
    entrypoint_num_cpus: float | None = Field(None, ge=0, description="CPUs reserved for the entrypoint.")
    entrypoint_num_gpus: float | None = Field(None, ge=0, description="GPUs reserved for the entrypoint.")
    ttl_seconds_after_finished: int | None = Field(None, ge=0, description="TTL before cleanup (with shutdown).")
    shutdown_after_job_finishes: bool | None = Field(None, description="Delete the cluster after the job.")
    suspend: bool | None = Field(None, description="Suspend the job.")

    @model_validator(mode="after")
    def _cluster(self) -> RayJobSpec:
        if (self.ray_cluster_spec is None) == (not self.cluster_selector):
            raise ValueError("a RayJob needs exactly one of rayClusterSpec and clusterSelector")
        if self.cluster_selector:
            if set(self.cluster_selector) != {CLUSTER_SELECTOR_KEY}:
                raise ValueError(f"KubeRay reads only clusterSelector[{CLUSTER_SELECTOR_KEY!r}] (the RayCluster's name)")
            if self.shutdown_after_job_finishes:
                raise ValueError("shutdownAfterJobFinishes would delete a cluster the job does not own")
        return self


class RayJob(_KubeRay):
    api_version: Literal["ray.io/v1"] = Field(description="API version.")
    kind: Literal["RayJob"] = Field(description="Kind.")
    metadata: ObjectMeta = Field(description="Metadata.")
    spec: RayJobSpec = Field(description="Spec.")


# ---------------------------------------------------------------------------------------- Kustomization


class KustomizeLabels(_KubeRay):
    pairs: dict[str, str] = Field(description="Labels to add.")
    include_selectors: bool | None = Field(None, description="Also add them to selectors (immutable on StatefulSets).")
    include_templates: bool | None = Field(None, description="Also add them to pod templates.")


class SecretGenerator(_KubeRay):
    name: str = Field(description="Secret name.")
    files: list[str] = Field(min_length=1, description="Files whose contents become keys (named by file name).")
    type: str | None = Field(None, description="Secret type (default Opaque).")


class GeneratorOptions(_KubeRay):
    disable_name_suffix_hash: bool | None = Field(None, description="Keep the plain name (no content hash suffix).")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels of generated objects.")


class Kustomization(_KubeRay):
    api_version: Literal["kustomize.config.k8s.io/v1beta1"] = Field(description="API version.")
    kind: Literal["Kustomization"] = Field(description="Kind.")
    namespace: str | None = Field(None, description="Namespace set on every resource.")
    resources: list[str] = Field(min_length=1, description="Files applied together.")
    labels: list[KustomizeLabels] = Field(default_factory=list, description="Labels added to every resource.")
    images: list[Object] = Field(default_factory=list, description="Image overrides.")
    secret_generator: list[SecretGenerator] = Field(default_factory=list, description="Secrets made from local files.")
    generator_options: GeneratorOptions | None = Field(None, description="Options of every generator.")


CUSTOM_KINDS: dict[tuple[str, str], type[BaseModel]] = {
    ("ray.io/v1", "RayService"): RayService,
    ("ray.io/v1", "RayJob"): RayJob,
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): Kustomization,
}


def json_schemas() -> dict[str, dict]:
    """JSON Schemas (draft 2020-12) of the modelled custom kinds, keyed by file name."""
    out = {}
    for (api, kind), model in CUSTOM_KINDS.items():
        schema = model.model_json_schema(by_alias=True)
        schema["$comment"] = (
            f"{kind} ({api}) as checked offline by deploy/k8s_models.py, field names of KubeRay {KUBERAY_VERSION}; "
            "generated by `knnssd k8s render`, do not edit"
        )
        out[f"{kind.lower()}_{api.split('/')[-1]}.json"] = schema
    return out
