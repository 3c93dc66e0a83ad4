"""The engine on a CUDA GPU (skipped without one; `scripts/gpu_check.sh` runs these on a GPU machine).

The same device-generic code runs on the CPU in tests/unit/test_engine_lean_arch.py (F.linear kernels,
cos/sin RoPE, bf16); here it meets cuBLAS and bf16 for real: lossless speculation, batching and seeded
sampling on the device, and logits close to the CPU fp32 reference.
"""

from __future__ import annotations

import os

import pytest
import torch

from engine.config import DraftConfig, RuntimeSettings, SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL = os.environ.get("KNNSSD_GPU_MODEL", "smollm2")
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


@pytest.fixture(scope="module")
def gpu_engine():
    from engine.generate import Engine

    return Engine.load(MODEL, device="cuda", dtype="bfloat16", max_seq_len=2048)


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


def test_gpu_logits_are_close_to_the_cpu_fp32_reference(gpu_engine):
    from engine.lean import LeanModel

    cpu = LeanModel.from_pretrained(gpu_engine.path, max_seq_len=256)
    ids = torch.tensor(gpu_engine.encode_prompt(prompt=PROMPTS[2]))
    with torch.inference_mode():
        ref = cpu.forward(ids, 0)
        got = gpu_engine.lean.forward(ids, 0).float().cpu()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert (got - ref).abs().max() < 0.1 * ref.abs().max()
