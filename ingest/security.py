"""CURVE keys, the ZAP authenticator, per-key group allow-lists and per-sensor rate limits.

Why CURVE: every ZeroMQ endpoint of the daemon is a TCP port; without a security mechanism anyone who
can reach it can read results or inject sensor data. CURVE (libzmq's CurveZMQ, built into the pyzmq
wheel) encrypts each connection and authenticates both ends by long-term key pairs. The side that
binds is the CURVE *server*; connecting sides are *clients* and must know the server's public key, so
a client always knows whom it talks to. Which clients a server admits is decided by ZAP (ZeroMQ RFC 27):
libzmq asks a handler on ``inproc://zeromq.zap.01`` of the socket's *context* about every handshake.
That is why the handler must live in the process (and context) that owns the socket: the daemon's
ingest socket lives in the spawned ingest process, so its handler starts there.

Why our own ZAP handler instead of ``zmq.auth.thread.ThreadAuthenticator``: we need the key's *name*
as the ZAP User-Id (the subscriber reads it from each message to check the group allow-list), denials
counted by a fixed set of reasons and logged at a bounded rate with the peer's address, IP networks
(CIDR) rather than exact addresses, certificate-directory changes picked up without a restart, and the
handshake failures ZAP never sees (a peer without CURVE, a client using the wrong server key), which
only the socket monitor reports. One small thread does all of that. Key files stay in the standard
ZeroMQ certificate format (``zmq.auth.create_certificates`` / ``load_certificate``).

Security properties worth knowing (SECURITY.md has the full threat model):

* A ZAP handler must be running *before* a server socket binds, and ``ZMQ_ZAP_ENFORCE_DOMAIN`` is set,
  so a handshake can never be admitted by default when the handler is missing.
* ZAP runs once per connection. Removing a key from the directory refuses its next handshake but does
  not cut an established connection; restart the daemon to cut them. A removal takes effect whatever
  else is wrong in the directory: a bad file beside it is refused on its own and never keeps, or
  brings back, a key whose file is gone.
* ``inproc://`` endpoints never run a security mechanism (they cannot leave the process); sockets whose
  endpoints are all inproc are left without CURVE.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import zmq
import zmq.auth
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

log = structlog.get_logger("sacmf.security")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"
DOMAIN = "sacmf"
Z85_KEY_LEN = 40

# Why a peer was refused. Fixed: these are Prometheus label values (sacmf_auth_rejected_total{reason}).
AUTH_REJECT_REASONS = (
    "unknown_key",  # a CURVE client whose public key is not in the certificate directory
    "address",  # the peer's IP is denied, or not in a non-empty allow list
    "mechanism",  # a peer without CURVE (NULL/PLAIN) on a CURVE socket: mechanism mismatch
    "handshake",  # a malformed or undecryptable handshake, e.g. a client using the wrong server key
    "bad_request",  # a ZAP request that is not ZAP 1.0 or not CURVE (never sent by a sound libzmq)
    "key_file",  # a certificate in the directory of admitted keys was refused (counted once per file and problem)
)
# monitor events that mean "refused before any data"; ZAP denials arrive as HANDSHAKE_FAILED_AUTH too,
# but those are counted by the handler itself (with the address), so the monitor skips them
_HANDSHAKE_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
_MECHANISM_MISMATCH = zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
# a connecting CURVE socket (we pin the publisher's server key): every way its handshake can fail, and
# the success that ends a run of failures
CLIENT_HANDSHAKE_FAILED = _HANDSHAKE_EVENTS | zmq.EVENT_HANDSHAKE_FAILED_AUTH
CLIENT_HANDSHAKE_EVENTS = CLIENT_HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED


def client_refusal(event: int, value: int) -> tuple[str, str]:
    """(reason, hint) for a failed handshake of a connecting CURVE socket with the publisher it pins."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == _MECHANISM_MISMATCH:
        return "mechanism", "the publisher at this endpoint does not speak CURVE (plaintext, or another mechanism)"
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "handshake", "the publisher refused our key (add our public key to its admitted keys)"
    return "handshake", (
        "the peer at this endpoint did not prove the pinned server key: an impostor, or the wrong key file "
        "pinned in [security] sensor_server_keys"
    )


class KeyFileError(ValueError):
    """A key file or key directory that must not be used; the message names the path and why."""


