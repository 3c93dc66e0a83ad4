"""Artefact format: round trip, corruption and incompatibility refused, crashes leave CURRENT intact."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from engine.config import DraftConfig
from index import artefact as A
from index.artefact import ArtefactError, DomainEntry, IndexManifest, load_artefact, write_artefact


def _index(n: int = 4, d: int = 8, seed: int = 0) -> faiss.IndexFlatIP:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx = faiss.IndexFlatIP(d)
    idx.add(x)
    return idx


def _manifest(version: str | None = None, d: int = 8) -> IndexManifest:
    cfg = DraftConfig(skip_attn=(3, 1), skip_mlp=(5,), max_draft=5, confidence=0.4)
    return IndexManifest(
        version=version or A.new_version(),
        created_at=A.now_iso(),
        model_id="smollm2",
        model_hash="abc123",
        embedder_id="minilm:all-MiniLM-L6-v2",
        embedder_dim=d,
        representation="minilm",
        corpus_hash="c0ffee",
        distance_threshold=0.2,
        fallback_config=DraftConfig.plain(),
        domains={
            "math": DomainEntry(name="math", config=cfg, speedup=1.2, acceptance=0.8, mean_accepted_tokens=2.5, n_prompts=40, n_centroids=2),
            "code": DomainEntry(
                name="code", config=DraftConfig.plain(), speedup=1.0, acceptance=0.0, mean_accepted_tokens=1.0, n_prompts=40, n_centroids=2
            ),
        },
    )


LABELS = ["math", "math", "code", "code"]


def test_round_trip(tmp_path):
    m = _manifest()
    vdir = write_artefact(tmp_path, m, _index(), LABELS, extra_files={"search.json": b"{}"})
    assert vdir == tmp_path / "versions" / m.version
    assert A.current_version(tmp_path) == m.version
    assert A.list_versions(tmp_path) == [m.version]
    art = load_artefact(tmp_path, expect_model_hash="abc123", expect_embedder_id="minilm:all-MiniLM-L6-v2")
    assert art.labels == LABELS and art.index.ntotal == 4 and art.path == vdir
    assert art.manifest.domains["math"].config == m.domains["math"].config
    assert art.manifest.domains["math"].config.skip_attn == (1, 3)
    assert set(art.manifest.files) == {"centroids.faiss", "labels.json", "search.json"}
    assert art.config_for("code") == DraftConfig.plain()
    assert art.config_for("unknown") == m.fallback_config
    # loading the version directory directly works too
    assert load_artefact(vdir).version == m.version
    # schema keeps descriptions on every field
    for model in (IndexManifest, DomainEntry):
        assert all(f.description for f in model.model_fields.values())


def test_second_version_becomes_current_and_first_stays_loadable(tmp_path):
    m1, m2 = _manifest(), _manifest()
    write_artefact(tmp_path, m1, _index(), LABELS)
    write_artefact(tmp_path, m2, _index(seed=1), LABELS)
    assert A.current_version(tmp_path) == m2.version
    assert load_artefact(tmp_path, version=m1.version).version == m1.version
    assert sorted(A.list_versions(tmp_path)) == sorted([m1.version, m2.version])


def test_checksum_corruption_refused(tmp_path):
    vdir = write_artefact(tmp_path, _manifest(), _index(), LABELS)
    p = vdir / "centroids.faiss"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ArtefactError, match=r"checksum mismatch for .*centroids\.faiss"):
        load_artefact(tmp_path)


def test_labels_tampered_refused(tmp_path):
    vdir = write_artefact(tmp_path, _manifest(), _index(), LABELS)
    (vdir / "labels.json").write_text(json.dumps(["math"] * 4))
    with pytest.raises(ArtefactError, match="labels.json"):
        load_artefact(tmp_path)


def test_missing_file_and_bad_manifest_refused(tmp_path):
    vdir = write_artefact(tmp_path, _manifest(), _index(), LABELS)
    (vdir / "labels.json").unlink()
    with pytest.raises(ArtefactError, match=r"labels\.json is missing"):
        load_artefact(tmp_path)
    (vdir / "manifest.json").write_text("{not json")
    with pytest.raises(ArtefactError, match=r"manifest\.json is not valid JSON"):
        load_artefact(tmp_path)


def test_format_version_refused(tmp_path):
    vdir = write_artefact(tmp_path, _manifest(), _index(), LABELS)
    data = json.loads((vdir / "manifest.json").read_text())
    data["format_version"] = 2
    (vdir / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtefactError, match="format_version 2 is not supported"):
        load_artefact(tmp_path)


def test_model_hash_mismatch_refused(tmp_path):
    write_artefact(tmp_path, _manifest(), _index(), LABELS)
    with pytest.raises(ArtefactError, match=r"weights hash 'abc123'.*'other'"):
        load_artefact(tmp_path, expect_model_hash="other")
    with pytest.raises(ArtefactError, match="embedder"):
        load_artefact(tmp_path, expect_embedder_id="llm-hidden:smollm2")


def test_no_artefact_is_clear(tmp_path):
    with pytest.raises(ArtefactError, match="holds no artefact"):
        load_artefact(tmp_path)
    assert A.current_version(tmp_path) is None and A.list_versions(tmp_path) == []


def test_inconsistent_inputs_rejected_before_writing(tmp_path):
    with pytest.raises(ArtefactError, match="labels for"):
        write_artefact(tmp_path, _manifest(), _index(), LABELS[:3])
    with pytest.raises(ArtefactError, match="dimension"):
        write_artefact(tmp_path, _manifest(d=16), _index(), LABELS)
    with pytest.raises(ArtefactError, match="missing from the manifest"):
        write_artefact(tmp_path, _manifest(), _index(), ["math", "math", "chat", "code"])
    assert A.current_version(tmp_path) is None


@pytest.mark.parametrize("fail_at", ["commit", "current"])
def test_crash_mid_write_keeps_previous_current(tmp_path, monkeypatch, fail_at):
    m1 = _manifest()
    write_artefact(tmp_path, m1, _index(), LABELS)

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    if fail_at == "commit":  # temp dir fully written, not yet renamed into place
        monkeypatch.setattr(A, "_commit", boom)
    else:  # version renamed into place, CURRENT not yet replaced
        monkeypatch.setattr(A, "set_current", boom)
    m2 = _manifest()
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_artefact(tmp_path, m2, _index(seed=2), LABELS)
    assert A.current_version(tmp_path) == m1.version
    assert load_artefact(tmp_path).version == m1.version
    assert not list((tmp_path / "versions").glob(".tmp-*"))  # cleaned up on a raised error
