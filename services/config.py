"""Deployable configuration: pydantic models with a description on every field, loadable from YAML.

`AppConfig.from_yaml(path)` reads a config file (unknown keys are errors, so typos surface);
`AppConfig.serve_config()` produces the Ray Serve config (the shape `serve deploy` and a KubeRay
`serveConfigV2` take: `applications: [{name, route_prefix, import_path, args, deployments: [...]}]`),
with per-deployment overrides from `deployments`. The Serve builder at `serve.import_path` receives the
whole AppConfig as `args["config"]`, so one file drives both the app and its scaling.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.config import RuntimeSettings


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AutoscalingSettings(_Config):
    """Ray Serve autoscaling for one deployment (a subset of Serve's AutoscalingConfig)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas kept running (0 allows scale to zero).")
    max_replicas: int = Field(4, ge=1, description="Most replicas the autoscaler starts.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Ongoing requests per replica the autoscaler aims for; more scales up."
    )
    upscale_delay_s: float | None = Field(None, ge=0, description="Seconds of sustained load before scaling up.")
    downscale_delay_s: float | None = Field(None, ge=0, description="Seconds of low load before scaling down.")
    look_back_period_s: float | None = Field(
        None, gt=0, description="Window over which ongoing requests are averaged for a decision (Serve's default: 30 s)."
    )

    @model_validator(mode="after")
    def _order(self) -> AutoscalingSettings:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be >= min_replicas")
        return self


class RayActorOptions(_Config):
    """Resources each replica actor reserves."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(
        0.0, ge=0, description="GPUs reserved per replica (1 for GPU model replicas; an `engine.device` of "
        "'cuda' or 'cuda:N' reserves 1 when this is 0, since Ray hides unreserved GPUs from an actor).",
    )


class DeploymentSettings(_Config):
    """Scaling and resources of one Serve deployment."""

    name: str = Field(description="Deployment name in the Serve app (the builder uses the same name).")
    num_replicas: int | None = Field(1, ge=1, description="Fixed replica count; ignored when autoscaling is set.")
    autoscaling_config: AutoscalingSettings | None = Field(
        None, description="Autoscale between min and max replicas instead of a fixed count."
    )
    max_ongoing_requests: int = Field(
        8, ge=1, description="Most requests one replica handles at once (for GPU model replicas at least "
        "`runtime.max_running`, which AppConfig enforces: the runtime could not batch more than Serve sends it).",
    )
    max_queued_requests: int = Field(
        -1, ge=-1, description="Requests queued per caller before 503 (back-pressure); -1 for no limit."
    )
    ray_actor_options: RayActorOptions = Field(
        default_factory=RayActorOptions, description="Resources reserved by each replica."
    )

    def serve_options(self) -> dict[str, Any]:
        """Keyword arguments for `serve.deployment(...)` / `.options(...)`, and the Serve config entry."""
        out: dict[str, Any] = {
            "name": self.name,
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": self.ray_actor_options.model_dump(),
        }
        if self.max_queued_requests != -1:
            out["max_queued_requests"] = self.max_queued_requests
        if self.autoscaling_config is not None:
            out["autoscaling_config"] = self.autoscaling_config.model_dump(exclude_none=True)
        else:
            out["num_replicas"] = self.num_replicas or 1
        return out


class DeploymentsConfig(_Config):
    """The three deployments of the app."""

    gateway: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(
            name="Gateway", max_ongoing_requests=64, max_queued_requests=64, ray_actor_options=RayActorOptions(num_cpus=0.25)
        ),
        description="FastAPI ingress: auth, limits, OpenAI schema.",
    )
    router: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(
            name="Router", max_ongoing_requests=32, ray_actor_options=RayActorOptions(num_cpus=0.25)
        ),
        description="Embeds prompts and picks the draft config by KNN over the index.",
    )
    replica: DeploymentSettings = Field(
        default_factory=lambda: DeploymentSettings(
            # as many as the runtime batches (runtime.max_running): fewer would leave batch slots empty
            # while requests wait in Serve's queue (at 8 clients on 2 cores, 4 gave 2.2x the throughput
            # of 1 client, 8 gave 3.0-3.7x; issue 21's bench serve)
            name="ModelReplica", max_ongoing_requests=8, max_queued_requests=8, ray_actor_options=RayActorOptions(num_cpus=1)
        ),
        description="Model replicas, one engine each (set num_gpus: 1 on GPU nodes).",
    )


class HttpConfig(_Config):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds (0.0.0.0 in containers).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body accepted; larger gets 413.")
    body_timeout_s: float = Field(
        10.0, gt=0, description="Seconds a client has to send the whole request body; slower gets 408 and is cut off."
    )
    metrics_public: bool = Field(
        False,
        description="Serve /metrics without a key (only where the port is private to the scraper); otherwise it "
        "needs the key of an admin tenant (`knnssd tenants add NAME --admin`).",
    )


class LimitsConfig(_Config):
    default_rpm: int = Field(120, ge=0, description="Requests per window for tenants without their own; 0 = unlimited.")
    default_tpm: int = Field(
        200_000, ge=0, description="Tokens (prompt + completion) per window for tenants without their own; 0 = unlimited."
    )
    window_s: float = Field(60.0, gt=0, description="Sliding window length in seconds (60 for per-minute limits).")
    fail_open: bool = Field(True, description="When Redis is unreachable, admit requests (and count it) instead of 503.")
    default_max_concurrent: int = Field(
        8, ge=0, description="Requests one tenant may have in flight on one gateway replica (more get 429 before "
        "the body is read), for tenants without their own; 0 = unlimited.",
    )
    default_max_prompt_tokens: int = Field(
        4096, ge=0, description="Longest prompt (tokens) a tenant may send, for tenants without their own; longer gets "
        "400 before any model work. 0 = only the model's context limit.",
    )


class GenerationConfig(_Config):
    default_max_tokens: int = Field(128, ge=1, description="max_tokens when a request leaves it out.")
    max_tokens_limit: int = Field(2048, ge=1, description="Largest max_tokens a request may ask for (400 above).")
    stream_chunk_ms: float = Field(
        20.0, ge=0, description="A replica coalesces the decoding steps that arrive within this many milliseconds "
        "into one chunk to the gateway (one Ray message); the first token and the last step go at once."
    )
    stream_chunk_tokens: int = Field(
        16, ge=1, description="Most tokens a replica gathers into one chunk before sending it (with stream_chunk_ms)."
    )


class ServeAppConfig(_Config):
    name: str = Field("knnssd", description="Serve application name.")
    route_prefix: str = Field("/", description="HTTP route prefix of the application.")
    import_path: str = Field(
        "services.app:build_app", description="Builder `module:function` Serve calls with `args` to build the app."
    )
    runtime_env: dict[str, Any] = Field(
        default_factory=dict, description="Ray runtime_env for the application (env_vars, pip, working_dir...)."
    )


class EngineSettings(_Config):
    """Where and how each model replica runs its engine."""

    device: str = Field(
        "auto", description="Torch device: 'cpu', 'cuda', 'cuda:N', or 'auto' (the GPU Ray gives the replica when it "
        "has one, else the CPU)."
    )
    dtype: str = Field(
        "auto", description="Weights and activations: 'float32', 'bfloat16', 'float16', or 'auto' (fp32 on the CPU, "
        "bf16 on a GPU). Greedy output is identical with and without speculation for any choice."
    )
    max_seq_len: int = Field(8192, ge=16, description="Longest prompt + output a request may reach (capped by the model's context).")
    precision: Literal["auto", "reference", "native", "native-f32"] = Field(
        "auto", description="Arithmetic of every pass: 'reference' is fp32 on the dequantised weights; 'native' the GGUF's own "
        "quantised blocks with int8 activations (llama.cpp's scheme) and 'native-f32' with fp32 activations, both CPU-only; "
        "'auto' is native on a CPU for a bundled GGUF model, else reference. Lossless at every precision: speculative output "
        "equals plain output at the same precision. The index must have been measured at the same precision.",
    )

    def served_precision(self, has_blocks: bool, gpu_reserved: bool) -> str:
        """The precision replicas run, decided from the settings alone (the router must know it without a
        GPU of its own): a CPU replica is one whose device is 'cpu', or 'auto' without a reserved GPU."""
        from engine.generate import resolve_precision
        import torch

        cpu = self.device == "cpu" or (self.device == "auto" and not gpu_reserved)
        dtype = torch.float32 if self.dtype in ("auto", "float32") else torch.bfloat16
        return resolve_precision(self.precision, torch.device("cpu" if cpu else "cuda"), dtype, has_blocks)

    @property
    def wants_gpu(self) -> bool:
        """An explicit GPU device ('auto' follows what Ray reserved; 'cpu' never needs one)."""
        return self.device.split(":")[0] == "cuda"


def _env_redis_url() -> str:
    return os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


class AppConfig(_Config):
    """Everything one deployment of the service needs."""

    def served_precision(self) -> str:
        """The engine precision the model replicas run (`EngineSettings.served_precision`): the router checks
        the index against it."""
        from engine.load import BUNDLED

        has_blocks = self.model_path is None and self.model in BUNDLED
        return self.engine.served_precision(has_blocks, self.deployments.replica.ray_actor_options.num_gpus > 0)

    model: str = Field("smollm2", description="Served model name (what requests put in `model`).")
    model_path: str | None = Field(
        None, description="Hugging Face model directory or GGUF file; None loads the bundled model named by `model`."
    )
    index_path: str | None = Field(None, description="Index artefact directory; None uses the bundled default index.")
    redis_url: str = Field(default_factory=_env_redis_url, description="Redis URL (default: $REDIS_URL or localhost).")
    redis_prefix: str = Field("knnssd:", description="Prefix of every Redis key the service writes.")
    redis_timeout_s: float = Field(0.25, gt=0, description="Socket timeout of Redis calls on the request path.")
    tenants_file: str | None = Field(None, description="YAML file of tenants (hashed keys); Redis tenants also apply.")
    tenant_cache_s: float = Field(
        10.0, ge=0, description="Seconds a gateway replica trusts a validated key without asking Redis; a removal "
        "reaches every gateway at once by pub/sub, this is only the bound when that channel is down.",
    )
    http: HttpConfig = Field(default_factory=HttpConfig, description="HTTP listener and body limit.")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="Default per-tenant rate limits.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Defaults and caps for generation.")
    deployments: DeploymentsConfig = Field(
        default_factory=DeploymentsConfig, description="Scaling and resources of gateway, router and replicas."
    )
    engine: EngineSettings = Field(default_factory=EngineSettings, description="Device and dtype of the model replicas.")
    runtime: RuntimeSettings = Field(
        default_factory=RuntimeSettings,
        description="How one replica batches requests: slots, waiting queue, prefill chunks, load-aware speculation.",
    )
    serve: ServeAppConfig = Field(default_factory=ServeAppConfig, description="How the Serve application is named and built.")

    @model_validator(mode="after")
    def _gpu_replicas(self) -> AppConfig:
        """A replica on a GPU reserves one and takes what it batches. Ray shows an actor only the GPUs it
        reserved (CUDA_VISIBLE_DEVICES), so `device: cuda` with `num_gpus: 0` would fail at load, and
        `auto` would silently run on the CPU in fp32. Serve sends a replica at most
        `max_ongoing_requests`, so below `runtime.max_running` a GPU's batch slots would stay empty."""
        rep = self.deployments.replica
        opts = rep.ray_actor_options
        update: dict[str, Any] = {}
        if self.engine.wants_gpu and opts.num_gpus == 0:
            opts = opts.model_copy(update={"num_gpus": 1.0})
            update["ray_actor_options"] = opts
        if opts.num_gpus > 0 and rep.max_ongoing_requests < self.runtime.max_running:
            update["max_ongoing_requests"] = self.runtime.max_running
        if update:
            self.deployments = self.deployments.model_copy(update={"replica": rep.model_copy(update=update)})
        return self

    def with_engine(self, device: str | None = None, dtype: str | None = None, precision: str | None = None) -> AppConfig:
        """This config with another replica device, dtype and/or precision, validated again (GPU reservation)."""
        engine = self.engine.model_copy(update={k: v for k, v in (("device", device), ("dtype", dtype), ("precision", precision)) if v})
        return type(self).model_validate(self.model_dump() | {"engine": engine.model_dump()})

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> AppConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a YAML mapping, got {type(data).__name__}")
        return cls.model_validate(data)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> AppConfig:
        """From YAML when a path is given, else the defaults."""
        return cls.from_yaml(path) if path else cls()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def serve_applications(self) -> list[dict[str, Any]]:
        """The `applications` list of a Serve config (one application)."""
        app: dict[str, Any] = {
            "name": self.serve.name,
            "route_prefix": self.serve.route_prefix,
            "import_path": self.serve.import_path,
            "args": {"config": self.model_dump(mode="json")},
            "deployments": [d.serve_options() for d in self.deployment_list()],
        }
        if self.serve.runtime_env:
            app["runtime_env"] = self.serve.runtime_env
        return [app]

    def serve_config(self) -> dict[str, Any]:
        """A whole Serve config: for `serve deploy FILE`, or under a RayService's `serveConfigV2`."""
        return {
            "proxy_location": "EveryNode",
            "http_options": {"host": self.http.host, "port": self.http.port},
            "applications": self.serve_applications(),
        }

    def redis_client(self):
        """A Redis client for request-path calls: short timeouts and no retries, because every caller on
        that path degrades at once (limits fail open, usage is skipped, routing goes local) rather than
        waiting; redis-py's default retries would stall a request ~4 s per call while Redis is down."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis.from_url(
            self.redis_url,
            socket_timeout=self.redis_timeout_s,
            socket_connect_timeout=self.redis_timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=30,
        )

    def deployment_list(self) -> list[DeploymentSettings]:
        d = self.deployments
        return [d.gateway, d.router, d.replica]