# ---------------------------------------------------------------- key files


@dataclass(frozen=True)
class KeyPair:
    """A loaded certificate: Z85 public and secret keys, named after its file."""

    name: str
    public: bytes  # Z85, 40 bytes
    secret: bytes  # Z85, 40 bytes
    path: Path

    def __repr__(self) -> str:  # never print a secret key into a log or a traceback
        return f"KeyPair(name={self.name!r}, public={self.public.decode()!r}, path={str(self.path)!r})"


def key_name(path: str | os.PathLike[str]) -> str:
    """``keys/cam1.key`` and ``keys/cam1.key_secret`` are both named ``cam1``."""
    name = Path(path).name
    for suffix in (".key_secret", ".key"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _mode(path: Path) -> int:
    try:
        st = path.stat()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file: {exc.strerror or exc}") from exc
    return stat.S_IMODE(st.st_mode)


def check_secret_file(path: str | os.PathLike[str]) -> None:
    """Refuse a secret key that group or others may read or write.

    A secret key readable by another account lets that account impersonate this party (a sensor, or
    the daemon itself); writable, it can be swapped. ssh refuses loose private keys for the same reason.
    """
    path = Path(path)
    mode = _mode(path)
    if not path.is_file():
        raise KeyFileError(f"{path}: secret key is not a regular file")
    if mode & 0o077:
        raise KeyFileError(
            f"{path}: secret key file has mode {mode:04o}; it must be readable by its owner only "
            f"(fix with: chmod 600 {path})"
        )


def check_public_location(path: str | os.PathLike[str]) -> None:
    """Refuse a public certificate or certificate directory that group or others may write.

    Public keys are not secret, but whoever can add a file to the directory of admitted keys, or
    replace a pinned server key, admits themselves.
    """
    path = Path(path)
    mode = _mode(path)
    if mode & 0o022:
        what = "directory of admitted keys" if path.is_dir() else "public key file"
        raise KeyFileError(
            f"{path}: {what} has mode {mode:04o}; group and others must not be able to write it "
            f"(fix with: chmod go-w {path})"
        )


def _valid_z85(key: bytes | None) -> bool:
    if key is None or len(key) != Z85_KEY_LEN:
        return False
    try:
        z85.decode(key)
    except (ValueError, KeyError, IndexError):
        return False
    return True


def load_secret_certificate(path: str | os.PathLike[str]) -> KeyPair:
    """This party's certificate (``NAME.key_secret``); permissions checked first."""
    path = Path(path)
    _mode(path)  # a missing file is reported as such
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: not a ZeroMQ certificate ({exc})") from exc
    if secret is None:
        raise KeyFileError(f"{path}: holds no secret key (a public .key file? use NAME.key_secret)")
    check_secret_file(path)
    if not (_valid_z85(public) and _valid_z85(secret)):
        raise KeyFileError(f"{path}: keys are not 40-character Z85 strings")
    return KeyPair(key_name(path), public, secret, path)


def load_public_certificate(path: str | os.PathLike[str]) -> bytes:
    """A peer's public key (Z85) from its certificate file (``NAME.key``)."""
    path = Path(path)
    check_public_location(path)
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: not a ZeroMQ certificate ({exc})") from exc
    if not _valid_z85(public):
        raise KeyFileError(f"{path}: public key is not a 40-character Z85 string")
    return public


def _check_key_directory(directory: Path) -> None:
    if not directory.is_dir():
        raise KeyFileError(f"{directory}: not a directory of public certificates")
    check_public_location(directory)


def scan_checked_directory(directory: str | os.PathLike[str]) -> tuple[dict[bytes, str], dict[str, str]]:
    """:func:`scan_authorized_keys` of a directory that must itself be sound (raises KeyFileError if not)."""
    _check_key_directory(Path(directory))
    return scan_authorized_keys(directory)


def scan_authorized_keys(
    directory: str | os.PathLike[str], previous: Mapping[bytes, str] | None = None
) -> tuple[dict[bytes, str], dict[str, str]]:
    """(public key -> name for every ``*.key`` that loads, path -> why for every one that does not).

    Never raises for one file: the ZAP handler re-reads the directory while serving, and one bad file
    must neither admit nor lock out any other key. Two files with one key are ambiguous (a key has one
    name, the one its groups are granted to): the file that already held that key under its name in
    ``previous`` keeps it and the other is refused; with no such file both are refused.
    """
    directory = Path(directory)
    previous = previous or {}
    found: dict[bytes, list[str]] = {}
    problems: dict[str, str] = {}
    for cert in sorted(directory.glob("*.key")):
        try:
            public = load_public_certificate(cert)
        except KeyFileError as exc:
            problems[str(cert)] = str(exc)
            continue
        found.setdefault(public, []).append(key_name(cert))
    keys: dict[bytes, str] = {}
    for public, names in found.items():
        if len(names) == 1:
            keys[public] = names[0]
            continue
        keep = previous.get(public) if previous.get(public) in names else None
        if keep is not None:
            keys[public] = keep
        for name in names:
            if name != keep:
                others = ", ".join(f"{n}.key" for n in names if n != name)
                problems[str(directory / f"{name}.key")] = f"same public key as {others}; a key must have one name"
    return keys, problems


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class CurveConfig:
    """How one side of a ZeroMQ connection uses CURVE (paths, not keys: loading checks permissions).

    Binding sockets are CURVE servers and admit the clients in ``authorized_dir``; connecting sockets
    are clients and pin the server's public key: ``server_keys[endpoint]``, else ``server_key``.
    """

    secret_file: Path  # this side's certificate, NAME.key_secret (mode 0600)
    authorized_dir: Path | None = None  # server side: directory of admitted client certificates (*.key)
    server_key: Path | None = None  # client side: the server's public certificate (NAME.key)
    server_keys: Mapping[str, Path] = field(default_factory=dict)  # client side, per endpoint
    allow_ips: tuple[str, ...] = ()  # server side: only these IPs/networks (CIDR) may connect; () = any
    deny_ips: tuple[str, ...] = ()  # server side: never these (checked first)
    # sensor input: key name or Z85 public key -> groups that key may publish into; {} = any group
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    log_interval_s: float = 10.0

    def server_key_for(self, endpoint: str) -> Path:
        path = self.server_keys.get(endpoint, self.server_key)
        if path is None:
            raise KeyFileError(f"no server public key configured for {endpoint} (CURVE clients must pin one)")
        return path


def uses_curve(curve: CurveConfig | None, endpoints: Iterable[str]) -> bool:
    """inproc endpoints never run a security mechanism: CURVE only matters for the others."""
    return curve is not None and any(not ep.startswith("inproc://") for ep in endpoints)


# ---------------------------------------------------------------- sockets


def make_server(sock: zmq.Socket, keys: KeyPair, domain: str = DOMAIN) -> None:
    """CURVE server options; set before bind. The ZAP domain routes handshakes to our handler."""
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt_string(zmq.ZAP_DOMAIN, domain)
    sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no handler must mean "refused", never "admitted"


def make_client(sock: zmq.Socket, keys: KeyPair, server_public: bytes) -> None:
    """CURVE client options; libzmq copies them at ``connect``, so each endpoint may pin its own server."""
    sock.setsockopt(zmq.CURVE_SERVER, 0)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.public)
    sock.setsockopt(zmq.CURVE_SERVERKEY, server_public)


