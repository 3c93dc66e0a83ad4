"""Screening, the search's first stage: rank many proposed DraftConfigs cheaply, without timing them.

1. Continuations: each screening prompt's greedy continuation, generated once with DraftConfig.plain().
2. A per-layer profile (agreement when the draft skips only layer i, attention and MLP): it aims the
   random proposals and is plotted.
3. Calibration: one timed speculative run per draft precision scales the cost model's draft-pass cost.
4. Screening (SWIFT's "matchness"): for a candidate, the teacher-forced fraction of continuation
   positions where the draft's argmax equals the continuation (`Engine.draft_agreement`), turned into an
   expected speedup with a cost model of the draft (`proxy_speedup`). The space: the screened knobs of
   `engine.config.KNOBS` (attention/MLP skip sets, max_draft, confidence, draft precision, a
   vocabulary-subset draft head; nothing here lists them), narrowed by `SearchSettings.knobs`.
   Candidates come from seeded starting points, sparse random proposals aimed by the per-layer profile,
   and optuna's TPE sampler; `budget` candidates in all, seeded.

`screen` returns a `Screening`; `index.search` measures its best candidates (the next stage).
"""

from __future__ import annotations

import random
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from engine.config import KNOBS, DecodeStats, DraftConfig, KnobSpace, SamplingParams
from engine.costs import expected_tokens
from engine.knobs import total_cost
from index.select import PromptLike
from index.settings import SearchSettings

# A progress step: advance(n=1, description=None) (index.search.StepProgress.advance).
Advance = Callable[..., None]


class GenerationLike(Protocol):
    token_ids: list[int]
    stats: DecodeStats


class SearchEngine(Protocol):
    """The part of `engine.generate.Engine` the search uses."""

    model_id: str
    weights_hash: str
    num_layers: int

    def encode_prompt(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]: ...

    def generate(self, ids: list[int], params: SamplingParams, draft: DraftConfig) -> GenerationLike: ...

    def draft_agreement(self, ids: list[int], continuation_ids: list[int], draft: DraftConfig) -> float: ...


class Candidate(BaseModel):
    """One screened candidate."""

    config: DraftConfig = Field(description="The candidate draft configuration.")
    agreement: float = Field(description="Mean teacher-forced draft agreement over the screening prompts.")
    proxy: float = Field(description="Expected speedup from agreement and the cost model.")
    source: str = Field(description="Who proposed it: 'seed', 'random' or 'tpe'.")


class Screening(BaseModel):
    """What screening hands on: the candidates to rank for measurement, and what the result reports."""

    model_config = ConfigDict(frozen=True)

    candidates: list[Candidate] = Field(description="Every screened candidate, in proposal order.")
    layer_agreement: list[float] = Field(description="Agreement when the draft skips only layer i (index = layer); empty without a profile.")
    scales: dict[str, float] = Field(description="Calibration factor of the cost model per draft precision ('none', 'int8'; 1.0 uncalibrated).")


# ------------------------------------------------------------------------------------------ cost model


def estimated_draft_cost(cfg: DraftConfig, num_layers: int, s: SearchSettings, scale: float = 1.0) -> float:
    """The cost model's estimate of one draft pass relative to a full 1-token pass (what `engine.bench.draft_cost`
    measures): the sub-layers it still runs (cheaper on
    int8 copies) plus the LM head (cheaper over a vocabulary subset), times a calibration `scale`. Each
    knob's share comes from its declaration (`Knob.cost`, engine.config.DraftConfig)."""
    return scale * total_cost(cfg.cost_parts(num_layers, s.cost_model()), num_layers, s.cost_model())


def proxy_speedup(alpha: float, gamma: int, cost: float, verify_token_cost: float) -> float:
    """Expected speedup of drafting `gamma` tokens at per-token acceptance `alpha`: expected committed
    tokens per step (`engine.costs.expected_tokens`, the one model of it) over the step's cost, gamma
    drafts of `cost` (`estimated_draft_cost`) + one verify."""
    step = gamma * cost + 1.0 + verify_token_cost * gamma
    return expected_tokens(alpha, gamma) / step


# ------------------------------------------------------------------------------------------ proposals


