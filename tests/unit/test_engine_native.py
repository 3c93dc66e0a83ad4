"""The native precision without the real model: GGUF blocks packed exactly, the C++ kernels batch-invariant
and equal across builds, and the native pass lossless on a tiny random model (every draft kind)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import ext
from engine.config import DraftConfig, RuntimeSettings, SamplingParams
from engine.draft import draft_plan
from engine.lean import Segment
from engine.pack import FMT_F32, FMT_Q4, FMT_Q8, Packed, pack_blocks, pack_dense
from tests.tiny import tiny_engine

# bytes per block and where its f16 scales sit, for random but well-formed blocks of each GGUF type
BLOCKS = {  # type: (elements, bytes, f16 offsets)
    "Q4_0": (32, 18, (0,)),
    "Q4_1": (32, 20, (0, 2)),
    "Q5_0": (32, 22, (0,)),
    "Q5_1": (32, 24, (0, 2)),
    "Q8_0": (32, 34, (0,)),
    "Q4_K": (256, 144, (0, 2)),
    "Q6_K": (256, 210, (208,)),
}


def _random_blocks(ttype: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    elems, size, f16 = BLOCKS[ttype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(n, k // elems, size), dtype=np.uint8)
    for off in f16:  # scales in a sane range (random bytes could be inf or nan)
        scales = (rng.random((n, k // elems)) * 0.02 + 1e-3).astype(np.float16) * rng.choice([-1, 1], (n, k // elems))
        raw[..., off : off + 2] = scales.astype(np.float16).view(np.uint8).reshape(n, k // elems, 2)
    return raw.reshape(n, -1)


@pytest.mark.parametrize("ttype", sorted(BLOCKS))
def test_packed_blocks_dequantise_to_exactly_the_gguf_values(ttype):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    n, k = 10, 512  # 10 rows: one whole tile of 8 in the kernels' layout and part of another
    raw = _random_blocks(ttype, n, k)
    packed = pack_blocks(ttype, raw, n, k)
    ref = torch.from_numpy(dequantize(raw, GGMLQuantizationType[ttype]).reshape(n, k).astype(np.float32))
    got = packed.dequantize()
    mod = ext.load("scalar")
    qw = mod.QW(packed.codes, packed.scales, packed.mins, packed.fmt, packed.group)
    if ttype == "Q4_0":  # d*q + (-8d) vs d*(q-8): the same values, but 0.0 where GGUF has -0.0 (d < 0, q = 8)
        assert torch.equal(got, ref) and torch.equal(qw.dequant_rows(torch.arange(n)), ref)
        return
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))  # bit for bit, signed zeros included
    # and the kernels' own dequantisation agrees
    assert torch.equal(qw.dequant_rows(torch.arange(n)).view(torch.int32), ref.view(torch.int32))


def test_float_tensors_pack_as_themselves():
    w = torch.randn(4, 64)
    p = pack_blocks("F32", w.numpy(), 4, 64)
    assert p.fmt == FMT_F32 and torch.equal(p.dequantize(), w)
    h = pack_blocks("F16", w.half().numpy(), 4, 64)
    assert torch.equal(h.dequantize(), w.half().float())


def _weights(kind: str, n: int = 72) -> Packed:
    """[n, 192] (q6_k: [n, 256]) weights; the kernels keep 8 output rows a tile, so n = 70 leaves a part tile."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(n, 192, generator=g) * 0.05
    if kind == "q4_1":
        return pack_dense(w, "q4_1")
    if kind == "q8_0":
        return pack_dense(w, "q8_0")
    if kind == "q6_k":
        return pack_blocks("Q6_K", _random_blocks("Q6_K", n, 256), n, 256)
    if kind in ("q5_0", "q5_1", "q4_0", "q4_k"):
        k = 256 if kind == "q4_k" else 192
        return pack_blocks(kind.upper(), _random_blocks(kind.upper(), n, k), n, k)
    return Packed(w, torch.empty(0), torch.empty(0), FMT_F32)


