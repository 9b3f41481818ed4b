"""Admin HTTP endpoint: ``/metrics``, ``/healthz``, ``/readyz`` and ``POST /reload``.

Why the stdlib server in a thread: four tiny endpoints do not justify a web framework, and a
``ThreadingHTTPServer`` keeps a slow scraper from blocking a health probe. Why a separate admin port,
bound to 127.0.0.1 by default (daemon.md §2.4): the endpoints expose internals and one of them changes
the served model; exposing them beyond the host is a deliberate configuration change.

``/reload`` is the only endpoint that changes state. It is refused (403) unless the request carries the
configured token (``Authorization: Bearer <token>``), with one exception: when no token is configured
and the server listens on loopback only, local callers may reload without one (the same trust as
sending SIGHUP). Bound beyond loopback without a token, reload over HTTP is always refused. Tokens are
compared in constant time.

With a token configured, every endpoint but ``public_endpoints`` (default ``/healthz`` only: a
liveness probe carries no secret and reveals nothing) needs it, on loopback too: metrics name every
sensor, group and model version, and readiness details describe the daemon's state to whoever asks.
Why loopback is no exception: the TLS reverse proxy SECURITY.md recommends runs on the same host, so
every request it forwards from the internet arrives from 127.0.0.1; a loopback exemption would publish
the endpoints to everyone the proxy serves. Without a token, loopback serves every read endpoint (as
local as the process list) and beyond loopback only the public ones answer. The token travels in clear
over plain HTTP: beyond one host, put a TLS reverse proxy in front (SECURITY.md).

Why a deadline per request rather than only a socket timeout: a timeout bounds each read, so a client
that sends one byte just within it can hold a thread for as long as it likes. The request line, the
headers and the body must all arrive within ``_Handler.timeout`` seconds of the request's start.

Semantics: ``/healthz`` = liveness (the daemon's loops ticked recently; never depends on sensors);
``/readyz`` = readiness (model warm, sockets up, not draining). Both answer 200 or 503 with a JSON body
that says why.
"""

from __future__ import annotations

import contextlib
import hmac
import io
import ipaddress
import json
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog

log = structlog.get_logger("sacmf.admin")

MAX_BODY = 65536
ADMIN_PATHS = ("/metrics", "/healthz", "/readyz", "/reload")
_HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}[A-Za-z0-9])?)*")


@dataclass(frozen=True)
class AdminHandlers:
    """What the endpoints call; each returns quickly except ``reload`` (it loads and warms a model)."""

    metrics: Callable[[str], tuple[bytes, str]]  # Accept header -> (body, content type)
    health: Callable[[], tuple[bool, dict]]
    ready: Callable[[], tuple[bool, dict]]
    reload: Callable[[], tuple[int, dict]]  # -> (HTTP status, JSON body)


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); port 0 asks the kernel for a free one."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"listen address {listen!r} must be host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not _HOST_RE.fullmatch(host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"listen address {listen!r}: {host!r} is neither an IP address nor a host name") from None
    try:
        p = int(port)
    except ValueError:
        raise ValueError(f"listen address {listen!r}: port {port!r} is not a number") from None
    if not 0 <= p <= 65535:
        raise ValueError(f"listen address {listen!r}: port {p} is out of range")
    return host, p


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback address."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung client must not keep the process alive at exit
    handlers: AdminHandlers
    token: str
    loopback: bool
    public: frozenset[str]


