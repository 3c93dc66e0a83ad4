"""The lean forward against transformers on tiny random Llama, Qwen2 and Gemma 3 models.

Random weights exercise every code path of each architecture (GQA, QKV bias, q/k norms, sliding
windows, Gemma's norms and embedding scale) in well under a second, without any download.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config

from engine.lean import LeanModel

COMMON = dict(
    vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(**COMMON, head_dim=16, tie_word_embeddings=True)
    elif arch == "qwen2":
        cfg = Qwen2Config(**COMMON, tie_word_embeddings=False)
    else:
        cfg = Gemma3TextConfig(
            **COMMON, head_dim=32, sliding_window=5, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        )
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():  # random norm weights so a wrong (1 + w) or permutation shows up
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_lean_matches_transformers(arch):
    model = tiny(arch)
    lean = LeanModel(model, max_seq_len=64)
    ids = torch.randint(0, 97, (14,))
    with torch.no_grad():
        ref = model(ids.unsqueeze(0)).logits[0]  # [14, V]
    with torch.inference_mode():
        full = lean.forward(ids, 0)
        # Same sequence fed in pieces through the KV cache, including a multi-token "verify" chunk
        # that crosses the sliding window.
        pieces = [lean.forward(ids[:3], 0), lean.forward(ids[3:4], 3), lean.forward(ids[4:10], 4),
                  lean.forward(ids[10:], 10)]
    assert (full - ref).abs().max() < 1e-4
    assert (torch.cat(pieces) - ref).abs().max() < 1e-4


def test_skipping_sublayers_changes_output_and_rejected_positions_are_overwritten():
    model = tiny("llama")
    lean = LeanModel(model, max_seq_len=64)
    ids = torch.randint(0, 97, (8,))
    with torch.inference_mode():
        skipped = lean.forward(ids, 0, plan=lean.plan(skip_attn={1, 2}, skip_mlp={0})).clone()
        ref = lean.forward(ids, 0).clone()  # a full pass rewrites every layer's K/V at 0..7
        assert (skipped - ref).abs().max() > 1e-3
        # Write garbage at positions 5..7 (as rejected drafts would), then recompute from position 5.
        lean.forward(torch.randint(0, 97, (3,)), 5)
        again = lean.forward(ids[5:], 5)
    assert (again - ref[5:]).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_int8_draft_and_subset_head(arch):
    model = tiny(arch)
    lean = LeanModel(model, max_seq_len=64)
    added = lean.prepare("int8")
    n_weights = sum(k.weight.numel() for lw in lean.layers for k in vars(lw.proj["int8"]).values())
    assert added >= n_weights  # one byte per weight plus scales
    ids = torch.randint(0, 97, (6,))
    with torch.inference_mode():
        ref = lean.forward(ids, 0)
        q = lean.forward(ids, 0, plan=lean.plan(precision="int8"))
        sub = lean.forward(ids, 0, plan=lean.plan(head_rows=40))  # the draft head over the 40 first rows
    # int8 weights approximate the fp32 model: close, but not equal
    assert 0 < (q - ref).abs().max() < 0.1 * ref.abs().max()
    assert torch.isinf(sub[:, 40:]).all() and torch.allclose(sub[:, :40], ref[:, :40], atol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_int4_draft_is_close_and_exact_on_grouped_weights(arch):
    model = tiny(arch)
    lean = LeanModel(model, max_seq_len=64)
    added = lean.prepare("int4")
    n_weights = sum(k.out_features * k.in_features for lw in lean.layers for k in vars(lw.proj["int4"]).values())
    assert 0 < added < n_weights  # about half a byte per weight plus scales
    ids = torch.randint(0, 97, (6,))
    with torch.inference_mode():
        ref = lean.forward(ids, 0)
        q = lean.forward(ids, 0, plan=lean.plan(precision="int4"))
    # 4-bit random (not quantisation-friendly) weights: close-ish, and the error is reported
    assert 0 < (q - ref).abs().max() < 0.5 * ref.abs().max()
    assert 0 < lean.quantization_error("int4") < 0.2


def test_int4_recovers_weights_that_are_q4_groups():
    """Weights that are GGUF Q4_1 blocks (w = d * q + m per 32 inputs) come back exactly up to bf16
    rounding of the scales: the int4 draft of a Q4_1 model runs on the model's own bits."""
    from engine.kernels import Int4Linear

    torch.manual_seed(1)
    n, k = 16, 64
    d = torch.rand(n, k // 32, 1) * 0.01 + 0.001
    m = torch.randn(n, k // 32, 1) * 0.01
    q = torch.randint(0, 16, (n, k // 32, 32)).float()
    q[..., 0], q[..., 1] = 0, 15  # min/max quantisers put both ends in every block
    w = (d * q + m).view(n, k)
    lin = Int4Linear(w)
    assert lin.error < 1e-6
    x = torch.randn(3, k)
    assert torch.allclose(lin(x), x @ w.T, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_device_generic_path_matches_transformers_in_fp32_and_bf16(arch):
    """The path GPUs take (F.linear kernels, cos/sin RoPE, any dtype), run on the CPU."""
    from engine.gpu import FixedRowsLinear
    from engine.kernels import DenseLinear
    from engine.weights import WeightSource

    model = tiny(arch)
    ids = torch.randint(0, 97, (12,))
    with torch.no_grad():
        ref = model(ids.unsqueeze(0)).logits[0]
    rotary = getattr(model.model, "language_model", model.model).rotary_emb
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 0.15)):
        lean = LeanModel(WeightSource.from_module(model), model.config, max_seq_len=64, dtype=dtype, rotary=rotary, generic=True)
        qkv = lean.layers[0].proj["full"].qkv
        assert not lean.complex_rope and isinstance(qkv, FixedRowsLinear) and isinstance(qkv.inner, DenseLinear)
        with torch.inference_mode():
            out = torch.cat([lean.forward(ids[:5], 0), lean.forward(ids[5:], 5)]).float()
        assert (out - ref).abs().max() < tol * max(1.0, ref.abs().max().item()), dtype


def test_batched_rows_are_bit_identical_to_solo_rows():
    """Batch invariance: a sequence's logits do not depend on which other sequences share the pass."""
    from engine.lean import Segment

    model = tiny("llama")
    lean = LeanModel(model, max_seq_len=64)
    torch.manual_seed(3)
    prompts = [torch.randint(0, 97, (n,)) for n in (9, 4, 13)]
    with torch.inference_mode():
        caches = [lean.new_cache() for _ in prompts]
        lean.forward_batch([Segment(c, 0, p, "none", exact=False) for c, p in zip(caches, prompts)])
        solo = []
        for c, p in zip(caches, prompts):  # each alone: 1 decode row, then a 3-row verify
            solo.append(lean.forward(torch.tensor([5]), len(p), cache=c).clone())
            solo.append(lean.forward(torch.tensor([7, 8, 9]), len(p) + 1, cache=c).clone())
        batched = lean.forward_batch([Segment(c, len(p), torch.tensor([5])) for c, p in zip(caches, prompts)])
        verify = lean.forward_batch([Segment(c, len(p) + 1, torch.tensor([7, 8, 9])) for c, p in zip(caches, prompts)])
    for j in range(len(prompts)):
        assert torch.equal(batched[j], solo[2 * j])
        assert torch.equal(verify[j], solo[2 * j + 1])
