"""Typed payloads at the engine's seams: what to draft with, how to sample, and what a decode measured.

`DraftConfig` travels everywhere (index artefact, Redis cache, HTTP response), so it is a frozen pydantic
model with a stable `config_id`. `SamplingParams` is per request. `DecodeStats` only collects numbers;
logging and Prometheus read it elsewhere.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


# The knobs that existed when ids were first stored (artefacts, Redis caches): always hashed. Any knob
# added since is hashed only when it differs from its default, so adding one changes no stored id and
# needs no edit here.
_ID_FIRST_KNOBS = frozenset({
    "enabled", "skip_attn", "skip_mlp", "max_draft", "confidence", "adaptive", "target_acceptance", "quantize",
    "draft_vocab", "prompt_lookup",
})


class DraftConfig(BaseModel):
    """How the model drafts its own tokens. Output is lossless whatever these are: the verify pass
    always runs the full model, so a config only changes speed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = Field(True, description="False turns speculation off: plain decoding, one full pass per token.")
    skip_attn: tuple[int, ...] = Field((), description="Decoder layers whose attention sub-layer the draft skips.")
    skip_mlp: tuple[int, ...] = Field((), description="Decoder layers whose MLP sub-layer the draft skips.")
    max_draft: int = Field(4, ge=1, le=32, description="Most tokens drafted before one verify pass.")
    confidence: float = Field(
        0.5, ge=0.0, le=1.0, description="Stop drafting early when the draft's top-1 probability falls below this."
    )
    adaptive: bool = Field(
        False,
        description="Adapt the confidence threshold per request from running acceptance (Draft&Verify): "
        "raise it after a step that accepted less than `target_acceptance`, lower it otherwise.",
    )
    target_acceptance: float = Field(
        0.7, gt=0.0, lt=1.0, description="Acceptance rate the adaptive threshold steers towards."
    )
    quantize: Literal["none", "int8", "int4"] = Field(
        "none",
        description="Precision of the draft's weights: 'int8' (per row) or 'int4' (per group of 32 inputs, the "
        "layout of GGUF Q4_1) weight-only copies with bf16 activations, kept beside the full weights; the "
        "verify pass always uses the full weights.",
    )
    draft_vocab: int = Field(
        0, ge=0, description="Rows of the draft-only LM head (most frequent tokens first, FR-Spec style); 0 = all."
    )
    prompt_lookup: int = Field(
        0,
        ge=0,
        le=8,
        description="Longest n-gram matched against the prompt and output so far to propose a copied "
        "continuation (prompt lookup); used instead of the model draft when it matches. 0 = off.",
    )

    early_exit: int = Field(
        0,
        ge=0,
        description="Early-exit draft (LayerSkip/DEL without their training): the draft runs only the first N decoder "
        "layers, then the final norm and head; 0 (or N >= the model's layers) runs them all. Combines with skips.",
    )

    model_draft: bool = Field(
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

    def check_layers(self, num_layers: int) -> None:
        bad = [i for i in self.skip_attn + self.skip_mlp if i >= num_layers]
        if bad:
            raise ValueError(f"DraftConfig skips layers {bad} but the model has {num_layers} layers")
        if self.early_exit > num_layers:
            raise ValueError(f"DraftConfig exits after layer {self.early_exit} but the model has {num_layers} layers")

    @classmethod
    def plain(cls) -> DraftConfig:
        return cls(enabled=False)


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


@dataclass(frozen=True)
class KnobSpace:
    """How the index search and the bench ablation explore one draft knob. The search derives its
    proposals, TPE space and configs from this table; `index.settings.SearchSettings.knobs` may narrow a
    knob's values."""

    kind: Literal["layers", "int", "float", "choice"]
    low: float = 0.0
    high: float = 0.0
    step: float = 1.0
    choices: tuple = ()
    screened: bool = True  # teacher-forced screening sees its effect; lookup and adaptivity only show when timed
    alone: object = None  # the value the bench ablation sets to show this knob alone (None: not in the ablation)
    label: str = ""  # the ablation config's name for it (default: the knob's name)
    # None: the knob does not make a full-depth draft pay on its own, so its ablation config rides on the
    # bench's skip draft and random proposals skip at least one sub-layer. Otherwise the other fields of its
    # ablation config (it drafts with no layer skipped), and a proposal with it off its default may skip none.
    alone_with: dict | None = None

    def values(self) -> tuple:
        if self.kind == "choice":
            return self.choices
        n = int(round((self.high - self.low) / self.step))
        vals = [self.low + i * self.step for i in range(n + 1)]
        return tuple(int(v) for v in vals) if self.kind == "int" else tuple(round(v, 4) for v in vals)


# The one table of draft knobs: the search space, the bench ablation and the CLI come from it (with
# `DraftConfig`'s fields). A knob missing here is not searched (enabled, model_draft, target_acceptance).
# A new knob: its `DraftConfig` field, its row here and the drafter code that reads it.
KNOBS: dict[str, KnobSpace] = {
    "skip_attn": KnobSpace("layers"),
    "skip_mlp": KnobSpace("layers"),
    "max_draft": KnobSpace("int", 2, 12, 1),
    "confidence": KnobSpace("float", 0.0, 0.9, 0.05),
    # int8 alone is the ablation's precision (int4 is measured in the combined configs)
    "quantize": KnobSpace(
        "choice", choices=("none", "int8", "int4"), alone="int8", label="int8", alone_with={"max_draft": 6, "confidence": 0.3}
    ),
    "draft_vocab": KnobSpace("choice", choices=(0, 8192), alone=8192, label="vocab8k"),
    "prompt_lookup": KnobSpace(
        "choice", choices=(0, 2, 3), screened=False, alone=3, label="lookup", alone_with={"model_draft": False, "max_draft": 8}
    ),
    "adaptive": KnobSpace("choice", choices=(False, True), screened=False, alone=True),
}


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
