"""`knnssd bench engine`: HF `generate`, the engine's plain decoding and speculative decoding per draft
config, interleaved in one process on the same prompts, reported as ratios per prompt kind.

Each prompt runs every method back to back (the order rotated per prompt), `repeats` times; a prompt's
time per method is the median of its repeats (or the fastest, `fastest`), and a kind's ratio is the
median of its prompts' ratios (`speedup_vs_plain`) and their geometric mean (`geomean_vs_plain`).
Methods that pick the same config for a prompt share its runs. Ratios from one process are what we
quote: the machine is shared and absolute times drift.

Besides fixed configs, a method may choose a config per prompt (`per_prompt`): the router's choice, the
index's general config, each kind's own config (`knnssd bench engine --routed`, see router.offline).
Other decoders join as `extra` methods, timed in the same rotation on the same prompt ids: plain decoding
at another engine precision (`plain@reference`) and llama.cpp on the same GGUF (`engine.peer`);
`peer_report` gives each llama.cpp type's tokens/s, our methods' ratios to it and where its text first
diverges from our plain decoding at each precision.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.config import DraftConfig, SamplingParams
from engine.draft import draft_pass_args
from engine.generate import Engine
from engine.gpu import device_clock

# The named configs live in engine.named_configs (the index takes its general candidates from them
# without torch); re-exported here, where the bench's callers and tests import them.
from engine.named_configs import ABLATION_CONFIGS, DEFAULT_CONFIGS, SKIP_DRAFT, knob_ablation  # noqa: F401
from engine.prompts import BenchPrompt

HF = "hf-generate"
PLAIN = "plain"
PER_KIND = "per-kind"
# An extra method: prompt ids, max new tokens -> new token ids (greedy), timed by run_bench.
ExtraDecoder = Callable[[list[int], int], list[int]]


def load_per_kind(path: Path) -> dict[str, DraftConfig]:
    """{kind: config} from a JSON file: either that mapping itself or an index artefact's manifest.json
    (its `domains.<name>.config`), so the configs the index search chose can be benchmarked by kind."""
    data = json.loads(Path(path).read_text())
    if "domains" in data:
        data = {name: d["config"] for name, d in data["domains"].items()}
    return {kind: DraftConfig.model_validate(c) for kind, c in data.items()}


@dataclass
class PromptResult:
    kind: str
    times: dict[str, list[float]] = field(default_factory=dict)  # method -> seconds per repeat
    tokens: dict[str, list[int]] = field(default_factory=dict)  # method -> token ids (last repeat)
    steps: dict[str, int] = field(default_factory=dict)
    drafted: dict[str, int] = field(default_factory=dict)
    accepted: dict[str, int] = field(default_factory=dict)
    fastest: bool = False  # a method's time is its fastest repeat, else the median

    def seconds(self, method: str) -> float:
        return min(self.times[method]) if self.fastest else statistics.median(self.times[method])

    def tps(self, method: str) -> float:
        return len(self.tokens[method]) / self.seconds(method)


def _hf_generate(engine: Engine, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = engine.hf_model.generate(
            torch.tensor([ids], device=engine.device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=engine.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=engine.tokenizer.eos_token_id,
        )[0, len(ids) :].tolist()
    while out and out[-1] in engine.eos_token_ids:  # count what the engine counts: EOS excluded
        out.pop()
    return out


def method_configs(
    prompts: list[BenchPrompt],
    configs: dict[str, DraftConfig],
    include_hf: bool = True,
    per_kind: dict[str, DraftConfig] | None = None,
    per_prompt: dict[str, list[DraftConfig]] | None = None,
) -> list[dict[str, DraftConfig | None]]:
    """For each prompt, method -> the config it decodes with (None: HF generate), in method order."""
    per_prompt = per_prompt or {}
    for name, cfgs in per_prompt.items():
        if len(cfgs) != len(prompts):
            raise ValueError(f"method {name!r} has {len(cfgs)} configs for {len(prompts)} prompts")
    out = []
    for i, bp in enumerate(prompts):
        row: dict[str, DraftConfig | None] = {HF: None} if include_hf else {}
        row[PLAIN] = DraftConfig.plain()
        row |= configs
        if per_kind:
            row[PER_KIND] = per_kind.get(bp.kind, DraftConfig.plain())
        row |= {name: cfgs[i] for name, cfgs in per_prompt.items()}
        out.append(row)
    return out


def count_runs(rows: list[dict[str, DraftConfig | None]], repeats: int = 1) -> int:
    """Decodes `run_bench` makes: one per distinct config per prompt and repeat."""
    return sum(len(set(row.values())) for row in rows) * repeats


def run_bench(
    engine: Engine,
    prompts: list[BenchPrompt],
    configs: dict[str, DraftConfig],
    max_new_tokens: int = 128,
    repeats: int = 1,
    include_hf: bool = True,
    on_step=None,
    per_kind: dict[str, DraftConfig] | None = None,
    per_prompt: dict[str, list[DraftConfig]] | None = None,
    fastest: bool = False,
    extra: dict[str, ExtraDecoder] | None = None,
) -> list[PromptResult]:
    """`per_kind` adds a method that decodes each prompt with its kind's config (plain where its kind has
    none): what routing by domain would pick, with the kind known. `per_prompt` adds methods that decode
    prompt i with their config i (e.g. the router's decision for it, made before timing starts).

    Methods that decode a prompt with the same config share that config's runs (greedy decoding of the
    same prompt with the same config is the same computation): fewer runs, and two methods differ only
    on the prompts where their configs differ. `fastest`: a prompt's time per config is its fastest
    repeat (other load on the machine only ever adds time) instead of the median. `extra` methods (other
    decoders of the same ids) run in the same rotation, one run per prompt and repeat each."""
    params = SamplingParams(max_new_tokens=max_new_tokens)
    extra = extra or {}
    rows = method_configs(prompts, configs, include_hf, per_kind, per_prompt)
    results = []
    warm = engine.encode_prompt(prompt="Hello")
    # Warm every distinct config once, untimed: the first use of int8 weights or a subset head builds
    # them (seconds), which would otherwise land in whichever timed run comes first.
    distinct = {c for row in rows for c in row.values() if c is not None}
    for cfg in sorted(distinct, key=lambda c: c.config_id):
        engine.generate(warm, SamplingParams(max_new_tokens=4), cfg)
    for dec in extra.values():
        dec(warm, 4)
    for i, (bp, row) in enumerate(zip(prompts, rows)):
        ids = engine.encode_prompt(prompt=bp.prompt, messages=list(bp.messages) if bp.messages else None)
        res = PromptResult(bp.kind, fastest=fastest)
        runs = list(dict.fromkeys(row.values())) + list(extra)  # distinct configs in method order (None: HF), extras
        order = runs[i % len(runs) :] + runs[: i % len(runs)]
        times: dict[DraftConfig | None, list[float]] = {}
        out: dict[DraftConfig | None, tuple] = {}
        for _ in range(repeats):
            for cfg in order:
                t0 = device_clock(engine.device)
                if cfg is None:
                    toks, st = _hf_generate(engine, ids, max_new_tokens), None
                elif isinstance(cfg, str):
                    toks, st = extra[cfg](ids, max_new_tokens), None
                else:
                    r = engine.generate(ids, params, cfg)
                    toks, st = r.token_ids, r.stats
                times.setdefault(cfg, []).append(device_clock(engine.device) - t0)
                out[cfg] = (toks, st)
                if on_step:
                    on_step()
        for m, cfg in [*row.items(), *((name, name) for name in extra)]:
            toks, st = out[cfg]
            res.times[m], res.tokens[m] = list(times[cfg]), toks
            if st is not None:
                res.steps[m], res.drafted[m], res.accepted[m] = st.steps, st.drafted, st.accepted
        results.append(res)
    return results


def _summary(results: list[PromptResult], method: str, include_hf: bool) -> dict:
    toks = sum(len(r.tokens[method]) for r in results)
    secs = sum(r.seconds(method) for r in results)
    out = {
        "prompts": len(results),
        "tokens": toks,
        "tokens_per_s": round(toks / secs, 3) if secs else 0.0,
        "speedup_vs_plain": round(statistics.median(r.tps(method) / r.tps(PLAIN) for r in results), 4),
        "geomean_vs_plain": round(_geomean([r.tps(method) / r.tps(PLAIN) for r in results]), 4),
        "speedup_vs_hf": (
            round(statistics.median(r.tps(method) / r.tps(HF) for r in results), 4) if include_hf else None
        ),
        "identical": all(r.tokens[method] == r.tokens[PLAIN] for r in results),
    }
    if method not in (HF, PLAIN) and method in results[0].steps:
        steps = sum(r.steps[method] for r in results)
        drafted = sum(r.drafted[method] for r in results)
        decoded = sum(max(len(r.tokens[method]) - 1, 0) for r in results)  # the prefill token is no step
        out["mean_accepted_tokens"] = round(decoded / steps, 4) if steps else 0.0
        out["acceptance_rate"] = round(sum(r.accepted[method] for r in results) / drafted, 4) if drafted else 0.0
    else:
        out["mean_accepted_tokens"] = 1.0
        out["acceptance_rate"] = None
    return out


def _geomean(xs: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(x) for x in xs)) if xs else 0.0


def summarize(
    results: list[PromptResult], configs: dict[str, DraftConfig], include_hf: bool, per_prompt: list[str] | tuple[str, ...] = (),
    extra: list[str] | tuple[str, ...] = (),
) -> dict:
    methods = ([HF] if include_hf else []) + [PLAIN] + list(configs)
    methods += [PER_KIND] if results and PER_KIND in results[0].times else []
    methods += list(per_prompt) + list(extra)
    kinds = sorted({r.kind for r in results})
    table: dict[str, dict] = {}
    for m in methods:
        table[m] = {k: _summary([r for r in results if r.kind == k], m, include_hf) for k in kinds}
        table[m]["overall"] = _summary(results, m, include_hf)
    return table


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where two token sequences differ (a length counts when one is a prefix of the
    other), None when they are identical."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def peer_report(results: list[PromptResult], peers: list[str], ours: list[str], plains: dict[str, str]) -> dict:
    """Per peer method: its median tokens/s over prompts, each of our methods' median per-prompt ratio to it,
    and per precision (`plains`: precision -> our plain method at it) the first position where the peer's
    tokens diverge from ours on each prompt (None: identical)."""
    out = {}
    for p in peers:
        out[p] = {
            "tokens_per_s": round(statistics.median(r.tps(p) for r in results), 3),
            "ratio": {m: round(statistics.median(r.tps(m) / r.tps(p) for r in results), 4) for m in ours},
            "diverges_at": {prec: [first_divergence(r.tokens[p], r.tokens[m]) for r in results] for prec, m in plains.items()},
        }
    return out


def verify_cost(engine: Engine, sizes=(1, 2, 3, 4, 5, 8), context: int = 128, reps: int = 30) -> dict:
    """Median time of one full pass over M new tokens at a fixed context, and its ratio to M=1.
    Sizes are interleaved per repetition so drift hits them alike."""
    lean = engine.lean
    ctx = torch.randint(0, lean.vocab, (context,))
    times: dict[int, list[float]] = {m: [] for m in sizes}
    with torch.inference_mode():
        lean.forward(ctx, 0)
        for _ in range(reps):
            for m in sizes:
                toks = torch.randint(0, lean.vocab, (m,)).to(lean.device)
                t0 = device_clock(lean.device)
                lean.forward(toks, context)
                times[m].append(device_clock(lean.device) - t0)
    base = statistics.median(times[sizes[0]])
    return {
        str(m): {"ms": round(statistics.median(t) * 1e3, 2), "ratio_to_1": round(statistics.median(t) / base, 3)}
        for m, t in times.items()
    }


def draft_cost(engine: Engine, configs: dict[str, DraftConfig], context: int = 128, reps: int = 15) -> dict:
    """Cost of one model draft step (one token, the config's skips / int8 weights / subset head) as a
    fraction of one full 1-token pass, medians interleaved per repetition. Lookup-only configs cost 0.
    Measured: the index search's cost model estimates the same ratio (`index.screen.estimated_draft_cost`)."""
    lean = engine.lean
    ctx = torch.randint(0, lean.vocab, (context,))
    runs = {name: args for name, c in configs.items() if (args := draft_pass_args(lean, c))}  # those with a draft pass
    times: dict[str, list[float]] = {n: [] for n in [PLAIN, *runs]}
    tok = torch.tensor([1]).to(lean.device)
    with torch.inference_mode():
        lean.forward(ctx, 0)
        for _ in range(reps):
            for name in times:
                t0 = device_clock(lean.device)
                lean.forward(tok, context, last_only=True, **runs.get(name, {}))
                times[name].append(device_clock(lean.device) - t0)
    full = statistics.median(times[PLAIN])
    return {n: (round(statistics.median(times[n]) / full, 3) if n in runs else 0.0) for n in configs}


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = report["table"]
    methods = [m for m in table if m != PLAIN]
    kinds = [k for k in table[PLAIN] if k != "overall"] + ["overall"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        vals = [table[m][k]["speedup_vs_plain"] for k in kinds]
        ax1.bar([i + j * width for i in range(len(kinds))], vals, width, label=m)
    ax1.axhline(1.0, color="black", lw=0.8, ls="--")
    ax1.set_xticks([i + width * (len(methods) - 1) / 2 for i in range(len(kinds))], kinds)
    ax1.set_ylabel("tokens/s ratio to engine plain decoding")
    ax1.set_title(f"{report['model']}: speed by prompt kind ({report['max_new_tokens']} new tokens)")
    ax1.legend(fontsize=8)
    vc = report.get("verify_cost")
    if vc:
        ms = [int(k) for k in vc]
        ax2.plot(ms, [vc[str(m)]["ratio_to_1"] for m in ms], marker="o")
        ax2.set_xlabel("tokens in one full pass (M)")
        ax2.set_ylabel("cost / cost at M=1")
        ax2.set_title("verify cost")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2))
