"""The seam between the HTTP gateway and the model side: typed payloads and the `Backend` protocol.

The gateway turns an OpenAI request into one `BackendRequest` and reads `BackendChunk`s back from
`Backend.stream`. Whatever sits behind (Ray Serve handles to router + replicas, or a fake in tests)
only has to honour this contract:

- `stream(req)` yields chunks in order. Each carries a text delta and how many tokens it holds.
- The first chunk should carry `route` (routing happens before decoding) and may carry `usage` with the
  prompt token count, so headers and aborted-stream accounting can use them.
- The last chunk has `finish_reason` set ("stop" or "length"), `usage`, `route` and `stats`
  (`engine.config.DecodeStats.to_dict()`), and nothing follows it.
- Failures are raised as exceptions; `services.errors.to_service_error` maps the known ones
  (prompt too long -> 400, no replica -> 503), anything else is a 500.

Payloads are plain dataclasses so they pickle cheaply across Ray processes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from engine.config import SamplingParams

FINISH_REASONS = ("stop", "length")


def normalize_finish_reason(reason: str | None) -> str:
    """OpenAI knows "stop" and "length"; the engine may say "eos", "stop_string", "max_tokens", "context"."""
    if reason in ("length", "max_tokens", "max_new_tokens", "context", "context_length"):
        return "length"
    return "stop"


@dataclass(slots=True)
class BackendRequest:
    """One generation request, after authentication, validation and limits."""

    request_id: str
    tenant: str
    model: str
    sampling: SamplingParams
    prompt: str | None = None  # completions
    messages: list[dict[str, str]] | None = None  # chat: [{"role": ..., "content": ...}], roles system/user/assistant
    speculative: bool = True  # False: plain decoding for this request (output is the same; only speed differs)
    index_version: str | None = None  # the tenant's pinned index version; None means the current one

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("BackendRequest needs exactly one of prompt or messages")

    @property
    def routing_text(self) -> str:
        """The text routing embeds: the prompt, or the user turns of a chat."""
        if self.prompt is not None:
            return self.prompt
        assert self.messages is not None
        users = [m["content"] for m in self.messages if m.get("role") == "user"]
        return "\n".join(users or [m["content"] for m in self.messages])


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "domain": self.domain,
            "config_id": self.config_id,
            "index_version": self.index_version,
            "fallback": self.fallback,
        }


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
