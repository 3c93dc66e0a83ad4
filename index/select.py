"""Choose configs against a strong baseline: the general config, then each domain's own config or not.

1. General config: a few strong candidates (`GENERAL_CANDIDATES`) and plain decoding are timed on all
   domains' prompts together, interleaved (`measure`); the candidate with the best geometric mean of
   per-prompt speedups wins (`choose_general`). Plain becomes the general config only when it measurably
   wins: the winner's whole confidence interval lies below 1.
2. Per domain: the domain's own best config (from its search) and the general config are timed on that
   domain's prompts, plain beside them (`choose_domain`). The domain keeps its own config only when the
   confidence interval of the per-prompt ratio own / general lies wholly above 1 (it beats the general
   config by more than the measured noise); otherwise it inherits the general config.

Intervals are percentile bootstraps over prompts of the geometric mean of paired per-prompt ratios: each
prompt's runs of every config are interleaved in one process, so a ratio cancels the machine's drift.
Each (config, prompt) keeps its fastest round (other load only ever adds time). A config that changed the
greedy output, or measured faster than its tokens per verify pass allow, is disqualified.

The timing loop takes an engine and a clock, so tests drive it with fakes; the choice functions are pure.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from engine.config import DraftConfig, SamplingParams
from engine.named_configs import ABLATION_CONFIGS
from index.artefact import Ratio

log = logging.getLogger(__name__)

PLAIN = "plain"
GENERAL = "general"
OWN = "own"

# Strong general candidates measured on SmolLM2 (README "Benchmarks", issue 11): the best static
# combination, prompt lookup alone (no draft pass at all), lookup with an adaptive length, int8 plus
# lookup, and the best combination on int4 draft weights. They are the bench's ablation configs of those
# names (engine.named_configs), so a bench run and a build measure the same drafts; this order is the
# measurement's (its rotation starts from it).
GENERAL_CANDIDATES: dict[str, DraftConfig] = {
    name: ABLATION_CONFIGS[name]
    # int4 is gone from the list: at the native precision a draft's int8/int4 means int8 activations, so
    # the int4 candidate was the int8 one again (and at reference it was never the winner by more than noise)
    for name in ("int8+vocab8k+lookup2+adaptive", "lookup", "lookup2+adaptive", "int8+vocab8k+lookup")
}


class SelectSettings(BaseModel):
    """How the general config and the per-domain keep-or-inherit choice are measured."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    general_prompts: int = Field(4, ge=1, description="Prompts per domain in the general config's measurement (all domains together).")
    confirm_prompts: int = Field(6, ge=1, description="Prompts per domain on which its own config is compared with the general one (disjoint from the search's prompts when the domain has enough).")
    rounds: int = Field(2, ge=1, description="Interleaved rounds; each (config, prompt) keeps its fastest run.")
    max_new_tokens: int = Field(64, ge=2, description="Tokens generated per measured run (longer than the search's: copying pays later in an answer).")
    level: float = Field(0.9, gt=0.0, lt=1.0, description="Two-sided confidence level of the bootstrap intervals.")
    n_boot: int = Field(2000, ge=100, description="Bootstrap resamples of the prompts.")
    plausibility_slack: float = Field(0.05, ge=0.0, description="A geometric-mean speedup above tokens per verify pass x (1 + this) is disturbed timing: disqualified.")
    seed: int = Field(0, description="Seed of the bootstrap and of the prompt choice.")


class ConfigTiming(BaseModel):
    """One config's runs over the measured prompts (fastest round per prompt)."""

    config: DraftConfig = Field(description="The measured configuration.")
    seconds: list[float] = Field(description="Fastest round's wall time per prompt, in prompt order.")
    tokens: list[int] = Field(description="Tokens generated per prompt.")
    lossless: bool = Field(True, description="Every run produced plain decoding's tokens.")
    steps: int = Field(0, description="Verify passes over all runs.")
    decoded: int = Field(0, description="Tokens committed by verify passes over all runs (the prefill token excluded).")
    drafted: int = Field(0, description="Drafted tokens over all runs.")
    accepted: int = Field(0, description="Accepted drafted tokens over all runs.")

    @property
    def tokens_per_step(self) -> float:
        return self.decoded / self.steps if self.steps else 1.0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Measurement(BaseModel):
    """Interleaved timings of named configs on the same prompts; `plain` is always among them."""

    prompts: list[str] = Field(description="Where each measured prompt came from (domain and index), in order.")
    configs: dict[str, ConfigTiming] = Field(description="Name -> timings; 'plain' is plain decoding.")

    def merge(self, other: Measurement) -> Measurement:
        """The same configs measured on more prompts (e.g. another worker's shard)."""
        if set(other.configs) != set(self.configs):
            raise ValueError(f"cannot merge measurements of {sorted(self.configs)} and {sorted(other.configs)}")
        out = {}
        for name, a in self.configs.items():
            b = other.configs[name]
            out[name] = ConfigTiming(
                config=a.config, seconds=a.seconds + b.seconds, tokens=a.tokens + b.tokens, lossless=a.lossless and b.lossless,
                steps=a.steps + b.steps, decoded=a.decoded + b.decoded, drafted=a.drafted + b.drafted, accepted=a.accepted + b.accepted,
            )  # fmt: skip
        return Measurement(prompts=self.prompts + other.prompts, configs=out)


