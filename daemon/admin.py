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

Bound beyond loopback, the read endpoints need the token too, except ``public_endpoints`` (default
``/healthz`` only: a liveness probe carries no secret and reveals nothing): metrics name every sensor,
group and model version, and readiness details describe the daemon's state to whoever asks. Without a
configured token they are then refused. The token travels in clear over plain HTTP: beyond one host,
put a TLS reverse proxy in front (SECURITY.md).

Semantics: ``/healthz`` = liveness (the daemon's loops ticked recently; never depends on sensors);
``/readyz`` = readiness (model warm, sockets up, not draining). Both answer 200 or 503 with a JSON body
that says why.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import re
import socket
import threading
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


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # seconds per request: a stalled client cannot pin a thread forever
    server_version = "sacmf-admin"

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
        h = self.server.handlers
        path = self.path.split("?", 1)[0]
        if path in ADMIN_PATHS and not self._may_read(path):
            log.warning("admin_request_refused", client=self.client_address[0], path=path)
            self._json(403, {"error": "forbidden: present the configured admin token (Authorization: Bearer ...)"})
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

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
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
            self._json(403, {"error": "forbidden: present the configured admin token (Authorization: Bearer ...)"})
            return
        status, body = self.server.handlers.reload()
        self._json(status, body)

    def _may_read(self, path: str) -> bool:
        """On loopback everything but /reload is open (as local as the process list); beyond it, the token."""
        if self.server.loopback or path in self.server.public:
            return True
        return bool(self.server.token) and self._token_matches()

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
