"""`knnssd bench engine --peer llama.cpp` and `--compare-precision`: the option parses, is skipped with a
note when llama-cpp-python is absent, and extra decoders join the interleaved runs and the peer report."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from engine import peer
from engine.bench import PLAIN, first_divergence, peer_report, run_bench, summarize
from engine.config import DraftConfig
from engine.prompts import BenchPrompt
from tests.tiny import tiny_engine


def test_peer_option_parses():
    assert peer.parse_peer(None) == [] and peer.parse_peer("") == []
    assert peer.parse_peer("llama.cpp") == ["own", "Q8_0", "F32"]
    assert peer.parse_peer("llama.cpp:own,F32") == ["own", "F32"]
    with pytest.raises(ValueError, match="unknown peer"):
        peer.parse_peer("vllm")
    with pytest.raises(ValueError, match="unknown llama.cpp types"):
        peer.parse_peer("llama.cpp:Q2_K")


def test_first_divergence():
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 3]) == 2


@pytest.fixture
def tiny(monkeypatch):
    torch.set_num_threads(1)
    eng = tiny_engine()
    import engine.generate

    monkeypatch.setattr(engine.generate.Engine, "load", classmethod(lambda cls, *a, **k: eng))
    return eng


def test_bench_skips_the_peer_cleanly_without_llama_cpp(tiny, monkeypatch, tmp_path):
    from deploy.bench_engine import bench_engine

    monkeypatch.setattr(peer, "available", lambda: False)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "abcabcabc", "kind": "copy"}) + "\n")
    app = typer.Typer()
    app.command()(bench_engine)
    out = tmp_path / "r.json"
    r = CliRunner().invoke(app, ["--prompts", str(prompts), "--max-new-tokens", "8", "--no-hf", "--no-costs", "--peer", "llama.cpp",
                                 "--config", 'lookup={"prompt_lookup": 2, "model_draft": false}', "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "--peer llama.cpp skipped" in r.output
    report = json.loads(out.read_text())
    assert "peer" not in report and report["precision"] == "reference"
    r = CliRunner().invoke(app, ["--prompts", str(prompts), "--no-hf", "--peer", "sglang"])
    assert r.exit_code != 0 and "unknown peer" in r.output


def test_extra_decoders_are_timed_and_reported_like_a_peer(tiny):
    prompts = [BenchPrompt(prompt="abcabcabc", kind="copy"), BenchPrompt(prompt="xyz", kind="short")]
    first = tiny.encode_prompt(prompt="abcabcabc")

    def fake_peer(ids, n):  # decodes like our plain decoding, except that it diverges at position 2 of the first prompt
        toks = tiny.generate(ids, tiny_params(n), DraftConfig.plain()).token_ids
        assert len(toks) >= 3 or ids != first
        return toks[:2] + [(toks[2] + 1) % 100] + toks[3:] if ids == first else toks

    res = run_bench(tiny, prompts, {"lookup": DraftConfig(prompt_lookup=2, model_draft=False)}, max_new_tokens=6, include_hf=False,
                    extra={"llama.cpp X": fake_peer})
    table = summarize(res, {"lookup": DraftConfig(prompt_lookup=2, model_draft=False)}, False, extra=["llama.cpp X"])
    assert "llama.cpp X" in table and table["llama.cpp X"]["overall"]["tokens"] > 0
    rep = peer_report(res, ["llama.cpp X"], [PLAIN, "lookup"], {"reference": PLAIN})
    pos = rep["llama.cpp X"]["diverges_at"]["reference"]
    assert sorted(p for p in pos if p is not None) == [2] and pos.count(None) == 1
    assert set(rep["llama.cpp X"]["ratio"]) == {PLAIN, "lookup"} and rep["llama.cpp X"]["tokens_per_s"] > 0


def tiny_params(n):
    from engine.config import SamplingParams

    return SamplingParams(max_new_tokens=n)