def connect_pinned(sock: zmq.Socket, keys: KeyPair, curve: CurveConfig, endpoint: str) -> str:
    """Connect as a CURVE client to ``endpoint`` pinned to its server key; returns the key's name."""
    path = curve.server_key_for(endpoint)
    make_client(sock, keys, load_public_certificate(path))
    sock.connect(endpoint)
    return key_name(path)


# ---------------------------------------------------------------- logging


class _BoundedLog:
    """At most one line per key per interval; keys must come from a bounded set (reasons, key names)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def __call__(self, level: str, event: str, slot: str, **fields: object) -> None:
        now = time.monotonic()
        last = self._last.get(slot)
        if last is not None and now - last < self.interval_s:
            self._suppressed[slot] += 1
            return
        self._last[slot] = now
        getattr(log, level)(event, suppressed=self._suppressed.pop(slot, 0), **fields)


# ---------------------------------------------------------------- ZAP


def parse_networks(specs: Iterable[str], what: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for spec in specs:
        try:
            out.append(ipaddress.ip_network(spec, strict=False))
        except ValueError as exc:
            raise ValueError(f"{what}: {spec!r} is not an IP address or network ({exc})") from None
    return tuple(out)


class ZapHandler:
    """The ZAP handler of one ZeroMQ context, in a thread: admits client keys from a directory.

    Usage, in the thread that owns the server socket: ``h = ZapHandler(ctx, dir)``, ``h.watch(sock)``,
    ``h.start()``, then ``sock.bind(...)``; ``h.stop()`` after closing the socket. Admitted peers get
    their key's name as ZAP User-Id (``frame.get("User-Id")`` on every message they send). Refusals are
    counted in ``rejected`` (keys: ``AUTH_REJECT_REASONS``) and logged at most once per reason per
    ``log_interval_s``, with the peer's address where libzmq gives one (ZAP requests carry it; monitor
    events of failed handshakes carry only the local endpoint).
    """

    def __init__(
        self,
        ctx: zmq.Context,
        authorized_dir: str | os.PathLike[str],
        *,
        allow_ips: Iterable[str] = (),
        deny_ips: Iterable[str] = (),
        log_interval_s: float = 10.0,
        socket_name: str = "ingest",
        domain: str = DOMAIN,
    ) -> None:
        self.ctx = ctx
        self.directory = Path(authorized_dir)
        self.allow = parse_networks(allow_ips, "allow_ips")
        self.deny = parse_networks(deny_ips, "deny_ips")
        self.socket_name = socket_name
        self.domain = domain.encode()
        self.refused_files: dict[str, str] = {}  # path -> why, for files the last reading refused
        self.rejected: Counter[str] = Counter(dict.fromkeys(AUTH_REJECT_REASONS, 0))  # fixed keys: safe to copy
        self.admitted = 0
        self._log = _BoundedLog(log_interval_s)
        # public key -> name. Raises on a bad directory; a bad file in it is refused on its own, as when the
        # directory is re-read while serving: a stray file must not stop a restart for every other key.
        self.keys, problems = scan_checked_directory(self.directory)
        self._report_files(problems)
        self._monitors: list[zmq.Socket] = []
        self._watched: list[zmq.Socket] = []
        self._zap: zmq.Socket | None = None
        self._wake_endpoint = f"inproc://sacmf-zap-stop-{id(self)}"
        self._wake: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle --------------------------------------------------------------------------------

    def watch(self, sock: zmq.Socket) -> None:
        """Count the handshake failures ZAP never sees on ``sock`` (call before ``start``)."""
        if self._thread is not None:
            raise RuntimeError("watch() sockets before start()")
        self._monitors.append(sock.get_monitor_socket(_HANDSHAKE_EVENTS))
        self._watched.append(sock)

    def start(self) -> ZapHandler:
        zap = self.ctx.socket(zmq.REP)
        zap.setsockopt(zmq.LINGER, 0)
        try:
            zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            zap.close()
            raise RuntimeError(
                "a ZAP handler already runs on this ZeroMQ context; use one handler (one context) per "
                f"CURVE server socket owner ({exc})"
            ) from exc
        self._zap = zap
        inbox = self.ctx.socket(zmq.PAIR)
        inbox.setsockopt(zmq.LINGER, 0)
        inbox.bind(self._wake_endpoint)
        self._wake = self.ctx.socket(zmq.PAIR)
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.connect(self._wake_endpoint)
        self._thread = threading.Thread(target=self._run, args=(inbox,), name=f"zap-{self.socket_name}", daemon=True)
        self._thread.start()
        log.info("curve_authenticator_started", socket=self.socket_name, keys=sorted(self.keys.values()))
        return self

    def stop(self) -> None:
        if self._thread is None or self._stopping.is_set():
            return
        self._stopping.set()
        assert self._wake is not None
        self._wake.send(b"stop")
        self._thread.join(5)
        self._wake.close()
        for sock in self._watched:
            if not sock.closed:
                with contextlib.suppress(zmq.ZMQError):
                    sock.disable_monitor()

    # -- the thread -------------------------------------------------------------------------------

    def _run(self, inbox: zmq.Socket) -> None:
        zap = self._zap
        assert zap is not None
        poller = zmq.Poller()
        poller.register(inbox, zmq.POLLIN)
        poller.register(zap, zmq.POLLIN)
        for m in self._monitors:
            poller.register(m, zmq.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if inbox in ready:
                    return
                if zap in ready:
                    zap.send_multipart(self._answer_safely(zap.recv_multipart()))
                for m in self._monitors:
                    if m in ready:
                        self._on_monitor(m)
        except zmq.ZMQError as exc:  # context terminated under us: nothing left to guard
            if exc.errno != zmq.ETERM:
                log.exception("zap_handler_failed", socket=self.socket_name)
        finally:
            inbox.close(linger=0)
            zap.close(linger=0)
            for m in self._monitors:
                m.close(linger=0)

    def _on_monitor(self, m: zmq.Socket) -> None:
        while True:
            try:
                event = parse_monitor_message(m.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and event["value"] == _MECHANISM_MISMATCH:
                reason, hint = "mechanism", "a peer without CURVE (or another mechanism) tried to connect"
            else:
                reason, hint = "handshake", "a CURVE handshake failed (wrong server key, or not ZeroMQ)"
            self._refuse(reason, event["endpoint"].decode(errors="replace"), hint=hint, address_known=False)

    def _refresh_keys(self) -> None:
        """Pick up added, removed or rewritten certificates without a restart: the directory is read
        again at every ZAP request. That costs a file read per key, but a request needs a complete
        CURVE handshake first, and comparing timestamps instead would miss a file rewritten in place
        within the filesystem's timestamp granularity. A refused client does not retry on its own.

        Why file by file: revoking is deleting a file, and a revocation must never depend on the rest
        of the directory being in order (an operator adding a key with a loose umask while deleting
        another must not keep the deleted one admitted). So a key is admitted only while its own file,
        under its name, loads cleanly now; a bad file is refused and reported on its own (logged, and
        counted as ``reason="key_file"``) and costs the other keys nothing. A directory others may write
        cannot be trusted to add keys: then no key is added, but removals and rewrites still apply."""
        previous = self.keys
        try:
            _check_key_directory(self.directory)
            os.listdir(self.directory)  # unreadable: glob would see no file at all, silently
        except (KeyFileError, OSError) as exc:
            keys, problems = scan_authorized_keys(self.directory, previous)
            keys = {public: name for public, name in keys.items() if previous.get(public) == name}  # no additions
            problems[str(self.directory)] = f"{exc} (no key is added until it is fixed; removals still apply)"
        else:
            keys, problems = scan_authorized_keys(self.directory, previous)
        self._report_files(problems)
        if keys != previous:
            log.info("curve_keys_reloaded", socket=self.socket_name, keys=sorted(keys.values()))
            self.keys = keys

    def _report_files(self, problems: dict[str, str]) -> None:
        for path, error in problems.items():
            if self.refused_files.get(path) != error:  # once per file and problem: bounded by file changes
                self.rejected["key_file"] += 1
                log.error("curve_key_file_refused", socket=self.socket_name, file=path, error=error)
        self.refused_files = problems

    def _address_allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:  # ipc peers have no IP; an IP rule then cannot admit them
            return not self.allow
        if any(ip in net for net in self.deny):
            return False
        return not self.allow or any(ip in net for net in self.allow)

    def _answer_safely(self, request: list[bytes]) -> list[bytes]:
        """A bug here must neither kill the thread (every later handshake would hang) nor admit anyone."""
        try:
            return self.answer(request)
        except Exception:
            log.exception("zap_request_failed", socket=self.socket_name)
            request_id = request[1] if len(request) > 1 else b""
            return [ZAP_VERSION, request_id, b"500", b"internal error", b"", b""]

    def answer(self, request: list[bytes]) -> list[bytes]:
        """One ZAP reply (RFC 27) for one request; the key's name is the User-Id of an admitted peer."""
        if len(request) < 2:
            request = [*request, b""][:2]
        version, request_id = request[0], request[1]
        if len(request) < 7 or version != ZAP_VERSION or request[5] != b"CURVE" or len(request[6]) != 32:
            self._refuse("bad_request", "", hint="not a ZAP 1.0 CURVE request")
            return [ZAP_VERSION, request_id, b"400", b"bad request", b"", b""]
        address = request[3].decode(errors="replace")
        if not self._address_allowed(address):
            self._refuse("address", address, hint="address denied or not in allow_ips")
            return [ZAP_VERSION, request_id, b"400", b"address not allowed", b"", b""]
        self._refresh_keys()
        public = z85.encode(request[6])
        name = self.keys.get(public)
        if name is None:
            hint = "public key not in the directory of admitted keys"
            if self.refused_files:  # the operator may have meant to admit it: point at the refused files
                hint += f" ({len(self.refused_files)} refused file(s) there: see curve_key_file_refused)"
            self._refuse("unknown_key", address, hint=hint, key=public)
            return [ZAP_VERSION, request_id, b"400", b"unknown key", b"", b""]
        self.admitted += 1
        self._log("info", "curve_peer_admitted", f"ok:{name}", socket=self.socket_name, key=name, address=address)
        return [ZAP_VERSION, request_id, b"200", b"OK", name.encode(), b""]

    def _refuse(self, reason: str, address: str, *, hint: str, address_known: bool = True, key: bytes = b"") -> None:
        self.rejected[reason] += 1
        fields: dict[str, object] = {"socket": self.socket_name, "reason": reason, "hint": hint}
        fields["address" if address_known else "local_endpoint"] = address
        if key:
            fields["public_key"] = key.decode()
        self._log("warning", "curve_peer_rejected", reason, total=self.rejected[reason], **fields)


