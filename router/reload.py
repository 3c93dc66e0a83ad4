"""Artefact sources: which index version a request routes with, and hot reload of new versions.

A request calls `source.current(tenant)` once and keeps that `Artefact` to the end, so swapping in a new
version (one attribute assignment) never changes an in-flight request. `Reloader` follows the version the
index job publishes (`index.publish`: a Redis key holding {version, path} and a pub/sub channel): a
background thread waits on the channel for at most `poll_interval_s`, then re-reads the key either way,
so a lost message or a dead pub/sub connection only delays a reload by one poll interval. A version that
fails to load is logged and counted, the previous one keeps serving, and it is not retried until the
key changes again. Tenants can be pinned to an older (or newer) version from the artefact root.

Validation before any version is served (at start, on reload, for a pin): checksums and schema
(`index.artefact.load_artefact`), then `validate_manifest`: the model hash equals the served weights'
(`expect_model_hash`), the embedder is the router's (`expect_embedder_id`), the configs were measured at the
engine precision the replicas run (`expect_precision`, set with the model), and with a `ModelSpec` every
draft config fits the served model (`DraftConfig.problems`, the one validation, from each knob's declared
bound: skipped layers exist, the early exit is within the model, the draft vocabulary is no larger than the
model's; and knobs consistent). A refused version raises `IncompatibleArtefact` naming the reason; on reload it
is counted per reason in `Reloader.rejected` and logged, and the old version keeps serving.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import redis

from engine.config import DraftConfig
from index.artefact import Artefact, ArtefactError, IndexManifest, load_artefact, read_manifest, resolve_version_dir
from index.publish import index_key, updates_channel
from router.cache import RedisLink
from router.stats import RouteStats

log = logging.getLogger(__name__)


class IncompatibleArtefact(ArtefactError):
    """A readable artefact that must not be served here; `reason` is one of model_hash, embedder, layers,
    vocab, config."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ModelSpec:
    """What draft configs are checked against: the served model's shape (from its config.json)."""

    num_layers: int
    vocab_size: int

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelSpec:
        """Read the shape from a Hugging Face model directory without loading weights (Gemma 3 nests it
        under text_config)."""
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        text = cfg.get("text_config") or {}
        layers = cfg.get("num_hidden_layers", text.get("num_hidden_layers"))
        vocab = cfg.get("vocab_size", text.get("vocab_size"))
        if not isinstance(layers, int) or not isinstance(vocab, int):
            raise ValueError(f"{model_dir}/config.json names no num_hidden_layers/vocab_size")
        return cls(num_layers=layers, vocab_size=vocab)


def validate_manifest(
    manifest: IndexManifest,
    *,
    expect_model_hash: str | None = None,
    expect_embedder_id: str | None = None,
    spec: ModelSpec | None = None,
    expect_precision: str | None = None,
) -> None:
    """Raise IncompatibleArtefact (first problem found) unless the artefact may be served with this model."""
    where = f"index version {manifest.version}"
    if expect_precision is not None and manifest.precision != expect_precision:
        raise IncompatibleArtefact(
            "precision", f"{where} was measured at precision {manifest.precision!r}, the replicas run {expect_precision!r}: "
            "its draft configs' costs do not hold there (rebuild the index at that precision)",
        )
    if expect_model_hash is not None and manifest.model_hash != expect_model_hash:
        raise IncompatibleArtefact(
            "model_hash", f"{where} was built for {manifest.model_id!r} with weights hash {manifest.model_hash!r}, "
            f"but the served weights hash is {expect_model_hash!r}",
        )
    if expect_embedder_id is not None and manifest.embedder_id != expect_embedder_id:
        raise IncompatibleArtefact(
            "embedder", f"{where} was built with embedder {manifest.embedder_id!r}, the router embeds with "
            f"{expect_embedder_id!r}",
        )
    if spec is None:
        return
    configs = [("fallback", manifest.fallback_config)] + [(n, d.config) for n, d in sorted(manifest.domains.items())]
    for name, cfg in configs:
        problems = cfg.problems(spec.num_layers, spec.vocab_size)  # the knobs' bounds, declared with them
        if problems:
            reason, msg = problems[0]
            raise IncompatibleArtefact(reason, f"{where}: the draft config of domain {name!r} {msg}")


