"""What a draft knob is, besides its `DraftConfig` field: the one declaration everything else reads.

A knob is a `DraftConfig` field annotated with a `Knob` (engine/config.py), so the field, its search
space, its bound against the model, what it does to the draft pass, its share of the estimated draft cost
and its report column sit together. Nothing else lists knobs:
- the search space (`engine.config.KNOBS`, index.screen / index.settings) comes from `Knob.space`;
- validation against a model (`DraftConfig.problems`: the engine, the router's reload and the index build
  call it) comes from `Knob.limit`;
- the draft pass (`DraftConfig.plan_args` -> `LeanModel.plan` -> `DraftPlan`) comes from `Knob.plan`;
- the search's cost model (`index.screen.estimated_draft_cost`) comes from `Knob.cost`;
- the artefact table (`DraftConfig.report_columns`, index.build) comes from `Knob.column` / `Knob.cell`.
A knob that changes the pass is then its field with its `Knob` plus the pass code that reads its plan
value (tests/unit/test_knobs.py adds one that way).

No torch and no pydantic model here: `engine.config` imports this, and the index imports that without a
model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class KnobSpace:
    """How the index search and the bench ablation explore one draft knob. The search derives its
    proposals, TPE space and configs from these; `index.settings.SearchSettings.knobs` may narrow a
    knob's values."""

    # "layers": a set of layer indices (searched per sub-layer); "layer": one layer count whose values are
    # the model's searchable layers (its range depends on the model), 0 = off
    kind: Literal["layers", "layer", "int", "float", "choice"]
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

    def values(self, layers: Sequence[int] = ()) -> tuple:
        """The searched values; a "layer" knob's are 0 (off) and the model's searchable `layers`."""
        if self.kind == "choice":
            return self.choices
        if self.kind == "layer":
            return (0, *layers)
        n = int(round((self.high - self.low) / self.step))
        vals = [self.low + i * self.step for i in range(n + 1)]
        return tuple(int(v) for v in vals) if self.kind == "int" else tuple(round(v, 4) for v in vals)


@dataclass(frozen=True)
class ModelShape:
    """What a knob's bound may depend on. `vocab_size` None: not checked (the engine clamps a larger
    draft vocabulary to its own, so it checks layers only)."""

    num_layers: int
    vocab_size: int | None = None


@dataclass(frozen=True)
class CostModel:
    """The search's cost model parameters (index.settings.SearchSettings has them, with descriptions)."""

    head_cost: float  # share of a full pass outside the decoder layers (embedding, final norm, LM head)
    attn_share: float  # share of a decoder layer's cost in attention
    int8_cost: float  # an int8 draft layer's cost relative to an fp32 one
    subset_head_cost: float  # a vocabulary-subset head's cost relative to the full head


@dataclass(frozen=True)
class CostPart:
    """One knob's effect on the estimated draft pass cost: decoder layers' worth of work it removes, a
    factor on every layer still run, a factor on the LM head."""

    removed: float = 0.0
    layers: float = 1.0
    head: float = 1.0


# A problem with a config: (reason, message). Reasons: "layers" and "vocab" (the config does not fit the
# model: nothing may run it) and "config" (it runs but is pointless: the engine decodes it, the router
# refuses to serve it). The router counts refused versions by reason.
Problem = tuple[str, str]
FITS = ("layers", "vocab")


@dataclass(frozen=True)
class Knob:
    """Everything about one draft knob but its field (type, default, description): see the module."""

    space: KnobSpace | None = None  # None: not searched
    # the largest value the model allows (each element of a layer set), or None when it allows any
    limit: Callable[[ModelShape], int | None] | None = None
    reason: str = "config"  # the problem's reason when over the limit
    problem: str = "{name}={value} exceeds {limit}"  # message; fields: name, value, bad, limit, num_layers
    plan: Callable[[Any], dict] | None = None  # `LeanModel.plan` keyword arguments from the value
    cost: Callable[[Any, ModelShape, CostModel], CostPart] | None = None
    column: str = ""  # report column header ("": not in the report)
    cell: Callable[[Any, Any], str] = lambda value, cfg: str(value)  # (value, config) -> cell text

    def check(self, name: str, value: Any, shape: ModelShape) -> Problem | None:
        if self.limit is None:
            return None
        limit = self.limit(shape)
        if limit is None:
            return None
        bad = sorted(i for i in value if i > limit) if isinstance(value, tuple) else ([value] if value > limit else [])
        if not bad:
            return None
        return self.reason, self.problem.format(name=name, value=value, bad=bad, limit=limit, num_layers=shape.num_layers)


# ---- bounds and cells shared by several knobs -------------------------------------------------------


def last_layer(m: ModelShape) -> int:
    return m.num_layers - 1


def layer_count(m: ModelShape) -> int:
    return m.num_layers


def vocab_size(m: ModelShape) -> int | None:
    return m.vocab_size


def layer_cell(value: tuple[int, ...], cfg: Any) -> str:
    return ",".join(map(str, value)) or "-"


def total_cost(parts: Sequence[CostPart], num_layers: int, cm: CostModel) -> float:
    """A draft pass relative to a full 1-token pass: the layers it still runs (times their factors) plus
    the head (times its factors)."""
    kept = max(num_layers - sum(p.removed for p in parts), 0.0)
    layers = (1.0 - cm.head_cost) * kept / num_layers
    head = cm.head_cost
    for p in parts:
        layers *= p.layers
        head *= p.head
    return head + layers
