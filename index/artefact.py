"""The index artefact: one versioned directory per build, written atomically, verified on load.

Layout under a root directory:

    <root>/CURRENT                          text file: the current version name (replaced with os.replace)
    <root>/versions/<version>/manifest.json IndexManifest (with sha256 of every other file)
    <root>/versions/<version>/centroids.faiss  faiss.IndexFlatIP over L2-normalised centroids
    <root>/versions/<version>/labels.json   list[str]: the domain of each centroid row
    <root>/versions/<version>/...           optional extras (search report, plot), also checksummed

A build writes everything into `versions/.tmp-<uuid>/`, fsyncs, renames the directory into place and only
then replaces CURRENT, so a crash at any point leaves the previous CURRENT version intact and loadable.
This module is the one schema shared by the offline job (writer) and the router (reader).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from engine.config import DraftConfig

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "centroids.faiss"
LABELS_FILE = "labels.json"
CURRENT_FILE = "CURRENT"
VERSIONS_DIR = "versions"
TMP_PREFIX = ".tmp-"
# Temp dirs older than this are leftovers of a killed build and are removed by the next write.
STALE_TMP_SECONDS = 3600.0

# The artefact shipped with the project: built from index/data/default for the bundled SmolLM2.
DEFAULT_ROOT = Path(__file__).resolve().parent / "artefacts" / "default"

_VERSION_RE = re.compile(r"^[0-9]{8}T[0-9]{6}-[0-9a-f]{8}$")


class ArtefactError(Exception):
    """An artefact is missing, corrupt or incompatible; the message names the file and the mismatch."""


class Ratio(BaseModel):
    """A measured speedup: the geometric mean over prompts of paired per-prompt time ratios, with a
    percentile-bootstrap confidence interval over the prompts (`index.select`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: float = Field(description="Geometric mean of the per-prompt ratios (> 1: faster than the reference).")
    low: float = Field(description="Lower end of the confidence interval.")
    high: float = Field(description="Upper end of the confidence interval.")
    prompts: int = Field(ge=0, description="Prompts the ratio is over.")


class GeneralEntry(BaseModel):
    """How the general config (the manifest's fallback_config) was chosen."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Name of the winning candidate ('plain' only when plain decoding measurably won).")
    speedup: Ratio = Field(description="Its speedup over plain decoding on all domains' prompts together.")
    candidates: dict[str, Ratio] = Field(default_factory=dict, description="Every candidate's speedup over plain on the same prompts (disqualified ones included).")
    max_new_tokens: int = Field(0, ge=0, description="Tokens generated per measured run.")


class DomainEntry(BaseModel):
    """One domain's searched draft configuration and what it measured."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Domain name (the JSONL file name it came from, without .jsonl).")
    config: DraftConfig = Field(description="Draft configuration chosen for this domain; plain when nothing beat plain decoding.")
    speedup: float = Field(description="Measured tokens/s of this config over plain decoding on the same prompts (median ratio; 1.0 for plain).")
    acceptance: float = Field(description="Fraction of drafted tokens the verify pass accepted during measurement (0.0 for plain).")
    mean_accepted_tokens: float = Field(description="Mean tokens committed per verify pass during measurement (1.0 for plain).")
    n_prompts: int = Field(ge=0, description="Prompts of this domain in the corpus the index was built from.")
    n_centroids: int = Field(ge=0, description="Centroids of this domain in the FAISS index.")
    # Written by builds that measure a general config (issue 11); absent in older artefacts.
    source: Literal["own", "general"] | None = Field(
        None, description="'own': the domain's searched config beat the general config; 'general': it inherits the general config; None: older build."
    )
    measured: Ratio | None = Field(None, description="The chosen config's speedup over plain on the domain's confirmation prompts, with its interval.")
    vs_general: Ratio | None = Field(None, description="The domain's own best config over the general config on those prompts (> 1: own faster); None when they are the same.")


class IndexManifest(BaseModel):
    """Everything a reader needs to trust and use one artefact version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format_version: int = Field(FORMAT_VERSION, description="Artefact layout version; readers refuse any other.")
    version: str = Field(description="Version name, e.g. '20261122T061500-1a2b3c4d' (UTC build time and a random suffix); also the directory name.")
    created_at: str = Field(description="Build time, ISO 8601 with timezone.")
    model_id: str = Field(description="Model the draft configs were searched on (engine model id).")
    model_hash: str = Field(description="Weights hash of that model; a replica serving other weights must refuse the artefact.")
    precision: str = Field(
        "reference", description="Engine precision the configs were measured at ('reference', 'native', 'native-f32'; older builds: "
        "reference); a router serving another precision refuses the artefact, since a draft's cost depends on it.",
    )
    embedder_id: str = Field(description="Embedder that produced the centroids; the router must embed prompts with the same one.")
    embedder_dim: int = Field(ge=1, description="Embedding dimension (equals the FAISS index dimension).")
    representation: str = Field(description="Prompt representation: 'minilm' (sentence-transformers) or 'llm-hidden' (mean-pooled last hidden state).")
    corpus_hash: str = Field(description="sha256 over the corpus files (sorted by name) the index was built from.")
    distance_threshold: float = Field(description="Cosine similarity to the nearest centroid below which the router uses fallback_config.")
    fallback_config: DraftConfig = Field(
        description="Draft configuration for prompts far from every centroid: the general config measured on all domains' prompts (plain in older builds)."
    )
    domains: dict[str, DomainEntry] = Field(description="Per-domain entries, keyed by domain name.")
    general: GeneralEntry | None = Field(None, description="How fallback_config was chosen (None: older builds, whose fallback is plain decoding).")
    files: dict[str, str] = Field(default_factory=dict, description="File name -> sha256 hex of every file in the version directory except the manifest.")


@dataclass
class Artefact:
    """A loaded, verified artefact version."""

    manifest: IndexManifest
    index: object  # faiss.IndexFlatIP
    labels: list[str]
    path: Path

    @property
    def version(self) -> str:
        return self.manifest.version

    def config_for(self, domain: str) -> DraftConfig:
        entry = self.manifest.domains.get(domain)
        return entry.config if entry is not None else self.manifest.fallback_config


def new_version(now: _dt.datetime | None = None) -> str:
    """A fresh version name: UTC time stamp plus 8 random hex digits (sorts by build time)."""
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- writing


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _serialize_index(index: object) -> bytes:
    import faiss

    return faiss.serialize_index(index).tobytes()


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished temp directory into place (a separate function so tests can make it fail)."""
    os.rename(tmp, final)


def set_current(root: str | Path, version: str) -> None:
    """Atomically point CURRENT at `version` (which must exist under versions/)."""
    root = Path(root)
    if not (root / VERSIONS_DIR / version / MANIFEST_FILE).is_file():
        raise ArtefactError(f"cannot set CURRENT to {version!r}: {root / VERSIONS_DIR / version / MANIFEST_FILE} does not exist")
    tmp = root / f"{CURRENT_FILE}{TMP_PREFIX}{uuid.uuid4().hex}"
    _write_bytes(tmp, (version + "\n").encode())
    os.replace(tmp, root / CURRENT_FILE)
    _fsync_dir(root)


def _remove_stale_tmp(versions: Path) -> None:
    cutoff = time.time() - STALE_TMP_SECONDS
    for p in versions.glob(TMP_PREFIX + "*"):
        try:
            if p.stat().st_mtime < cutoff:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def write_artefact(
    root: str | Path,
    manifest: IndexManifest,
    index: object,
    labels: list[str],
    extra_files: Mapping[str, bytes] | None = None,
    make_current: bool = True,
) -> Path:
    """Write one version under `root` and (by default) make it CURRENT; returns the version directory.

    `manifest.files` is ignored and recomputed. `extra_files` (name -> bytes, e.g. a search report or a
    plot) are written and checksummed alongside. Nothing under versions/<version> or CURRENT changes
    until every file is on disk.
    """
    root = Path(root)
    ntotal = int(getattr(index, "ntotal"))
    dim = int(getattr(index, "d"))
    if len(labels) != ntotal:
        raise ArtefactError(f"{len(labels)} labels for {ntotal} centroids")
    if dim != manifest.embedder_dim:
        raise ArtefactError(f"index dimension {dim} != manifest embedder_dim {manifest.embedder_dim}")
    unknown = sorted(set(labels) - set(manifest.domains))
    if unknown:
        raise ArtefactError(f"labels name domains missing from the manifest: {unknown}")
    if not _VERSION_RE.match(manifest.version):
        raise ArtefactError(f"bad version name {manifest.version!r} (expected like 20261122T061500-1a2b3c4d)")
    extra = dict(extra_files or {})
    reserved = {MANIFEST_FILE, INDEX_FILE, LABELS_FILE}
    for name in extra:
        if name in reserved or "/" in name or name.startswith("."):
            raise ArtefactError(f"extra file name {name!r} is reserved or not a plain file name")

    versions = root / VERSIONS_DIR
    versions.mkdir(parents=True, exist_ok=True)
    final = versions / manifest.version
    if final.exists():
        raise ArtefactError(f"version directory {final} already exists")
    _remove_stale_tmp(versions)

    tmp = versions / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        payload = {INDEX_FILE: _serialize_index(index), LABELS_FILE: json.dumps(list(labels), indent=1).encode()}
        payload.update(extra)
        for name, data in payload.items():
            _write_bytes(tmp / name, data)
        files = {name: sha256_file(tmp / name) for name in sorted(payload)}
        full = manifest.model_copy(update={"files": files})
        _write_bytes(tmp / MANIFEST_FILE, full.model_dump_json(indent=2).encode())
        _fsync_dir(tmp)
        _commit(tmp, final)
        _fsync_dir(versions)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if make_current:
        set_current(root, manifest.version)
    return final


# ---------------------------------------------------------------------------------------------- reading


def current_version(root: str | Path) -> str | None:
    """The version CURRENT names, or None when there is no CURRENT yet."""
    try:
        text = (Path(root) / CURRENT_FILE).read_text().strip()
    except FileNotFoundError:
        return None
    return text or None


def list_versions(root: str | Path) -> list[str]:
    """Complete versions under root (temp directories of unfinished builds excluded), oldest first."""
    versions = Path(root) / VERSIONS_DIR
    if not versions.is_dir():
        return []
    return sorted(
        p.name for p in versions.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_FILE).is_file()
    )