def searchable_layers(num_layers: int, s: SearchSettings) -> list[int]:
    return list(range(min(s.protect_first, num_layers), max(num_layers - s.protect_last, 0)))


def layer_knobs() -> list[str]:
    """The skip-set knobs: searched per sub-layer (one 0/1 parameter each), not as one value."""
    return [name for name, space in KNOBS.items() if space.kind == "layers"]


def _sub(knob: str, i: int) -> str:
    return f"{knob.removeprefix('skip_')}_{i}"  # 'attn_3': the parameter names TPE has always seen


def params_to_config(params: dict[str, Any], layers: Sequence[int]) -> DraftConfig:
    knobs: dict[str, Any] = {k: tuple(i for i in layers if params.get(_sub(k, i), 0)) for k in layer_knobs()}
    for name, space in KNOBS.items():
        if space.kind != "layers" and name in params:
            v = params[name]
            # TPE's float steps leave noise (0.30000000000000004): rounded, so equal configs compare equal
            knobs[name] = int(v) if space.kind == "int" else round(float(v), 4) if space.kind == "float" else v
    return DraftConfig(**knobs)


def _weighted_sample(rng: random.Random, items: list, weights: list[float], n: int) -> list:
    """n distinct items, drawn with probability proportional to weight (Efraimidis-Spirakis keys)."""
    keys = [(rng.random() ** (1.0 / max(w, 1e-9)), j) for j, w in enumerate(weights)]
    return [items[j] for _, j in sorted(keys, reverse=True)[:n]]


def layer_weights(layers: Sequence[int], profile: Sequence[float]) -> dict[int, float]:
    """Proposal weight of each searchable layer: its single-layer-skip agreement, sharpened (agreement^4),
    so layers whose removal breaks the draft are rarely proposed. Uniform without a profile."""
    if not profile:
        return {i: 1.0 for i in layers}
    return {i: max(float(profile[i]), 0.01) ** 4 for i in layers}


def _pays_alone(space: KnobSpace) -> bool:
    return space.alone_with is not None


def random_params(
    rng: random.Random, layers: Sequence[int], s: SearchSettings, weights: dict[int, float] | None = None
) -> dict[str, Any]:
    """A sparse random proposal: a few sub-layers skipped (dense random sets draft badly), drawn by
    `weights` (per layer) when given; every other searched knob uniform over its values. Knobs that make a
    full-depth draft pay (a cheaper precision) are drawn first: off their default, none skipped is allowed."""
    space = s.space()
    p: dict[str, Any] = {k: rng.choice(sp.values(layers)) for k, sp in space.items() if _pays_alone(sp)}
    subs = [(k, i) for i in layers for k in layer_knobs()]
    top = max(1, int(round(s.max_skip_fraction * len(subs)))) if subs else 0
    low = 0 if any(v != DraftConfig.model_fields[k].default for k, v in p.items()) else 1
    n = rng.randint(low, top) if top else 0
    w = [(weights or {}).get(i, 1.0) for _, i in subs]
    chosen = set(_weighted_sample(rng, subs, w, n)) if n else set()
    p |= {_sub(k, i): int((k, i) in chosen) for k, i in subs}
    p |= {k: rng.choice(sp.values(layers)) for k, sp in space.items() if not _pays_alone(sp)}
    return p


def _start(name: str, space: KnobSpace) -> Any:
    """A seed's value of a knob: its DraftConfig default, moved into the searched values."""
    default = DraftConfig.model_fields[name].default
    if space.kind == "layer":
        return 0  # off: a "layer" knob's first value
    if space.kind == "choice":
        return default if default in space.choices else space.choices[0]
    return min(max(default, space.low), space.high)


def seed_params(
    layers: Sequence[int], s: SearchSettings, n_skip: int, weights: dict[int, float] | None = None, **fixed: Any
) -> dict[str, Any]:
    """A deterministic starting point: the MLPs of the `n_skip` layers cheapest to skip by `weights`
    (ties and no weights: spread evenly over the searchable range); other knobs at their default unless
    `fixed` (e.g. quantize="int8")."""
    spread = [layers[int(j * len(layers) / n_skip)] for j in range(n_skip)] if n_skip and layers else []
    if weights:
        rank = sorted(layers, key=lambda i: (-weights.get(i, 0.0), i not in spread, i))
        chosen = set(rank[:n_skip])
    else:
        chosen = set(spread)
    p: dict[str, Any] = {_sub(k, i): 0 for i in layers for k in layer_knobs()}
    p.update({_sub("skip_mlp", i): 1 for i in chosen})
    p |= {k: fixed.get(k, _start(k, sp)) for k, sp in s.space().items()}
    return p


