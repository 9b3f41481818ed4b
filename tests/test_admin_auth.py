"""The admin server's token on loopback, and its whole-request deadline, over real HTTP connections.

Both are about the same deployment: the admin port on loopback behind a TLS reverse proxy on the same
host (SECURITY.md §5). Every request the proxy forwards arrives from 127.0.0.1, so loopback cannot be
the reason to skip the token; and every client the proxy passes on can hold one of the server's threads
for as long as it takes to send its request, so that time must be bounded per request, not per read.
"""

from __future__ import annotations

import select
import socket
import time

import pytest
import structlog

from daemon import admin
from daemon.admin import AdminHandlers, AdminServer
from tests.http_helpers import status as _status

PATHS = ("/metrics", "/healthz", "/readyz")


def _server(host: str = "127.0.0.1", **kw) -> AdminServer:
    handlers = AdminHandlers(
        metrics=lambda accept: (b'sacmf_ingest_messages_total{group="g1",sensor="cam-host-1"} 5\n', "text/plain"),
        health=lambda: (True, {}),
        ready=lambda: (True, {"groups": ["g1"]}),
        reload=lambda: (200, {"result": "success"}),
    )
    return AdminServer(host, 0, handlers, **kw).start()


def test_with_a_token_loopback_reads_need_it_too_except_the_public_endpoints() -> None:
    """A proxy on this host forwards internet clients from 127.0.0.1: with a token set, /metrics (every
    sensor and group name) and /readyz answered them all without it. /healthz stays open for local
    probes; an operator who wants /readyz open for a probe lists it in public_endpoints."""
    server = _server(token="s3cret")
    base = f"http://127.0.0.1:{server.address[1]}"
    try:
        assert server.loopback
        assert [_status(base + p) for p in PATHS] == [403, 200, 403]
        assert [_status(base + p, "wrong") for p in PATHS] == [403, 200, 403]
        assert [_status(base + p, "s3cret") for p in PATHS] == [200, 200, 200]
        assert _status(f"{base}/reload", method="POST") == 403 and _status(f"{base}/reload", "s3cret", "POST") == 200
    finally:
        server.stop()

    server = _server(token="s3cret", public_endpoints=("/healthz", "/readyz"))
    base = f"http://127.0.0.1:{server.address[1]}"
    try:
        assert [_status(base + p) for p in PATHS] == [403, 200, 200]
    finally:
        server.stop()

    server = _server()  # no token on loopback: unchanged, every read is open and reload too
    base = f"http://127.0.0.1:{server.address[1]}"
    try:
        assert [_status(base + p) for p in PATHS] == [200, 200, 200]
        assert _status(f"{base}/reload", method="POST") == 200
    finally:
        server.stop()


def _trickle(port: int, request: bytes, gap_s: float) -> tuple[float, bytes]:
    """Send ``request`` one byte every ``gap_s``; (seconds until the server closed or answered, answer)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    start = time.monotonic()
    try:
        for i in range(len(request)):
            try:
                sock.sendall(request[i : i + 1])
            except OSError:  # reset: the server gave up on us
                break
            if _readable(sock):  # answered or closed: stop sending
                break
            time.sleep(gap_s)
        try:
            answer = sock.recv(200)
        except OSError:
            answer = b""
        return time.monotonic() - start, answer
    finally:
        sock.close()


def _readable(sock: socket.socket) -> bool:
    """True once the server has answered or closed (a closed socket reads as readable, with b"")."""
    return bool(select.select([sock], [], [], 0)[0])


@pytest.fixture
def one_second_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    """The admin server's request timeout (10 s in production) at 1 s, so that the test takes seconds."""
    monkeypatch.setattr(admin._Handler, "timeout", 1)


@pytest.mark.usefixtures("one_second_requests")
def test_a_request_trickled_byte_by_byte_is_cut_at_the_whole_request_deadline() -> None:
    """The per-read socket timeout let a client that sends a byte just within it hold a thread for as
    long as it pleased (28 s at a byte per 4 s against a 10 s timeout). Request line, headers and body
    now share one deadline; a prompt request is served as before."""
    server = _server(token="s3cret")
    port = server.address[1]
    try:
        header = b"GET /healthz HTTP/1.0\r\nX-Pad: " + b"a" * 12 + b"\r\n\r\n"  # 40 bytes, 0.1 s apart: 4 s
        held, answer = _trickle(port, header, 0.1)
        assert held < 2.5 and not answer.startswith(b"HTTP/1.0 200"), (held, answer)

        body = b"POST /reload HTTP/1.0\r\nAuthorization: Bearer s3cret\r\nContent-Length: 30\r\n\r\n" + b"x" * 30
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        start = time.monotonic()
        try:
            sock.sendall(body[:-30])  # the headers at once, then the body one byte per 0.1 s
            for i in range(30):
                if _readable(sock):
                    break
                sock.sendall(body[-30 + i : len(body) - 29 + i])
                time.sleep(0.1)
            held = time.monotonic() - start
            with structlog.testing.capture_logs() as logs:
                answer = sock.recv(200)
                time.sleep(0.2)
            # closed without an answer, as the stdlib does on a timeout: not a logged 500 "internal error"
            assert held < 2.5 and answer == b"", (held, answer)
            assert not [e for e in logs if e["log_level"] == "error"], logs
        finally:
            sock.close()

        assert _status(f"http://127.0.0.1:{port}/healthz") == 200  # the server is fine, and prompt requests pass
        held, answer = _trickle(port, b"GET /healthz HTTP/1.0\r\n\r\n", 0.02)  # slow but within the deadline
        assert answer.startswith(b"HTTP/1.0 200"), (held, answer)
    finally:
        server.stop()