def resolve_version_dir(path_or_root: str | Path, version: str | None = None) -> Path:
    """A version directory from either a root (CURRENT or `version`) or a version directory itself."""
    p = Path(path_or_root)
    if version is None and (p / MANIFEST_FILE).is_file():
        return p
    if not p.is_dir():
        raise ArtefactError(f"artefact path {p} does not exist")
    if version is None:
        version = current_version(p)
        if version is None:
            raise ArtefactError(f"{p} holds no artefact: neither {MANIFEST_FILE} nor {CURRENT_FILE} found")
    vdir = p / VERSIONS_DIR / version
    if not vdir.is_dir():
        raise ArtefactError(f"version {version!r} not found under {p / VERSIONS_DIR}")
    return vdir


def read_manifest(vdir: Path) -> IndexManifest:
    mpath = vdir / MANIFEST_FILE
    try:
        raw = mpath.read_bytes()
    except FileNotFoundError:
        raise ArtefactError(f"{mpath} is missing") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtefactError(f"{mpath} is not valid JSON: {e}") from None
    if isinstance(data, dict) and data.get("format_version") != FORMAT_VERSION:
        raise ArtefactError(
            f"{mpath}: format_version {data.get('format_version')!r} is not supported (this reader reads {FORMAT_VERSION})"
        )
    try:
        return IndexManifest.model_validate(data)
    except ValidationError as e:
        raise ArtefactError(f"{mpath} does not match the manifest schema: {e}") from None


