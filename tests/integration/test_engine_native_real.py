"""The native precision on the real bundled SmolLM2: its GGUF blocks packed exactly, rows bit-identical
whatever shares the pass, and speculative output equal to plain output for every draft kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import DraftConfig, SamplingParams
from engine.lean import Segment

pytestmark = pytest.mark.slow


def test_every_gguf_tensor_packs_to_exactly_its_dequantised_values(smollm2, smollm2_ref):
    import gguf
    from gguf.quants import dequantize

    from engine.load import gguf_source
    from engine.pack import pack_blocks

    reader = gguf.GGUFReader(str(gguf_source("smollm2")[0]))
    types = set()
    for t in reader.tensors:
        if len(t.shape) < 2:
            continue
        k, n = int(t.shape[0]), int(t.shape[1])
        raw = np.asarray(t.data)
        ref = torch.from_numpy(dequantize(raw, t.tensor_type).reshape(n, k).astype(np.float32))
        got = pack_blocks(t.tensor_type.name, raw, n, k).dequantize()
        assert torch.equal(got.view(torch.int32), ref.view(torch.int32)), t.name
        types.add(t.tensor_type.name)
    assert types == {"Q4_1", "Q8_0"}
    # The engine's packed projections are the reference engine's fp32 weights, rows in the same order
    # (Llama's GGUF q/k rows are already in the lean forward's interleaved RoPE order).
    for i in (0, 17, 29):
        for name, lin in (("qkv", smollm2.lean.layers[i].proj["full"].qkv), ("gate_up", smollm2.lean.layers[i].proj["full"].gate_up)):
            w = torch.cat([q.dequant_rows(torch.arange(q.n)) for q in lin.qw])
            assert torch.equal(w, smollm2_ref.lean._fused(i)[name][0]), (i, name)
    assert smollm2.precision == "native" and smollm2.lean.embed is None  # no fp32 copy of the weights


def test_a_rows_logits_do_not_depend_on_the_verify_width_or_the_batch(smollm2):
    lean = smollm2.lean
    prompts = [smollm2.encode_prompt(prompt=p) for p in (
        "Write a Python function that returns the n-th Fibonacci number.",
        "Translate into French: the weather is lovely today.",
        "Why is the sky blue?",
    )]
    draft = torch.tensor((smollm2.tokenizer(" The answer is that light scatters off air molecules in the sky.").input_ids * 2)[:16])
    with torch.inference_mode():
        caches = []
        for p in prompts:
            c = lean.new_cache(256)
            lean.forward_batch([Segment(c, 0, torch.tensor(p), "none", exact=False)])
            caches.append(c)
        base, c = len(prompts[0]), caches[0]
        solo = [lean.forward_batch([Segment(c, base, draft[: m + 1].clone(), "all")])[0][m].clone() for m in range(16)]
        for m in (1, 2, 4, 8, 16):  # a verify pass of m rows: row j equals the pass that ends at row j
            rows = lean.forward_batch([Segment(c, base, draft[:m].clone(), "all")])[0]
            for j in range(m):
                assert torch.equal(rows[j], solo[j]), (m, j)
        # the same 8 rows beside the other sequences' rows (a batched verify), in two orders
        segs = [Segment(c, base, draft[:8].clone(), "all")] + [
            Segment(cc, len(p), draft[:m].clone(), "all") for p, cc, m in zip(prompts[1:], caches[1:], (3, 1))
        ]
        mixed = lean.forward_batch(segs)[0]
        mixed_rev = lean.forward_batch(segs[::-1])[-1]
    for j in range(8):
        assert torch.equal(mixed[j], solo[j]) and torch.equal(mixed_rev[j], solo[j])


# One config per kind of draft the native precision has: skipped sub-layers, early exit, a vocabulary-subset
# head, int8 activations (cheaper only beside native-f32), prompt lookup, and all of them together.
NATIVE_DRAFTS = {
    "skip": DraftConfig(skip_attn=(20, 24), skip_mlp=(22, 26, 27), max_draft=4, confidence=0.3),
    "early-exit": DraftConfig(early_exit=22, max_draft=4, confidence=0.3),
    "vocab": DraftConfig(draft_vocab=8192, max_draft=4, confidence=0.3),
    "int8-act": DraftConfig(quantize="int8", max_draft=6, confidence=0.3),
    "lookup": DraftConfig(prompt_lookup=2, model_draft=False, max_draft=8, adaptive=True),
    "combined": DraftConfig(early_exit=24, skip_mlp=(10,), draft_vocab=8192, prompt_lookup=2, adaptive=True, max_draft=6),
}


@pytest.mark.parametrize("precision", ["native", "native-f32"])
def test_speculative_equals_plain_at_native_precision_for_every_draft_kind(smollm2, precision):
    from engine.generate import Engine

    eng = smollm2 if precision == "native" else Engine.load("smollm2", max_seq_len=1024, precision=precision)
    params = SamplingParams(max_new_tokens=40)
    prompts = [
        "Summarize in one sentence: The city council met on Monday to discuss the new park. Residents asked for "
        "more trees and a playground. The council agreed to fund both next year.",
        "A farmer has 12 cows and buys 7 more, then sells 5. How many cows does he have?",
    ]
    drafted = dict.fromkeys(NATIVE_DRAFTS, 0)
    for text in prompts:
        ids = eng.encode_prompt(prompt=text)
        plain = eng.generate(ids, params, DraftConfig.plain())
        assert len(plain.token_ids) > 10
        for name, cfg in NATIVE_DRAFTS.items():
            r = eng.generate(ids, params, cfg)
            assert r.token_ids == plain.token_ids, (precision, name, text[:20])
            drafted[name] += r.stats.drafted
    assert all(drafted.values()), drafted  # every kind of draft was exercised
