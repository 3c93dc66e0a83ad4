"""Search one domain's DraftConfig on the real engine in three stages, each a function with a typed value
passed to the next: screen cheaply, measure the best few, choose.

1. Screen (`index.screen.screen` -> `Screening`): continuations, a per-layer profile, a calibrated cost
   model and `budget` proposed candidates ranked by teacher-forced draft agreement turned into an
   expected speedup (SWIFT's "matchness"; seeded, random and TPE proposals).
2. Measure (`measure_finalists` -> `Timing`; Draft&Verify's objective): the top `n_measure` candidates
   (`finalists`: plus the best one with prompt lookup, which screening cannot see, and any extra configs)
   and plain decoding run on the same prompts, interleaved, for a few rounds; each (config, prompt) keeps
   its fastest round (other load only adds time) and a candidate's speedup is the median over prompts of
   plain time / its time.
3. Choose (`choose`): a candidate must be lossless (exactly plain decoding's tokens) and physically
   plausible (at most its tokens per verify pass); the best one wins if it beats `min_speedup`, else the
   domain gets plain. Against the general config (when the build passes one, `index.select`): the
   general candidates are measured in step 2 beside the screened ones, the best measured config is the
   domain's own, and it is timed against the general config on other prompts of the domain (`confirm`);
   the domain keeps it only when the interval of own / general clears 1, else it inherits the general one.

`search_domain` composes them. The engine is typed by the `SearchEngine` protocol, so tests drive this
with a small fake.
"""

from __future__ import annotations

import logging
import math
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from engine.config import DraftConfig, SamplingParams
from index.screen import (
    Advance,
    Candidate,
    GenerationLike,
    Screening,
    SearchEngine,
    estimated_draft_cost,
    params_to_config,
    proxy_speedup,
    random_params,
    screen,
    seed_list,
    seed_params,
)
from index.select import DomainChoice, Measurement, PromptLike, SelectSettings, choose_domain, domain_configs, measure
from index.settings import SearchSettings

# Re-exported: the search's callers and tests import these from here.
__all__ = [
    "Candidate", "DomainResult", "GenerationLike", "Measured", "PromptLike", "SearchEngine", "SearchSettings", "StepProgress",
    "estimated_draft_cost", "load_engine", "params_to_config", "proxy_speedup", "random_params", "search_domain", "seed_list", "seed_params",
]  # fmt: skip

log = logging.getLogger(__name__)


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


class Timing(BaseModel):
    """What measurement hands on to the choice."""

    model_config = ConfigDict(frozen=True)

    measured: list[Measured] = Field(description="Every finalist's measurement, in finalist order.")
    plain_tokens_per_s: float = Field(description="Median tokens/s of plain decoding in the same rounds.")


class DomainResult(BaseModel):
    """The outcome of one domain's search; the artefact's DomainEntry comes from it."""

    name: str = Field(description="Domain name.")
    config: DraftConfig = Field(description="Chosen configuration (plain if nothing beat plain).")
    speedup: float = Field(description="Measured speedup of the chosen configuration (1.0 for plain).")
    acceptance: float = Field(description="Measured acceptance of the chosen configuration (0.0 for plain).")
    mean_accepted_tokens: float = Field(description="Measured tokens per verify pass of the chosen configuration (1.0 for plain).")
    plain_tokens_per_s: float = Field(0.0, description="Median tokens/s of plain decoding during measurement.")
    draft_cost_scale: float = Field(1.0, description="Calibration factor of the cost model for fp32 drafts (measured draft cost / estimated_draft_cost).")
    draft_cost_scales: dict[str, float] = Field(default_factory=dict, description="Calibration factor per draft precision ('none', 'int8').")
    layer_agreement: list[float] = Field(default_factory=list, description="Agreement when the draft skips only layer i (index = layer).")
    candidates: list[Candidate] = Field(default_factory=list, description="Every screened candidate, in proposal order.")
    measured: list[Measured] = Field(default_factory=list, description="The measured candidates.")
    seconds: float = Field(0.0, description="Wall time of this domain's search.")
    choice: DomainChoice | None = Field(None, description="Own config vs the general config on the domain's confirmation prompts (None: the build measured no general config).")
    confirmation: Measurement | None = Field(None, description="Per-prompt timings of that comparison.")


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


