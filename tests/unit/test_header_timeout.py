"""Issue 22, finding 5: a connection whose request line and headers do not complete within the deadline is
closed (408 in the envelope when it sent part of a request), on a real uvicorn server over real sockets, for
both of uvicorn's HTTP implementations; requests that complete their headers in time, bodies that follow
slowly and kept-alive connections are not affected. (Serve's proxy gets the same patch from its callback:
tests/integration/test_hardening_second.py checks it there.)"""

from __future__ import annotations

import json
import socket
import time

import pytest

from services import header_timeout
from services.header_timeout import HEADER_TIMEOUT_ENV, patch_uvicorn_header_timeout
from tests.netutil import uvicorn_thread

DEADLINE_S = 0.6


async def app(scope, receive, send):  # answers after reading the whole body
    assert scope["type"] == "http"
    more = True
    while more:
        msg = await receive()
        more = msg.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def patched(monkeypatch):
    """The patch, undone afterwards (it changes uvicorn's protocol classes for the whole process)."""
    from uvicorn.protocols.http import h11_impl, httptools_impl

    for cls in (h11_impl.H11Protocol, httptools_impl.HttpToolsProtocol):
        for name in ("connection_made", "data_received", "connection_lost"):
            monkeypatch.setattr(cls, name, getattr(cls, name))
        monkeypatch.setattr(cls, "_knnssd_header_timeout_s", None, raising=False)
        monkeypatch.delattr(cls, "_knnssd_header_timeout_s")
    assert patch_uvicorn_header_timeout(DEADLINE_S) == DEADLINE_S


@pytest.fixture(params=["httptools", "h11"])
def server(request, patched):
    with uvicorn_thread(app, http=request.param, timeout_keep_alive=30) as port:
        yield port


def closed_after(sock: socket.socket, limit_s: float) -> tuple[float, bytes]:
    """Seconds until the server closed `sock` (reading all it sent), failing after `limit_s`."""
    t0 = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except socket.timeout:
        raise AssertionError(f"still open after {limit_s} s; got {data[:200]!r}") from None
    except ConnectionResetError:
        pass
    return time.monotonic() - t0, data


def test_a_header_trickle_is_closed_with_408(server):
    with socket.create_connection(("127.0.0.1", server)) as s:
        t0 = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for part in (b"X-A: 1\r\n", b"X-B: 2\r\n", b"X-C: 3\r\n"):  # a byte now and then, never the blank line
            time.sleep(DEADLINE_S / 4)
            s.sendall(part)
        _, data = closed_after(s, DEADLINE_S * 10)
        took = time.monotonic() - t0
    assert DEADLINE_S * 0.9 <= took < DEADLINE_S * 5, took
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), data[:200]
    assert json.loads(body)["error"]["code"] == "header_timeout"


def test_a_request_line_without_its_blank_line_is_closed(server):
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(b"GET /health\r\n")  # what the probe sent: it waited 10 s
        took, data = closed_after(s, DEADLINE_S * 10)
    assert took < DEADLINE_S * 5 and (data == b"" or data.startswith(b"HTTP/1.1 4")), data[:200]


def test_a_silent_connection_is_closed_without_an_answer(server):
    with socket.create_connection(("127.0.0.1", server)) as s:
        took, data = closed_after(s, DEADLINE_S * 10)
    assert took < DEADLINE_S * 5 and data == b""


def test_many_trickling_connections_are_all_closed_and_others_served(server):
    socks = [socket.create_connection(("127.0.0.1", server)) for _ in range(30)]
    try:
        for s in socks:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        with socket.create_connection(("127.0.0.1", server)) as ok:
            ok.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            _, data = closed_after(ok, 10)
        assert data.startswith(b"HTTP/1.1 200"), data[:200]
        for s in socks:
            closed_after(s, DEADLINE_S * 10)
    finally:
        for s in socks:
            s.close()


def test_slow_bodies_and_kept_alive_connections_are_not_cut(server):
    with socket.create_connection(("127.0.0.1", server)) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
        time.sleep(DEADLINE_S * 2)  # the headers were complete: only the gateway's body deadline applies
        s.sendall(b"abcd")
        s.settimeout(10)
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(DEADLINE_S * 2)  # idle between requests: the keep-alive timeout's business (30 s here)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        time.sleep(DEADLINE_S / 3)
        s.sendall(b"\r\n")  # the second request's headers complete in time, counted from its first byte
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # a third one that never completes: cut
        _, data = closed_after(s, DEADLINE_S * 10)
    assert data.startswith(b"HTTP/1.1 408"), data[:200]


def test_the_deadline_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(HEADER_TIMEOUT_ENV, "2.5")
    assert header_timeout.header_timeout_s() == 2.5
    monkeypatch.setenv(HEADER_TIMEOUT_ENV, "soon")
    assert header_timeout.header_timeout_s() == header_timeout.DEFAULT_HEADER_TIMEOUT_S
    monkeypatch.delenv(HEADER_TIMEOUT_ENV)
    assert header_timeout.header_timeout_s() == header_timeout.DEFAULT_HEADER_TIMEOUT_S
