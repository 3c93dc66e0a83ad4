"""The settings of one index build and of each domain's search: `BuildSettings` is the single declaration
that `knnssd index build` (index/cli.py) and the Ray job `python -m index.job` (index/job.py) generate
their flags from (index/options.py); `SearchSettings` is one domain's search (index.search). The settings
both have (`SearchEffort`: how much a search screens and measures, and its seed) are declared once, in
their common base, and a build passes its values on (`BuildSettings.search_settings`).

This module imports no numpy, torch or index.search, so `knnssd --help` stays instant; `index.build` and
`index.search` re-export `BuildSettings` and `SearchSettings`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.config import KNOBS, DraftConfig, KnobSpace
from engine.knobs import CostModel

if TYPE_CHECKING:
    from index.select import SelectSettings

# The representations a serving router can route with. The router (router.route.Router.from_config)
# embeds every request with MiniLM on the CPU, next to the request path, and refuses an artefact whose
# embedder_id differs (router.reload): an 'llm-hidden' index needs the LLM itself to embed each prompt,
# which the router does not load. Such an index is an offline experiment (`knnssd bench engine --routed`).
SERVED_REPRESENTATIONS = ("minilm",)


def _general_candidates() -> dict[str, DraftConfig]:
    from index.select import GENERAL_CANDIDATES  # numpy: only when a build actually starts

    return dict(GENERAL_CANDIDATES)


class SearchEffort(BaseModel):
    """How much one domain's search screens and measures, and its seed: settings of the search and flags
    of the build alike (the build passes each on under the same name)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    budget: int = Field(24, ge=1, description="Candidate draft configs screened per domain by draft agreement (TPE + random proposals).")
    seed: int = Field(
        0,
        description="Seed for prompt choice, random proposals and TPE (and a build's k-means and bootstrap); the same seed and data "
        "reproduce the screening.",
    )
    max_new_tokens: int = Field(32, ge=2, description="Tokens generated per measured run when comparing candidates against plain decoding.")
    measure_prompts: int = Field(3, ge=1, description="Prompts per domain on which tokens/s is measured.")
    screen_prompts: int = Field(4, ge=1, description="Prompts per domain whose greedy continuation screens each candidate.")
    n_measure: int = Field(2, ge=1, description="Best screened candidates per domain whose tokens/s is measured against plain decoding.")
    measure_rounds: int = Field(
        3, ge=1, description="Interleaved rounds of measurement (each runs plain and every candidate once per prompt); each (config, prompt) keeps its fastest run."
    )
    layer_profile_prompts: int = Field(2, ge=0, description="Prompts per domain for the per-layer agreement profile and plot (0 disables it).")