def user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id of the peer that sent ``frame`` (received with copy=False), or None."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:  # no ZAP handler admitted this peer: the property does not exist
        return None


# ---------------------------------------------------------------- group allow-lists


def resolve_groups(
    grants: Mapping[str, Iterable[str]],
    known: Mapping[bytes, str],
    refused: Mapping[bytes, Sequence[str]] | None = None,
) -> dict[str, frozenset[bytes]]:
    """Key name -> topic groups (bytes) it may publish into; grants name keys by name or Z85 public key.

    ``known`` maps the public keys this side knows to their names. A grant for a Z85 key nobody knows
    is an error (a typo must not pass silently); a grant for an unknown *name* is kept (its
    certificate may be added to the directory later without a restart). A Z85 key held only by refused
    certificate files (``refused``, from :func:`refused_key_names`) is no typo: the grant goes to each of
    their names, and applies once a file is fixed (until then ZAP admits none of them).
    """
    by_key = {k.decode(): n for k, n in known.items()}
    refused_by_key = {k.decode(): names for k, names in (refused or {}).items()}
    out: dict[str, frozenset[bytes]] = {}
    for who, groups in grants.items():
        names = [who]
        if len(who) == Z85_KEY_LEN and _valid_z85(who.encode()) and who not in set(known.values()):
            if who in by_key:
                names = [by_key[who]]
            elif who in refused_by_key:
                names = list(refused_by_key[who])
            else:
                raise KeyFileError(f"public key {who} is not among the known keys")
        for name in names:
            out[name] = out.get(name, frozenset()) | frozenset(g.encode() for g in groups)
    return out


