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


def test_show_without_arguments_prints_the_shipped_index():
    # issue 11: `knnssd index show` failed with "Missing option '--out'" although the README promised it
    from index.artefact import DEFAULT_ROOT

    r = CliRunner().invoke(index_app, ["show"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["version"] == (DEFAULT_ROOT / "CURRENT").read_text().strip()
    r = CliRunner().invoke(index_app, ["show", "--table"])
    assert r.exit_code == 0 and "(general)" in r.output


def test_a_build_without_bars_still_logs_its_progress(caplog):
    # issue 11: `--no-progress` left the job silent for 11 minutes
    import logging

    from index.search import StepProgress

    with caplog.at_level(logging.INFO, logger="index.search"):
        with StepProgress("chat: screening", 3, False, log_every_s=0.0) as bar:
            bar.advance()
            bar.advance(description="chat: measuring")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("chat: screening: 0/3 steps")
    assert any(m.startswith("chat: measuring: 2/3 steps") for m in lines)
    assert lines[-1].startswith("chat: measuring: done, 2/3 steps")
