"""`knnssd k8s ...`: render the Kubernetes manifests from the config, and seed a data volume (init container).

Heavy imports stay inside the commands so `knnssd --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

k8s_app = typer.Typer(no_args_is_help=True, help="Kubernetes (KubeRay) manifests.")

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "k8s"


@k8s_app.command("render")
def render_cmd(
    config: Optional[Path] = typer.Option(
        None, "--config", "-c", help="K8s config YAML (deploy.k8s.K8sConfig; its `app:` is an AppConfig). Default: the defaults."
    ),
    out: Path = typer.Option(DEFAULT_OUT, "--out", "-o", help="Directory to write (default: the repository's k8s/)."),
) -> None:
    """Write the RayService, RayJob, Redis, Secret, PVC and kustomization manifests generated from the config."""
    from pydantic import ValidationError

    from deploy.k8s import K8sConfig, write

    try:
        cfg = K8sConfig.load(config)
    except (ValidationError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for p in write(out, cfg):
        typer.echo(f"wrote {p}", err=True)


@k8s_app.command("seed")
def seed_cmd(
    domains: Path = typer.Option(..., "--domains", help="Domain data directory on the shared volume."),
    index: Path = typer.Option(..., "--index", help="Index artefact root on the shared volume."),
) -> None:
    """Copy the bundled domain data and the image's default index onto an empty volume (never overwrites)."""
    from deploy.k8s import seed_data

    done = seed_data(domains, index)
    typer.echo("seeded: " + "; ".join(done) if done else "volume already seeded; nothing copied", err=True)