def refused_key_names(problems: Mapping[str, str]) -> dict[bytes, list[str]]:
    """Public key -> names of the refused certificate files (``problems``, path -> why, as
    :func:`scan_authorized_keys` reports them) that hold it (loose mode, a second file with the same
    key): the key can be read, only not trusted yet."""
    out: dict[bytes, list[str]] = {}
    for path in problems:
        try:
            public, _ = zmq.auth.load_certificate(path)
        except (OSError, ValueError):  # not a certificate at all: no key to grant
            continue
        if public and _valid_z85(public):
            out.setdefault(public, []).append(key_name(path))
    return out


# ---------------------------------------------------------------- rate limits


@dataclass(frozen=True)
class RateLimit:
    """A token bucket per sensor: 0 disables that dimension; the burst is ``burst_s`` seconds of rate."""

    messages_per_s: float = 0.0
    bytes_per_s: float = 0.0
    burst_s: float = 1.0

    def __post_init__(self) -> None:
        if self.messages_per_s < 0 or self.bytes_per_s < 0:
            raise ValueError("rates must be >= 0 (0 = unlimited)")
        if self.burst_s <= 0:
            raise ValueError("burst_s must be > 0")

    @property
    def enabled(self) -> bool:
        return self.messages_per_s > 0 or self.bytes_per_s > 0


