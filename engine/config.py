"""Typed payloads at the engine's seams: what to draft with, how to sample, and what a decode measured.

`DraftConfig` travels everywhere (index artefact, Redis cache, HTTP response), so it is a frozen pydantic
model with a stable `config_id`. `SamplingParams` is per request. `DecodeStats` only collects numbers;
logging and Prometheus read it elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.knobs import (
    FITS,
    CostModel,
    CostPart,
    Knob,
    KnobSpace,
    ModelShape,
    Problem,
    last_layer,
    layer_cell,
    layer_count,
    vocab_size,
)


# The knobs that existed when ids were first stored (artefacts, Redis caches): always hashed. Any knob
# added since is hashed only when it differs from its default, so adding one changes no stored id and
# needs no edit here.
_ID_FIRST_KNOBS = frozenset({
    "enabled", "skip_attn", "skip_mlp", "max_draft", "confidence", "adaptive", "target_acceptance", "quantize",
    "draft_vocab", "prompt_lookup",
})


_SKIPS = "skips layers {bad}, but the model has {num_layers} (0-{limit})"


class DraftConfig(BaseModel):
    """How the model drafts its own tokens. Output is lossless whatever these are: the verify pass
    always runs the full model, so a config only changes speed.

    Each knob is declared here once: its field, and in its `Knob` (engine.knobs) its search space, its
    bound against the model, its draft-plan arguments, its share of the estimated draft cost and its
    report column. A field without a `Knob` (enabled, target_acceptance) is a setting of other knobs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(True, description="False turns speculation off: plain decoding, one full pass per token.")
    skip_attn: Annotated[tuple[int, ...], Knob(
        KnobSpace("layers"), limit=last_layer, reason="layers", problem=_SKIPS, plan=lambda v: {"skip_attn": v},
        cost=lambda v, m, cm: CostPart(removed=cm.attn_share * len(v)), column="skip attn", cell=layer_cell,
    )] = Field((), description="Decoder layers whose attention sub-layer the draft skips.")  # fmt: skip
    skip_mlp: Annotated[tuple[int, ...], Knob(
        KnobSpace("layers"), limit=last_layer, reason="layers", problem=_SKIPS, plan=lambda v: {"skip_mlp": v},
        cost=lambda v, m, cm: CostPart(removed=(1.0 - cm.attn_share) * len(v)), column="skip mlp", cell=layer_cell,
    )] = Field((), description="Decoder layers whose MLP sub-layer the draft skips.")  # fmt: skip
    max_draft: Annotated[int, Knob(KnobSpace("int", 2, 12, 1), column="max")] = Field(
        4, ge=1, le=32, description="Most tokens drafted before one verify pass."
    )
    confidence: Annotated[float, Knob(KnobSpace("float", 0.0, 0.9, 0.05), column="conf", cell=lambda v, c: f"{v:.2f}")] = Field(
        0.5, ge=0.0, le=1.0, description="Stop drafting early when the draft's top-1 probability falls below this."
    )
    adaptive: Annotated[bool, Knob(
        KnobSpace("choice", choices=(False, True), screened=False, alone=True),
        column="adaptive", cell=lambda v, c: f"{c.target_acceptance:.2f}" if v else "no",
    )] = Field(
        False,
        description="Adapt the confidence threshold per request from running acceptance (Draft&Verify): "
        "raise it after a step that accepted less than `target_acceptance`, lower it otherwise.",
    )  # fmt: skip
    target_acceptance: float = Field(
        0.7, gt=0.0, lt=1.0, description="Acceptance rate the adaptive threshold steers towards."
    )
    # int8 alone is the ablation's precision (int4 is measured in the combined configs)
    quantize: Annotated[Literal["none", "int8", "int4"], Knob(
        KnobSpace("choice", choices=("none", "int8", "int4"), alone="int8", label="int8", alone_with={"max_draft": 6, "confidence": 0.3}),
        plan=lambda v: {"precision": "full" if v == "none" else v},
        cost=lambda v, m, cm: CostPart(layers=cm.int8_cost if v == "int8" else 1.0), column="quant",
    )] = Field(
        "none",
        description="Precision of the draft's weights: 'int8' (per row) or 'int4' (per group of 32 inputs, the "
        "layout of GGUF Q4_1) weight-only copies with bf16 activations, kept beside the full weights; the "
        "verify pass always uses the full weights.",
    )  # fmt: skip
    draft_vocab: Annotated[int, Knob(
        KnobSpace("choice", choices=(0, 8192), alone=8192, label="vocab8k"), limit=vocab_size, reason="vocab",
        problem="draft_vocab {value} exceeds the model's vocabulary of {limit}", plan=lambda v: {"head_rows": v},
        cost=lambda v, m, cm: CostPart(head=cm.subset_head_cost if v > 0 else 1.0), column="vocab", cell=lambda v, c: str(v or "all"),
    )] = Field(
        0, ge=0, description="Rows of the draft-only LM head (most frequent tokens first, FR-Spec style); 0 = all."
    )  # fmt: skip
    prompt_lookup: Annotated[int, Knob(
        KnobSpace("choice", choices=(0, 2, 3), screened=False, alone=3, label="lookup", alone_with={"model_draft": False, "max_draft": 8}),
        column="lookup", cell=lambda v, c: str(v or "-"),
    )] = Field(
        0,
        ge=0,
        le=8,
        description="Longest n-gram matched against the prompt and output so far to propose a copied "
        "continuation (prompt lookup); used instead of the model draft when it matches. 0 = off.",
    )  # fmt: skip

    # Not searched: screening it would change the candidates every earlier build screened (a "layer" space
    # would search it over the model's searchable layers).
    early_exit: Annotated[int, Knob(
        limit=layer_count, reason="layers", problem="exits after layer {value} but the model has {num_layers} layers",
        plan=lambda v: {"exit_layer": v},
        cost=lambda v, m, cm: CostPart(removed=m.num_layers - v if 0 < v < m.num_layers else 0.0),
        column="exit", cell=lambda v, c: str(v or "-"),
    )] = Field(
        0,
        ge=0,
        description="Early-exit draft (LayerSkip/DEL without their training): the draft runs only the first N decoder "
        "layers, then the final norm and head; 0 (or N >= the model's layers) runs them all. Combines with skips.",
    )  # fmt: skip

    model_draft: Annotated[bool, Knob(column="model", cell=lambda v, c: "yes" if v else "no")] = Field(
        True,
        description="Draft with the model when prompt lookup proposes nothing; False drafts by lookup alone "
        "(no draft pass at all: a step without a match is a plain decoding step).",
    )

    @field_validator("skip_attn", "skip_mlp", mode="before")
    @classmethod
    def _sorted_unique(cls, v: object) -> tuple[int, ...]:
        layers = tuple(sorted({int(i) for i in v}))  # type: ignore[union-attr]
        if any(i < 0 for i in layers):
            raise ValueError("layer indices must be >= 0")
        return layers

    @property
    def config_id(self) -> str:
        """Short stable id: the same knobs always give the same id (used in metrics and responses)."""
        if not self.enabled:
            return "plain"
        later = self.model_dump(mode="json", exclude=set(_ID_FIRST_KNOBS), exclude_defaults=True)
        fields = self.model_dump(mode="json", include=set(_ID_FIRST_KNOBS)) | later
        blob = json.dumps(fields, sort_keys=True).encode()
        return "ssd-" + hashlib.sha256(blob).hexdigest()[:10]

    @classmethod
    def from_options(cls, options: list[str] | tuple[str, ...], base: dict | None = None) -> DraftConfig:
        """A config from `knob=value` strings (CLI flags generated from the fields, so every knob is
        settable without listing it): layer sets as '1,2,5-8', booleans as true/false, JSON otherwise."""
        data = dict(base or {})
        for opt in options:
            name, sep, value = opt.partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in cls.model_fields:
                raise ValueError(f"expected KNOB=VALUE with KNOB one of {', '.join(cls.model_fields)}; got {opt!r}")
            data[name] = _option_value(name, value.strip())
        return cls.model_validate(data)

    # ---- what the knobs' declarations derive ------------------------------------------------------

    def problems(self, num_layers: int, vocab_size: int | None = None) -> list[Problem]:
        """(reason, message) for each way this config does not fit a model of this shape (each knob's
        bound), or runs but drafts nothing useful (reason "config"); empty when it fits. The one
        validation: the engine (`check`), the router's reload and the index build call it."""
        if not self.enabled:
            return []
        shape = ModelShape(num_layers, vocab_size)
        out = [p for name, knob in declared_knobs(type(self)).items() if (p := knob.check(name, getattr(self, name), shape))]
        if len(set(self.skip_attn) & set(self.skip_mlp)) >= num_layers:
            out.append(("config", "skips every layer: the draft would be the embedding alone"))
        if not self.model_draft and self.prompt_lookup == 0:
            out.append(("config", "model_draft is off and prompt_lookup is 0: nothing would ever be drafted"))
        return out

    def check(self, num_layers: int, vocab_size: int | None = None) -> None:
        """Raise ValueError when the config cannot run on the model (a "config" problem still runs: it
        drafts nothing, so it decodes plainly)."""
        bad = [msg for reason, msg in self.problems(num_layers, vocab_size) if reason in FITS]
        if bad:
            raise ValueError(f"DraftConfig {'; '.join(bad)}")

    def plan_args(self) -> dict:
        """`LeanModel.plan` keyword arguments for this config's model draft, from the knobs' declarations."""
        out: dict = {}
        for name, knob in declared_knobs(type(self)).items():
            if knob.plan is not None:
                out.update(knob.plan(getattr(self, name)))
        return out

    def cost_parts(self, num_layers: int, cm: CostModel) -> list[CostPart]:
        """Each knob's share of the estimated draft pass cost (engine.knobs.total_cost adds them up)."""
        shape = ModelShape(num_layers)
        return [knob.cost(getattr(self, name), shape, cm) for name, knob in declared_knobs(type(self)).items() if knob.cost]

    def report_cells(self) -> list[str]:
        """The report's cells, one per `report_columns()` ('-' where plain decoding has none)."""
        cols = {name: knob for name, knob in declared_knobs(type(self)).items() if knob.column}
        if not self.enabled:
            return ["plain", *["-"] * len(cols)]
        return [self.config_id, *(knob.cell(getattr(self, name), self) for name, knob in cols.items())]

    @classmethod
    def report_columns(cls) -> tuple[str, ...]:
        return ("config", *(k.column for k in declared_knobs(cls).values() if k.column))

    @classmethod
    def plain(cls) -> DraftConfig:
        return cls(enabled=False)


