"""`knnssd bench engine --routed` on a tiny prompt file: the real model, MiniLM and the shipped index."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

LINES = [
    {"prompt": "Translate into French: The cat sleeps on the warm windowsill.", "kind": "translate"},
    {"prompt": "What is 12 times 7? Explain briefly.", "kind": "math"},
    {"messages": [{"role": "user", "content": "Hi! Can you suggest a name for my goldfish?"}], "kind": "pets"},
]


def test_routed_bench_on_a_tiny_file(tmp_path):
    from index.artefact import DEFAULT_ROOT, load_artefact
    from deploy.cli import app

    prompts = tmp_path / "tiny.jsonl"
    prompts.write_text("".join(json.dumps(x) + "\n" for x in LINES))
    out = tmp_path / "bench.json"
    args = ["bench", "engine", "--prompts", str(prompts), "--routed", "--no-hf", "--no-costs", "--max-new-tokens", "6",
            "--config", 'lookup={"prompt_lookup": 3, "model_draft": false, "max_draft": 8}', "--json", str(out)]  # fmt: skip
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    table = report["table"]
    assert set(table) == {"plain", "lookup", "routed", "general", "oracle"}
    for method, rows in table.items():
        assert set(rows) == {"translate", "math", "pets", "overall"}
        assert rows["overall"]["identical"], method  # every method decodes exactly what plain decoding does
        assert rows["overall"]["tokens"] == sum(rows[k]["tokens"] for k in ("translate", "math", "pets")) > 0
        # one prompt per kind: the overall geometric mean of per-prompt ratios is the kinds' ratios combined
        kinds = [rows[k]["geomean_vs_plain"] for k in ("translate", "math", "pets")]
        assert rows["overall"]["geomean_vs_plain"] == pytest.approx(
            (kinds[0] * kinds[1] * kinds[2]) ** (1 / 3), rel=1e-3), method
        assert rows["overall"]["speedup_vs_plain"] == pytest.approx(sorted(kinds)[1], rel=1e-3), method
    assert table["plain"]["overall"]["speedup_vs_plain"] == table["plain"]["overall"]["geomean_vs_plain"] == 1.0
    # the router's choice decodes each prompt with its domain's config (the general one for a domain that
    # inherits it, plain decoding for one that keeps plain) in the very runs the method with that config
    # timed (methods share runs by config): one kind per prompt, so each kind's row is that run's
    art = load_artefact(DEFAULT_ROOT)
    assert report["index_version"] == art.version
    general_id = art.manifest.fallback_config.config_id
    for d in report["decisions"]:
        same = {general_id: "general", "plain": "plain"}.get(d["config_id"])
        assert same is not None, d  # the shipped index holds only these two configs
        row, twin = table["routed"][d["kind"]], table[same][d["kind"]]
        if same == "plain":  # a plain route reports acceptance 0.0 where the plain method has none
            assert row.pop("acceptance_rate") in (0.0, None) and twin.pop("acceptance_rate") is None
        assert row == twin, d
    assert sum(report["route_domains"].values()) == 3 and "fallback" in report["route_domains"]
    assert set(report["route_domains"]) <= {"fallback", *art.manifest.domains}
    # oracle: the kinds the index has a domain for use that domain's config; 'pets' gets the general one
    assert report["oracle_domains"] == {"translate": "translate", "math": "math", "pets": "general"}
    routed = {d["kind"]: d for d in report["decisions"]}
    assert routed["translate"]["domain"] in {"translate", "fallback"}
    assert "routes (index" in r.output
