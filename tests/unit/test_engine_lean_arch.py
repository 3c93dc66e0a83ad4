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
        skipped = lean.forward(ids, 0, frozenset({1, 2}), frozenset({0})).clone()
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
    added = lean.prepare_int8()
    n_weights = sum(q.weight.numel() for lw in lean.layers for q in lw.int8.values())
    assert added >= n_weights  # one byte per weight plus scales
    ids = torch.randint(0, 97, (6,))
    with torch.inference_mode():
        ref = lean.forward(ids, 0)
        q = lean.forward(ids, 0, int8=True)
        head = lean.draft_head(40, int8=False)
        sub = lean.forward(ids, 0, head=head)
    # int8 weights approximate the fp32 model: close, but not equal
    assert 0 < (q - ref).abs().max() < 0.1 * ref.abs().max()
    assert torch.isinf(sub[:, 40:]).all() and torch.allclose(sub[:, :40], ref[:, :40], atol=1e-4)
