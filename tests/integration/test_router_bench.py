"""`knnssd bench route` end to end on a few corpus prompts (real MiniLM, real Redis, given decode time)."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from router.bench import DEFAULT_DATA, bench_route


@pytest.mark.slow
@pytest.mark.skipif(not (DEFAULT_DATA / "default").is_dir(), reason="no corpus under index/data")
def test_bench_route_writes_json(tmp_path, redis_url):
    app = typer.Typer()
    app.command()(bench_route)
    out = tmp_path / "route.json"
    res = CliRunner().invoke(
        app, ["--limit", "24", "--decode-s", "6.0", "--redis-url", redis_url, "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    cold, cached = data["passes"]["cold"], data["passes"]["cached"]
    assert data["n_prompts"] == 24
    assert (cold["cache_hits"], cold["cache_misses"]) == (0, 24)
    assert (cached["cache_hits"], cached["cache_misses"]) == (24, 0)
    assert cached["p50_ms"] < cold["p50_ms"]
    assert 0 < cold["p50_frac"] < 1 and "cached_p50_under_1ms" in data["targets"]
    assert "Routing latency" in res.output
