"""Batch-invariant rows on the device-generic path (what GPUs run), on the CPU.

The engine is lossless under batching and speculation only if a row's logits do not depend on how many
rows share its pass. `F.linear` (cuBLAS on a GPU, MKL here) does not give that by itself; the generic
path runs every projection and RMSNorm on fixed-shape row chunks (`engine.gpu`). Forced onto that path
on the CPU (`generic=True`), rows must be bit-identical for M = 1..16 whether they are decoded alone,
batched with other sequences, or verified together.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import DraftConfig, RuntimeSettings, SamplingParams
from engine.gpu import FIXED_ROWS, FixedRowsLinear, probe, rms_norm_fixed, to_device, to_host
from engine.lean import LeanModel, Segment
from engine.random_model import build_random_model, random_engine
from engine.weights import WeightSource

MINI = "random:qwen2.5-coder-0.5b-mini"


@pytest.fixture(scope="module")
def mini_hf():
    torch.set_num_threads(2)
    return build_random_model(MINI)


def generic_lean(hf, dtype=torch.float32) -> LeanModel:
    from engine.random_model import _host_rotary

    return LeanModel(WeightSource.from_module(hf), hf.config, max_seq_len=256, dtype=dtype,
                     rotary=_host_rotary(hf), generic=True)


def test_probe_on_the_cpu_finds_the_engine_rows_invariant():
    report = probe("cpu", torch.float32, max_m=16)
    assert report["engine_rows_invariant"], report["checks"]
    for name in ("fixed-rows linear 896->1152", "fixed-rows linear 4864->896", "fixed-rows rms_norm", "per-row sdpa"):
        assert report["checks"][name]["identical_m"] == list(range(1, 17)), name


def test_fixed_rows_linear_equals_f_linear_up_to_rounding_and_keeps_shape():
    torch.manual_seed(0)
    w, b = torch.randn(48, 40), torch.randn(48)

    class Plain:
        out_features, nbytes = 48, 0

        def __call__(self, x):
            return torch.nn.functional.linear(x, w, b)

    lin = FixedRowsLinear(Plain(), rows=8)
    for n in (1, 7, 8, 9, 17, 24):
        x = torch.randn(n, 40)
        y = lin(x)
        assert y.shape == (n, 48)
        assert torch.allclose(y, torch.nn.functional.linear(x, w, b), atol=1e-5)
    x = torch.randn(5, 3, 40)  # leading row dim, any trailing shape (q/k norms are [N, heads, D])
    g = torch.rand(40) + 0.5
    assert torch.allclose(rms_norm_fixed(x, g, 1e-6, rows=4), torch.nn.functional.rms_norm(x, (40,), g, 1e-6), atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generic_path_rows_are_bit_identical_for_m_1_to_16(mini_hf, dtype):
    """M sequences decoding one row each in one pass, and one sequence verifying M rows in one pass, give
    each row exactly the logits it gets alone (M = 1..16)."""
    lean = generic_lean(mini_hf, dtype)
    assert isinstance(lean.layers[0].proj["full"].qkv, FixedRowsLinear) and lean.layers[0].proj["full"].qkv.rows == FIXED_ROWS
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, lean.vocab, (int(n),), generator=g) for n in torch.randint(5, 40, (16,), generator=g)]
    nxt = torch.randint(3, lean.vocab, (16,), generator=g)
    with torch.inference_mode():
        caches = [lean.new_cache() for _ in prompts]
        for c, p in zip(caches, prompts):
            lean.forward_batch([Segment(c, 0, p, "none", exact=False)])
        solo = [lean.forward_batch([Segment(c, len(p), nxt[i : i + 1])])[0].clone() for i, (c, p) in enumerate(zip(caches, prompts))]
        for m in range(1, 17):
            out = lean.forward_batch([Segment(caches[i], len(prompts[i]), nxt[i : i + 1]) for i in range(m)])
            for i in range(m):
                assert torch.equal(out[i], solo[i]), (m, i)

        # one sequence: 16 tokens decoded one at a time, against verify passes over the first M of them
        p, toks = prompts[0], torch.randint(3, lean.vocab, (16,), generator=g)
        cache = lean.new_cache()
        lean.forward_batch([Segment(cache, 0, p, "none", exact=False)])
        one_by_one = torch.cat([lean.forward_batch([Segment(cache, len(p) + j, toks[j : j + 1])])[0] for j in range(16)])
        for m in range(1, 17):
            rows = lean.forward_batch([Segment(cache, len(p), toks[:m])])[0]
            assert torch.equal(rows, one_by_one[:m]), m


def test_generic_bf16_engine_is_lossless_batched_and_speculative():
    """The scheduler on the device-generic bf16 path (the GPU's): greedy speculative output equals plain
    greedy, and four concurrent requests with different configs each get their solo plain output."""
    torch.set_num_threads(2)
    eng = random_engine(MINI, device="cpu", dtype="bfloat16", generic=True, max_seq_len=256)
    prompts = ["Write a Python function that returns the n-th Fibonacci number.", "Why is the sky blue?",
               "Summarize: the council met on Monday and agreed to fund a park.", "Translate into Spanish: good morning."]
    configs = [DraftConfig(skip_mlp=(20, 21), max_draft=4, confidence=0.3), DraftConfig(prompt_lookup=3, model_draft=False),
               DraftConfig(skip_attn=(2,), skip_mlp=(5,), max_draft=6), DraftConfig(quantize="int8", max_draft=3, confidence=0.2)]
    ids = [eng.encode_prompt(prompt=p) for p in prompts]
    params = SamplingParams(max_new_tokens=12)
    solo = [eng.generate(x, params, DraftConfig.plain()).token_ids for x in ids]
    drafted = 0
    for x, ref, cfg in zip(ids, solo, configs):
        r = eng.generate(x, params, cfg)
        assert r.token_ids == ref, cfg
        drafted += r.stats.drafted
    assert drafted > 0  # speculation actually ran
    sched = eng.scheduler(RuntimeSettings(max_running=4, load_aware=False, calibrate=False))
    seqs = [eng.sequence(x, params, c) for x, c in zip(ids, configs)]
    for s in seqs:
        sched.submit(s)
    while sched.has_work():
        sched.step()
    assert [[t for o in s.outbox for t in o.token_ids] for s in seqs] == solo


def test_transfers_keep_values_and_order():
    outs = [torch.tensor([3, 4]), None, torch.randn(2, 5), torch.tensor([7])]
    host = to_host(outs)  # CPU tensors pass through unchanged
    assert host[1] is None and host[2] is outs[2] and host[0].tolist() == [3, 4] and host[3].tolist() == [7]
    rows = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    assert [t.tolist() for t in to_device(rows, torch.device("cpu"))] == [[1, 2, 3], [4]]