class ArtefactSource(Protocol):
    def current(self, tenant: str | None = None) -> Artefact: ...


class StaticSource:
    """One fixed artefact (tests, benchmarks, a router without Redis)."""

    def __init__(self, artefact: Artefact) -> None:
        self.artefact = artefact

    def current(self, tenant: str | None = None) -> Artefact:
        return self.artefact


Loader = Callable[..., Artefact]


class Reloader:
    """Follows the published index version; `current()` is lock-free and O(1).

    Start-up order: the version named by the Redis key if Redis answers and names one, else the
    CURRENT version under `index_root`. With neither, construction raises `ArtefactError`.
    """

    def __init__(
        self,
        link: RedisLink | None,
        *,
        index_root: str | Path | None = None,
        key_prefix: str = "",
        poll_interval_s: float = 1.0,
        use_pubsub: bool = True,
        expect_model_hash: str | None = None,
        expect_embedder_id: str | None = None,
        stats: RouteStats | None = None,
        loader: Loader = load_artefact,
    ) -> None:
        self.link = link
        self.index_root = Path(index_root) if index_root is not None else None
        self.key = index_key(key_prefix)
        self.channel = updates_channel(key_prefix)
        self.poll_interval_s = poll_interval_s
        self.use_pubsub = use_pubsub and link is not None
        self.expect_model_hash = expect_model_hash
        self.expect_embedder_id = expect_embedder_id
        self.stats = stats if stats is not None else (link.stats if link is not None else RouteStats())
        self._loader = loader
        self.model_spec: ModelSpec | None = None  # set by the service (router.route builds this object)
        self.expect_precision: str | None = None  # set with the model: the replicas' engine precision
        self.rejected: Counter[str] = Counter()  # refused published versions, by reason
        self._swap_lock = threading.Lock()  # serialises loads (poll thread vs. check_now), never requests
        self._failed: str | None = None  # last published version that failed to load
        self._pinned: dict[str, Artefact] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pubsub: redis.client.PubSub | None = None

        self._current: Artefact | None = None
        self.check_now()
        if self._current is None and self.index_root is not None:
            self._current = self._load(self.index_root, None)
            log.info("router index %s loaded from %s (no published version)", self._current.version, self.index_root)
        if self._current is None:
            raise ArtefactError("no index artefact: Redis names no loadable version and no index_root was given")

    # -- request path -----------------------------------------------------------------------------

    def current(self, tenant: str | None = None) -> Artefact:
        if tenant is not None and self._pinned:
            pinned = self._pinned.get(tenant)
            if pinned is not None:
                return pinned
        assert self._current is not None
        return self._current

    @property
    def version(self) -> str:
        return self.current().version

    # -- loading ----------------------------------------------------------------------------------

    def _load(self, path: str | Path, version: str | None) -> Artefact:
        # The manifest alone says whether the version fits; read it first so a refusal names its reason.
        self.validate(read_manifest(resolve_version_dir(path, version)))
        return self._loader(
            path, version, expect_model_hash=self.expect_model_hash, expect_embedder_id=self.expect_embedder_id
        )

    def validate(self, manifest: IndexManifest) -> None:
        """Raise IncompatibleArtefact unless `manifest` may be served (see the module docstring)."""
        validate_manifest(manifest, expect_model_hash=self.expect_model_hash,
                          expect_embedder_id=self.expect_embedder_id, spec=self.model_spec,
                          expect_precision=self.expect_precision)

    def set_model(self, spec: ModelSpec | None = None, model_hash: str | None = None, precision: str | None = None) -> None:
        """Check every later version (and the one serving now: raises if it does not fit) against the
        served model and the precision its replicas run."""
        if model_hash is not None:
            self.expect_model_hash = model_hash
        if precision is not None:
            self.expect_precision = precision
        if spec is not None:
            self.model_spec = spec
        assert self._current is not None
        self.validate(self._current.manifest)

    def _load_published(self, payload: dict) -> Artefact:
        """Load what the key names: its path first, then the same version under our own root."""
        version = str(payload["version"])
        errors = []
        refused: IncompatibleArtefact | None = None
        if payload.get("path"):
            try:
                art = self._load(payload["path"], None)
                if art.version == version:
                    return art
                errors.append(f"{payload['path']} holds version {art.version!r}, not {version!r}")
            except IncompatibleArtefact as e:
                refused = e
            except ArtefactError as e:
                errors.append(str(e))
        if self.index_root is not None and refused is None:
            try:
                return self._load(self.index_root, version)
            except IncompatibleArtefact as e:
                refused = e
            except ArtefactError as e:
                errors.append(str(e))
        if refused is not None:  # readable but not for this model: that is the reason to report
            raise refused
        raise ArtefactError(f"cannot load published version {version!r}: " + "; ".join(errors or ["no path"]))

    def read_published(self) -> dict | None:
        """The {version, path} payload under the version key; None if absent, malformed or Redis is down."""
        if self.link is None:
            return None
        raw = self.link.call(lambda r: r.get(self.key), None)
        if raw is None:
            return None
        try:
            payload = json.loads(raw)
            if not isinstance(payload, dict) or not payload.get("version"):
                raise ValueError("no version field")
            return payload
        except (ValueError, UnicodeDecodeError) as e:
            log.warning("ignoring malformed index version key %s: %s", self.key, e)
            return None

    def check_now(self) -> bool:
        """Read the version key once and swap in the named version if it is new; True if swapped."""
        payload = self.read_published()
        if payload is None:
            return False
        version = str(payload["version"])
        cur = self._current
        if (cur is not None and cur.version == version) or version == self._failed:
            return False
        with self._swap_lock:
            cur = self._current
            if cur is not None and cur.version == version:
                return False
            try:
                art = self._load_published(payload)
            except (ArtefactError, OSError) as e:
                self._failed = version
                self.stats.observe_reload(ok=False)
                reason = getattr(e, "reason", "unloadable")
                self.rejected[reason] += 1
                log.error("index version %s refused (%s); keeping %s: %s", version, reason,
                          cur.version if cur else None, e)
                return False
            self._current = art  # the swap: requests that already hold the old artefact keep it
            self._failed = None
        if cur is not None:  # the start-up load is not a reload
            self.stats.observe_reload(ok=True)
        log.info("router index %s -> %s", cur.version if cur else None, art.version)
        return True

    # -- pinning ----------------------------------------------------------------------------------

    def pin(self, tenant: str, version: str) -> Artefact:
        """Route `tenant` with `version` (loaded from `index_root`) until unpinned."""
        if self.index_root is None:
            raise ArtefactError("pinning a tenant needs index_root")
        art = self._load(self.index_root, version)
        self._pinned = {**self._pinned, tenant: art}  # copy-on-write: readers never see a half update
        return art

    def unpin(self, tenant: str) -> None:
        self._pinned = {t: a for t, a in self._pinned.items() if t != tenant}

    # -- background watch -------------------------------------------------------------------------

    def start(self) -> Reloader:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="knnssd-index-reloader", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_interval_s + 5)
            self._thread = None
        self._close_pubsub()

    def __enter__(self) -> Reloader:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _close_pubsub(self) -> None:
        ps, self._pubsub = self._pubsub, None
        if ps is not None:
            try:
                ps.close()
            except (redis.RedisError, OSError):
                pass

    def _wait_for_update(self) -> None:
        """Block up to one poll interval, returning early on a pub/sub message or stop()."""
        if not self.use_pubsub or self.link is None or not self.link.up:
            self._stop.wait(self.poll_interval_s)
            return
        try:
            if self._pubsub is None:
                self._pubsub = self.link.make_client().pubsub(ignore_subscribe_messages=True)
                self._pubsub.subscribe(self.channel)
            # Wait in short slices so stop() is honoured quickly even with a long poll interval.
            deadline = time.monotonic() + self.poll_interval_s
            while not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0 or self._pubsub.get_message(timeout=min(left, 0.25)) is not None:
                    return
        except (redis.RedisError, OSError) as e:
            # The poll below still runs (and counts the error through the link if Redis is really down).
            log.debug("index update subscription lost: %s", e)
            self._close_pubsub()
            self._stop.wait(self.poll_interval_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wait_for_update()
            if self._stop.is_set():
                break
            try:
                self.check_now()
            except Exception:  # the watcher must never die; the request path does not depend on it
                log.exception("index reload check failed")