class TokenBucket:
    """Messages/s and bytes/s with bursts; admits or refuses one message at a time.

    Times must come from a monotonic clock (``time.monotonic_ns``), never the wall clock: a wall clock
    stepped back (NTP, a VM resumed) would refill nothing until it caught up again, starving every
    limited sensor for as long as the step.

    A message needs one message token and a non-negative byte balance; its size is then charged, so
    a message larger than the byte burst is still admitted (it pays back over time) instead of being
    refused forever. Refusals cost nothing: a flood spends no tokens and the sensor recovers at the
    configured rate as soon as it slows down.
    """

    __slots__ = ("msg_rate", "byte_rate", "msg_cap", "byte_cap", "msgs", "bytes", "last_ns", "dropped", "dropped_bytes")

    def __init__(self, limit: RateLimit, now_ns: int) -> None:
        self.msg_rate = limit.messages_per_s / 1e9  # tokens per ns
        self.byte_rate = limit.bytes_per_s / 1e9
        self.msg_cap = max(1.0, limit.messages_per_s * limit.burst_s) if limit.messages_per_s else 0.0
        self.byte_cap = limit.bytes_per_s * limit.burst_s
        self.msgs = self.msg_cap
        self.bytes = self.byte_cap
        self.last_ns = now_ns
        self.dropped = 0
        self.dropped_bytes = 0

    def admit(self, nbytes: int, now_ns: int) -> bool:
        elapsed = now_ns - self.last_ns
        if elapsed > 0:  # defensive: a time earlier than the last refills nothing and is not remembered
            self.last_ns = now_ns
            if self.msg_rate:
                self.msgs = min(self.msg_cap, self.msgs + elapsed * self.msg_rate)
            if self.byte_rate:
                self.bytes = min(self.byte_cap, self.bytes + elapsed * self.byte_rate)
        if (self.msg_rate and self.msgs < 1.0) or (self.byte_rate and self.bytes < 0.0):
            self.dropped += 1
            self.dropped_bytes += nbytes
            return False
        if self.msg_rate:
            self.msgs -= 1.0
        if self.byte_rate:
            self.bytes -= nbytes
        return True


