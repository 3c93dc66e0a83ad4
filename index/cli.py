"""`knnssd index ...`: build an index artefact locally, or show the current one.

Heavy imports (torch, faiss, sentence-transformers) happen inside the commands so `--help` is instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

index_app = typer.Typer(no_args_is_help=True, help="Domain index: build and inspect artefacts.")


@index_app.command("build")
def build_cmd(
    data: Path = typer.Option(..., "--data", help="Data directory: one <domain>.jsonl per domain."),
    out: Path = typer.Option(..., "--out", help="Artefact root (versions/ and CURRENT live here)."),
    budget: int = typer.Option(24, "--budget", min=1, help="Candidate draft configs screened per domain."),
    workers: int = typer.Option(1, "--workers", min=1, help="Domains searched in parallel (processes)."),
    seed: int = typer.Option(0, "--seed", help="Seed for k-means and the search."),
    k: int = typer.Option(2, "--k", min=1, help="Centroids per domain."),
    model: str = typer.Option("smollm2", "--model", help="Engine model name or Hugging Face model directory."),
    representation: str = typer.Option("minilm", "--representation", help="'minilm' or 'llm-hidden'."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=2, help="Tokens per measured run."),
    measure_prompts: int = typer.Option(3, "--measure-prompts", min=1, help="Prompts per domain measured for tokens/s."),
    screen_prompts: int = typer.Option(4, "--screen-prompts", min=1, help="Prompts per domain used for screening."),
    n_measure: int = typer.Option(2, "--n-measure", min=1, help="Best screened candidates measured per domain."),
    measure_rounds: int = typer.Option(3, "--measure-rounds", min=1, help="Interleaved measurement rounds (fastest run counts)."),
    layer_profile_prompts: int = typer.Option(2, "--layer-profile-prompts", min=0, help="Prompts for the per-layer profile (0: off)."),
    threads: int = typer.Option(0, "--threads", min=0, help="torch threads (0: torch's default)."),
    general: bool = typer.Option(True, "--general/--no-general", help="Measure a general config (the fallback) and keep a domain's own config only when it beats it (--no-general: the older procedure)."),
    general_prompts: int = typer.Option(None, "--general-prompts", min=1, help="Prompts per domain in the general config's measurement (default: measure-prompts + 1)."),
    confirm_prompts: int = typer.Option(None, "--confirm-prompts", min=1, help="Prompts per domain comparing its own config with the general one (default: 2 x measure-prompts)."),
    select_rounds: int = typer.Option(None, "--select-rounds", min=1, help="Interleaved rounds of those two measurements (default: 2)."),
    select_tokens: int = typer.Option(None, "--select-tokens", min=2, help="Tokens per run in those two measurements (default: 2 x max-new-tokens)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars (--no-progress: log lines at each stage and every 30 s)."),
) -> None:
    """Build a new index version from DATA into OUT and make it CURRENT."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    from rich.console import Console

    if not progress:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if threads:
        import torch

        torch.set_num_threads(threads)
    from index.build import BuildSettings, build, summary_table

    settings = BuildSettings(
        data=data,
        out=out,
        budget=budget,
        workers=workers,
        seed=seed,
        k=k,
        model=model,
        representation=representation,  # type: ignore[arg-type]
        max_new_tokens=max_new_tokens,
        measure_prompts=measure_prompts,
        screen_prompts=screen_prompts,
        n_measure=n_measure,
        measure_rounds=measure_rounds,
        layer_profile_prompts=layer_profile_prompts,
        general=general,
        general_prompts=general_prompts,
        confirm_prompts=confirm_prompts,
        select_rounds=select_rounds,
        select_tokens=select_tokens,
        progress=progress,
    )
    result = build(settings)
    console = Console(width=max(Console().width, 240))  # every knob column stays readable when piped
    console.print(summary_table(result))
    console.print(f"plot: {result.path / 'search.png'}")


@index_app.command("show")
def show_cmd(
    out: Path = typer.Option(None, "--out", help="Artefact root or version directory (default: the shipped index, index/artefacts/default)."),
    version: str = typer.Option(None, "--version", help="Version to show (default: CURRENT)."),
    table: bool = typer.Option(False, "--table", help="A table (general config, each domain's knobs and measured speedup with its interval) instead of the JSON manifest."),
) -> None:
    """Verify and print an artefact's manifest (JSON), or a summary table with --table."""
    from index.artefact import DEFAULT_ROOT, ArtefactError, load_artefact

    try:
        art = load_artefact(out or DEFAULT_ROOT, version=version)
    except ArtefactError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    if not table:
        typer.echo(art.manifest.model_dump_json(indent=2))
        return
    from rich.console import Console

    from index.build import manifest_table

    Console(width=max(Console().width, 240)).print(manifest_table(art.manifest, title=f"{art.path}"))