def declared_knobs(cls: type[BaseModel] = None) -> dict[str, Knob]:  # type: ignore[assignment]
    """Every field of `cls` (DraftConfig) declared with a `Knob`, in field order. Read at each call, so
    a field added to the class is a knob at once."""
    fields = (cls or DraftConfig).model_fields
    return {name: k for name, f in fields.items() for k in f.metadata if isinstance(k, Knob)}


def _option_value(name: str, value: str):
    if name in ("skip_attn", "skip_mlp"):
        out: list[int] = []
        for part in filter(None, (p.strip() for p in value.split(","))):
            lo, dash, hi = part.partition("-")
            out.extend(range(int(lo), int(hi) + 1) if dash else [int(lo)])
        return out
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value  # a bare string (quantize=int4)


# The search space of each searched knob, from the declarations (the search, the bench ablation and the
# CLI read it): a knob whose `Knob` has no space is not searched (model_draft, early_exit, ...).
KNOBS: dict[str, KnobSpace] = {name: k.space for name, k in declared_knobs(DraftConfig).items() if k.space is not None}


class RuntimeSettings(BaseModel):
    """How one engine runs many requests."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_running: int = Field(8, ge=1, description="Requests decoded together (KV-cache slots); more wait in the queue.")
    max_waiting: int = Field(64, ge=0, description="Requests queued for a slot; a full queue refuses new ones (the service answers 503).")
    prefill_chunk: int = Field(128, ge=1, description="Prompt tokens per prefill chunk; chunks start at multiples of this, so a prompt's split never depends on load.")
    prefill_rows: int = Field(256, ge=1, description="Most prompt rows per iteration (whole chunks, at least one), so long prompts interleave with other requests' steps.")
    load_aware: bool = Field(True, description="Shorten or switch off drafts when measured pass costs say they do not pay at the current batch size.")
    calibrate: bool = Field(True, description="Measure pass costs by rows once (about a second) before the first batched decision.")


class SamplingParams(BaseModel):
    """Per-request decoding parameters. temperature == 0 means greedy."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_new_tokens: int = Field(128, ge=1, description="Most tokens generated (fewer at EOS, a stop string, or the context end).")
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 is greedy; above 0 samples from softmax(logits / temperature).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling: keep the smallest set of tokens with this much mass.")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens; 0 keeps all.")
    seed: int | None = Field(None, description="Seed for sampling; the same seed, prompt and config give the same output.")
    stop: tuple[str, ...] = Field((), description="Stop strings: generation ends before the first occurrence of any.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class DecodeStats:
    """Numbers one decode measured. `observe_*` methods collect; exporters only read."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    steps: int = 0  # verify passes (speculative) or decode passes (plain)
    drafted: int = 0
    accepted: int = 0
    drafted_by_pos: list[int] = field(default_factory=list)
    accepted_by_pos: list[int] = field(default_factory=list)
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_other: float = 0.0
    finish_reason: str = ""
    paused_steps: int = 0  # steps online correction left without a model draft (it was not paying)
    load_capped_steps: int = 0  # steps whose draft length the load-aware cap shortened
    load_plain_steps: int = 0  # steps the load-aware cap turned speculation off for (batch too large)
    max_batch: int = 0  # most requests that shared a pass with this one

    def observe_step(self, drafted: int, accepted: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        while len(self.drafted_by_pos) < drafted:
            self.drafted_by_pos.append(0)
            self.accepted_by_pos.append(0)
        for i in range(drafted):
            self.drafted_by_pos[i] += 1
            if i < accepted:
                self.accepted_by_pos[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_by_pos(self) -> list[float]:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_by_pos, self.drafted_by_pos)]

    @property
    def mean_tokens_per_step(self) -> float:
        """Committed tokens per verify pass (1.0 for plain decoding); the prefill token is not a step."""
        decoded = max(self.new_tokens - 1, 0)
        return decoded / self.steps if self.steps else 0.0

    @property
    def time_total(self) -> float:
        return self.time_prefill + self.time_draft + self.time_verify + self.time_other

    def to_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "acceptance_by_pos": [round(x, 4) for x in self.acceptance_by_pos],
            "mean_tokens_per_step": round(self.mean_tokens_per_step, 4),
            "time_prefill_s": round(self.time_prefill, 5),
            "time_draft_s": round(self.time_draft, 5),
            "time_verify_s": round(self.time_verify, 5),
            "time_other_s": round(self.time_other, 5),
            "finish_reason": self.finish_reason,
            "paused_steps": self.paused_steps,
            "load_capped_steps": self.load_capped_steps,
            "load_plain_steps": self.load_plain_steps,
            "max_batch": self.max_batch,
        }