class RateLimiter:
    """Per-sensor buckets, found by the message's topic frame (one dict lookup, before any decoding).

    Why before decoding: a flooding sensor must cost as little as possible, so that the worker keeps
    up with its neighbours; its excess is dropped before the header is parsed or the payload checked.
    All kinds of one sensor (data and heartbeats) share its bucket.
    """

    def __init__(self, limits: Mapping[str, RateLimit], kinds: Iterable[str], now_ns: int) -> None:
        self.buckets: dict[str, TokenBucket] = {}  # "group/sensor" -> bucket
        self._by_topic: dict[bytes, TokenBucket] = {}
        for key, limit in limits.items():
            if not limit.enabled:
                continue
            bucket = TokenBucket(limit, now_ns)
            self.buckets[key] = bucket
            for kind in kinds:
                self._by_topic[f"{kind}/{key}".encode()] = bucket

    def __bool__(self) -> bool:
        return bool(self.buckets)

    def admit(self, frames: list, now_ns: int, extra_bytes: int = 0) -> bool:
        """False when the message's sensor is over its limit; unknown topics pass here (the worker
        refuses them by topic before decoding, under an ``UnroutedLimiter``). ``extra_bytes``: what the
        frames beyond the kept ones carried; every received byte is charged, kept or not, or a message
        of many frames would pass ``bytes_per_s``. ``now_ns`` must come from a monotonic clock."""
        bucket = self._by_topic.get(frames[0]) if frames else None
        if bucket is None:
            return True
        return bucket.admit(sum(map(len, frames)) + extra_bytes, now_ns)


