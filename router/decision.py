"""`RouteDecision`: what the router answers for one prompt, the seam between router, cache and service.

It is a frozen pydantic model so the cache can store it as JSON and validate it on the way back; a
stored value whose `config_id` does not match its config is rejected as malformed.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.config import DraftConfig

FALLBACK_DOMAIN = "fallback"


class RouteDecision(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    domain: str = Field(description=f"Routed domain; {FALLBACK_DOMAIN!r} when the prompt is far from every centroid.")
    config: DraftConfig = Field(description="Draft configuration to decode with.")
    config_id: str = Field("", description="config.config_id, filled in when empty.")
    similarity: float = Field(description="Cosine similarity of the best centroid of the voted domain (1 = same).")
    index_version: str = Field(description="Index artefact version the decision was made with.")
    fallback: bool = Field(False, description="True when the fallback config was chosen.")
    nearest_domain: str | None = Field(None, description="Domain the vote chose, also when it fell back.")
    cached: bool = Field(False, description="True when the decision came from the Redis cache.")

    @model_validator(mode="after")
    def _check_config_id(self) -> RouteDecision:
        if not self.config_id:
            object.__setattr__(self, "config_id", self.config.config_id)
        elif self.config_id != self.config.config_id:
            raise ValueError(f"config_id {self.config_id!r} does not match its config ({self.config.config_id!r})")
        return self
