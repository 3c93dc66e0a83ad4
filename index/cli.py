"""`knnssd index ...`: build an index artefact locally, or show the current one.

Heavy imports (torch, faiss, sentence-transformers) happen inside the commands so `--help` is instant
(index.settings, which the build's flags are generated from, imports none of them).
"""

from __future__ import annotations

from pathlib import Path

import typer

from index.options import flags, validate, with_flags
from index.settings import BuildSettings

BUILD_FLAGS = flags(BuildSettings)

index_app = typer.Typer(no_args_is_help=True, help="Domain index: build and inspect artefacts.")


# Every build setting is a flag (index.settings.BuildSettings, the one declaration); `--threads` and
# `--experiment` are this command's own.
@index_app.command("build")
@with_flags(BUILD_FLAGS)
def build_cmd(
    fields: dict,
    threads: int = typer.Option(0, "--threads", min=0, help="torch threads (0: torch's default)."),
    experiment: bool = typer.Option(
        False, "--experiment", help="Allow settings whose index the serving router refuses (--representation llm-hidden): an index for "
        "offline comparison only (`knnssd bench engine --routed --index OUT`), never for a router."
    ),
) -> None:
    """Build a new index version from DATA into OUT and make it CURRENT."""
    try:
        settings = validate(BuildSettings, fields)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    why = settings.unservable()
    if why and not experiment:
        raise typer.BadParameter(why, param_hint="--representation")

    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    from rich.console import Console

    if not settings.progress:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if threads:
        import torch

        torch.set_num_threads(threads)
    from index.build import build, summary_table

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
