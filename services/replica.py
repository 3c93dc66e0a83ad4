"""A model replica: one `Engine` and its batching `Scheduler`, decoding many requests at once.

`ModelReplica.generate(req, draft)` decodes `req` with the draft config it is given (routing, and the
choice of plain decoding, happened on the gateway's side, which also attaches the route to the chunks)
and yields `BackendChunk`s by the contract in `services.backend`: the first carries the prompt's token
count, the replica's name and its queue depth; the last carries finish_reason, usage and
`DecodeStats.to_dict()` (usage is read from those stats).

One decode thread runs the scheduler loop (torch keeps thread settings per OS thread; the engine is
not thread-safe, so only that thread touches it after loading); requests join it at the next
iteration and leave the moment they finish or their client goes away (the stream's close cancels the
sequence, whose slot is freed at the next iteration). A full waiting queue is refused at once with a
503 and `Retry-After` (never an unbounded wait). A plain class: the Serve deployment is applied in
services/app.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator
from typing import Any

from engine.config import DraftConfig
from engine.schedule import QueueFull
from services.backend import BackendChunk, BackendRequest, Usage
from services.config import AppConfig
from services.errors import InvalidRequest, ServiceError, ServiceUnavailable, to_service_error

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
        self.served = 0
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

    async def generate(self, req: BackendRequest, draft: DraftConfig) -> AsyncIterator[BackendChunk]:
        """Decode `req` with `draft`, chunk by chunk (see the module docstring)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(out) -> None:  # on the decode thread: hand a snapshot to this request's event loop
            snap = (out.token_ids, out.text, out.finish_reason, out.stats.to_dict() if out.finish_reason else None)
            try:
                loop.call_soon_threadsafe(queue.put_nowait, snap)
            except RuntimeError:  # the request's loop is gone
                pass

        def make():
            try:
                ids = self.engine.encode_prompt(prompt=req.prompt, messages=req.messages)
            except ValueError as exc:  # e.g. chat messages for a model without a chat template
                raise InvalidRequest(str(exc), param="messages" if req.messages is not None else "prompt") from None
            return ids, self.engine.sequence(ids, req.sampling, draft, emit=emit, rid=req.request_id)

        try:
            ids, seq = await asyncio.to_thread(make)
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
        first, done = True, False
        try:
            while True:
                tok_ids, text, finish, stats = await queue.get()
                if finish == "cancelled":
                    raise ServiceUnavailable("The request was cancelled by the replica.")
                chunk = BackendChunk(text=text, tokens=len(tok_ids))
                if first:
                    chunk.usage = Usage(prompt_tokens=len(ids))
                    chunk.replica = self.name
                    chunk.queue_depth = depth
                    first = False
                if finish is not None:
                    chunk.finish_reason = finish
                    chunk.usage = Usage(prompt_tokens=stats["prompt_tokens"], completion_tokens=stats["new_tokens"])
                    chunk.stats = stats
                    done = True
                    self.served += 1
                yield chunk
                if done:
                    return
        finally:
            if not done:
                seq.cancel()  # its slot is freed at the scheduler's next iteration
