"""Deployable router settings: one pydantic model, a description on every field.

Timeouts are short on purpose: a routing decision is worth ~20 ms of embedding, so waiting longer than
that on a slow Redis would cost more than it saves; the router then routes from its local index.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class RouterConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    k: int = Field(5, ge=1, le=256, description="Nearest centroids that vote on the domain.")
    distance_threshold: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="Cosine similarity below which a prompt gets the fallback config; None uses the manifest's.",
    )
    redis_url: str | None = Field(
        "redis://127.0.0.1:6379/0", description="Redis for the decision cache and the index version key; None disables it."
    )
    key_prefix: str = Field(
        "", description="Prepended to every Redis key the router reads or writes (namespacing, tests)."
    )
    cache_ttl_s: int = Field(3600, ge=1, description="Lifetime of a cached routing decision in Redis, seconds.")
    socket_timeout_s: float = Field(
        0.05, gt=0, description="Redis read/write timeout; a slower answer counts as a Redis error and is skipped."
    )
    connect_timeout_s: float = Field(0.05, gt=0, description="Redis connect timeout, seconds.")
    backoff_initial_s: float = Field(
        0.1, ge=0, description="After a Redis error, skip Redis for this long before trying again (doubles per error)."
    )
    backoff_max_s: float = Field(2.0, ge=0, description="Upper bound of the Redis backoff, seconds.")
    index_root: str | None = Field(
        None, description="Artefact root (<root>/versions/<v>, <root>/CURRENT) used when Redis names no version."
    )
    poll_interval_s: float = Field(1.0, gt=0, description="How often the reloader reads the index version key.")
    use_pubsub: bool = Field(True, description="Also listen on the index update channel to reload at once.")
    embed_threads: int | None = Field(
        1,
        ge=1,
        description=(
            "Torch intra-op threads for embedding one prompt, set for the calling thread only and restored "
            "after; 1 is ~10x faster than 2 on a busy 2-core CPU. None leaves torch's setting alone."
        ),
    )
    expect_model_hash: str | None = Field(
        None, description="Refuse artefacts built for another model (hash in the manifest); None accepts any."
    )
