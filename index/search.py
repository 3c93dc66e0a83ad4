"""Search one domain's DraftConfig on the real engine: screen cheaply, then measure the best few.

1. Continuations: each screening prompt's greedy continuation, generated once with DraftConfig.plain().
2. Screening (SWIFT's "matchness"): for a candidate, the teacher-forced fraction of continuation
   positions where the draft's argmax equals the continuation (`Engine.draft_agreement`), turned into an
   expected speedup with a cost model of the draft (`proxy_speedup`, calibrated by one timed run per
   draft precision). The space: the screened knobs of `engine.config.KNOBS` (attention/MLP skip sets,
   max_draft, confidence, draft precision, a vocabulary-subset draft head; nothing here lists them),
   narrowed by `SearchSettings.knobs`. Candidates come from seeded starting points, sparse random
   proposals aimed by a per-layer profile, and optuna's TPE sampler; `budget` candidates in all, seeded.
3. Measurement (Draft&Verify's objective): the top `n_measure` candidates and plain decoding run on the
   same prompts, interleaved, for a few rounds; each (config, prompt) keeps its fastest round (other load
   only adds time) and a candidate's speedup is the median over prompts of plain time / its time. It must
   be lossless and physically plausible (at most its tokens per verify pass); the best one wins if it
   beats `min_speedup`, else the domain gets plain. Prompt lookup, which screening cannot see, is
   measured as a variant of the best candidate.
4. A per-layer profile (agreement when the draft skips only layer i, attention and MLP), computed
   first: it aims the random proposals and is plotted.
5. Against the general config (when the build passes one, `index.select`): the general candidates are
   measured in step 3 beside the screened ones, the best measured config is the domain's own, and it is
   timed against the general config on other prompts of the domain; the domain keeps it only when the
   interval of own / general clears 1, else it inherits the general config.

The engine is typed by the `SearchEngine` protocol, so tests drive this with a small fake.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.config import KNOBS, DecodeStats, DraftConfig, KnobSpace, SamplingParams
from index.select import DomainChoice, Measurement, SelectSettings, choose_domain, domain_configs, measure

log = logging.getLogger(__name__)


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


class PromptLike(Protocol):
    prompt: str | None

    def messages_list(self) -> list[dict] | None: ...


class SearchSettings(BaseModel):
    """Knobs of one domain's search (all candidates greedy; output is lossless whatever is chosen)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    budget: int = Field(24, ge=1, description="Candidates screened by draft agreement (TPE + random proposals), per domain.")
    seed: int = Field(0, description="Seed for prompt choice, random proposals and TPE; the same seed reproduces the search.")
    screen_prompts: int = Field(4, ge=1, description="Prompts whose greedy continuation screens each candidate.")
    screen_tokens: int = Field(32, ge=2, description="Length of the greedy continuation used for screening.")
    n_measure: int = Field(2, ge=1, description="Best screened candidates whose tokens/s is measured against plain decoding.")
    measure_prompts: int = Field(3, ge=1, description="Prompts per domain on which tokens/s is measured.")
    measure_rounds: int = Field(3, ge=1, description="Interleaved rounds of measurement (each runs plain and every candidate once per prompt); the fastest round counts.")
    plausibility_slack: float = Field(0.05, ge=0.0, description="A measured speedup above tokens-per-verify-pass x (1 + this) is treated as disturbed timing and disqualified.")
    max_new_tokens: int = Field(32, ge=2, description="Tokens generated per measured run.")
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
    layer_profile_prompts: int = Field(2, ge=0, description="Prompts for the per-layer agreement profile (0 disables it).")
    prompt_lookup_variant: int = Field(3, ge=0, le=8, description="Also measure the best candidate with prompt lookup of this n-gram size (0: never).")
    int8_cost: float = Field(0.6, gt=0.0, description="Cost model: cost of an int8 draft layer relative to an fp32 one (before calibration).")
    subset_head_cost: float = Field(0.25, gt=0.0, le=1.0, description="Cost model: cost of a vocabulary-subset draft head relative to the full head.")

    @field_validator("knobs")
    @classmethod
    def _narrows_screened_knobs(cls, v: dict[str, tuple]) -> dict[str, tuple]:
        # only narrowing: KNOBS stays the one place that says what a knob's values can be
        for name, vals in v.items():
            space = KNOBS.get(name)
            if space is None or space.kind == "layers" or not space.screened:
                raise ValueError(f"knobs: {name!r} is not a screened knob of engine.config.KNOBS")
            if space.kind == "choice":
                ok = len(vals) > 0 and all(x in space.choices for x in vals)
            else:
                ok = len(vals) == 2 and space.low <= vals[0] <= vals[1] <= space.high
            if not ok:
                raise ValueError(f"knobs: {name}={tuple(vals)} does not narrow KNOBS' {space.values()}")
        return v

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


