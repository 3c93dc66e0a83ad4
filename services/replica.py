"""A model replica: one `Engine` and its batching `Scheduler`, decoding many requests at once.

The request path is one Ray call from the gateway: `ModelReplica.generate(req)` reads the prompt once and
does the rest here, in order:

1. tokenises the prompt (`Engine.encode_prompt`, the one tokenisation of the request: the gateway loads no
   tokenizer), and refuses it with a 400 (`PromptTooLong`) above the tenant's limit the gateway sent
   (`BackendRequest.max_prompt_tokens`), naming the exact count, before any model work;
2. routes it (`route`: plain when the request turns speculation off, else the Router deployment's answer
   over the injected handle; a router that fails or cannot be reached decodes plain, and says so);
3. decodes it in the scheduler and yields `BackendChunk`s by the contract in `services.backend`: the first
   carries the prompt's exact token count, the route, the replica's name and its queue depth; the last
   carries finish_reason, usage, the route and `DecodeStats.to_dict()` (usage is read from those stats).

Chunks are coalesced here (`coalesce`): the first goes at once (time to first token), later ones gather the
steps that arrive within `generation.stream_chunk_ms` of the first, up to `generation.stream_chunk_tokens`
tokens, so a stream is a few Ray messages per request rather than one per decoding step; text and token
counts are only concatenated and summed, so the client's output is the same.

One decode thread runs the scheduler loop (torch keeps thread settings per OS thread; the engine is
not thread-safe, so only that thread touches it after loading); requests join it at the next
iteration and leave the moment they finish or their client goes away (the stream's close cancels the
sequence, whose slot is freed at the next iteration). A full waiting queue is refused at once with a
503 and `Retry-After` (never an unbounded wait). A plain class: the Serve deployment is applied in
services/app.py, which binds the Router's handle into it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from engine.config import DraftConfig
from engine.plain import plain_reason
from engine.schedule import QueueFull
from services.backend import BackendChunk, BackendRequest, Usage
from services.config import AppConfig
from services.errors import InvalidRequest, PromptTooLong, ServiceError, ServiceUnavailable, to_service_error
from services.routing import Routed

log = logging.getLogger(__name__)


def _set_torch_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


class ModelReplica:
    """One engine, many requests in flight; see the module docstring."""

    RETRY_AFTER_S = 1.0

    def __init__(
        self,
        config: AppConfig | dict | None = None,
        engine: Any | None = None,
        *,
        threads: int | None = None,
        name: str | None = None,
        router: Any | None = None,
    ) -> None:
        self.config = AppConfig.model_validate(config) if isinstance(config, dict) else (config or AppConfig())
        if threads is None:
            threads = max(1, int(round(self.config.deployments.replica.ray_actor_options.num_cpus)))
        self.threads = threads
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.engine = engine
        self.router = router  # the Router deployment's handle (None: every request decodes plain)
        self.served = 0
        self.route_failures = 0
        self._thread = threading.Thread(target=self._loop, name="knnssd-decode", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        log.info("replica %s: model %s on %s (%s, precision %s), up to %d requests at once", self.name,
                 self.engine.model_id, self.engine.device, str(self.engine.dtype).replace("torch.", ""), getattr(self.engine, "precision", "reference"),
                 self.scheduler.settings.max_running)

    def _loop(self) -> None:
        try:
            _set_torch_threads(self.threads)
            if self.engine is None:
                from engine.generate import Engine

                e = self.config.engine
                source = self.config.model_path or self.config.model
                log.info("replica loading model %s on %s with %d torch threads", source, e.device, self.threads)
                self.engine = Engine.load(source, max_seq_len=e.max_seq_len, device=e.device, dtype=e.dtype, precision=e.precision)
                expected = self.config.served_precision()
                if self.engine.precision != expected:  # the router checks the index against `expected`
                    log.warning("replica runs precision %s but the settings say replicas run %s: the index's costs may not hold",
                                self.engine.precision, expected)
            self.scheduler = self.engine.scheduler(self.config.runtime)
        except BaseException as exc:  # noqa: BLE001 - reported to the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.scheduler.run(self._stop)

    # ---------------------------------------------------------------- state

    @property
    def queue_depth(self) -> int:
        """Requests at this replica: decoding plus waiting for a slot."""
        running, waiting = self.scheduler.load
        return running + waiting

    def info(self) -> dict[str, Any]:
        """What this replica runs on and how busy it is (for /health and logs)."""
        running, waiting = self.scheduler.load
        return {
            "replica": self.name,
            "model": self.engine.model_id,
            "device": str(self.engine.device),
            "dtype": str(self.engine.dtype).replace("torch.", ""),
            "precision": getattr(self.engine, "precision", "reference"),
            "running": running,
            "waiting": waiting,
            "max_running": self.scheduler.settings.max_running,
        }

    def check_health(self) -> None:
        """Serve calls this periodically; a raise restarts the replica."""
        if self._stop.is_set() or not self._thread.is_alive():
            raise RuntimeError("this replica's decode loop is not running")

    def shutdown(self) -> None:
        self._stop.set()

    def __del__(self) -> None:  # Serve's replica shutdown hook
        if hasattr(self, "_stop"):
            self.shutdown()

    # ---------------------------------------------------------------- decoding

    async def route(self, req: BackendRequest) -> Routed:
        """The draft config and route info for `req`: plain when it turns speculation off (no embedding),
        else the Router's. Routing only changes speed: a router that fails, or none, decodes plain (same
        output) and the route says so (config "plain", fallback)."""
        if plain_reason(speculative=req.speculative):  # engine.plain decides; no embedding for it
            return Routed.plain()
        if self.router is None:
            return Routed.plain(fallback=True)
        try:
            return await self.router.route.remote(req.prompt, req.messages, req.tenant, req.index_version)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - routing only changes speed; decode plain rather than fail
            self.route_failures += 1
            log.warning("routing request %s failed; decoding it without speculation", req.request_id, exc_info=True)
            return Routed.plain(fallback=True)

    def _encode(self, req: BackendRequest) -> list[int]:
        """The prompt's token ids (the request's one tokenisation), or 400 for unusable or over-limit input."""
        param = "messages" if req.messages is not None else "prompt"
        try:
            ids = self.engine.encode_prompt(prompt=req.prompt, messages=req.messages)
        except ValueError as exc:  # e.g. chat messages for a model without a chat template
            raise InvalidRequest(str(exc), param=param) from None
        cap = req.max_prompt_tokens
        if cap and len(ids) > cap:  # before any model work: a long prefill would hold this replica
            raise PromptTooLong(
                f"This key may send prompts of at most {cap} tokens, but the {param} has {len(ids)} tokens. "
                "Shorten the prompt.", param=param,
            )
        return ids

    async def generate(self, req: BackendRequest, draft: DraftConfig | None = None) -> AsyncIterator[BackendChunk]:
        """Tokenise, route and decode `req`, chunk by chunk (see the module docstring). `draft` given (tests,
        benches) decodes with it instead of routing."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(out) -> None:  # on the decode thread: hand a snapshot to this request's event loop
            snap = (out.token_ids, out.text, out.finish_reason, out.stats.to_dict() if out.finish_reason else None)
            try:
                loop.call_soon_threadsafe(queue.put_nowait, snap)
            except RuntimeError:  # the request's loop is gone
                pass

        try:
            ids = await asyncio.to_thread(self._encode, req)
            routed = await self.route(req) if draft is None else Routed(config=draft, info=None)
            seq = await asyncio.to_thread(
                self.engine.sequence, ids, req.sampling, routed.config, emit=emit, rid=req.request_id)
            self.scheduler.submit(seq)
        except QueueFull as exc:
            raise ServiceUnavailable(
                f"This replica is at capacity ({exc.waiting} requests waiting); retry shortly.",
                retry_after_s=self.RETRY_AFTER_S,
            ) from None
        except ServiceError:
            raise
        except Exception as exc:
            mapped = to_service_error(exc)
            if mapped is None:
                raise
            raise mapped from None
        depth = self.queue_depth
        g = self.config.generation
        first, done = True, False
        try:
            async for tok_count, text, finish, stats in coalesce(queue, g.stream_chunk_tokens, g.stream_chunk_ms / 1000):
                if finish == "cancelled":
                    raise ServiceUnavailable("The request was cancelled by the replica.")
                chunk = BackendChunk(text=text, tokens=tok_count)
                if first:
                    chunk.usage = Usage(prompt_tokens=len(ids))
                    chunk.replica = self.name
                    chunk.queue_depth = depth
                    chunk.route = routed.info  # the gateway reads the route from the first and last chunks
                    first = False
                if finish is not None:
                    chunk.finish_reason = finish
                    chunk.usage = Usage(prompt_tokens=stats["prompt_tokens"], completion_tokens=stats["new_tokens"])
                    chunk.stats = stats
                    chunk.route = routed.info
                    done = True
                    self.served += 1
                yield chunk
                if done:
                    return
        finally:
            if not done:
                seq.cancel()  # its slot is freed at the scheduler's next iteration


async def coalesce(queue: asyncio.Queue, max_tokens: int, window_s: float) -> AsyncIterator[tuple]:
    """(token count, text, finish_reason, stats) per outgoing chunk from the decode thread's per-step
    snapshots (token ids, text, finish_reason, stats): the first step alone, at once; after it, each chunk
    holds the steps that arrive within `window_s` of its first one, up to `max_tokens` tokens, and ends at
    once with the step that finishes the request (or cancels it). Texts are concatenated and counts summed."""
    first = True
    while True:
        ids, text, finish, stats = await queue.get()
        count, parts = len(ids), [text]
        if not first and finish is None:
            deadline = time.monotonic() + window_s
            while count < max_tokens:
                if queue.empty():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        ids, text, finish, stats = await asyncio.wait_for(queue.get(), left)
                    except TimeoutError:
                        break
                else:
                    ids, text, finish, stats = queue.get_nowait()
                count += len(ids)
                parts.append(text)
                if finish is not None:
                    break
        first = False
        yield count, "".join(parts), finish, stats
        if finish is not None:
            return
