"""A deadline for request headers on the HTTP proxy's connections (uvicorn, which Serve's proxy runs, has none).

uvicorn closes idle kept-alive connections, but waits for ever on a connection whose request line and
headers never complete: a client trickling header bytes, or sending `GET /health\\r\\n` and nothing more,
holds a connection, a descriptor and parser state as long as it likes. `patch_uvicorn_header_timeout(s)`
gives each connection `s` seconds from its opening (on a kept-alive connection, from the first byte of each
next request) to complete its headers. One that does not is answered 408 in the OpenAI envelope if it sent
part of a request (silently if it sent nothing), and closed. Bodies have their own deadline at the gateway
(`http.body_timeout_s`).

Applied in Serve's proxy process by its callback (`services.errors.proxy_middlewares`, before it listens),
for both of uvicorn's HTTP implementations; the seconds come from `$KNNSSD_HEADER_TIMEOUT_S` (default 5),
which the proxy inherits from the environment `knnssd serve` (or a pod spec) runs in.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from services.errors import RequestTimeout

log = logging.getLogger(__name__)

HEADER_TIMEOUT_ENV = "KNNSSD_HEADER_TIMEOUT_S"
DEFAULT_HEADER_TIMEOUT_S = 5.0


def header_timeout_s() -> float:
    """The deadline from `$KNNSSD_HEADER_TIMEOUT_S`, else the default (a bad value is logged, not fatal)."""
    raw = os.environ.get(HEADER_TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_HEADER_TIMEOUT_S
    try:
        value = float(raw)
        if value > 0:
            return value
    except ValueError:
        pass
    log.warning("%s=%r is not a positive number of seconds; using %g", HEADER_TIMEOUT_ENV, raw,
                DEFAULT_HEADER_TIMEOUT_S)
    return DEFAULT_HEADER_TIMEOUT_S


def _response_408(timeout_s: float) -> bytes:
    err = RequestTimeout(f"The request line and headers did not arrive within {timeout_s:g}s.", code="header_timeout")
    body = json.dumps(err.envelope()).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)


def _between_requests(proto: Any) -> bool:
    cycle = proto.cycle
    return cycle is None or cycle.response_complete


def _arm(proto: Any) -> None:
    timeout_s = type(proto)._knnssd_header_timeout_s
    proto._knnssd_header_timer = proto.loop.call_later(timeout_s, _expire, proto, timeout_s)


def _disarm(proto: Any) -> None:
    timer = getattr(proto, "_knnssd_header_timer", None)
    if timer is not None:
        timer.cancel()
        proto._knnssd_header_timer = None
    proto._knnssd_header_bytes = 0


def _expire(proto: Any, timeout_s: float) -> None:
    proto._knnssd_header_timer = None
    if proto.transport.is_closing() or not _between_requests(proto):
        return  # gone already, or a request is being answered (its headers completed)
    if proto._knnssd_header_bytes:
        proto.transport.write(_response_408(timeout_s))
    proto.transport.close()


def _wrap(cls: type) -> None:
    made, received, lost = cls.connection_made, cls.data_received, cls.connection_lost

    def connection_made(self, transport) -> None:
        made(self, transport)
        self._knnssd_header_bytes = 0
        _arm(self)

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        if _between_requests(self):  # bytes of the next request's line and headers
            if getattr(self, "_knnssd_header_timer", None) is None:
                _arm(self)
            self._knnssd_header_bytes += len(data)
        received(self, data)
        if self.cycle is not before:  # the parser completed a request's headers (uvicorn made its cycle)
            _disarm(self)

    def connection_lost(self, exc) -> None:
        _disarm(self)
        lost(self, exc)

    cls.connection_made, cls.data_received, cls.connection_lost = connection_made, data_received, connection_lost


def patch_uvicorn_header_timeout(timeout_s: float | None = None) -> float:
    """Give every connection of uvicorn's HTTP/1.1 servers in this process `timeout_s` (default: from the
    environment) to complete its request headers. Idempotent; returns the deadline in force."""
    from uvicorn.protocols.http import h11_impl

    classes = [h11_impl.H11Protocol]
    try:
        from uvicorn.protocols.http import httptools_impl
    except ImportError:  # pragma: no cover - httptools not installed: uvicorn uses h11
        pass
    else:
        classes.append(httptools_impl.HttpToolsProtocol)
    timeout_s = header_timeout_s() if timeout_s is None else float(timeout_s)
    for cls in classes:
        if "_knnssd_header_timeout_s" not in cls.__dict__:
            _wrap(cls)
        cls._knnssd_header_timeout_s = timeout_s
    return timeout_s
