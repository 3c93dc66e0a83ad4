"""The engine on a CUDA GPU (skipped without one; `scripts/gpu_check.sh` runs these on a GPU machine).

The same device-generic code runs on the CPU in tests/unit/test_gpu_rows.py and test_engine_lean_arch.py
(fixed-shape F.linear chunks, cos/sin RoPE, bf16); here it meets cuBLAS and bf16 for real: rows
bit-identical whatever shares the pass, lossless speculation, batching and seeded sampling on the device,
and logits close to the CPU fp32 reference. The model is `$KNNSSD_GPU_MODEL`, by default a random-weight
Qwen2.5-Coder-0.5B of the real shape built on the device (engine.random_model: no model package needed).
"""

from __future__ import annotations

import os

import pytest
import torch

from engine.config import DraftConfig, RuntimeSettings, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL = os.environ.get("KNNSSD_GPU_MODEL", "random:qwen2.5-coder-0.5b")
PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "Summarize in one sentence: The city council met on Monday to discuss the new park. Residents asked for "
    "more trees and a playground. The council agreed to fund both next year.",
    "Why is the sky blue?",
    "Translate into Spanish: The library opens at nine in the morning.",
]
CONFIGS = [
    DraftConfig(skip_mlp=(1, 3), max_draft=4, confidence=0.3),
    DraftConfig(prompt_lookup=3, model_draft=False, max_draft=8),
    DraftConfig(quantize="int8", max_draft=6, confidence=0.3),  # bf16 fallback on the GPU
    DraftConfig(prompt_lookup=2, adaptive=True, skip_attn=(2,), max_draft=6),
]


def _load(dtype: str):
    from engine.generate import Engine

    return Engine.load(MODEL, device="cuda", dtype=dtype, max_seq_len=2048)


@pytest.fixture(scope="module")
def gpu_engine():
    return _load("bfloat16")


@pytest.fixture(scope="module")
def cpu_reference(gpu_engine):
    """The same weights on the CPU in fp32 (the oneDNN path the CPU tests check against transformers)."""
    from engine.lean import LeanModel
    from engine.random_model import cpu_reference, is_random

    if is_random(MODEL):
        return cpu_reference(gpu_engine)
    return LeanModel.from_pretrained(gpu_engine.path, max_seq_len=256)


def test_rows_are_bit_identical_whatever_shares_the_pass_on_the_gpu(gpu_engine):
    """M sequences decoding together, and one sequence verifying M rows, give each row its solo logits
    (M = 1..16): what makes batched and speculative greedy output equal plain greedy output."""
    from engine.lean import Segment

    lean = gpu_engine.lean
    dev = lean.device
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (int(n),), generator=g).to(dev) for n in torch.randint(5, 60, (16,), generator=g)]
    nxt = torch.randint(3, 1000, (16,), generator=g).to(dev)
    with torch.inference_mode():
        caches = [lean.new_cache() for _ in prompts]
        for c, p in zip(caches, prompts):
            lean.forward_batch([Segment(c, 0, p, "none", exact=False)])
        solo = [lean.forward_batch([Segment(c, len(p), nxt[i : i + 1])])[0].clone() for i, (c, p) in enumerate(zip(caches, prompts))]
        bad = []
        for m in range(1, 17):
            out = lean.forward_batch([Segment(caches[i], len(prompts[i]), nxt[i : i + 1]) for i in range(m)])
            bad += [(m, i) for i in range(m) if not torch.equal(out[i], solo[i])]
        p, toks = prompts[0], nxt
        cache = lean.new_cache()
        lean.forward_batch([Segment(cache, 0, p, "none", exact=False)])
        one_by_one = torch.cat([lean.forward_batch([Segment(cache, len(p) + j, toks[j : j + 1])])[0] for j in range(16)])
        bad_verify = [m for m in range(1, 17) if not torch.equal(lean.forward_batch([Segment(cache, len(p), toks[:m])])[0], one_by_one[:m])]
    assert not bad and not bad_verify, (bad, bad_verify)


def test_greedy_speculative_is_token_identical_on_the_gpu(gpu_engine):
    for p in PROMPTS:
        ids = gpu_engine.encode_prompt(prompt=p)
        plain = gpu_engine.generate(ids, SamplingParams(max_new_tokens=48), DraftConfig.plain())
        for cfg in CONFIGS:
            assert gpu_engine.generate(ids, SamplingParams(max_new_tokens=48), cfg).token_ids == plain.token_ids, cfg


def test_batched_requests_give_their_solo_output_on_the_gpu(gpu_engine):
    ids = [gpu_engine.encode_prompt(prompt=p) for p in PROMPTS]
    solo = [gpu_engine.generate(x, SamplingParams(max_new_tokens=32), DraftConfig.plain()).token_ids for x in ids]
    sched = gpu_engine.scheduler(RuntimeSettings(max_running=4, load_aware=False))
    seqs = [gpu_engine.sequence(x, SamplingParams(max_new_tokens=32), c) for x, c in zip(ids, CONFIGS)]
    for s in seqs:
        sched.submit(s)
    while sched.has_work():
        sched.step()
    assert [[t for o in s.outbox for t in o.token_ids] for s in seqs] == solo


def test_seeded_sampling_is_reproducible_on_the_gpu(gpu_engine):
    ids = gpu_engine.encode_prompt(prompt="Tell me a story about a fox.")
    params = SamplingParams(max_new_tokens=24, temperature=0.8, seed=3)
    a = gpu_engine.generate(ids, params, CONFIGS[3]).token_ids
    assert gpu_engine.generate(ids, params, CONFIGS[3]).token_ids == a


def test_gpu_logits_are_close_to_the_cpu_fp32_reference(gpu_engine, cpu_reference):
    ids = torch.tensor(gpu_engine.encode_prompt(prompt=PROMPTS[2]))
    with torch.inference_mode():
        ref = cpu_reference.forward(ids, 0)
        got = gpu_engine.lean.forward(ids, 0).float().cpu()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()


def test_gpu_fp32_matches_the_cpu_fp32_reference():
    """In fp32 the device path (cuBLAS without TF32, the fixed-shape chunks, cos/sin RoPE) must agree with
    the CPU's oneDNN path to rounding: the same greedy tokens."""
    from engine.random_model import cpu_reference, is_random

    if not is_random(MODEL):
        pytest.skip("builds a second copy of the model; run for the random model only")
    eng = _load("float32")  # its own fp32 weights (a bf16 init draws other values)
    assert not torch.backends.cuda.matmul.allow_tf32
    ids = torch.tensor(eng.encode_prompt(prompt=PROMPTS[0]))
    with torch.inference_mode():
        ref = cpu_reference(eng).forward(ids, 0)
        got = eng.lean.forward(ids, 0).cpu()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.99
    assert (got - ref).abs().max() < 1e-3 * ref.abs().max()
