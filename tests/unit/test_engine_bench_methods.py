"""The bench's per-prompt methods on a fake engine: methods that pick the same config share its runs,
geometric means, fastest-of-repeats, and the routed/general/oracle method lists."""

from __future__ import annotations

import math

import pytest

from engine.bench import PLAIN, count_runs, method_configs, run_bench, summarize
from engine.config import DecodeStats, DraftConfig
from engine.prompts import BenchPrompt

A = DraftConfig(prompt_lookup=3, model_draft=False, max_draft=8)
B = DraftConfig(quantize="int8", max_draft=6, confidence=0.3)


class _Result:
    def __init__(self, toks):
        self.token_ids, self.stats = toks, DecodeStats(new_tokens=len(toks), steps=2, drafted=4, accepted=3)


class FakeEngine:
    """Each generate advances a fake clock by the config's cost x the prompt's length; the first timed run
    of every (config, prompt) is disturbed (3x slower)."""

    device = None  # nothing to wait for

    def __init__(self, clock):
        self.clock, self.calls, self.seen = clock, [], set()

    def encode_prompt(self, prompt=None, messages=None):
        return [len(prompt or "")]

    def generate(self, ids, params, cfg):
        cost = {PLAIN: 1.0, A.config_id: 0.5, B.config_id: 0.8}[cfg.config_id if cfg.enabled else PLAIN]
        key = (cfg.config_id, ids[0], params.max_new_tokens)
        slow = 3.0 if key not in self.seen and params.max_new_tokens > 4 else 1.0
        self.seen.add(key)
        self.clock[0] += cost * ids[0] * slow
        self.calls.append((cfg.config_id, ids[0], params.max_new_tokens))
        return _Result([1, 2, 3])


@pytest.fixture
def fake(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("engine.gpu.time.perf_counter", lambda: clock[0])  # engine.bench times through engine.gpu.device_clock
    return FakeEngine(clock)


PROMPTS = [BenchPrompt("x", prompt="ab"), BenchPrompt("y", prompt="abcd")]


def test_methods_sharing_a_config_share_its_runs(fake):
    per_prompt = {"routed": [A, B], "general": [A, A]}
    rows = method_configs(PROMPTS, {"a": A}, include_hf=False, per_prompt=per_prompt)
    assert rows[1] == {PLAIN: DraftConfig.plain(), "a": A, "routed": B, "general": A}
    assert count_runs(rows, repeats=2) == (2 + 3) * 2
    res = run_bench(fake, PROMPTS, {"a": A}, max_new_tokens=8, repeats=2, include_hf=False, per_prompt=per_prompt, fastest=True)
    timed = [c for c in fake.calls if c[2] == 8]
    assert len(timed) == 10  # prompt 0: plain, A; prompt 1: plain, A, B; two repeats each
    table = summarize(res, {"a": A}, include_hf=False, per_prompt=list(per_prompt))
    # fastest repeat: the disturbed first runs do not count; general == a exactly (shared runs)
    assert table["general"]["overall"]["geomean_vs_plain"] == table["a"]["overall"]["geomean_vs_plain"] == 2.0
    assert math.isclose(table["routed"]["overall"]["geomean_vs_plain"], math.sqrt(2.0 * 1.25), rel_tol=1e-3)
    assert table["routed"]["y"]["speedup_vs_plain"] == 1.25 and all(table[m]["overall"]["identical"] for m in table)


def test_median_of_repeats_by_default(fake):
    res = run_bench(fake, PROMPTS[:1], {"a": A}, max_new_tokens=8, repeats=2, include_hf=False)
    # plain: 3*2 then 2 -> median 4; A: 3*1 then 1 -> median 2
    assert res[0].seconds(PLAIN) == 4.0 and res[0].seconds("a") == 2.0


def test_per_prompt_lists_must_match_the_prompts():
    with pytest.raises(ValueError, match="routed"):
        method_configs(PROMPTS, {}, per_prompt={"routed": [A]})