class UnroutedLimiter:
    """Messages whose topic names no configured sensor: one bucket per configured group, one shared by
    every unknown group (attacker-chosen names must not create buckets: the set of keys is fixed).

    Why a limit of their own: such messages are refused by topic before decoding, so what they still
    cost is the dead-letter record and its disk; without a bucket a flooder that renames its sensor
    would escape its own limit and fill the dead-letter file. Messages over this limit are counted
    (reason ``unknown_sensor`` / ``unknown_group`` as any other, and in the bucket) but not written.
    The limit is fixed (``LIMIT``): these messages are never useful data, only evidence of a misconfigured
    or misbehaving sender, and a few per second per group show what is wrong.
    """

    LIMIT = RateLimit(messages_per_s=10.0, burst_s=1.0)
    ANY = "*"  # the sensor label of a group's bucket, and the group label of the unknown groups' bucket

    def __init__(self, groups: Iterable[str], now_ns: int) -> None:
        self.buckets: dict[str, TokenBucket] = {f"{g}/{self.ANY}": TokenBucket(self.LIMIT, now_ns) for g in groups}
        self._unknown_groups = self.buckets[f"{self.ANY}/{self.ANY}"] = TokenBucket(self.LIMIT, now_ns)

    def admit(self, group: str, nbytes: int, now_ns: int) -> bool:
        """True while ``group``'s unrouted messages are within the limit (``now_ns``: monotonic)."""
        bucket = self.buckets.get(f"{group}/{self.ANY}", self._unknown_groups)
        return bucket.admit(nbytes, now_ns)


# ---------------------------------------------------------------- metrics


class RateLimitCollector(Collector):
    """``sacmf_ingest_rate_limited_{messages,bytes}_total{group,sensor}`` from the workers' limiters
    (an ``UnroutedLimiter``'s buckets appear as ``sensor="*"``, and ``group="*"`` for unknown groups)."""

    def __init__(self, limiters: Callable[[], Iterable[RateLimiter | UnroutedLimiter | None]]) -> None:
        self._limiters = limiters

    def collect(self) -> Iterable[Metric]:
        labels = ["group", "sensor"]
        msgs = CounterMetricFamily(
            "sacmf_ingest_rate_limited_messages", "Messages dropped by the sensor's rate limit", labels=labels
        )
        nbytes = CounterMetricFamily(
            "sacmf_ingest_rate_limited_bytes", "Bytes dropped by the sensor's rate limit", labels=labels
        )
        for limiter in self._limiters():
            if limiter is None:
                continue
            for key, b in limiter.buckets.items():
                values = key.split("/", 1)
                msgs.add_metric(values, b.dropped)
                nbytes.add_metric(values, b.dropped_bytes)
        yield msgs
        yield nbytes


class AuthCollector(Collector):
    """``sacmf_auth_rejected_total{socket,reason}``: refused peers per CURVE socket, every reason listed."""

    def __init__(self, read: Callable[[], Mapping[str, Mapping[str, int]]]) -> None:
        self._read = read  # socket name -> reason -> count

    def collect(self) -> Iterable[Metric]:
        fam = CounterMetricFamily(
            "sacmf_auth_rejected",
            "Peers refused by CURVE/ZAP, and refused key files (reason key_file), by socket and reason",
            labels=["socket", "reason"],
        )
        for sock, counts in sorted(self._read().items()):
            for reason in AUTH_REJECT_REASONS:
                fam.add_metric([sock, reason], counts.get(reason, 0))
        yield fam


def socket_securer(
    curve: CurveConfig | None, socket_name: str
) -> Callable[[zmq.Context, zmq.Socket, str, bool], ZapHandler | None]:
    """A function that secures and opens a socket built elsewhere (the results PUB in sinks/): plain
    bind/connect when CURVE is off for its endpoint; bound, a CURVE server whose readers ZAP admits from
    ``curve.authorized_dir``; connected, a client pinned to the server's key."""

    def secure(ctx: zmq.Context, sock: zmq.Socket, endpoint: str, bind: bool) -> ZapHandler | None:
        if curve is None or not uses_curve(curve, [endpoint]):
            (sock.bind if bind else sock.connect)(endpoint)
            return None
        keys = load_secret_certificate(curve.secret_file)
        if not bind:
            connect_pinned(sock, keys, curve, endpoint)
            return None
        if curve.authorized_dir is None:
            raise KeyFileError(f"a CURVE {socket_name} socket that binds needs a directory of reader keys")
        auth = ZapHandler(
            ctx,
            curve.authorized_dir,
            allow_ips=curve.allow_ips,
            deny_ips=curve.deny_ips,
            log_interval_s=curve.log_interval_s,
            socket_name=socket_name,
        )
        make_server(sock, keys)
        auth.watch(sock)
        auth.start()  # before bind: no reader may connect unchecked
        try:
            sock.bind(endpoint)
        except zmq.ZMQError:
            auth.stop()
            raise
        return auth

    return secure
