"""The `knnssd` command line: one root that mounts each stage's commands (the top floor: it may import
every other package, none imports it).

Each stage keeps its commands next to its code; heavy imports (torch, ray) happen inside the
commands so `knnssd --help` stays instant.
"""

from __future__ import annotations

import typer

from deploy.bench_engine import bench_engine
from deploy.bench_serve import bench_serve
from engine.cli import generate
from index.cli import index_app
from router.bench import bench_route
from deploy.k8s_cli import k8s_app
from deploy.serve_cmd import serve
from deploy.tenants_cli import tenants_app

app = typer.Typer(no_args_is_help=True, add_completion=False, help="KNN-SSD serving.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: each runs both sides in one process.")
app.add_typer(bench_app, name="bench")
app.add_typer(index_app, name="index")
app.add_typer(tenants_app, name="tenants")
app.add_typer(k8s_app, name="k8s")

app.command("generate")(generate)
app.command("serve")(serve)
bench_app.command("engine")(bench_engine)
bench_app.command("route")(bench_route)
bench_app.command("serve")(bench_serve)


def main() -> None:
    app()