class Scored(BaseModel):
    """One config's speedup over plain decoding in a measurement, and whether it may be chosen."""

    name: str = Field(description="Config name in the measurement.")
    config: DraftConfig = Field(description="The configuration.")
    speedup: Ratio = Field(description="Speedup over plain decoding (time of plain / time of this config, per prompt).")
    tokens_per_step: float = Field(description="Tokens committed per verify pass.")
    acceptance: float = Field(description="Accepted / drafted tokens.")
    lossless: bool = Field(description="Every run produced plain decoding's tokens.")
    plausible: bool = Field(description="The speedup is at most what its tokens per verify pass allow.")

    @property
    def valid(self) -> bool:
        return self.lossless and self.plausible and math.isfinite(self.speedup.value)


class GeneralChoice(BaseModel):
    """The general config (the manifest's fallback) and what every candidate measured."""

    name: str = Field(description="Winning candidate's name, or 'plain' when plain decoding measurably won.")
    config: DraftConfig = Field(description="The general config.")
    speedup: Ratio = Field(description="Its speedup over plain decoding on all domains' prompts (1 for plain).")
    candidates: list[Scored] = Field(description="Every measured candidate.")
    reason: str = Field(description="Why this one won, in words.")


class DomainChoice(BaseModel):
    """A domain's config: its own when it beat the general config by more than the noise, else inherited."""

    source: Literal["own", "general"] = Field(description="'own': the domain's searched config; 'general': inherited.")
    config: DraftConfig = Field(description="The chosen config.")
    own_config: DraftConfig = Field(description="The domain's own best config from its search (may be plain or equal the general config).")
    speedup: Ratio = Field(description="Chosen config's speedup over plain decoding on the domain's confirmation prompts.")
    general_speedup: Ratio = Field(description="The general config's speedup over plain on the same prompts.")
    own_vs_general: Ratio | None = Field(description="Own config's time ratio over the general config's (> 1: own faster); None when they are the same config.")
    acceptance: float = Field(description="Acceptance of the chosen config in the confirmation runs.")
    tokens_per_step: float = Field(description="Tokens per verify pass of the chosen config in the confirmation runs.")
    reason: str = Field(description="Why, in words.")


# ---------------------------------------------------------------------------------------------- maths


def ratio_ci(num: Sequence[float], den: Sequence[float], level: float = 0.9, n_boot: int = 2000, seed: int = 0) -> Ratio:
    """Geometric mean of num[i] / den[i] with a percentile-bootstrap interval over i (paired by prompt).

    For a speedup pass (plain seconds, config seconds); for 'own beats general' (general s, own s)."""
    x = np.log(np.asarray(num, dtype=np.float64)) - np.log(np.asarray(den, dtype=np.float64))
    if x.size == 0:
        raise ValueError("ratio over no prompts")
    mean = float(x.mean())
    if x.size == 1:
        lo = hi = mean
    else:
        rng = np.random.default_rng(seed)
        boots = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
        lo, hi = (float(v) for v in np.quantile(boots, [(1 - level) / 2, (1 + level) / 2]))
    return Ratio(value=round(math.exp(mean), 4), low=round(math.exp(lo), 4), high=round(math.exp(hi), 4), prompts=int(x.size))


def score(m: Measurement, name: str, s: SelectSettings) -> Scored:
    """`name`'s speedup over plain in `m`, with its interval, lossless and plausibility flags."""
    t, plain = m.configs[name], m.configs[PLAIN]
    r = ratio_ci(plain.seconds, t.seconds, s.level, s.n_boot, s.seed)
    tps = t.tokens_per_step if name != PLAIN else 1.0
    return Scored(
        name=name, config=t.config, speedup=r, tokens_per_step=round(tps, 4), acceptance=round(t.acceptance, 4),
        lossless=t.lossless, plausible=name == PLAIN or r.value <= max(tps, 1.0) * (1.0 + s.plausibility_slack),
    )  # fmt: skip


