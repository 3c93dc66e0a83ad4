"""`knnssd bench engine`: HF `generate`, the engine's plain decoding and speculative decoding per draft
config, interleaved in one process (the measuring lives in engine.bench). It sits on the top floor
because `--routed` asks the router (router.offline) for each prompt's config."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer


def bench_engine(
    model: Annotated[str, typer.Option(help="Bundled model name or a local Hugging Face model directory.")] = "smollm2",
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per prompt.")] = 128,
    prompts: Annotated[Optional[Path], typer.Option(help="JSONL prompts ({'prompt'|'messages', 'kind', 'domain'}), or a directory of <kind>.jsonl files; default: built-in mixed set.")] = None,
    config: Annotated[Optional[list[str]], typer.Option(help="Draft config as NAME=JSON or a JSON file {name: config}; repeatable. Default: a hand-picked set.")] = None,
    ablation: Annotated[bool, typer.Option(help="Use the ablation set: each draft knob alone, then combined (instead of the hand-picked set; --config adds to it).")] = False,
    per_kind: Annotated[Optional[Path], typer.Option(help="JSON {kind: config}, or an index artefact's manifest.json: adds a 'per-kind' method decoding each prompt with its kind's config.")] = None,
    repeats: Annotated[int, typer.Option(help="Runs of each method per prompt (median taken).")] = 1,
    fastest: Annotated[bool, typer.Option(help="With --repeats: a prompt's time per method is its fastest repeat, not the median (other load only adds time).")] = False,
    hf: Annotated[bool, typer.Option(help="Include Hugging Face generate as a baseline.")] = True,
    routed: Annotated[bool, typer.Option(help="Add the methods 'routed' (the index router's choice per prompt), 'general' (the index's fallback config for every prompt) and, when kinds name index domains, 'oracle' (each kind's own config); reports where prompts were routed.")] = False,
    index: Annotated[Optional[Path], typer.Option(help="Index artefact for --routed (a root or a version directory; default: the shipped index/artefacts/default).")] = None,
    costs: Annotated[bool, typer.Option(help="Measure the verify cost by tokens and each config's draft cost after the runs.")] = True,
    limit: Annotated[int, typer.Option(help="Use at most this many prompts per kind (0: all).")] = 0,
    threads: Annotated[int, typer.Option(help="torch threads.")] = 2,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto (fp32 on CPU, bf16 on GPU).")] = "auto",
    precision: Annotated[str, typer.Option(help="Engine precision of every method: auto, reference, native or native-f32 (auto: native on a CPU for a GGUF model).")] = "auto",
    compare_precision: Annotated[Optional[list[str]], typer.Option(help="Also run plain decoding at this precision (method 'plain@PRECISION'), interleaved; repeatable.")] = None,
    peer: Annotated[Optional[str], typer.Option(help="'llama.cpp' (or llama.cpp:own,Q8_0,F32): decode the same prompt ids with llama.cpp on the same GGUF at its own type, Q8_0 and F32, interleaved (needs llama-cpp-python; skipped with a note when absent).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report as JSON here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="PNG plot path (default: next to --json, else bench-engine.png).")] = None,
) -> None:
    """Speculative vs plain decoding vs HF generate, interleaved in one process; tables, JSON and a plot."""
    from rich.console import Console
    from rich.table import Table

    from engine.bench import (
        ABLATION_CONFIGS, DEFAULT_CONFIGS, HF, PLAIN, count_runs, draft_cost, load_per_kind, method_configs, peer_report,
        run_bench, summarize, verify_cost, write_json, write_plot,
    )
    from engine import peer as peers_mod
    from engine.config import DraftConfig, SamplingParams
    from engine.generate import Engine
    from engine.prompts import builtin_prompts, load_prompts
    from index.search import StepProgress

    configs = dict(ABLATION_CONFIGS) if ablation else ({} if config else dict(DEFAULT_CONFIGS))
    configs |= _parse_configs(config, DraftConfig) if config else {}
    kind_configs = load_per_kind(per_kind) if per_kind else None
    plist = load_prompts(prompts) if prompts else builtin_prompts()
    if limit:
        seen: dict[str, int] = {}
        plist = [p for p in plist if seen.setdefault(p.kind, 0) < limit and not seen.__setitem__(p.kind, seen[p.kind] + 1)]
    console = Console(stderr=True)
    try:
        peer_types = peers_mod.parse_peer(peer)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--peer") from None
    if peer_types and not peers_mod.available():
        console.print("[yellow]--peer llama.cpp skipped: llama-cpp-python is not installed "
                      "(CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install -e \".[peer]\")")
        peer_types = []
    try:
        eng = Engine.load(model, threads=threads, device=device, dtype=dtype, precision=precision)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--precision") from None
    extra, plains = {}, {eng.precision: PLAIN}
    for prec in compare_precision or []:
        other = Engine.load(model, threads=threads, device=device, dtype=dtype, precision=prec)
        name = f"plain@{other.precision}"
        extra[name] = lambda ids, n, e=other: e.generate(ids, SamplingParams(max_new_tokens=n), DraftConfig.plain()).token_ids
        plains[other.precision] = name
    peer_labels = []
    if peer_types:
        with console.status("llama.cpp models"):
            for d in peers_mod.llama_cpp_peers(model, peer_types, threads, eng.eos_token_ids, n_ctx=eng.context_length):
                extra[d.label] = d.decode
                peer_labels.append(d.label)
    route = None
    if routed:  # routing imports (MiniLM, FAISS) only when asked; decisions are made before any timing
        from router.offline import load_index, routed_methods

        art = load_index(index)
        if art.manifest.model_hash != eng.weights_hash:
            console.print(f"[yellow]warning: index {art.version} was built for weights {art.manifest.model_hash[:12]}, not {eng.weights_hash[:12]}")
        route = routed_methods(art, plist, engine=eng)
    per_prompt = route.methods if route else {}
    for c in [*configs.values(), *(kind_configs or {}).values(), *(c for cs in per_prompt.values() for c in cs)]:
        c.check(eng.num_layers)
    n_runs = count_runs(method_configs(plist, configs, hf, kind_configs, per_prompt), repeats) + len(extra) * len(plist) * repeats
    if not console.is_terminal:  # no bar without a terminal: StepProgress logs a line every 30 s instead
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with StepProgress("benchmark", n_runs, console.is_terminal) as prog:
        results = run_bench(
            eng, plist, configs, max_new_tokens, repeats, hf, on_step=prog.advance, per_kind=kind_configs,
            per_prompt=per_prompt, fastest=fastest, extra=extra,
        )  # fmt: skip
    vcost, dcost = {}, {}
    if costs:
        with console.status("verify and draft cost"):
            vcost = verify_cost(eng)
            dcost = draft_cost(eng, configs)
    table = summarize(results, configs, hf, per_prompt=list(per_prompt), extra=list(extra))
    import torch

    report = {
        "model": eng.model_id,
        "device": str(eng.device),
        "dtype": str(eng.dtype).replace("torch.", ""),
        "precision": eng.precision,
        "activations": {"native": "int8 per block of 32", "native-f32": "float32"}.get(eng.precision, str(eng.dtype).replace("torch.", "")),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "kernels": eng.lean.native.build_kind() if eng.lean.native is not None else None,
        "max_new_tokens": max_new_tokens,
        "repeats": repeats,
        "fastest": fastest,
        "threads": threads,
        "configs": {n: c.model_dump(mode="json") | {"config_id": c.config_id} for n, c in configs.items()},
        "per_kind_configs": (
            {k: c.model_dump(mode="json") | {"config_id": c.config_id} for k, c in kind_configs.items()}
            if kind_configs else None
        ),
        "table": table,
        "verify_cost": vcost,
        "draft_cost": dcost,
    }
    if peer_labels:
        ours = [m for m in table if m != HF and m not in peer_labels]
        report["peer"] = peer_report(results, peer_labels, ours, plains)
    if route:
        report |= route.report(plist)
        report["routed_configs"] = {
            c.config_id: c.model_dump(mode="json") for cs in per_prompt.values() for c in cs
        }
    out = Console(width=max(Console().width, 120))  # method names stay readable when piped
    for kind in list(table[PLAIN]):
        t = Table(title=f"{eng.model_id} — {kind}")
        for col in ("method", "tok/s", "vs plain", "geomean", "vs HF", "tokens/step", "acceptance", "draft cost", "identical"):
            t.add_column(col, justify="right")
        for m, rows in table.items():
            r = rows[kind]
            t.add_row(
                m, f"{r['tokens_per_s']:.1f}", f"{r['speedup_vs_plain']:.3f}", f"{r['geomean_vs_plain']:.3f}",
                "-" if r["speedup_vs_hf"] is None else f"{r['speedup_vs_hf']:.3f}",
                f"{r['mean_accepted_tokens']:.2f}",
                "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}",
                f"{dcost[m]:.2f}" if m in dcost else "-",
                "yes" if r["identical"] else "NO",
            )
        out.print(t)
    if route:
        rt = Table(title=f"routes (index {route.index_version}): prompts per routed domain, by kind")
        doms = list(route.route_domains())
        rt.add_column("kind")
        for d in doms:
            rt.add_column(d, justify="right")
        rt.add_column("oracle config from", justify="right")
        by_kind = route.route_table(plist)
        for kind, counts in by_kind.items():
            rt.add_row(kind, *[str(counts.get(d, 0)) for d in doms], route.oracle_domains.get(kind, "-"))
        rt.add_row("all", *[str(n) for n in route.route_domains().values()], "")
        out.print(rt)
    vc = Table(title="verify cost: one full pass over M tokens")
    vc.add_column("M", justify="right")
    vc.add_column("ms (median)", justify="right")
    vc.add_column("ratio to M=1", justify="right")
    for m, v in report["verify_cost"].items():
        vc.add_row(m, f"{v['ms']:.1f}", f"{v['ratio_to_1']:.2f}")
    if vcost:
        out.print(vc)
    if HF in table:
        out.print(f"HF generate output identical to engine plain decoding on every prompt: {table[HF]['overall']['identical']}")
    if peer_labels:
        pt = Table(title=f"vs llama.cpp (same GGUF, same prompt ids, {threads} threads): median of per-prompt tokens/s ratios")
        pt.add_column("our method")
        for lab in peer_labels:
            pt.add_column(f"/ {lab} ({report['peer'][lab]['tokens_per_s']:.1f} tok/s)", justify="right")
        for m in report["peer"][peer_labels[0]]["ratio"]:
            pt.add_row(m, *[f"{report['peer'][lab]['ratio'][m]:.3f}" for lab in peer_labels])
        out.print(pt)
        for lab in peer_labels:
            for prec, pos in report["peer"][lab]["diverges_at"].items():
                same = sum(p is None for p in pos)
                out.print(f"{lab} text vs our plain at {prec}: identical on {same}/{len(pos)} prompts; first divergence at {pos}")
    if json_out:
        write_json(report, json_out)
    plot_path = plot or (json_out.with_suffix(".png") if json_out else Path("bench-engine.png"))
    write_plot(report, plot_path)
    console.print(f"wrote {json_out or ''} {plot_path}")


def _parse_configs(specs: list[str], draft_cls) -> dict:
    configs = {}
    for spec in specs:
        if "=" in spec and not Path(spec).exists():
            name, blob = spec.split("=", 1)
            configs[name] = draft_cls.model_validate_json(blob)
        else:
            for name, c in json.loads(Path(spec).read_text()).items():
                configs[name] = draft_cls.model_validate(c)
    return configs