def seed_list(layers: Sequence[int], s: SearchSettings, weights: dict[int, float]) -> list[dict[str, Any]]:
    """Starting points: skip sets of 1/8 and 1/4 of the layers in fp32, and (when searched) the whole
    model on int8 copies with and without a few skips and a subset head: the drafts measured best here."""
    few, more = max(1, len(layers) // 8), max(1, len(layers) // 4)
    seeds = [seed_params(layers, s, few, weights), seed_params(layers, s, more, weights)]
    space = s.space()
    if "int8" in space["quantize"].values():
        vocab = max(space["draft_vocab"].values())
        seeds.append(seed_params(layers, s, 0, weights, quantize="int8", draft_vocab=0))
        seeds.append(seed_params(layers, s, 0, weights, quantize="int8", draft_vocab=vocab))
        seeds.append(seed_params(layers, s, few, weights, quantize="int8", draft_vocab=vocab))
    return seeds


def _suggest(trial: Any, name: str, space: KnobSpace, layers: Sequence[int]) -> Any:
    """TPE's value for one knob, on the knob's searched values (a "layer" knob's: the searchable layers)."""
    if space.kind == "layer":
        return trial.suggest_categorical(name, list(space.values(layers)))
    if space.kind == "int":
        return trial.suggest_int(name, int(space.low), int(space.high), step=int(space.step))
    if space.kind == "float":
        return trial.suggest_float(name, space.low, space.high, step=space.step)
    return trial.suggest_categorical(name, list(space.choices))


# ------------------------------------------------------------------------------------------ the stage


@dataclass(frozen=True)
class Continuation:
    """A screening prompt's ids and plain decoding's greedy continuation of it."""

    ids: list[int]
    continuation: list[int]


def mean_agreement(engine: SearchEngine, cfg: DraftConfig, preps: Sequence[Continuation]) -> float:
    """Teacher-forced draft agreement of `cfg`, averaged over the prompts."""
    return statistics.fmean(float(engine.draft_agreement(p.ids, p.continuation, cfg)) for p in preps)


def screen(
    engine: SearchEngine, name: str, records: Sequence[PromptLike], s: SearchSettings, rng: random.Random, advance: Advance
) -> Screening:
    """Screen `s.budget` candidates on `records` (the domain's screening prompts). `rng` is the domain's
    search generator (already used to choose the prompts; the random proposals continue it)."""
    greedy = SamplingParams(max_new_tokens=s.screen_tokens, temperature=0.0)
    prepared = continuations(engine, records, greedy, advance)
    L = int(engine.num_layers)
    layers = searchable_layers(L, s)
    layer_agreement = layer_profile(engine, name, prepared, s, advance)
    weights = layer_weights(layers, layer_agreement)
    scales = calibrate(engine, prepared, layers, weights, greedy, s)
    advance()
    candidates = propose_and_screen(engine, name, prepared, layers, weights, scales, s, rng, advance)
    return Screening(candidates=candidates, layer_agreement=layer_agreement, scales=scales)


def continuations(engine: SearchEngine, records: Sequence[PromptLike], greedy: SamplingParams, advance: Advance) -> list[Continuation]:
    """Each prompt's greedy continuation under plain decoding; prompts whose continuation is too short to
    score (fewer than 2 tokens) are dropped unless all are."""
    prepared = []
    for r in records:
        ids = engine.encode_prompt(prompt=r.prompt, messages=r.messages_list())
        prepared.append(Continuation(ids, list(engine.generate(ids, greedy, DraftConfig.plain()).token_ids)))
        advance()
    return [p for p in prepared if len(p.continuation) >= 2] or prepared


def layer_profile(engine: SearchEngine, name: str, prepared: Sequence[Continuation], s: SearchSettings, advance: Advance) -> list[float]:
    """Agreement when the draft skips only layer i (attention and MLP), on the first
    `s.layer_profile_prompts` prompts: for the plot, and to aim the proposals at layers cheap to skip."""
    out: list[float] = []
    n_prof = min(s.layer_profile_prompts, len(prepared))
    if n_prof:
        for i in range(int(engine.num_layers)):
            out.append(round(mean_agreement(engine, DraftConfig(skip_attn=(i,), skip_mlp=(i,)), prepared[:n_prof]), 5))
            advance(n_prof, description=f"{name}: per-layer profile")
    return out


def calibrate(
    engine: SearchEngine, prepared: Sequence[Continuation], layers: Sequence[int], weights: dict[int, float], greedy: SamplingParams,
    s: SearchSettings,
) -> dict[str, float]:  # fmt: skip
    """The cost model's scale per draft precision, from one real speculative run each: measured draft
    pass / verify pass, over what the cost model predicts for that probe (1.0 where the run says nothing,
    and every 1.0 without `s.calibrate`)."""
    L = int(engine.num_layers)
    precisions = s.space()["quantize"].values()
    scales = {q: 1.0 for q in precisions}
    if not s.calibrate:
        return scales
    for q in precisions:
        probe = params_to_config(seed_params(layers, s, max(1, len(layers) // 4), weights, quantize=q, draft_vocab=0), layers)
        mean_agreement(engine, probe, prepared[:1])  # first use of a precision may build its weights: not timed
        st = engine.generate(prepared[0].ids, greedy, probe).stats
        if st.time_draft > 0 and st.time_verify > 0 and st.steps > 0 and st.drafted > 0:
            per_draft = st.time_draft / st.drafted
            per_verify = st.time_verify / st.steps
            raw = per_draft / per_verify / max(estimated_draft_cost(probe, L, s), 1e-6)
            scales[q] = float(min(max(raw, 0.05), 3.0))
    return scales


def propose_and_screen(
    engine: SearchEngine, name: str, prepared: Sequence[Continuation], layers: Sequence[int], weights: dict[int, float],
    scales: dict[str, float], s: SearchSettings, rng: random.Random, advance: Advance,
) -> list[Candidate]:  # fmt: skip
    """`s.budget` distinct candidates: seeded start points and sparse random proposals until TPE has a
    model (its own start-up sampling would propose dense, hopeless skip sets), then TPE mixed with random
    ones. A repeated config costs no budget."""
    import optuna

    L = int(engine.num_layers)
    n_startup = max(4, s.budget // 3)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=n_startup)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    seen: dict[DraftConfig, Candidate] = {}
    candidates: list[Candidate] = []
    seeds = seed_list(layers, s, weights)
    attempts = 0
    while len(candidates) < s.budget and attempts < 4 * s.budget + 8:
        attempts += 1
        if seeds:
            study.enqueue_trial(seeds.pop(0))
            source = "seed"
        elif len(study.trials) < n_startup or rng.random() < s.random_fraction:
            study.enqueue_trial(random_params(rng, layers, s, weights))
            source = "random"
        else:
            source = "tpe"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            trial = study.ask()
            params = {_sub(k, i): trial.suggest_int(_sub(k, i), 0, 1) for i in layers for k in layer_knobs()}
            params |= {k: _suggest(trial, k, sp, layers) for k, sp in s.space().items()}
        cfg = params_to_config(params, layers)
        if cfg in seen:  # a repeat: tell TPE the known value, do not spend budget on it
            study.tell(trial, seen[cfg].proxy)
            continue
        a = mean_agreement(engine, cfg, prepared)
        proxy = proxy_speedup(a, cfg.max_draft, estimated_draft_cost(cfg, L, s, scales.get(cfg.quantize, 1.0)), s.verify_token_cost)
        cand = Candidate(config=cfg, agreement=round(a, 5), proxy=round(proxy, 5), source=source)
        seen[cfg] = cand
        candidates.append(cand)
        study.tell(trial, proxy)
        advance(description=f"{name}: screening (best proxy {max(c.proxy for c in candidates):.2f}x)")
    return candidates