def choose_general(m: Measurement, s: SelectSettings) -> GeneralChoice:
    """The best valid candidate by geometric-mean speedup; plain only when the best one measurably loses
    to plain (its whole interval below 1) or no candidate is valid."""
    scored = [score(m, n, s) for n in m.configs if n != PLAIN]
    for sc in scored:
        if not sc.lossless:
            log.warning("general candidate %s changed greedy output; disqualified", sc.name)
        elif not sc.plausible:
            log.warning("general candidate %s measured %.2fx at %.2f tokens per step (disturbed); disqualified", sc.name, sc.speedup.value, sc.tokens_per_step)
    valid = [sc for sc in scored if sc.valid]
    one = Ratio(value=1.0, low=1.0, high=1.0, prompts=len(m.prompts))
    if not valid:
        return GeneralChoice(name=PLAIN, config=DraftConfig.plain(), speedup=one, candidates=scored, reason="no candidate was lossless and plausible")
    best = max(valid, key=lambda sc: (sc.speedup.value, sc.speedup.low, sc.name))
    if best.speedup.high < 1.0:
        return GeneralChoice(
            name=PLAIN, config=DraftConfig.plain(), speedup=one, candidates=scored,
            reason=f"plain measurably won: the best candidate {best.name} measured {_fmt(best.speedup)}",
        )  # fmt: skip
    return GeneralChoice(
        name=best.name, config=best.config, speedup=best.speedup, candidates=scored,
        reason=f"best geometric-mean speedup {_fmt(best.speedup)} over {best.speedup.prompts} prompts",
    )  # fmt: skip


def choose_domain(m: Measurement, own: DraftConfig, general: DraftConfig, s: SelectSettings) -> DomainChoice:
    """`m` is a measurement of `domain_configs(own, general)` (plain always in it). The domain keeps its
    own config only when own / general clears 1 over the whole interval and own is valid; plain as the
    own config is always valid (it is the reference), so plain wins a domain only by measurably beating
    the general config there."""
    own_name, gen_name = _name_in(own, general), _name_in(general, general)
    gen = score(m, gen_name, s)
    if own_name == gen_name:
        return DomainChoice(
            source="general", config=general, own_config=own, speedup=gen.speedup, general_speedup=gen.speedup,
            own_vs_general=None, acceptance=gen.acceptance, tokens_per_step=gen.tokens_per_step,
            reason="its own best config is the general config",
        )  # fmt: skip
    sc = score(m, own_name, s)
    vs = ratio_ci(m.configs[gen_name].seconds, m.configs[own_name].seconds, s.level, s.n_boot, s.seed)
    if sc.valid and vs.low > 1.0:
        return DomainChoice(
            source="own", config=own, own_config=own, speedup=sc.speedup, general_speedup=gen.speedup, own_vs_general=vs,
            acceptance=sc.acceptance, tokens_per_step=sc.tokens_per_step, reason=f"own config beat the general one by {_fmt(vs)}",
        )  # fmt: skip
    why = "own config changed the output or measured implausibly" if not sc.valid else f"own / general {_fmt(vs)} does not clear 1"
    if not gen.valid:
        log.warning("the general config %s was not lossless and plausible on this domain's prompts", general.config_id)
    return DomainChoice(
        source="general", config=general, own_config=own, speedup=gen.speedup, general_speedup=gen.speedup, own_vs_general=vs,
        acceptance=gen.acceptance, tokens_per_step=gen.tokens_per_step, reason=why,
    )  # fmt: skip


def _name_in(cfg: DraftConfig, general: DraftConfig) -> str:
    """The name `cfg` is measured under in a domain's confirmation (see `domain_configs`)."""
    if not cfg.enabled:
        return PLAIN
    return GENERAL if cfg == general else OWN


def _fmt(r: Ratio) -> str:
    return f"{r.value:.3f}x [{r.low:.3f}, {r.high:.3f}]"


# ---------------------------------------------------------------------------------------------- timing


class Generator(Protocol):
    """What `measure` needs of `engine.generate.Engine`: a result with `token_ids` and `stats`."""

    def generate(self, ids: list[int], params: SamplingParams, draft: DraftConfig) -> Any: ...


