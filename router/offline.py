"""Route a list of prompts offline, with no Redis: the `routed`, `general` and `oracle` methods of
`knnssd bench engine --routed`.

- routed: the router's decision per prompt (`Router` over a `StaticSource` of the artefact: the real
  embedder, FAISS index, vote, fallback threshold and second stage, exactly what the service does).
- general: the artefact's fallback config (its general config) for every prompt.
- oracle: each prompt's own kind's config from the manifest (the prompt's `domain`, else its kind), when
  any prompt's kind names a domain of the index; a kind the index has no domain for gets the general one.

Routing happens before any timing, so the bench times decoding only (routing latency is `bench route`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from engine.config import DraftConfig
from index.artefact import DEFAULT_ROOT, Artefact, load_artefact
from router.config import RouterConfig
from router.decision import FALLBACK_DOMAIN, RouteDecision
from router.reload import StaticSource
from router.route import Router

ROUTED, GENERAL, ORACLE = "routed", "general", "oracle"


class PromptLike(Protocol):
    kind: str
    prompt: str | None
    domain: str | None

    @property
    def messages_list(self) -> list[dict] | None: ...


@dataclass
class RoutedMethods:
    """Per-prompt configs of each method, and where the router sent each prompt."""

    methods: dict[str, list[DraftConfig]]
    decisions: list[RouteDecision]
    index_version: str
    index_path: str
    oracle_domains: dict[str, str] = field(default_factory=dict)  # kind -> the manifest domain its oracle config came from

    def route_domains(self) -> dict[str, int]:
        """Prompts per routed domain, 'fallback' included (0 when none fell back)."""
        counts = Counter(d.domain for d in self.decisions)
        return {FALLBACK_DOMAIN: counts.pop(FALLBACK_DOMAIN, 0), **dict(sorted(counts.items()))}

    def route_table(self, prompts: Sequence[PromptLike]) -> dict[str, dict[str, int]]:
        """kind -> {routed domain: prompts}: where each kind's prompts went."""
        out: dict[str, Counter] = {}
        for p, d in zip(prompts, self.decisions):
            out.setdefault(p.kind, Counter())[d.domain] += 1
        return {k: dict(sorted(c.items())) for k, c in sorted(out.items())}

    def report(self, prompts: Sequence[PromptLike]) -> dict[str, Any]:
        return {
            "index_version": self.index_version,
            "index_path": self.index_path,
            "route_domains": self.route_domains(),
            "route_by_kind": self.route_table(prompts),
            "oracle_domains": self.oracle_domains,
            "decisions": [
                {"kind": p.kind, "domain": d.domain, "nearest_domain": d.nearest_domain, "config_id": d.config_id,
                 "similarity": round(d.similarity, 4), "fallback": d.fallback}
                for p, d in zip(prompts, self.decisions)
            ],  # fmt: skip
        }


def load_index(index: str | Path | None = None) -> Artefact:
    """The artefact to route with: `index` (a root or a version directory), else the shipped default."""
    return load_artefact(index or DEFAULT_ROOT)


def make_router(art: Artefact, engine: Any = None, k: int | None = None) -> Router:
    """A Redis-free router over `art`, embedding as the artefact was built (MiniLM, or the LLM's hidden
    state, which needs `engine`)."""
    from index.embed import make_embedder

    embedder = make_embedder(art.manifest.representation, engine=engine, progress=False)
    cfg = RouterConfig(redis_url=None, **({"k": k} if k else {}))
    return Router(embedder, StaticSource(art), config=cfg)


def routed_methods(art: Artefact, prompts: Sequence[PromptLike], router: Router | None = None, engine: Any = None) -> RoutedMethods:
    """Route every prompt, then build the routed / general (/ oracle) per-prompt config lists."""
    router = router or make_router(art, engine=engine)
    decisions = [router.route(p.prompt, messages=p.messages_list, artefact=art) for p in prompts]
    m = art.manifest
    methods = {ROUTED: [d.config for d in decisions], GENERAL: [m.fallback_config] * len(prompts)}
    oracle_domains: dict[str, str] = {}
    if any((p.domain or p.kind) in m.domains for p in prompts):
        cfgs = []
        for p in prompts:
            dom = p.domain or p.kind
            entry = m.domains.get(dom)
            oracle_domains[p.kind] = dom if entry is not None else GENERAL
            cfgs.append(entry.config if entry is not None else m.fallback_config)
        methods[ORACLE] = cfgs
    return RoutedMethods(methods, decisions, m.version, str(art.path), oracle_domains)
