"""Do cheap prompt statistics (index.features) help routing? Measured on a development set, never on the
evaluation sets (index/data/ood, index/data/heldout).

The development set is derived deterministically from the training corpus (index/data/default), so it
is neither reported nor part of any evaluation: long summaries (4 corpus passages under one summarise
instruction), passages followed by a question, multi-turn chats (two corpus chat prompts around a corpus
reference answer), and short corpus prompts as a control.

1. Speed matrix: every prompt decoded (greedy, interleaved, one process) with plain decoding, every general
   candidate and every config of the index; per prompt, each config's speedup over plain.
2. Routing variants, scored on that matrix (geometric mean of the chosen config's per-prompt speedup):
   - general: the index's general config for every prompt (no routing);
   - knn: the router as shipped (nearest MiniLM centroids, fallback to the general config);
   - knn+stats(w): centroids and queries on [MiniLM, w * standardised statistics], threshold recomputed;
   - knn+second-stage: the knn decision, then long or copy-shaped prompts (>= 150 words, a passage
     followed by a question, or mostly code) go to prompt lookup alone; a rule fixed before measuring;
   - per-prompt oracle over the measured configs: the most any routing could gain.

    flock /tmp/knnssd-heavy.lock .venv/bin/python scripts/route_features_experiment.py --index DIR --out out/features.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def dev_set(seed: int = 7) -> list[dict]:
    """Prompts derived from the training corpus: {"kind", "prompt" | "messages"}."""
    from index.corpus import load_corpus

    c = load_corpus(REPO / "index/data/default")
    rng = random.Random(seed)
    summ = [r.prompt for r in c.domains["summarize"] if r.prompt]
    bodies = [p.split("\n\n", 1)[1] for p in summ if "\n\n" in p]
    chats = [r.prompt for r in c.domains["chat"] if r.prompt]
    refs = [r.reference for r in c.domains["translate"] if r.reference]
    qa = [r.prompt for r in c.domains["qa"] if r.prompt]
    out: list[dict] = []
    for i in range(6):
        parts = rng.sample(bodies, 4)
        out.append({"kind": "dev-long-summary", "prompt": "Summarise the following article in three sentences.\n\n" + "\n\n".join(parts)})
    for i in range(6):
        parts = rng.sample(bodies, 3)
        q = "According to the passage, what happened, who was involved, and what happens next?"
        out.append({"kind": "dev-passage-question", "prompt": "Answer using only the passage below.\n\nPassage:\n" + "\n\n".join(parts) + "\n\nQuestion: " + q})
    for i in range(6):
        a, b = rng.sample(chats, 2)
        out.append({"kind": "dev-multi-turn", "messages": [
            {"role": "user", "content": a}, {"role": "assistant", "content": rng.choice(refs)}, {"role": "user", "content": b}]})
    for name in sorted(c.domains):
        for r in rng.sample(c.domains[name], 2):
            out.append({"kind": f"dev-short-{name}", **({"prompt": r.prompt} if r.prompt else {"messages": r.messages_list()})})
    return out


def geomean(xs):
    return math.exp(statistics.fmean(math.log(x) for x in xs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", type=Path, default=None, help="index artefact (default: the shipped one)")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--limit", type=int, default=0, help="at most this many prompts (0: all)")
    ap.add_argument("--out", type=Path, default=REPO / "out/route-features.json")
    ap.add_argument("--matrix", type=Path, default=None, help="reuse a speed matrix from an earlier --out instead of measuring")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from engine.config import DraftConfig
    from index.artefact import DEFAULT_ROOT, load_artefact
    from index.centroids import build_index, similarity_threshold
    from index.corpus import load_corpus
    from index.embed import MiniLMEmbedder, l2_normalise
    from index.features import prompt_stats
    from index.select import GENERAL_CANDIDATES, SelectSettings, measure
    from router.decision import FALLBACK_DOMAIN
    from router.route import decide, routing_text

    torch.set_num_threads(2)
    art = load_artefact(args.index or DEFAULT_ROOT)
    m = art.manifest
    prompts = dev_set()
    if args.limit:
        prompts = prompts[: args.limit]
    configs: dict[str, DraftConfig] = {f"cand:{n}": c for n, c in GENERAL_CANDIDATES.items()}
    for name, e in m.domains.items():
        if e.config.enabled and e.config not in configs.values():
            configs[f"domain:{name}"] = e.config
    if m.fallback_config.enabled and m.fallback_config not in configs.values():
        configs["general"] = m.fallback_config
    by_cfg = {c: n for n, c in configs.items()}

    # 1. speed matrix
    if args.matrix:
        speed = json.loads(args.matrix.read_text())["speed"]
    else:
        from engine.generate import Engine

        eng = Engine.load("smollm2")
        ids = [eng.encode_prompt(prompt=p.get("prompt"), messages=p.get("messages")) for p in prompts]
        warm = eng.encode_prompt(prompt="Hello")
        from engine.config import SamplingParams

        for c in configs.values():
            eng.generate(warm, SamplingParams(max_new_tokens=4), c)
        t0 = time.time()
        meas = measure(eng, ids, configs, SelectSettings(rounds=1, max_new_tokens=args.tokens))
        print(f"measured {len(prompts)} prompts x {len(configs) + 1} configs in {time.time() - t0:.0f} s")
        bad = [n for n, t in meas.configs.items() if not t.lossless]
        assert not bad, f"configs changed the output: {bad}"
        plain = meas.configs["plain"].seconds
        speed = {n: [p / s for p, s in zip(plain, t.seconds)] for n, t in meas.configs.items() if n != "plain"}
    plain_cfg = DraftConfig.plain()

    def speed_of(cfg: DraftConfig, i: int) -> float:
        return 1.0 if not cfg.enabled else speed[by_cfg[cfg]][i]

    # 2. routing variants
    emb = MiniLMEmbedder(progress=False)
    texts = [routing_text(p.get("prompt"), p.get("messages")) for p in prompts]
    q = emb.embed(texts)
    stats = [prompt_stats(p.get("prompt"), p.get("messages")) for p in prompts]
    k = 5

    def route_with(index, labels, vecs, threshold):
        sims, rows = index.search(np.ascontiguousarray(vecs, dtype=np.float32), min(k, index.ntotal))
        out = []
        for srow, rrow in zip(sims, rows):
            keep = [(float(s), labels[r]) for s, r in zip(srow, rrow) if r >= 0]
            out.append(decide([s for s, _ in keep], [d for _, d in keep], m, threshold))
        return out

    variants: dict[str, list[DraftConfig]] = {}
    decisions: dict[str, list[str]] = {}
    variants["general"] = [m.fallback_config] * len(prompts)
    knn = route_with(art.index, art.labels, q, m.distance_threshold)
    variants["knn"] = [d.config for d in knn]
    decisions["knn"] = [d.domain for d in knn]

    corpus = load_corpus(REPO / "index/data/default")
    cvecs = {name: emb.embed([r.text for r in recs]) for name, recs in corpus.domains.items()}
    cstats = {name: np.array([prompt_stats(r.prompt, r.messages_list()).vector() for r in recs]) for name, recs in corpus.domains.items()}
    allstats = np.concatenate(list(cstats.values()))
    mu, sd = allstats.mean(axis=0), allstats.std(axis=0) + 1e-6
    for w in (0.15, 0.3):
        aug = {n: l2_normalise(np.concatenate([cvecs[n], w * (cstats[n] - mu) / sd], axis=1)) for n in cvecs}
        index, labels = build_index(aug, 2, seed=0)
        thr = similarity_threshold(index, labels, aug, 0.02, 0.05)
        qa = l2_normalise(np.concatenate([q, w * (np.array([s.vector() for s in stats]) - mu) / sd], axis=1))
        d = route_with(index, labels, qa, thr)
        variants[f"knn+stats(w={w})"] = [x.config for x in d]
        decisions[f"knn+stats(w={w})"] = [x.domain for x in d]

    lookup = GENERAL_CANDIDATES["lookup"]
    second = []
    for d, s in zip(knn, stats):
        long_or_copy = s.words >= 150 or s.passage_question or s.code_lines >= 0.5
        second.append(lookup if long_or_copy else d.config)
    variants["knn+second-stage"] = second

    names = list(speed)
    variants["oracle(per prompt)"] = [
        max([plain_cfg, *configs.values()], key=lambda c: speed_of(c, i)) for i in range(len(prompts))
    ]
    kinds = sorted({p["kind"] for p in prompts})
    table = {}
    for v, cfgs in variants.items():
        row = {"overall": round(geomean([speed_of(c, i) for i, c in enumerate(cfgs)]), 4)}
        for kd in kinds:
            row[kd] = round(geomean([speed_of(c, i) for i, c in enumerate(cfgs) if prompts[i]["kind"] == kd]), 4)
        table[v] = row
    for n in names:
        row = {"overall": round(geomean(speed[n]), 4)}
        for kd in kinds:
            row[kd] = round(geomean([x for i, x in enumerate(speed[n]) if prompts[i]["kind"] == kd]), 4)
        table[f"static {n}"] = row
    route_counts = {v: dict(sorted(defaultdict(int, {d: ds.count(d) for d in set(ds)}).items())) for v, ds in decisions.items()}
    report = {"index": str(art.path), "tokens": args.tokens, "prompts": len(prompts), "table": table, "route_counts": route_counts,
              "configs": {n: c.config_id for n, c in configs.items()}, "speed": speed, "kinds": [p["kind"] for p in prompts],
              "stats": [s.as_dict() for s in stats], "fallback_domain": FALLBACK_DOMAIN}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    w = max(len(v) for v in table)
    print(f"{'variant':{w}s} " + " ".join(f"{k[:14]:>14s}" for k in ["overall", *kinds]))
    for v, row in table.items():
        print(f"{v:{w}s} " + " ".join(f"{row[k]:14.3f}" for k in ["overall", *kinds]))
    print("routes:", json.dumps(route_counts))


if __name__ == "__main__":
    main()
