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
    threads: int = typer.Option(0, "--threads", min=0, help="torch threads (0: torch's default)."),
) -> None:
    """Build a new index version from DATA into OUT and make it CURRENT."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console

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
    )
    result = build(settings)
    console = Console()
    console.print(summary_table(result))
    console.print(f"plot: {result.path / 'search.png'}")


@index_app.command("show")
def show_cmd(
    out: Path = typer.Option(..., "--out", help="Artefact root or version directory."),
    version: str = typer.Option(None, "--version", help="Version to show (default: CURRENT)."),
) -> None:
    """Verify and print an artefact's manifest."""
    from index.artefact import ArtefactError, load_artefact

    try:
        art = load_artefact(out, version=version)
    except ArtefactError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    typer.echo(art.manifest.model_dump_json(indent=2))