class _DeadlineReader(io.RawIOBase):
    """The connection's reads, each given only what is left of the request's deadline.

    ``deadline`` (``time.monotonic()``) is set by the handler when a request starts; a read after it
    raises ``TimeoutError``, which the stdlib handler answers by closing the connection. After each read
    the socket's own timeout is restored, so writing a response is bounded as before, not by the rest.
    """

    def __init__(self, sock: socket.socket, per_read_timeout: float) -> None:
        self._sock = sock
        self._timeout = per_read_timeout
        self.deadline = float("inf")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive within its deadline")
        self._sock.settimeout(min(left, self._timeout))
        try:
            return self._sock.recv_into(buffer)
        finally:
            self._sock.settimeout(self._timeout)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # Seconds for a whole request to arrive (request line, headers and body), not per read: a client that
    # trickles bytes cannot pin a thread for longer than this. Also each read's and write's socket timeout.
    timeout = 10
    server_version = "sacmf-admin"

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the stdlib's buffered socket file: replaced by one that keeps the deadline
        self._reader = _DeadlineReader(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self._reader, self.rbufsize if self.rbufsize > 0 else io.DEFAULT_BUFFER_SIZE)

    def handle_one_request(self) -> None:
        self._reader.deadline = time.monotonic() + self.timeout  # the clock starts with the request line
        super().handle_one_request()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.debug("admin_request", client=self.client_address[0], line=format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj, sort_keys=True).encode() + b"\n", "application/json")

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._guarded(self._get)

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        self._guarded(self._post)

    def _guarded(self, handle: Callable[[], None]) -> None:
        """A bug answering one request is a logged 500, not a dropped connection and a bare traceback
        on stderr (outside the JSON log)."""
        try:
            handle()
        except TimeoutError:  # a client too slow for the request's deadline: the stdlib closes the connection
            raise
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away mid-answer
        except Exception:
            log.exception("admin_request_failed", client=self.client_address[0], path=self.path[:200])
            self.close_connection = True
            with contextlib.suppress(Exception):  # the headers may be out already
                self._json(500, {"error": "internal error (logged)"})

    def _get(self) -> None:
        h = self.server.handlers
        path = self.path.split("?", 1)[0]
        if path in ADMIN_PATHS and not self._may_read(path):
            log.warning("admin_request_refused", client=self.client_address[0], path=path)
            self._json(403, {"error": self._forbidden()})
        elif path == "/metrics":
            body, ctype = h.metrics(self.headers.get("Accept", ""))
            self._send(200, body, ctype)
        elif path == "/healthz":
            ok, detail = h.health()
            self._json(200 if ok else 503, {"status": "ok" if ok else "unhealthy", **detail})
        elif path == "/readyz":
            ok, detail = h.ready()
            self._json(200 if ok else 503, {"status": "ready" if ok else "not_ready", **detail})
        elif path == "/reload":
            self._json(405, {"error": "use POST"})
        else:
            self._json(404, {"error": "not found", "endpoints": ["/metrics", "/healthz", "/readyz", "/reload"]})

    def _post(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            self._json(400, {"error": "Content-Length is not a number"})
            return
        if length > MAX_BODY:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            self._json(413, {"error": f"the body may be at most {MAX_BODY} bytes (it carries nothing)"})
            return
        if length > 0:
            self.rfile.read(length)  # the body carries nothing; read it to keep HTTP sane
        path = self.path.split("?", 1)[0]
        if path != "/reload":
            known = path in ("/metrics", "/healthz", "/readyz")
            self._json(405 if known else 404, {"error": "POST only on /reload"})
            return
        if not self._authorised():
            log.warning("admin_reload_refused", client=self.client_address[0])
            self._json(403, {"error": self._forbidden()})
            return
        status, body = self.server.handlers.reload()
        self._json(status, body)

    def _forbidden(self) -> str:
        if self.server.token:
            return "forbidden: present the configured admin token (Authorization: Bearer ...)"
        # no token to present: a server listening beyond loopback answers only its public endpoints
        return (
            "forbidden: listening beyond loopback without [admin] token, only [admin] public_endpoints answer "
            "(and no POST /reload); set a token, list the endpoint there, or listen on 127.0.0.1"
        )

    def _may_read(self, path: str) -> bool:
        """Public endpoints are open; with a token every other one needs it, loopback or not (a reverse
        proxy on this host makes every remote client look local); without one, loopback only."""
        if path in self.server.public:
            return True
        if self.server.token:
            return self._token_matches()
        return self.server.loopback

    def _authorised(self) -> bool:
        token = self.server.token
        if not token:
            return self.server.loopback
        return self._token_matches()

    def _token_matches(self) -> bool:
        token = self.server.token
        presented = self.headers.get("Authorization", "")
        scheme, _, value = presented.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(value.strip().encode(), token.encode())


class AdminServer:
    """The admin HTTP server in a background thread."""

    def __init__(
        self,
        host: str,
        port: int,
        handlers: AdminHandlers,
        *,
        token: str = "",
        public_endpoints: tuple[str, ...] = ("/healthz",),
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_cls = type("_AdminServer", (_Server,), {"address_family": family})
        self._server: _Server = server_cls((host, port), _Handler)
        self._server.handlers = handlers
        self._server.token = token
        self._server.loopback = is_loopback(host)
        self._server.public = frozenset(public_endpoints) - {"/reload"}
        self._thread: threading.Thread | None = None
        if not self._server.loopback and not token:
            log.warning(
                "admin_token_missing",
                reason="listening beyond loopback without [admin] token: only the public endpoints answer",
                public=sorted(self._server.public),
                host=host,
            )

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def loopback(self) -> bool:
        return self._server.loopback

    def start(self) -> AdminServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="admin-http", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