class Candidate(BaseModel):
    """One screened candidate."""

    config: DraftConfig = Field(description="The candidate draft configuration.")
    agreement: float = Field(description="Mean teacher-forced draft agreement over the screening prompts.")
    proxy: float = Field(description="Expected speedup from agreement and the cost model.")
    source: str = Field(description="Who proposed it: 'seed', 'random' or 'tpe'.")


class Measured(BaseModel):
    """One candidate measured against plain decoding."""

    config: DraftConfig = Field(description="The measured draft configuration.")
    speedup: float = Field(description="Median over prompts of plain time / candidate time (fastest round of each).")
    tokens_per_s: float = Field(description="Median tokens/s of the candidate.")
    plain_tokens_per_s: float = Field(description="Median tokens/s of plain decoding in the same rounds.")
    acceptance: float = Field(description="Accepted / drafted tokens over all runs.")
    mean_accepted_tokens: float = Field(description="Committed tokens per verify pass over all runs.")
    lossless: bool = Field(description="Whether every run produced exactly plain decoding's tokens.")
    plausible: bool = Field(True, description="Whether the speedup is at most the tokens per verify pass (else the timing was disturbed).")


class DomainResult(BaseModel):
    """The outcome of one domain's search; the artefact's DomainEntry comes from it."""

    name: str = Field(description="Domain name.")
    config: DraftConfig = Field(description="Chosen configuration (plain if nothing beat plain).")
    speedup: float = Field(description="Measured speedup of the chosen configuration (1.0 for plain).")
    acceptance: float = Field(description="Measured acceptance of the chosen configuration (0.0 for plain).")
    mean_accepted_tokens: float = Field(description="Measured tokens per verify pass of the chosen configuration (1.0 for plain).")
    plain_tokens_per_s: float = Field(0.0, description="Median tokens/s of plain decoding during measurement.")
    draft_cost_scale: float = Field(1.0, description="Calibration factor of the cost model for fp32 drafts (measured / modelled draft cost).")
    draft_cost_scales: dict[str, float] = Field(default_factory=dict, description="Calibration factor per draft precision ('none', 'int8').")
    layer_agreement: list[float] = Field(default_factory=list, description="Agreement when the draft skips only layer i (index = layer).")
    candidates: list[Candidate] = Field(default_factory=list, description="Every screened candidate, in proposal order.")
    measured: list[Measured] = Field(default_factory=list, description="The measured candidates.")
    seconds: float = Field(0.0, description="Wall time of this domain's search.")
    choice: DomainChoice | None = Field(None, description="Own config vs the general config on the domain's confirmation prompts (None: the build measured no general config).")
    confirmation: Measurement | None = Field(None, description="Per-prompt timings of that comparison.")


# ------------------------------------------------------------------------------------------ cost model