class SearchSettings(SearchEffort):
    """Knobs of one domain's search (all candidates greedy; output is lossless whatever is chosen)."""

    screen_tokens: int = Field(32, ge=2, description="Length of the greedy continuation used for screening.")
    plausibility_slack: float = Field(0.05, ge=0.0, description="A measured speedup above tokens-per-verify-pass x (1 + this) is treated as disturbed timing and disqualified.")
    min_speedup: float = Field(1.03, ge=0.0, description="A candidate must measure at least this speedup over plain, or the domain gets plain.")
    random_fraction: float = Field(0.4, ge=0.0, le=1.0, description="Share of candidates proposed at random (sparse skip sets) rather than by TPE.")
    protect_first: int = Field(1, ge=0, description="Leading layers never skipped (early layers matter most for drafts).")
    protect_last: int = Field(1, ge=0, description="Trailing layers never skipped.")
    max_skip_fraction: float = Field(0.35, gt=0.0, le=1.0, description="Random proposals skip at most this share of the searchable sub-layers.")
    knobs: dict[str, tuple] = Field(
        # what the search screened before KNOBS existed (max_draft 2-8, fp32 and int8 drafts), so a build
        # with the default settings screens the same candidates as earlier builds
        default_factory=lambda: {"max_draft": (2, 8), "quantize": ("none", "int8")},
        description="Narrows the values searched for screened knobs of engine.config.KNOBS: (low, high), inclusive, for an "
        "int or float knob (on its KNOBS step), the choices for a choice knob; a knob not named is searched over all its KNOBS values.",
    )
    head_cost: float = Field(0.12, ge=0.0, le=1.0, description="Cost model: share of a full pass spent outside decoder layers (embedding, final norm, LM head).")
    attn_share: float = Field(0.4, ge=0.0, le=1.0, description="Cost model: share of a decoder layer's cost spent in attention (the rest in the MLP).")
    verify_token_cost: float = Field(0.06, ge=0.0, description="Cost model: extra cost of each additional verified token, as a fraction of a 1-token pass.")
    calibrate: bool = Field(True, description="Calibrate the cost model's draft-pass cost from one measured speculative run per draft precision.")
    prompt_lookup_variant: int = Field(3, ge=0, le=8, description="Also measure the best candidate with prompt lookup of this n-gram size (0: never).")
    int8_cost: float = Field(0.6, gt=0.0, description="Cost model: cost of an int8 draft layer relative to an fp32 one (before calibration).")
    subset_head_cost: float = Field(0.25, gt=0.0, le=1.0, description="Cost model: cost of a vocabulary-subset draft head relative to the full head.")

    @field_validator("knobs")
    @classmethod
    def _narrows_screened_knobs(cls, v: dict[str, tuple]) -> dict[str, tuple]:
        # only narrowing: KNOBS stays the one place that says what a knob's values can be
        for name, vals in v.items():
            space = KNOBS.get(name)
            if space is None or space.kind in ("layers", "layer") or not space.screened:
                raise ValueError(f"knobs: {name!r} is not a screened knob of engine.config.KNOBS")
            if space.kind == "choice":
                ok = len(vals) > 0 and all(x in space.choices for x in vals)
            else:
                ok = len(vals) == 2 and space.low <= vals[0] <= vals[1] <= space.high
            if not ok:
                raise ValueError(f"knobs: {name}={tuple(vals)} does not narrow KNOBS' {space.values()}")
        return v

    def cost_model(self) -> CostModel:
        """The cost model's parameters, as the knobs' declarations read them (`Knob.cost`)."""
        return CostModel(self.head_cost, self.attn_share, self.int8_cost, self.subset_head_cost)

    def space(self) -> dict[str, KnobSpace]:
        """The knobs screening searches besides the layer sets, in KNOBS order, narrowed by `knobs`."""
        out = {}
        for name, space in KNOBS.items():
            if space.kind == "layers" or not space.screened:
                continue
            vals = self.knobs.get(name)
            if vals is not None:
                space = replace(space, choices=tuple(vals)) if space.kind == "choice" else replace(space, low=vals[0], high=vals[1])
            out[name] = space
        return out


class BuildSettings(SearchEffort):
    """Settings of one index build. Every scalar field is a flag of both entry points (`--max-new-tokens`
    for max_new_tokens; booleans as --x/--no-x), described by its description; those of `SearchEffort`
    (budget, seed, the prompt and round counts) are passed on to every domain's search."""

    data: Path = Field(description="Data directory: one <domain>.jsonl per domain.")
    out: Path = Field(description="Artefact root: versions are written under <out>/versions, <out>/CURRENT names the current one.")
    k: int = Field(2, ge=1, description="k-means centroids per domain (clamped to the domain's number of prompts).")
    representation: Literal["minilm", "llm-hidden"] = Field(
        "minilm",
        description="Prompt representation: the bundled MiniLM sentence embedder, or the LLM's mean-pooled last hidden state. "
        "'llm-hidden' is an offline experiment: the serving router embeds with MiniLM and refuses such an index "
        "(only `knnssd bench engine --routed` can route with it).",
    )
    # The Ray job defaulted to 2 and the local build to 1; one default now, and the job's cluster default is
    # explicit data there (index.job.JOB_DEFAULTS).
    workers: int = Field(
        1,
        ge=1,
        description="Domains searched in parallel (local processes or Ray tasks), each loading the engine once. Default 1 on one "
        "machine: every worker loads its own engine and splits the cores, and parallel runs disturb each other's tokens/s "
        "measurements; the Ray job defaults to 2 (each task has its own CPUs on the cluster).",
    )
    model: str = Field("smollm2", description="Engine model name (bundled name or a Hugging Face model directory).")
    precision: Literal["auto", "reference", "native", "native-f32"] = Field(
        "auto", description="Engine precision the configs are measured at (engine.generate.PRECISIONS; auto: native on a CPU for a GGUF "
        "model). The manifest records it and a replica running another precision refuses the index.",
    )
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
        """The domain search's settings: this build's `SearchEffort` (budget, seed, max_new_tokens, the prompt
        and round counts); the rest keep SearchSettings' defaults."""
        return SearchSettings(**{name: getattr(self, name) for name in SearchEffort.model_fields})

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