def measure(
    engine: Generator,
    prompts: Sequence[list[int]],
    configs: Mapping[str, DraftConfig],
    s: SelectSettings,
    labels: Sequence[str] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    on_run: Callable[[], None] | None = None,
) -> Measurement:
    """Time plain decoding and every config on every prompt, `s.rounds` interleaved rounds (the order
    rotated per prompt and round so no config always runs first), greedy, `s.max_new_tokens` tokens."""
    if PLAIN in configs:
        raise ValueError(f"{PLAIN!r} is always measured; do not pass it")
    params = SamplingParams(max_new_tokens=s.max_new_tokens, temperature=0.0)
    all_cfgs = {PLAIN: DraftConfig.plain(), **configs}
    names = list(all_cfgs)
    best = {n: [math.inf] * len(prompts) for n in names}
    tokens = {n: [0] * len(prompts) for n in names}
    agg = {n: {"steps": 0, "decoded": 0, "drafted": 0, "accepted": 0, "lossless": True} for n in names}
    for rnd in range(s.rounds):
        for pi, ids in enumerate(prompts):
            shift = (rnd + pi) % len(names)
            out: dict[str, list[int]] = {}
            for n in names[shift:] + names[:shift]:
                t0 = clock()
                res = engine.generate(ids, params, all_cfgs[n])
                dt = max(clock() - t0, 1e-9)
                best[n][pi] = min(best[n][pi], dt)
                out[n] = list(res.token_ids)
                tokens[n][pi] = len(res.token_ids)
                st = res.stats
                a = agg[n]
                a["steps"] += st.steps
                a["decoded"] += max(st.new_tokens - 1, 0)
                a["drafted"] += st.drafted
                a["accepted"] += st.accepted
                if on_run:
                    on_run()
            for n in names:
                agg[n]["lossless"] &= out[n] == out[PLAIN]
    timings = {
        n: ConfigTiming(
            config=all_cfgs[n], seconds=[round(x, 6) for x in best[n]], tokens=tokens[n], lossless=bool(agg[n]["lossless"]),
            steps=int(agg[n]["steps"]), decoded=int(agg[n]["decoded"]), drafted=int(agg[n]["drafted"]), accepted=int(agg[n]["accepted"]),
        )  # fmt: skip
        for n in names
    }
    return Measurement(prompts=list(labels) if labels is not None else [str(i) for i in range(len(prompts))], configs=timings)


def general_configs(general_candidates: Mapping[str, DraftConfig] | None = None) -> dict[str, DraftConfig]:
    """The candidates measured for the general config (default: GENERAL_CANDIDATES), without plain."""
    cands = dict(GENERAL_CANDIDATES if general_candidates is None else general_candidates)
    return {n: c for n, c in cands.items() if c.enabled}


def domain_configs(own: DraftConfig, general: DraftConfig) -> dict[str, DraftConfig]:
    """What a domain's confirmation measures besides plain: the general config, and its own unless they
    are the same config (or the own config is plain, which is measured anyway)."""
    out = {GENERAL: general} if general.enabled else {}
    if own != general and own.enabled:
        out[OWN] = own
    return out


class PromptLike(Protocol):
    prompt: str | None

    def messages_list(self) -> list[dict] | None: ...


def general_prompts(domains: Mapping[str, Sequence[PromptLike]], s: SelectSettings) -> list[tuple[str, PromptLike]]:
    """`s.general_prompts` prompts of every domain (a seeded choice), labelled 'domain:source', round-robin
    over the domains. Workers may measure shards of the list: each ratio is paired within one prompt."""
    import random

    per = []
    for name in sorted(domains):
        recs = list(domains[name])
        idx = list(range(len(recs)))
        random.Random(f"{s.seed}:general:{name}").shuffle(idx)
        per.append([(f"{name}:{getattr(recs[i], 'source', '') or i}", recs[i]) for i in idx[: s.general_prompts]])
    return [item for group in zip_longest_flat(per) for item in group]


def zip_longest_flat(groups: Sequence[Sequence]) -> list[list]:
    """[[a1, a2], [b1]] -> [[a1, b1], [a2]]: round-robin rows of the groups."""
    n = max((len(g) for g in groups), default=0)
    return [[g[i] for g in groups if i < len(g)] for i in range(n)]


def measure_prompts(
    engine: Any,
    items: Sequence[tuple[str, PromptLike]],
    configs: Mapping[str, DraftConfig],
    s: SelectSettings,
    on_run: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Measurement:
    """`measure` on labelled prompt records (encoded with the engine's chat template)."""
    ids = [engine.encode_prompt(prompt=r.prompt, messages=r.messages_list()) for _, r in items]
    return measure(engine, ids, configs, s, labels=[label for label, _ in items], clock=clock, on_run=on_run)