def draft_cost(cfg: DraftConfig, num_layers: int, s: SearchSettings, scale: float = 1.0) -> float:
    """Cost of one draft pass relative to a full 1-token pass: the sub-layers it still runs (cheaper on
    int8 copies) plus the LM head (cheaper over a vocabulary subset), times a calibration `scale`."""
    kept = num_layers - s.attn_share * len(cfg.skip_attn) - (1.0 - s.attn_share) * len(cfg.skip_mlp)
    layers = (1.0 - s.head_cost) * kept / num_layers * (s.int8_cost if cfg.quantize == "int8" else 1.0)
    head = s.head_cost * (s.subset_head_cost if cfg.draft_vocab > 0 else 1.0)
    return scale * (head + layers)


def proxy_speedup(alpha: float, gamma: int, cost: float, verify_token_cost: float) -> float:
    """Expected speedup of drafting `gamma` tokens at per-token acceptance `alpha` (Leviathan et al.):
    E[tokens per step] = (1 - alpha^(gamma+1)) / (1 - alpha); a step costs gamma drafts + one verify."""
    alpha = min(max(alpha, 0.0), 1.0)
    tokens = gamma + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)
    step = gamma * cost + 1.0 + verify_token_cost * gamma
    return tokens / step


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
    p: dict[str, Any] = {k: rng.choice(sp.values()) for k, sp in space.items() if _pays_alone(sp)}
    subs = [(k, i) for i in layers for k in layer_knobs()]
    top = max(1, int(round(s.max_skip_fraction * len(subs)))) if subs else 0
    low = 0 if any(v != DraftConfig.model_fields[k].default for k, v in p.items()) else 1
    n = rng.randint(low, top) if top else 0
    w = [(weights or {}).get(i, 1.0) for _, i in subs]
    chosen = set(_weighted_sample(rng, subs, w, n)) if n else set()
    p |= {_sub(k, i): int((k, i) in chosen) for k, i in subs}
    p |= {k: rng.choice(sp.values()) for k, sp in space.items() if not _pays_alone(sp)}
    return p


def _start(name: str, space: KnobSpace) -> Any:
    """A seed's value of a knob: its DraftConfig default, moved into the searched values."""
    default = DraftConfig.model_fields[name].default
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


def _suggest(trial: Any, name: str, space: KnobSpace) -> Any:
    """TPE's value for one knob, on the knob's searched values."""
    if space.kind == "int":
        return trial.suggest_int(name, int(space.low), int(space.high), step=int(space.step))
    if space.kind == "float":
        return trial.suggest_float(name, space.low, space.high, step=space.step)
    return trial.suggest_categorical(name, list(space.choices))


# ------------------------------------------------------------------------------------------ the search


@dataclass
class _Prepared:
    ids: list[int]
    continuation: list[int]


