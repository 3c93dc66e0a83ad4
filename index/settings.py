"""The settings of one index build: the single declaration that `knnssd index build` (index/cli.py) and
the Ray job `python -m index.job` (index/job.py) generate their flags from (index/options.py).

This module imports no numpy, torch or index.search, so `knnssd --help` stays instant; `index.build`
re-exports `BuildSettings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.config import DraftConfig

if TYPE_CHECKING:
    from index.search import SearchSettings
    from index.select import SelectSettings

# The representations a serving router can route with. The router (router.route.Router.from_config)
# embeds every request with MiniLM on the CPU, next to the request path, and refuses an artefact whose
# embedder_id differs (router.reload): an 'llm-hidden' index needs the LLM itself to embed each prompt,
# which the router does not load. Such an index is an offline experiment (`knnssd bench engine --routed`).
SERVED_REPRESENTATIONS = ("minilm",)


def _general_candidates() -> dict[str, DraftConfig]:
    from index.select import GENERAL_CANDIDATES  # numpy: only when a build actually starts

    return dict(GENERAL_CANDIDATES)


class BuildSettings(BaseModel):
    """Settings of one index build. Every scalar field is a flag of both entry points (`--max-new-tokens`
    for max_new_tokens; booleans as --x/--no-x), described by its description."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: Path = Field(description="Data directory: one <domain>.jsonl per domain.")
    out: Path = Field(description="Artefact root: versions are written under <out>/versions, <out>/CURRENT names the current one.")
    k: int = Field(2, ge=1, description="k-means centroids per domain (clamped to the domain's number of prompts).")
    representation: Literal["minilm", "llm-hidden"] = Field(
        "minilm",
        description="Prompt representation: the bundled MiniLM sentence embedder, or the LLM's mean-pooled last hidden state. "
        "'llm-hidden' is an offline experiment: the serving router embeds with MiniLM and refuses such an index "
        "(only `knnssd bench engine --routed` can route with it).",
    )
    budget: int = Field(24, ge=1, description="Candidate draft configs screened per domain.")
    # The Ray job defaulted to 2 and the local build to 1; one default now, and the job's cluster default is
    # explicit data there (index.job.JOB_DEFAULTS).
    workers: int = Field(
        1,
        ge=1,
        description="Domains searched in parallel (local processes or Ray tasks), each loading the engine once. Default 1 on one "
        "machine: every worker loads its own engine and splits the cores, and parallel runs disturb each other's tokens/s "
        "measurements; the Ray job defaults to 2 (each task has its own CPUs on the cluster).",
    )
    seed: int = Field(0, description="Seed for k-means and the search; the same seed and data reproduce the screening.")
    model: str = Field("smollm2", description="Engine model name (bundled name or a Hugging Face model directory).")
    max_new_tokens: int = Field(32, ge=2, description="Tokens generated per measured run when comparing against plain decoding.")
    measure_prompts: int = Field(3, ge=1, description="Prompts per domain whose tokens/s is measured.")
    screen_prompts: int = Field(4, ge=1, description="Prompts per domain whose greedy continuation screens candidates.")
    n_measure: int = Field(2, ge=1, description="Best screened candidates per domain that are measured.")
    measure_rounds: int = Field(3, ge=1, description="Interleaved measurement rounds; each (config, prompt) keeps its fastest run.")
    layer_profile_prompts: int = Field(2, ge=0, description="Prompts per domain for the per-layer agreement plot (0 disables it).")
    threshold_quantile: float = Field(
        0.02, ge=0.0, le=1.0, description="The router's fallback threshold is this quantile of corpus prompts' similarity to their nearest centroid, minus threshold_margin."
    )
    threshold_margin: float = Field(0.05, ge=0.0, description="Subtracted from that quantile to give the fallback threshold (cosine similarity).")
    progress: bool = Field(True, description="Show progress bars (off: INFO log lines at each stage and every 30 s instead).")
    general: bool = Field(
        True,
        description="Measure a general config on all domains' prompts (it becomes the fallback) and keep a domain's own config only when it "
        "beats the general one by more than the noise; off: the older procedure (plain fallback, each domain its searched config).",
    )
    # Not a flag (a dict of configs): tests and experiments set it in Python.
    general_candidates: dict[str, DraftConfig] = Field(
        default_factory=_general_candidates, description="Candidates for the general config, by name (plain is always measured beside them)."
    )
    # The choice against the general config measures more than the search does (more prompts, more
    # tokens); by default it scales with the search's own measurement settings.
    general_prompts: int | None = Field(None, ge=1, description="Prompts per domain in the general config's measurement (None: measure_prompts + 1).")
    confirm_prompts: int | None = Field(None, ge=1, description="Prompts per domain on which its own config is compared with the general one (None: 2 x measure_prompts).")
    select_rounds: int | None = Field(None, ge=1, description="Interleaved rounds of the general and own-vs-general measurements, fastest run counts (None: min(measure_rounds, 2)).")
    select_tokens: int | None = Field(None, ge=2, description="Tokens per run in the general and own-vs-general measurements (None: 2 x max_new_tokens).")
    select_level: float = Field(0.9, gt=0.0, lt=1.0, description="Two-sided confidence level of the bootstrap intervals of those measurements.")

    def select_settings(self) -> SelectSettings:
        from index.select import SelectSettings

        return SelectSettings(
            general_prompts=self.general_prompts or self.measure_prompts + 1,
            confirm_prompts=self.confirm_prompts or 2 * self.measure_prompts,
            rounds=self.select_rounds or min(self.measure_rounds, 2),
            max_new_tokens=self.select_tokens or 2 * self.max_new_tokens,
            level=self.select_level,
            seed=self.seed,
        )

    def search_settings(self) -> SearchSettings:
        """The domain search's settings: every field named like one of SearchSettings' is that setting
        (budget, seed, max_new_tokens, the prompt and round counts); the rest keep SearchSettings' defaults."""
        from index.search import SearchSettings

        return SearchSettings(**{name: getattr(self, name) for name in SearchSettings.model_fields if name in type(self).model_fields})

    def unservable(self) -> str | None:
        """Why a serving router would refuse the index these settings build, or None when it can serve it.
        The entry points refuse such a build up front (a long build whose index no router loads); the
        Python API builds it (experiments, tests)."""
        if self.representation in SERVED_REPRESENTATIONS:
            return None
        return (
            f"representation {self.representation!r}: the serving router embeds prompts with MiniLM and refuses an index "
            f"built with another embedder, so no router could load this index. It is an offline experiment only "
            f"(`knnssd bench engine --routed --index OUT`); build it locally with `knnssd index build --experiment`."
        )
