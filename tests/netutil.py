"""Real sockets in tests: an ASGI app served by uvicorn in a thread on a free localhost port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from router.redis_server import free_port

START_TIMEOUT_S = 10.0


@contextmanager
def uvicorn_thread(app: Any, **config: Any) -> Iterator[int]:
    """Serve `app` with uvicorn on a free 127.0.0.1 port in a daemon thread; yields the port once the server
    has started and stops the server (joining its thread) on exit. `config` goes to `uvicorn.Config`
    (`log_level="warning"` and `lifespan="off"` unless it says otherwise)."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                        **{"log_level": "warning", "lifespan": "off", **config}))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not srv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        yield port
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