@dataclass
class StepProgress:
    """Progress over one domain's steps: a rich bar, or (bars off: jobs, Ray tasks) an INFO log line at
    each new stage and at least every `log_every_s` seconds, so a silent job still says where it is."""

    description: str
    total: int
    enabled: bool
    log_every_s: float = 30.0
    _prog: Any = None
    _task: Any = None
    done: int = field(default=0)
    _t0: float = field(default_factory=time.monotonic)
    _last_log: float = field(default=-math.inf)
    _stage: str = ""

    def __enter__(self) -> StepProgress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self._prog.start()
            self._task = self._prog.add_task(self.description, total=self.total)
        else:
            self._log(self.description)
        return self

    def _log(self, description: str) -> None:
        now = time.monotonic()
        stage = description.split(" (")[0]
        if stage != self._stage or now - self._last_log >= self.log_every_s:
            log.info("%s: %d/%d steps, %.0f s", description, self.done, self.total, now - self._t0)
            self._stage, self._last_log = stage, now

    def advance(self, n: int = 1, description: str | None = None) -> None:
        self.done += n
        if self._prog is not None:
            self._prog.update(self._task, advance=n, **({"description": description} if description else {}))
        else:
            self._log(description or self._stage or self.description)

    def __exit__(self, *exc: object) -> None:
        if self._prog is not None:
            self._prog.stop()
        else:
            log.info("%s: done, %d/%d steps, %.0f s", self._stage or self.description, self.done, self.total, time.monotonic() - self._t0)


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def search_domain(
    engine: SearchEngine,
    name: str,
    records: Sequence[PromptLike],
    settings: SearchSettings | None = None,
    progress: bool = True,
    clock: Callable[[], float] = time.perf_counter,
    extra: Mapping[str, DraftConfig] | None = None,
    general: DraftConfig | None = None,
    select: SelectSettings | None = None,
) -> DomainResult:
    """Search `name`'s DraftConfig over `records` (its prompts) on `engine`.

    `extra` configs (the general candidates) are measured beside the screened ones, so a domain's own
    config can also be one of them. With `general` (the build's general config), the best measured config
    is then compared with it on other prompts of the domain (`index.select.choose_domain`): the domain
    keeps it only when it beats the general config by more than the noise, else inherits the general one.
    """
    import optuna

    s = settings or SearchSettings()
    t0 = clock()
    if not records:
        raise ValueError(f"domain {name!r} has no prompts to search on")
    rng = random.Random(f"{s.seed}:{name}")
    order = list(range(len(records)))
    rng.shuffle(order)
    n_screen = min(s.screen_prompts, len(records))
    screen_recs = [records[i] for i in order[:n_screen]]
    measure_recs = [records[i] for i in order[: min(s.measure_prompts, len(records))]]
    L = int(engine.num_layers)
    layers = searchable_layers(L, s)
    plain = DraftConfig.plain()
    greedy = SamplingParams(max_new_tokens=s.screen_tokens, temperature=0.0)

    sel = select or SelectSettings(seed=s.seed)
    extra_cfgs = [c for c in (extra or {}).values() if c.enabled]
    n_runs = 1 + s.n_measure + (1 if s.prompt_lookup_variant else 0) + len(extra_cfgs)  # plain, candidates, lookup variant, extras
    confirm_recs = _confirm_records(records, order, len(measure_recs), sel.confirm_prompts) if general is not None else []
    total = n_screen + s.budget + L * min(s.layer_profile_prompts, n_screen) + len(measure_recs) * s.measure_rounds * n_runs + 1
    with StepProgress(f"{name}: continuations", total, progress) as bar:
        # 1. greedy continuations
        prepared: list[_Prepared] = []
        for r in screen_recs:
            ids = engine.encode_prompt(prompt=r.prompt, messages=r.messages_list())
            cont = list(engine.generate(ids, greedy, plain).token_ids)
            prepared.append(_Prepared(ids, cont))
            bar.advance()
        prepared = [p for p in prepared if len(p.continuation) >= 2] or prepared

        def agreement(cfg: DraftConfig, preps: Sequence[_Prepared] = prepared) -> float:
            return statistics.fmean(float(engine.draft_agreement(p.ids, p.continuation, cfg)) for p in preps)

        # per-layer profile: for the plot, and to aim the proposals at layers that are cheap to skip
        layer_agreement: list[float] = []
        n_prof = min(s.layer_profile_prompts, len(prepared))
        if n_prof:
            for i in range(L):
                layer_agreement.append(round(agreement(DraftConfig(skip_attn=(i,), skip_mlp=(i,)), prepared[:n_prof]), 5))
                bar.advance(n_prof, description=f"{name}: per-layer profile")

        weights = layer_weights(layers, layer_agreement)

        # calibrate the draft cost from one real speculative run per draft precision: measured draft
        # pass / verify pass, over what the cost model predicts for that probe
        precisions = s.space()["quantize"].values()
        scales = {q: 1.0 for q in precisions}
        if s.calibrate:
            for q in precisions:
                start = seed_params(layers, s, max(1, len(layers) // 4), weights, quantize=q, draft_vocab=0)
                probe = params_to_config(start, layers)
                agreement(probe, prepared[:1])  # first use of a precision may build its weights: not timed
                st = engine.generate(prepared[0].ids, greedy, probe).stats
                if st.time_draft > 0 and st.time_verify > 0 and st.steps > 0 and st.drafted > 0:
                    per_draft = st.time_draft / st.drafted
                    per_verify = st.time_verify / st.steps
                    raw = per_draft / per_verify / max(draft_cost(probe, L, s), 1e-6)
                    scales[q] = float(min(max(raw, 0.05), 3.0))
        bar.advance()

        # 2. screening: seeded start points and sparse random proposals until TPE has a model (its own
        # start-up sampling would propose dense, hopeless skip sets), then TPE mixed with random ones
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
                params |= {k: _suggest(trial, k, sp) for k, sp in s.space().items()}
            cfg = params_to_config(params, layers)
            if cfg in seen:  # a repeat: tell TPE the known value, do not spend budget on it
                study.tell(trial, seen[cfg].proxy)
                continue
            a = agreement(cfg)
            proxy = proxy_speedup(a, cfg.max_draft, draft_cost(cfg, L, s, scales.get(cfg.quantize, 1.0)), s.verify_token_cost)
            cand = Candidate(config=cfg, agreement=round(a, 5), proxy=round(proxy, 5), source=source)
            seen[cfg] = cand
            candidates.append(cand)
            study.tell(trial, proxy)
            bar.advance(description=f"{name}: screening (best proxy {max(c.proxy for c in candidates):.2f}x)")

        # 4. measurement: plain and the top candidates, interleaved per prompt and round. Other load
        # on the machine only ever adds time, so each (config, prompt) keeps its fastest round.
        top = [c.config for c in sorted(candidates, key=lambda c: (-c.proxy, c.config.config_id))[: s.n_measure]]
        if s.prompt_lookup_variant and top:  # lookup is free but invisible to screening: measure it
            top.append(DraftConfig(**{**top[0].model_dump(), "prompt_lookup": s.prompt_lookup_variant}))
        top += [c for c in extra_cfgs if c not in top]
        measure_params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=0.0)
        m_ids = [engine.encode_prompt(prompt=r.prompt, messages=r.messages_list()) for r in measure_recs]
        best_t: dict[tuple[int | None, int], float] = {}
        n_tok: dict[tuple[int | None, int], int] = {}
        agg = {j: [0, 0, 0, 0] for j in range(len(top))}  # drafted, accepted, decoded, steps
        lossless = {j: True for j in range(len(top))}
        for rnd in range(s.measure_rounds):
            for pi, ids in enumerate(m_ids):
                # rotate plain's slot so neither side always runs first (cache and frequency effects)
                runs: list[int | None] = [None, *range(len(top))]
                shift = (rnd + pi) % len(runs)
                runs = runs[shift:] + runs[:shift]
                tokens: dict[int | None, list[int]] = {}
                for j in runs:
                    cfg = plain if j is None else top[j]
                    start = clock()
                    res = engine.generate(ids, measure_params, cfg)
                    dt = max(clock() - start, 1e-9)
                    best_t[(j, pi)] = min(dt, best_t.get((j, pi), math.inf))
                    tokens[j] = list(res.token_ids)
                    n_tok[(j, pi)] = max(len(res.token_ids), 1)
                    if j is not None:
                        st = res.stats
                        agg[j][0] += st.drafted
                        agg[j][1] += st.accepted
                        agg[j][2] += max(st.new_tokens - 1, 0)
                        agg[j][3] += st.steps
                    bar.advance(description=f"{name}: measuring")
                for j in range(len(top)):
                    lossless[j] &= tokens[j] == tokens[None]

    prompts_idx = range(len(m_ids))
    plain_tps = [n_tok[(None, pi)] / best_t[(None, pi)] for pi in prompts_idx]
    measured = []
    for j in range(len(top)):
        speedup = _median([best_t[(None, pi)] / best_t[(j, pi)] for pi in prompts_idx])
        tokens_per_step = agg[j][2] / agg[j][3] if agg[j][3] else 0.0
        measured.append(
            Measured(
                config=top[j],
                speedup=round(speedup, 4),
                tokens_per_s=round(_median([n_tok[(j, pi)] / best_t[(j, pi)] for pi in prompts_idx]), 3),
                plain_tokens_per_s=round(_median(plain_tps), 3),
                acceptance=round(agg[j][1] / agg[j][0], 4) if agg[j][0] else 0.0,
                mean_accepted_tokens=round(tokens_per_step, 4),
                lossless=lossless[j],
                # A verify pass costs at least a plain pass, so no config can beat plain by more than its
                # tokens per verify pass; a larger measured ratio means the timing was disturbed.
                plausible=speedup <= tokens_per_step * (1.0 + s.plausibility_slack),
            )
        )
    for m in measured:
        if not m.lossless:
            log.warning("domain %s: config %s changed greedy output; disqualified", name, m.config.config_id)
        if not m.plausible:
            log.warning(
                "domain %s: config %s measured %.2fx with %.2f tokens per step (impossible; timing disturbed); disqualified",
                name, m.config.config_id, m.speedup, m.mean_accepted_tokens,
            )  # fmt: skip
    ok = [m for m in measured if m.lossless and m.plausible and m.speedup >= s.min_speedup and math.isfinite(m.speedup)]
    best = max(ok, key=lambda m: (m.speedup, m.config.config_id), default=None)
    common = dict(
        name=name,
        plain_tokens_per_s=round(_median(plain_tps), 3),
        draft_cost_scale=round(scales.get("none", 1.0), 4),
        draft_cost_scales={q: round(v, 4) for q, v in scales.items()},
        layer_agreement=layer_agreement,
        candidates=candidates,
        measured=measured,
        seconds=round(clock() - t0, 3),
    )
    if general is not None:
        own = best.config if best is not None else plain
        with StepProgress(f"{name}: own vs general", len(confirm_recs) * sel.rounds * (1 + len(domain_configs(own, general))), progress) as bar2:
            c_ids = [engine.encode_prompt(prompt=r.prompt, messages=r.messages_list()) for r in confirm_recs]
            m = measure(
                engine, c_ids, domain_configs(own, general), sel, labels=[f"{name}:{_source(r)}" for r in confirm_recs],
                clock=clock, on_run=lambda: bar2.advance(description=f"{name}: own vs general"),
            )  # fmt: skip
        choice = choose_domain(m, own, general, sel)
        log.info("domain %s: %s (%s), speedup %.3fx [%.3f, %.3f]", name, choice.source, choice.config.config_id,
                 choice.speedup.value, choice.speedup.low, choice.speedup.high)  # fmt: skip
        common["seconds"] = round(clock() - t0, 3)
        return DomainResult(
            config=choice.config, speedup=choice.speedup.value, acceptance=choice.acceptance if choice.config.enabled else 0.0,
            mean_accepted_tokens=choice.tokens_per_step if choice.config.enabled else 1.0, choice=choice, confirmation=m, **common,
        )  # fmt: skip
    if best is None:
        return DomainResult(config=plain, speedup=1.0, acceptance=0.0, mean_accepted_tokens=1.0, **common)
    return DomainResult(
        config=best.config, speedup=best.speedup, acceptance=best.acceptance, mean_accepted_tokens=best.mean_accepted_tokens, **common
    )


def _confirm_records(records: Sequence[PromptLike], order: Sequence[int], used: int, n: int) -> list[PromptLike]:
    """`n` prompts for the own-vs-general comparison: those the search did not measure on first (in the
    search's shuffled order), then, for a small domain, the measured ones again."""
    idx = list(order[used:]) + list(order[:used])
    return [records[i] for i in idx[: min(n, len(idx))]]


def _source(r: PromptLike) -> str:
    return str(getattr(r, "source", "") or "")


def load_engine(model: str) -> SearchEngine:
    """The real engine (imported here so the search logic needs no torch model to import)."""
    from engine.generate import Engine

    return Engine.load(model)
