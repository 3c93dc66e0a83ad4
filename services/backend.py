"""The seam between the HTTP gateway and the model side: typed payloads and the `Backend` protocol.

The gateway turns an OpenAI request into one `BackendRequest` and reads `BackendChunk`s back from
`Backend.stream`. Whatever sits behind (Ray Serve handles to router + replicas, or a fake in tests)
only has to honour this contract:

- `stream(req)` yields chunks in order. Each carries a text delta and how many tokens it holds.
- The backend reads the prompt, routes the request and reports both: the first chunk carries `route`
  (routing happens before decoding) and `usage` with the prompt's exact token count (the model side's own
  tokenisation; the gateway counts nothing), so headers and aborted-stream accounting can use them. A
  prompt over `max_prompt_tokens` is refused before any model work (`PromptTooLong`, a 400). A request
  with `speculative=False` is decoded plain and its route says so (config "plain").
- The last chunk has `finish_reason` set ("stop" or "length"), `usage`, `route` and `stats`
  (`engine.config.DecodeStats.to_dict()`: the one place acceptance is computed), and nothing follows it.
- Failures are raised as exceptions; `services.errors.to_service_error` maps the known ones
  (prompt too long -> 400, no replica -> 503), anything else is a 500.

Payloads are plain dataclasses so they pickle cheaply across Ray processes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from engine.config import SamplingParams

FINISH_REASONS = ("stop", "length")


def normalize_finish_reason(reason: str | None) -> str:
    """OpenAI's finish_reason: the engine already says "stop" or "length"; a stream that ended without its
    last chunk (no reason) counts as "stop"."""
    return "length" if reason == "length" else "stop"


@dataclass(slots=True)
class BackendRequest:
    """One generation request, after authentication, validation and limits."""

    request_id: str
    tenant: str
    model: str
    sampling: SamplingParams
    prompt: str | None = None  # completions
    messages: list[dict[str, str]] | None = None  # chat: [{"role": ..., "content": ...}], roles system/user/assistant
    speculative: bool = True  # False: decode plain (same output, only speed differs); the backend's route decides
    index_version: str | None = None  # the tenant's pinned index version; None means the current one
    max_prompt_tokens: int = 0  # the tenant's prompt-token limit, checked by the replica on its exact count; 0: none

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("BackendRequest needs exactly one of prompt or messages")


@dataclass(slots=True)
class RouteInfo:
    """What routing chose for a request (a summary of the router's RouteDecision)."""

    domain: str | None = None
    config_id: str | None = None
    index_version: str | None = None
    fallback: bool = False  # the prompt was far from every centroid; the fallback config was used
    cache_hit: bool | None = None  # the decision came from the Redis cache (None: unknown / no cache)
    redis_error: bool = False  # the router hit a Redis error while routing this request (it went on locally)

    def __post_init__(self) -> None:
        if self.index_version is not None and not isinstance(self.index_version, str):
            self.index_version = str(self.index_version)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class BackendChunk:
    """A piece of one request's output. See the module docstring for which fields each chunk carries."""

    text: str = ""
    tokens: int = 0  # new tokens in this delta
    finish_reason: str | None = None  # set on the last chunk only
    usage: Usage | None = None
    route: RouteInfo | None = None
    stats: dict[str, Any] | None = None  # DecodeStats.to_dict() on the last chunk
    replica: str | None = None  # which replica decoded (for the queue-depth gauge)
    queue_depth: int | None = None  # requests ongoing at that replica when this one started

    @property
    def is_last(self) -> bool:
        return self.finish_reason is not None


@runtime_checkable
class Backend(Protocol):
    """What the gateway needs from the model side."""

    def stream(self, req: BackendRequest) -> AsyncIterator[BackendChunk]:
        """Yield the request's output as chunks; the last has finish_reason, usage, route and stats."""
        ...

    def models(self) -> list[str]:
        """Model names this backend serves (the `model` field of requests must be one of them)."""
        ...