def _encode(engine: SearchEngine, records: Sequence[PromptLike]) -> list[list[int]]:
    return [engine.encode_prompt(prompt=r.prompt, messages=r.messages_list()) for r in records]


# ------------------------------------------------------------------------------------------ the search


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
    """Search `name`'s DraftConfig over `records` (its prompts) on `engine`: screen, measure, choose.

    `extra` configs (the general candidates) are measured beside the screened ones, so a domain's own
    config can also be one of them. With `general` (the build's general config), the best measured config
    is then compared with it on other prompts of the domain (`index.select.choose_domain`): the domain
    keeps it only when it beats the general config by more than the noise, else inherits the general one.
    """
    s = settings or SearchSettings()
    t0 = clock()
    if not records:
        raise ValueError(f"domain {name!r} has no prompts to search on")
    # One generator per domain: it chooses the prompts here, and screening's random proposals continue it.
    rng = random.Random(f"{s.seed}:{name}")
    order = list(range(len(records)))
    rng.shuffle(order)
    screen_recs = [records[i] for i in order[: min(s.screen_prompts, len(records))]]
    measure_recs = [records[i] for i in order[: min(s.measure_prompts, len(records))]]
    extra_cfgs = [c for c in (extra or {}).values() if c.enabled]

    n_runs = 1 + s.n_measure + (1 if s.prompt_lookup_variant else 0) + len(extra_cfgs)  # plain, candidates, lookup variant, extras
    n_profile = int(engine.num_layers) * min(s.layer_profile_prompts, len(screen_recs))
    total = len(screen_recs) + s.budget + n_profile + len(measure_recs) * s.measure_rounds * n_runs + 1
    with StepProgress(f"{name}: continuations", total, progress) as bar:
        screening = screen(engine, name, screen_recs, s, rng, bar.advance)
        timing = measure_finalists(engine, name, measure_recs, finalists(screening, s, extra_cfgs), s, clock, bar.advance)
    best = choose(name, timing.measured, s)

    common = dict(
        name=name,
        plain_tokens_per_s=timing.plain_tokens_per_s,
        draft_cost_scale=round(screening.scales.get("none", 1.0), 4),
        draft_cost_scales={q: round(v, 4) for q, v in screening.scales.items()},
        layer_agreement=screening.layer_agreement,
        candidates=screening.candidates,
        measured=timing.measured,
        seconds=round(clock() - t0, 3),
    )
    if general is not None:
        sel = select or SelectSettings(seed=s.seed)
        confirm_recs = _confirm_records(records, order, len(measure_recs), sel.confirm_prompts)
        own = best.config if best is not None else DraftConfig.plain()
        choice, m = confirm(engine, name, confirm_recs, own, general, sel, clock, progress)
        common["seconds"] = round(clock() - t0, 3)
        return DomainResult(
            config=choice.config, speedup=choice.speedup.value, acceptance=choice.acceptance if choice.config.enabled else 0.0,
            mean_accepted_tokens=choice.tokens_per_step if choice.config.enabled else 1.0, choice=choice, confirmation=m, **common,
        )  # fmt: skip
    if best is None:
        return DomainResult(config=DraftConfig.plain(), speedup=1.0, acceptance=0.0, mean_accepted_tokens=1.0, **common)
    return DomainResult(
        config=best.config, speedup=best.speedup, acceptance=best.acceptance, mean_accepted_tokens=best.mean_accepted_tokens, **common
    )


# ------------------------------------------------------------------------------------------ measure


def finalists(screening: Screening, s: SearchSettings, extra: Sequence[DraftConfig] = ()) -> list[DraftConfig]:
    """What is measured: the `s.n_measure` best candidates by proxy (ties by config id), the best one with
    prompt lookup (free, but invisible to screening), then the `extra` configs not already among them."""
    top = [c.config for c in sorted(screening.candidates, key=lambda c: (-c.proxy, c.config.config_id))[: s.n_measure]]
    if s.prompt_lookup_variant and top:
        top.append(DraftConfig(**{**top[0].model_dump(), "prompt_lookup": s.prompt_lookup_variant}))
    return top + [c for c in extra if c not in top]


