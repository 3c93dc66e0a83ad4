"""`knnssd bench serve`: closed-loop clients at several concurrencies against the batching runtime (or,
with `--http URL`, against a running service), every mode in one process on the same prompts.

Runtime modes: `serial` (one request at a time: the replica before batching), `batched-plain` and
`batched-spec` (the routed config per prompt from the default index, or `--config`). Prints a table,
writes JSON (`results`: rows of {mode, concurrency, agg_tps, p50_latency_s, p99_latency_s, ttft_p50_s,
identical, ...}) and a PNG. `identical`: every request's tokens equal its prompt's solo plain decoding.
HTTP modes: `http-spec` and `http-plain` (`"speculative": false`); `identical` compares their texts, and
`texts` in the JSON holds each (mode, prompt)'s text, for comparing two runs.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from engine.loadtest import MODES, Claims, RequestRecord, run_clients


def _ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def bench_serve(
    model: Annotated[str, typer.Option(help="Bundled model name or a local Hugging Face model directory.")] = "smollm2",
    prompts: Annotated[Optional[Path], typer.Option(help="JSONL prompts ({'prompt'|'messages', 'kind'}) or a directory of them; default: the built-in mixed set.")] = None,
    concurrency: Annotated[str, typer.Option(help="Comma-separated client counts.")] = "1,2,4,8",
    requests: Annotated[int, typer.Option(min=1, help="Requests per (mode, concurrency); clients share them.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="New tokens per request.")] = 128,
    modes: Annotated[str, typer.Option(help=f"Comma-separated runtime modes out of {','.join(MODES)}.")] = ",".join(MODES),
    config: Annotated[Optional[str], typer.Option(help="Draft config for batched-spec as JSON (default: each prompt's routed config from --index).")] = None,
    index: Annotated[Optional[Path], typer.Option(help="Index artefact for routing (default: the shipped one).")] = None,
    threads: Annotated[int, typer.Option(help="torch threads of the decode loop.")] = 2,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto.")] = "auto",
    max_running: Annotated[int, typer.Option(min=1, help="Requests decoded together by the runtime.")] = 8,
    http: Annotated[Optional[str], typer.Option(help="Drive a running service at this base URL instead of the runtime.")] = None,
    api_key: Annotated[str, typer.Option(help="API key for --http.")] = "sk-knnssd-dev",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report here.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="PNG path (default: next to --json, else bench-serve.png).")] = None,
) -> None:
    """Throughput and latency by concurrency: one-at-a-time vs batched, plain vs speculative."""
    from rich.console import Console

    from engine.prompts import builtin_prompts, load_prompts

    console = Console(stderr=True)
    plist = load_prompts(prompts) if prompts else builtin_prompts()
    levels = _ints(concurrency)
    if http:
        rows, texts = _bench_http(http, api_key, plist, levels, requests, max_new_tokens, model, console)
        report = {"target": http, "model": model, "max_new_tokens": max_new_tokens, "results": rows,
                  "texts": texts}
    else:
        report = _bench_runtime(model, plist, levels, requests, max_new_tokens, [m for m in modes.split(",") if m],
                                config, index, threads, device, dtype, max_running, console)
    _print(report["results"])
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2))
    plot_path = plot or (json_out.with_suffix(".png") if json_out else Path("bench-serve.png"))
    write_plot(report, plot_path)
    console.print(f"wrote {json_out or ''} {plot_path}")


def _bench_runtime(model, plist, levels, requests, max_new_tokens, modes, config, index, threads, device, dtype,
                   max_running, console) -> dict:
    import torch
    from rich.progress import Progress

    from engine.config import DraftConfig, RuntimeSettings, SamplingParams
    from engine.generate import Engine
    from engine.loadtest import BATCHED_PLAIN, closed_loop, mode_settings, summarize

    bad = sorted(set(modes) - set(MODES))
    if bad:
        raise typer.BadParameter(f"unknown modes {bad}; choose from {MODES}", param_hint="--modes")
    torch.set_num_threads(threads)
    eng = Engine.load(model, device=device, dtype=dtype)
    ids = [eng.encode_prompt(prompt=p.prompt, messages=list(p.messages) if p.messages else None) for p in plist]
    if config:
        spec = [DraftConfig.model_validate_json(config)] * len(plist)
        source = "given"
    else:  # the service's choice: route each prompt with the index (before any timing)
        from router.offline import load_index, routed_methods

        art = load_index(index)
        spec = routed_methods(art, plist, engine=eng).methods["routed"]
        source = f"routed by {art.path}"
    base = RuntimeSettings(max_running=max_running)
    with Progress(console=console) as prog:
        task = prog.add_task("solo plain references", total=len(ids))
        reference = []
        for x in ids:
            reference.append(eng.generate(x, SamplingParams(max_new_tokens=max_new_tokens), DraftConfig.plain()).token_ids)
            prog.advance(task)
        closed_loop(eng, ids[:2], [DraftConfig.plain(), spec[1]], mode_settings(BATCHED_PLAIN, base), 2, 2, 8)  # warm-up
        rows = []
        total = len(levels) * len(modes) * requests
        task = prog.add_task("closed-loop clients", total=total)
        for c in levels:
            for mode in modes:
                cfgs = spec if mode.endswith("spec") else [DraftConfig.plain()] * len(ids)
                records, wall = closed_loop(eng, ids, cfgs, mode_settings(mode, base), c, requests, max_new_tokens,
                                            on_done=lambda r: prog.advance(task))
                rows.append(summarize(mode, c, records, wall, reference))
                prog.console.log(f"{mode} x{c}: {rows[-1]['agg_tps']:.1f} tok/s, p50 {rows[-1]['p50_latency_s']:.2f} s")
    return {
        "model": eng.model_id, "device": str(eng.device), "dtype": str(eng.dtype).replace("torch.", ""),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": threads,
        "max_new_tokens": max_new_tokens, "requests": requests, "max_running": max_running,
        "spec_configs": source, "results": rows,
    }


def _bench_http(url, key, plist, levels, requests, max_new_tokens, model, console) -> tuple[list[dict], dict]:
    """The HTTP rows and each (mode, prompt)'s text, keyed "mode/prompt index" (so two runs, e.g. before and
    after a change to the service, can be compared text for text)."""
    import httpx

    from engine.loadtest import summarize

    def one(client: httpx.Client, i: int, speculative: bool) -> tuple[str, int]:
        p = plist[i]
        body = {"model": model, "max_tokens": max_new_tokens, "temperature": 0, "speculative": speculative}
        if p.messages:
            r = client.post("/v1/chat/completions", json={**body, "messages": list(p.messages)})
            r.raise_for_status()
            data = r.json()
            return data["choices"][0]["message"]["content"], data["usage"]["completion_tokens"]
        r = client.post("/v1/completions", json={**body, "prompt": p.prompt})
        r.raise_for_status()
        data = r.json()
        return data["choices"][0]["text"], data["usage"]["completion_tokens"]

    rows = []
    texts: dict[tuple[str, int], str] = {}
    headers = {"Authorization": f"Bearer {key}"}
    for c in levels:
        for mode, spec in (("http-spec", True), ("http-plain", False)):
            records: list[RequestRecord] = []
            lock = threading.Lock()
            claims = Claims(requests)

            def client() -> None:
                with httpx.Client(base_url=url, headers=headers, timeout=600) as cl:
                    while (n := claims.take()) is not None:
                        i = n % len(plist)
                        rec = RequestRecord(i, time.perf_counter())
                        text, ntok = one(cl, i, spec)
                        rec.done = time.perf_counter()
                        rec.tokens = [0] * ntok
                        with lock:
                            records.append(rec)
                            texts.setdefault((mode, i), text)

            row = summarize(mode, c, records, run_clients(client, c), reference=None)
            rows.append(row)
            console.log(f"{mode} x{c}: {row['agg_tps']:.1f} tok/s, p50 {row['p50_latency_s']:.2f} s")
    same = all(texts.get(("http-spec", i)) == texts.get(("http-plain", i)) for i in range(len(plist))
               if ("http-spec", i) in texts and ("http-plain", i) in texts)
    for row in rows:
        row["identical"] = same
    return rows, {f"{mode}/{i}": text for (mode, i), text in sorted(texts.items())}


def _print(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="closed-loop load: throughput and latency by concurrency")
    cols = ("mode", "concurrency", "agg_tps", "per_request_tps", "p50_latency_s", "p99_latency_s", "ttft_p50_s",
            "mean_tokens_per_step", "load_plain_steps", "identical")
    for c in cols:
        t.add_column(c.replace("_", " "), justify="right")
    for r in rows:
        t.add_row(*(str(r.get(c, "-")) for c in cols))
    Console(width=160).print(t)


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        rs = [r for r in rows if r["mode"] == mode]
        cs = [r["concurrency"] for r in rs]
        ax1.plot(cs, [r["agg_tps"] for r in rs], marker="o", label=mode)
        ax2.plot(cs, [r["p50_latency_s"] for r in rs], marker="o", label=f"{mode} p50")
        ax2.plot(cs, [r["p99_latency_s"] for r in rs], marker="x", ls=":", label=f"{mode} p99")
    ax1.set_xlabel("concurrent clients")
    ax1.set_ylabel("aggregate tokens/s")
    ax1.set_title(f"{report.get('model', '')} on {report.get('device', report.get('target', ''))}: throughput")
    ax2.set_xlabel("concurrent clients")
    ax2.set_ylabel("request latency (s)")
    ax2.set_title("latency")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