BUILDS = ext.runnable_builds()  # scalar everywhere; avx2 and avx512 where the CPU runs them


KINDS = ["q4_1", "q4_0", "q4_k", "q8_0", "q6_k", "q5_0", "q5_1", "f32"]


@pytest.mark.parametrize("n", [72, 70])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", [0, 1], ids=["f32-act", "q8-act"])
@pytest.mark.parametrize("build", BUILDS)
def test_kernel_rows_do_not_depend_on_how_many_rows_share_the_call(kind, act, build, n):
    mod = ext.load(build)
    p = _weights(kind, n)
    qw = mod.QW(p.codes, p.scales, p.mins, p.fmt, p.group)
    k = p.shape[1]
    x = torch.randn(16, k, generator=torch.Generator().manual_seed(2))
    bias = torch.randn(p.shape[0])
    full = mod.linear(x, [qw], [bias], act)
    for m in range(1, 17):
        assert torch.equal(mod.linear(x[:m], [qw], [bias], act), full[:m])
    for i in range(16):  # each row alone, and among other rows in another order
        assert torch.equal(mod.linear(x[i : i + 1], [qw], [bias], act)[0], full[i])
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(mod.linear(x[perm], [qw], [bias], act), full[perm])
    ref = x.double() @ p.dequantize().double().T + bias.double()
    err = float((full.double() - ref).norm() / ref.norm())
    assert err < (1e-5 if act == 0 or p.fmt == FMT_F32 else 2e-2)


@pytest.mark.parametrize("build", BUILDS)
def test_each_build_names_itself(build):
    """The bench JSON's `kernels` field reads it: an avx512 build once called itself avx2."""
    assert ext.load(build).build_kind() == build


@pytest.mark.skipif(len(BUILDS) == 1, reason="this CPU runs the scalar build only")
@pytest.mark.parametrize("build", BUILDS[1:])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("act", [0, 1])
def test_vector_and_scalar_builds_give_the_same_bits(kind, act, build):
    a, s = ext.load(build), ext.load("scalar")
    p = _weights(kind, 70)
    x = torch.randn(7, p.shape[1])
    ya = a.linear(x, [a.QW(p.codes, p.scales, p.mins, p.fmt, p.group)], [], act)
    ys = s.linear(x, [s.QW(p.codes, p.scales, p.mins, p.fmt, p.group)], [], act)
    assert torch.equal(ya, ys)


@pytest.fixture(scope="module", params=["native", "native-f32"])
def native_eng(request):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_engine(precision=request.param)
    torch.set_num_threads(threads)


def test_native_logits_are_close_to_the_reference(native_eng):
    ref = tiny_engine()  # the same seed: the same random weights, fp32 dequantised path
    ids = torch.randint(2, 128, (20,), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        a = ref.lean.forward(ids, 0)
        b = native_eng.lean.forward(ids, 0)
    rel = float((a - b).norm() / a.norm())
    assert rel < (0.02 if native_eng.precision == "native-f32" else 0.2)  # Q8_0 weights; int8 activations add more
    assert native_eng.lean.greedy_head is None and native_eng.lean.embed is None  # no fp32 copies kept


def test_native_rows_are_bit_identical_alone_and_in_company(native_eng):
    lean = native_eng.lean
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(2, 128, (n,), generator=g) for n in (9, 30, 4)]
    caches = []
    with torch.inference_mode():
        for p in prompts:
            c = lean.new_cache(64)
            lean.forward_batch([Segment(c, 0, p, "none", exact=False)])
            caches.append(c)
        solo = []
        for p, c in zip(prompts, caches):
            for m in (1, 2, 5, 8):
                solo.append(lean.forward_batch([Segment(c, len(p), p[:m].clone(), "all")])[0].clone())
        # the same rows beside each other, in one pass
        for m in (1, 2, 5, 8):
            segs = [Segment(c, len(p), p[:m].clone(), "all") for p, c in zip(prompts, caches)]
            outs = lean.forward_batch(segs)
            for j, o in enumerate(outs):
                assert torch.equal(o, solo[j * 4 + (1, 2, 5, 8).index(m)])
        # verify width: row i of an M-row pass equals the i-row pass's last row
        p, c = prompts[1], caches[1]
        rows = [lean.forward_batch([Segment(c, len(p), p[: m + 1].clone(), "all")])[0][m].clone() for m in range(8)]
        full = lean.forward_batch([Segment(c, len(p), p[:8].clone(), "all")])[0]
        for m in range(8):
            assert torch.equal(full[m], rows[m])


