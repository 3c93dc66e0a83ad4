"""`knnssd bench serve` as the README runs it, at a small scale: the real model, the shipped index's routing,
every runtime mode at two concurrencies, and every request's tokens equal to its prompt's solo plain
decoding. The README's figures come from the same command at full scale (they are measurements of one
machine, not asserted here)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

LINES = [
    {"prompt": "Write a Python function that returns the n-th Fibonacci number.", "kind": "code"},
    {"prompt": "Summarize in one sentence: The city council met on Monday to discuss the new park. Residents asked "
               "for more trees and a playground. The council agreed to fund both next year.", "kind": "summarize"},
]


def test_bench_serve_runs_every_mode_and_every_request_matches_solo_plain(tmp_path):
    from deploy.cli import app
    from engine.loadtest import MODES

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    out = tmp_path / "bench-serve.json"
    args = ["bench", "serve", "--prompts", str(prompts), "--concurrency", "1,2", "--requests", "3",
            "--max-new-tokens", "12", "--json", str(out)]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    rows = {(row["mode"], row["concurrency"]): row for row in report["results"]}
    assert set(rows) == {(m, c) for m in MODES for c in (1, 2)}
    for key, row in rows.items():
        assert row["identical"] is True, key  # every request's tokens equal its solo plain decoding
        assert row["requests"] == 3 and 0 < row["tokens"] <= 3 * 12 and row["agg_tps"] > 0, (key, row)
        assert row["p50_latency_s"] <= row["p99_latency_s"], key
    assert report["spec_configs"].startswith("routed by")
    assert out.with_suffix(".png").stat().st_size > 0