def verify_files(vdir: Path, manifest: IndexManifest) -> None:
    for required in (INDEX_FILE, LABELS_FILE):
        if required not in manifest.files:
            raise ArtefactError(f"{vdir / MANIFEST_FILE} lists no checksum for {required}")
    for name, expected in manifest.files.items():
        fpath = vdir / name
        if not fpath.is_file():
            raise ArtefactError(f"{fpath} is missing (listed in the manifest)")
        actual = sha256_file(fpath)
        if actual != expected:
            raise ArtefactError(
                f"checksum mismatch for {fpath}: manifest says sha256 {expected[:16]}..., file has {actual[:16]}... "
                "(the artefact is corrupt; rebuild it or load another version)"
            )


def load_artefact(
    path_or_root: str | Path,
    version: str | None = None,
    expect_model_hash: str | None = None,
    expect_embedder_id: str | None = None,
) -> Artefact:
    """Load and verify one version: checksums, schema, index/labels consistency and compatibility.

    `path_or_root` is either an artefact root (CURRENT, or `version`, is loaded) or a version directory.
    Raises ArtefactError naming the file and the mismatch.
    """
    import faiss

    vdir = resolve_version_dir(path_or_root, version)
    manifest = read_manifest(vdir)
    if manifest.version != vdir.name:
        raise ArtefactError(f"{vdir / MANIFEST_FILE}: manifest version {manifest.version!r} != directory name {vdir.name!r}")
    if expect_model_hash is not None and manifest.model_hash != expect_model_hash:
        raise ArtefactError(
            f"{vdir}: built for model {manifest.model_id!r} with weights hash {manifest.model_hash!r}, "
            f"but the serving model has weights hash {expect_model_hash!r}; rebuild the index for this model"
        )
    if expect_embedder_id is not None and manifest.embedder_id != expect_embedder_id:
        raise ArtefactError(
            f"{vdir}: built with embedder {manifest.embedder_id!r}, but the router embeds with {expect_embedder_id!r}"
        )
    verify_files(vdir, manifest)
    try:
        index = faiss.read_index(str(vdir / INDEX_FILE))
    except RuntimeError as e:
        raise ArtefactError(f"{vdir / INDEX_FILE} is not a readable FAISS index: {e}") from None
    try:
        labels = json.loads((vdir / LABELS_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtefactError(f"{vdir / LABELS_FILE} is not valid JSON: {e}") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ArtefactError(f"{vdir / LABELS_FILE} must be a JSON list of domain names")
    if len(labels) != index.ntotal:
        raise ArtefactError(f"{vdir / LABELS_FILE} has {len(labels)} labels but {INDEX_FILE} has {index.ntotal} centroids")
    if index.d != manifest.embedder_dim:
        raise ArtefactError(f"{vdir / INDEX_FILE} has dimension {index.d} but the manifest says embedder_dim {manifest.embedder_dim}")
    unknown = sorted(set(labels) - set(manifest.domains))
    if unknown:
        raise ArtefactError(f"{vdir / LABELS_FILE} names domains missing from the manifest: {unknown}")
    return Artefact(manifest=manifest, index=index, labels=labels, path=vdir)
