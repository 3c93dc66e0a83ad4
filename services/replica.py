"""A model replica: one `Engine`, decoding one request at a time with the routed `DraftConfig`, as chunks.

`ModelReplica.generate(req, draft, route)` yields `BackendChunk`s by the contract in `services.backend`:
the first carries the route, the prompt's token count, the replica's name and its queue depth; the last
carries finish_reason, usage, route and `DecodeStats.to_dict()`. `req.speculative == False` decodes with
`DraftConfig.plain()` whatever was routed (same output, only speed differs).

The engine owns one KV cache, so requests wait on an asyncio lock, and `queue_depth` counts the ones
decoding or waiting. Decoding is CPU-bound: every engine step runs on one dedicated thread (torch keeps
thread settings per OS thread, and one thread also orders a stream's close before the next request's
first step), so the event loop stays free to accept, queue and cancel requests. A client that goes
away stops the decode at the next step. A plain class: the Serve deployment is applied in services/app.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from engine.config import DraftConfig, SamplingParams
from services.backend import BackendChunk, BackendRequest, RouteInfo, Usage
from services.config import AppConfig
from services.errors import InvalidRequest, ServiceError, to_service_error

log = logging.getLogger(__name__)

_END = object()


class StreamingEngine(Protocol):
    """What a replica needs from `engine.generate.Engine`."""

    num_layers: int

    def encode_prompt(self, prompt: str | None = None, messages: list[dict] | None = None) -> list[int]: ...

    def stream(self, prompt_ids: list[int], params: SamplingParams, draft: DraftConfig | None = None) -> Iterator[Any]:
        """Yields objects with token_ids, text, finish_reason (None until the last) and stats (DecodeStats)."""
        ...


def _set_torch_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


class ModelReplica:
    """One engine, requests serialised; see the module docstring."""

    def __init__(
        self,
        config: AppConfig | dict | None = None,
        engine: StreamingEngine | None = None,
        *,
        threads: int | None = None,
        name: str | None = None,
    ) -> None:
        self.config = AppConfig.model_validate(config) if isinstance(config, dict) else (config or AppConfig())
        if threads is None:
            threads = max(1, int(round(self.config.deployments.replica.ray_actor_options.num_cpus)))
        self.threads = threads
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="knnssd-decode", initializer=_set_torch_threads, initargs=(threads,)
        )
        if engine is None:
            engine = self._executor.submit(self._load_engine).result()  # loaded on the decode thread
        self.engine = engine
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._lock: asyncio.Lock | None = None
        self._ongoing = 0
        self._closed = False
        self.served = 0

    def _load_engine(self) -> StreamingEngine:
        from engine.generate import Engine

        source = self.config.model_path or self.config.model
        log.info("replica loading model %s with %d torch threads", source, self.threads)
        return Engine.load(source)

    # ---------------------------------------------------------------- state

    @property
    def queue_depth(self) -> int:
        """Requests at this replica: the one decoding plus those waiting for the engine."""
        return self._ongoing

    def check_health(self) -> None:
        """Serve calls this periodically; a raise restarts the replica."""
        if self._closed:
            raise RuntimeError("this replica is shut down")

    def shutdown(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    def __del__(self) -> None:  # Serve's replica shutdown hook
        if hasattr(self, "_executor"):
            self.shutdown()

    # ---------------------------------------------------------------- decoding

    async def generate(
        self, req: BackendRequest, draft: DraftConfig | None = None, route: RouteInfo | None = None
    ) -> AsyncIterator[BackendChunk]:
        """Decode `req` with `draft` (plain when the request turns speculation off, or none was given)."""
        if draft is None or not req.speculative:
            draft = DraftConfig.plain()
        if self._lock is None:  # created here so it belongs to the loop that runs requests
            self._lock = asyncio.Lock()
        self._ongoing += 1
        depth = self._ongoing
        try:
            async with self._lock:
                async for chunk in self._decode(req, draft, route, depth):
                    yield chunk
        finally:
            self._ongoing -= 1

    async def _decode(
        self, req: BackendRequest, draft: DraftConfig, route: RouteInfo | None, depth: int
    ) -> AsyncIterator[BackendChunk]:
        loop = asyncio.get_running_loop()
        ex = self._executor

        def start() -> tuple[list[int], Iterator[Any]]:
            try:
                ids = self.engine.encode_prompt(prompt=req.prompt, messages=req.messages)
            except ValueError as exc:  # e.g. chat messages for a model without a chat template
                raise InvalidRequest(str(exc), param="messages" if req.messages is not None else "prompt") from None
            return ids, self.engine.stream(ids, req.sampling, draft)

        ids, steps = await loop.run_in_executor(ex, start)
        done = False
        first = True
        tokens = 0
        try:
            while True:
                try:
                    out = await loop.run_in_executor(ex, next, steps, _END)
                except ServiceError:
                    raise
                except Exception as exc:
                    # Known failures (prompt too long...) cross the Ray boundary as ServiceErrors, which
                    # pickle with their status; the engine's own exception classes may not unpickle.
                    mapped = to_service_error(exc)
                    if mapped is None:
                        raise
                    raise mapped from None
                if out is _END:  # the engine always ends with a finish_reason; this is only a guard
                    raise RuntimeError("the engine stopped without a finish reason")
                n = len(out.token_ids)
                tokens += n
                last = out.finish_reason is not None
                chunk = BackendChunk(text=out.text, tokens=n)
                if first:
                    chunk.route = route
                    chunk.usage = Usage(prompt_tokens=len(ids))
                    chunk.replica = self.name
                    chunk.queue_depth = depth
                    first = False
                if last:
                    chunk.finish_reason = out.finish_reason
                    chunk.usage = Usage(prompt_tokens=len(ids), completion_tokens=tokens)
                    chunk.route = route
                    chunk.stats = out.stats.to_dict()
                    done = True
                    self.served += 1
                yield chunk
                if last:
                    return
        finally:
            if not done:
                # Runs on the decode thread after any step still in flight and before the next request's
                # first step, so the engine's own cleanup finishes before it is used again.
                ex.submit(steps.close)