def measure_finalists(
    engine: SearchEngine, name: str, records: Sequence[PromptLike], top: Sequence[DraftConfig], s: SearchSettings,
    clock: Callable[[], float], advance: Advance,
) -> Timing:  # fmt: skip
    """Plain decoding and every config of `top`, interleaved per prompt and round, `s.measure_rounds`
    rounds. Other load on the machine only ever adds time, so each (config, prompt) keeps its fastest round."""
    plain = DraftConfig.plain()
    measure_params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=0.0)
    m_ids = _encode(engine, records)
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
                advance(description=f"{name}: measuring")
            for j in range(len(top)):
                lossless[j] &= tokens[j] == tokens[None]

    prompts_idx = range(len(m_ids))
    plain_tps = round(_median([n_tok[(None, pi)] / best_t[(None, pi)] for pi in prompts_idx]), 3)
    measured = []
    for j in range(len(top)):
        speedup = _median([best_t[(None, pi)] / best_t[(j, pi)] for pi in prompts_idx])
        tokens_per_step = agg[j][2] / agg[j][3] if agg[j][3] else 0.0
        measured.append(
            Measured(
                config=top[j],
                speedup=round(speedup, 4),
                tokens_per_s=round(_median([n_tok[(j, pi)] / best_t[(j, pi)] for pi in prompts_idx]), 3),
                plain_tokens_per_s=plain_tps,
                acceptance=round(agg[j][1] / agg[j][0], 4) if agg[j][0] else 0.0,
                mean_accepted_tokens=round(tokens_per_step, 4),
                lossless=lossless[j],
                # A verify pass costs at least a plain pass, so no config can beat plain by more than its
                # tokens per verify pass; a larger measured ratio means the timing was disturbed.
                plausible=speedup <= tokens_per_step * (1.0 + s.plausibility_slack),
            )
        )
    return Timing(measured=measured, plain_tokens_per_s=plain_tps)


# ------------------------------------------------------------------------------------------ choose


def choose(name: str, measured: Sequence[Measured], s: SearchSettings) -> Measured | None:
    """The fastest measured config that is lossless, plausible and at least `s.min_speedup` (ties by
    config id), or None (the domain gets plain); disqualified ones are logged."""
    for m in measured:
        if not m.lossless:
            log.warning("domain %s: config %s changed greedy output; disqualified", name, m.config.config_id)
        if not m.plausible:
            log.warning(
                "domain %s: config %s measured %.2fx with %.2f tokens per step (impossible; timing disturbed); disqualified",
                name, m.config.config_id, m.speedup, m.mean_accepted_tokens,
            )  # fmt: skip
    ok = [m for m in measured if m.lossless and m.plausible and m.speedup >= s.min_speedup and math.isfinite(m.speedup)]
    return max(ok, key=lambda m: (m.speedup, m.config.config_id), default=None)


def confirm(
    engine: SearchEngine, name: str, records: Sequence[PromptLike], own: DraftConfig, general: DraftConfig, sel: SelectSettings,
    clock: Callable[[], float], progress: bool,
) -> tuple[DomainChoice, Measurement]:  # fmt: skip
    """Own config vs the general one on `records` (`index.select`): the choice and its timings."""
    configs = domain_configs(own, general)
    with StepProgress(f"{name}: own vs general", len(records) * sel.rounds * (1 + len(configs)), progress) as bar:
        m = measure(
            engine, _encode(engine, records), configs, sel, labels=[f"{name}:{_source(r)}" for r in records],
            clock=clock, on_run=lambda: bar.advance(description=f"{name}: own vs general"),
        )  # fmt: skip
    choice = choose_domain(m, own, general, sel)
    log.info("domain %s: %s (%s), speedup %.3fx [%.3f, %.3f]", name, choice.source, choice.config.config_id,
             choice.speedup.value, choice.speedup.low, choice.speedup.high)  # fmt: skip
    return choice, m


def _confirm_records(records: Sequence[PromptLike], order: Sequence[int], used: int, n: int) -> list[PromptLike]:
    """`n` prompts for the own-vs-general comparison: those the search did not measure on first (in the
    search's shuffled order), then, for a small domain, the measured ones again."""
    idx = list(order[used:]) + list(order[:used])
    return [records[i] for i in idx[: min(n, len(idx))]]


def _source(r: PromptLike) -> str:
    return str(getattr(r, "source", "") or "")


def load_engine(model: str, precision: str = "auto") -> SearchEngine:
    """The real engine (imported here so the search logic needs no torch model to import)."""
    from engine.generate import Engine

    return Engine.load(model, precision=precision)
