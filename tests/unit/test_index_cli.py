"""`knnssd index ...` commands (the typer app mounted by deploy/cli.py)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from index.cli import index_app
from tests.unit.test_index_artefact import LABELS, _index, _manifest


def test_help_lists_commands():
    r = CliRunner().invoke(index_app, ["--help"])
    assert r.exit_code == 0 and "build" in r.output and "show" in r.output
    r = CliRunner().invoke(index_app, ["build", "--help"])
    assert r.exit_code == 0
    for flag in ("--data", "--out", "--budget", "--workers", "--seed", "--k"):
        assert flag in r.output


def test_show_prints_manifest_and_refuses_corruption(tmp_path):
    from index.artefact import write_artefact

    m = _manifest()
    vdir = write_artefact(tmp_path, m, _index(), LABELS)
    r = CliRunner().invoke(index_app, ["show", "--out", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["version"] == m.version
    (vdir / "labels.json").write_text("[]")
    r = CliRunner().invoke(index_app, ["show", "--out", str(tmp_path)])
    assert r.exit_code == 1 and "checksum mismatch" in r.output