def test_prefill_in_chunks_equals_prefill_at_once(native_eng):
    lean = native_eng.lean
    ids = torch.randint(2, 128, (40,), generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        a = lean.forward(ids, 0, cache=lean.new_cache(64)).clone()
        c = lean.new_cache(64)
        parts = [lean.forward(ids[:16], 0, cache=c).clone(), lean.forward(ids[16:33], 16, cache=c).clone(),
                 lean.forward(ids[33:], 33, cache=c).clone()]
    assert torch.equal(torch.cat(parts), a)


NATIVE_CONFIGS = [
    DraftConfig(skip_mlp=(2,), max_draft=4, confidence=0.0),
    DraftConfig(skip_attn=(1,), skip_mlp=(3,), max_draft=3, confidence=0.0),
    DraftConfig(early_exit=3, max_draft=4, confidence=0.0),
    DraftConfig(quantize="int8", draft_vocab=64, max_draft=5, confidence=0.0),
    DraftConfig(prompt_lookup=2, model_draft=False, max_draft=5),
    DraftConfig(early_exit=2, skip_mlp=(0,), prompt_lookup=2, adaptive=True, max_draft=6),
]


def _prompt(i: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(100 + i)
    base = torch.randint(2, 128, (max(n // 3, 2),), generator=g).tolist()
    return (base * 4)[:n]


def test_native_speculation_is_lossless_solo_and_batched(native_eng):
    params = SamplingParams(max_new_tokens=24)
    plain = [native_eng.generate(_prompt(i, 12 + 7 * i), params, DraftConfig.plain()).token_ids for i in range(len(NATIVE_CONFIGS))]
    drafted = 0
    for i, cfg in enumerate(NATIVE_CONFIGS):
        r = native_eng.generate(_prompt(i, 12 + 7 * i), params, cfg)
        assert r.token_ids == plain[i], cfg
        drafted += r.stats.drafted
    assert drafted > 0
    # all of them together on one scheduler (load-aware cap off, so drafting happens beside others)
    sched = native_eng.scheduler(RuntimeSettings(max_running=8, prefill_chunk=16, prefill_rows=32, load_aware=False))
    seqs = [native_eng.sequence(_prompt(i, 12 + 7 * i), params, cfg) for i, cfg in enumerate(NATIVE_CONFIGS)]
    for s in seqs:
        sched.submit(s)
    while sched.has_work():
        sched.step()
    assert sum(s.stats.drafted for s in seqs) > 0
    for i, s in enumerate(seqs):
        assert [t for o in s.outbox for t in o.token_ids] == plain[i]


def test_early_exit_runs_fewer_layers():
    eng = tiny_engine(precision="native")
    lean = eng.lean
    plan = lean.plan(exit_layer=2)
    assert plan.exit_layer == 2 and lean.plan(exit_layer=4).exit_layer == 0  # all 4 layers: a full pass
    ids = torch.randint(2, 128, (6,), generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        early = lean.forward(ids, 0, plan=plan, cache=lean.new_cache(16))
        full = lean.forward(ids, 0, cache=lean.new_cache(16))
    assert not torch.equal(early, full)
    with pytest.raises(ValueError, match="exits after layer 9"):
        draft_plan(lean, DraftConfig(early_exit=9))
    with pytest.raises(ValueError, match="exits after layer 9"):
        DraftConfig(early_exit=9).check(4)


def test_native_needs_the_cpu_in_float32():
    with pytest.raises(ValueError, match="runs on the CPU in float32"):
        tiny_engine(precision="native", dtype=torch.bfloat16)
