"""The build pipeline with a fake embedder and a fake search runner: a valid artefact comes out, and a
build that fails or is SIGKILLed half-way leaves the previous CURRENT version intact and loadable."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from engine.config import DraftConfig
from index import artefact as A
from index.build import BuildSettings, EngineIdentity, build
from index.search import DomainResult

REPO = Path(__file__).resolve().parents[2]


class BowEmbedder:
    """Hashed bag of words: deterministic, instant, good enough to separate toy domains."""

    id = "fake-bow"
    dim = 64

    def embed(self, texts):
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.md5(w.encode()).hexdigest(), 16) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def fake_runner(domains, search, settings):
    res = {}
    for i, name in enumerate(sorted(domains)):
        cfg = DraftConfig(skip_mlp=(i + 1,), max_draft=3) if i % 2 == 0 else DraftConfig.plain()
        res[name] = DomainResult(
            name=name,
            config=cfg,
            speedup=1.2 if cfg.enabled else 1.0,
            acceptance=0.7 if cfg.enabled else 0.0,
            mean_accepted_tokens=2.1 if cfg.enabled else 1.0,
            layer_agreement=[0.9 - 0.05 * j for j in range(8)],
        )
    return EngineIdentity("fake", "f" * 64, 8), res


def _corpus(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "math.jsonl").write_text("".join(f'{{"prompt": "add {i} and {i + 1} then multiply the sum"}}\n' for i in range(6)))
    (d / "code.jsonl").write_text("".join(f'{{"prompt": "write a python function number {i} that sorts a list"}}\n' for i in range(5)))
    (d / "chat.jsonl").write_text(
        "".join(f'{{"messages": [{{"role": "user", "content": "tell me a story about dragon {i}"}}]}}\n' for i in range(4))
    )
    return d


def _settings(tmp_path: Path, **kw) -> BuildSettings:
    return BuildSettings(data=_corpus(tmp_path / "data"), out=tmp_path / "out", k=2, progress=False, **kw)


def test_build_writes_a_valid_artefact(tmp_path):
    s = _settings(tmp_path)
    r = build(s, runner=fake_runner, embedder=BowEmbedder())
    art = A.load_artefact(s.out, expect_model_hash="f" * 64, expect_embedder_id="fake-bow")
    assert art.path == r.path and A.current_version(s.out) == r.manifest.version
    m = art.manifest
    assert set(m.domains) == {"chat", "code", "math"}
    assert m.domains["chat"].config.skip_mlp == (1,) and m.domains["code"].config == DraftConfig.plain()
    assert m.domains["math"].n_prompts == 6 and m.domains["math"].n_centroids == 2
    assert art.index.ntotal == 6 and art.index.d == 64
    assert m.embedder_dim == 64 and m.representation == "minilm" and m.model_id == "fake"
    assert 0.0 <= m.distance_threshold < 1.0
    assert m.fallback_config == DraftConfig.plain()
    assert {"search.json", "search.png"} <= set(m.files)
    assert (r.path / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(f.description for f in BuildSettings.model_fields.values())


def test_failed_search_touches_nothing(tmp_path):
    s = _settings(tmp_path)
    first = build(s, runner=fake_runner, embedder=BowEmbedder())

    def broken(domains, search, settings):
        raise RuntimeError("search blew up")

    with pytest.raises(RuntimeError, match="blew up"):
        build(s, runner=broken, embedder=BowEmbedder())
    assert A.current_version(s.out) == first.manifest.version
    assert A.list_versions(s.out) == [first.manifest.version]


_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path[:0] = [{repo!r}, {tests!r}]
    from pathlib import Path
    from index import artefact as A
    from index.build import BuildSettings, build
    from test_index_build import BowEmbedder, fake_runner

    stage = sys.argv[1]
    marker = Path(sys.argv[2])

    def hang(*a, **k):
        marker.write_text("ready")
        time.sleep(600)

    if stage == "search":
        runner = lambda *a: hang()
    else:  # inside write_artefact: the temp dir is fully written, not yet renamed into place
        A._commit = hang
        runner = fake_runner
    build(BuildSettings(data={data!r}, out={out!r}, k=2, progress=False), runner=runner, embedder=BowEmbedder())
    """
)


@pytest.mark.parametrize("stage", ["search", "commit"])
def test_sigkill_mid_build_keeps_previous_version(tmp_path, stage):
    s = _settings(tmp_path)
    first = build(s, runner=fake_runner, embedder=BowEmbedder())
    marker = tmp_path / "marker"
    code = _CHILD.format(repo=str(REPO), tests=str(REPO / "tests" / "unit"), data=str(s.data), out=str(s.out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, stage, str(marker)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, f"child exited early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "child never reached the kill point"
            time.sleep(0.05)
        if stage == "commit":
            assert list((s.out / "versions").glob(".tmp-*")), "the temp dir should exist at the kill point"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert A.current_version(s.out) == first.manifest.version
    assert A.list_versions(s.out) == [first.manifest.version]  # a half-written temp dir is not a version
    assert A.load_artefact(s.out).version == first.manifest.version
    # the next build still works and becomes CURRENT
    second = build(s, runner=fake_runner, embedder=BowEmbedder())
    assert A.current_version(s.out) == second.manifest.version
