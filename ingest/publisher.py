"""Publisher library for sensor hosts: speaks protocol v1 correctly so that sensor code need not.

What it takes care of: a random 64-bit session drawn at start (so the daemon can tell a restart from
a gap), per-sensor sequence numbers starting at 0, the exact header layout, little-endian C-order
payloads, zero-copy sends of large frames, and a heartbeat per sensor at least every second from a
background thread (so that tail loss and silent sensors are visible even when no data flows).

ZeroMQ sockets are not thread-safe; the heartbeat thread and the caller share the socket under a lock.

CURVE (SECURITY.md): give ``curve_secret`` (this sensor's ``NAME.key_secret`` from ``sacmf keygen``).
Connecting, also ``curve_server_public`` (the daemon's ``.key``): the daemon is the CURVE server and
admits this sensor's public key. Binding, this publisher is the server: ``curve_clients`` is the
directory of the public keys it admits (the daemon's), checked by a ZAP handler in a context of its own.
"""

from __future__ import annotations

import operator
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zmq

from ingest import protocol, security

ZERO_COPY_BYTES = 65536  # pyzmq sends frames of at least this size without copying when copy=False
# What a send is checked against: the protocol itself; the size and finiteness limits are the daemon's
# configuration, not known here.
_SEND_CHECK = protocol.Limits(max_message_bytes=2**62, reject_non_finite=False, max_image_side=2**31 - 1)


def _ns(name: str, value: object) -> int:
    """An integer number of ns (numpy integers too); a clear error names the argument otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer number of ns, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[call-overload]
    except TypeError:
        raise ValueError(f"{name} must be an integer number of ns, got {value!r}") from None


class SensorPublisher:
    """Publishes the sensors of one group on one socket.

    ``socket_type`` is "pub" for live feeds (never blocks the sensor; a slow subscriber loses data,
    which the daemon counts from the sequence numbers) or "push" for lossless replay (blocks when
    the receiver is behind). Arrays handed to ``send_*`` must not be modified afterwards: large ones
    are sent without a copy.

    ``check`` runs the daemon's own decoder over every message before it is sent (about 9 µs each, as
    much again as the send): a message it would reject raises ValueError at the call instead of being
    sent, rejected and counted as lost. Load generators that send known-good messages turn it off.

    ``send_timeout_ms`` bounds how long a send may block (a PUSH socket whose peer is gone or behind,
    once ``sndhwm`` messages are queued): the send then raises TimeoutError, nothing is sent and no seq
    is used, so the caller can retry, drop (a counted gap) or stop. None blocks for as long as it takes,
    which is what a lossless replay wants. A PUB socket never blocks.

    ``session`` with ``next_seq`` resumes a session on a new socket: a host that re-creates its socket
    (network change, reconnect) without restarting keeps its session and numbering, so the daemon sees
    neither a restart nor a gap. Pass the old publisher's ``session`` and ``next_seq``.
    """

    def __init__(
        self,
        endpoint: str | list[str],
        group: str,
        sensors: dict[str, str],
        *,
        bind: bool = True,
        socket_type: str = "pub",
        context: zmq.Context | None = None,
        heartbeat_interval: float = 0.5,
        clock: Callable[[], int] = time.time_ns,
        sndhwm: int = 1000,
        session: int | None = None,
        next_seq: dict[str, int] | None = None,
        curve_secret: str | Path | None = None,
        curve_server_public: str | Path | None = None,
        curve_clients: str | Path | None = None,
        check: bool = True,
        send_timeout_ms: int | None = None,
    ) -> None:
        if not protocol.NAME_RE.match(group):
            raise ValueError(f"group name {group!r} must match [A-Za-z0-9_.-]{{1,64}}")
        for name, kind in sensors.items():
            if not protocol.NAME_RE.match(name):
                raise ValueError(f"sensor name {name!r} must match [A-Za-z0-9_.-]{{1,64}}")
            if kind not in protocol.DATA_KINDS:
                raise ValueError(f"sensor {name!r}: kind must be 'img' or 'rad', not {kind!r}")
        if send_timeout_ms is not None and (
            isinstance(send_timeout_ms, bool) or not isinstance(send_timeout_ms, int) or not 0 < send_timeout_ms < 2**31
        ):
            raise ValueError(f"send_timeout_ms must be a positive int of ms (or None), got {send_timeout_ms!r}")
        if not 0 < heartbeat_interval <= 1.0:
            raise ValueError("heartbeat_interval must be in (0, 1] seconds (the protocol requires >= 1 Hz)")
        self.group = group
        self.kinds = dict(sensors)
        self.check = check
        if session is not None and (
            isinstance(session, bool) or not isinstance(session, int) or not 0 <= session < 2**64
        ):
            raise ValueError(f"session must be an int in 0..2^64-1, got {session!r}")
        self.session = secrets.randbits(64) if session is None else session
        self._clock = clock
        self._next_seq = {name: 0 for name in sensors}
        if next_seq is not None:
            if session is None:
                raise ValueError("next_seq resumes a session: give the session too")
            for name, seq in next_seq.items():
                if name not in sensors:
                    raise ValueError(f"next_seq: sensor {name!r} is not configured")
                if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**64:
                    raise ValueError(f"next_seq: seq of {name!r} must be an int in 0..2^64-1, got {seq!r}")
                self._next_seq[name] = seq
        self._topics = {(k, n): protocol.topic(k, group, n) for n, kind in sensors.items() for k in (kind, "hb")}
        kinds = {"pub": zmq.PUB, "push": zmq.PUSH}
        if socket_type not in kinds:
            raise ValueError(f"socket_type must be 'pub' or 'push', not {socket_type!r}")
        endpoints = [endpoint] if isinstance(endpoint, str) else list(endpoint)
        keys = security.load_secret_certificate(curve_secret) if curve_secret is not None else None
        if keys is None and (curve_server_public is not None or curve_clients is not None):
            raise ValueError("curve_server_public / curve_clients need curve_secret (this sensor's key pair)")
        # Without a context from the caller the publisher owns one and terminates it in close(), which
        # waits (up to the 2 s linger) until queued messages are out: with the shared global instance a
        # script that closes and exits lost what was still queued. A ZAP handler needs its own anyway.
        self._own_ctx = context is None
        self._ctx = zmq.Context() if self._own_ctx else context
        self._auth: security.ZapHandler | None = None
        self._sock = self._ctx.socket(kinds[socket_type])
        self._sock.setsockopt(zmq.SNDHWM, sndhwm)
        self._sock.setsockopt(zmq.LINGER, 2000)
        self.send_timeout_ms = send_timeout_ms
        if send_timeout_ms is not None:
            self._sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)
        try:
            if keys is not None and bind:
                if curve_clients is None:
                    raise ValueError("a binding CURVE publisher needs curve_clients (the daemon's public key dir)")
                security.make_server(self._sock, keys)
                self._auth = security.ZapHandler(self._ctx, curve_clients, socket_name=f"publisher-{group}")
                self._auth.watch(self._sock)
                self._auth.start()
            elif keys is not None:
                if curve_server_public is None:
                    raise ValueError("a connecting CURVE publisher needs curve_server_public (the daemon's key)")
                security.make_client(self._sock, keys, security.load_public_certificate(curve_server_public))
            for ep in endpoints:
                (self._sock.bind if bind else self._sock.connect)(ep)
        except BaseException:
            self._sock.close(linger=0)
            self._close_auth()
            raise
        self.endpoints = [self._sock.getsockopt_string(zmq.LAST_ENDPOINT)] if bind else endpoints
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._hb_thread = threading.Thread(
            target=self._heartbeat_loop, args=(heartbeat_interval,), name=f"hb-{group}", daemon=True
        )
        self._hb_thread.start()

    @property
    def next_seq(self) -> dict[str, int]:
        """The seq each sensor's next data message will use (a copy): what a resumed publisher takes."""
        with self._lock:
            return dict(self._next_seq)

    # -- data ---------------------------------------------------------------------------------------

    def send_image(self, sensor: str, image: np.ndarray, t_ns: int, exp_ns: int = 0, meta: dict | None = None) -> int:
        """Publish one frame; ``t_ns`` is the start of the exposure. Returns the seq used."""
        self._expect(sensor, "img")
        image = protocol.payload(np.asarray(image))
        if image.dtype.name not in protocol.IMG_DTYPES or image.ndim not in (2, 3):
            raise ValueError(f"image must be 2-D or 3-D {protocol.IMG_DTYPES}, got {image.dtype} {image.shape}")
        t_ns, exp_ns = _ns("t_ns", t_ns), _ns("exp_ns", exp_ns)
        with self._lock:
            seq = self._next_seq[sensor]
            header = self._header(protocol.encode_image_header, sensor, seq, t_ns, exp_ns, image, meta)
            self._send(self._topics["img", sensor], header, image)
            self._next_seq[sensor] = seq + 1
        return seq

    def send_samples(self, sensor: str, values: np.ndarray, t_ns: int, dt_ns: int, meta: dict | None = None) -> int:
        """Publish a run of radiation samples; sample i is at ``t_ns + i*dt_ns``. Returns the seq used."""
        self._expect(sensor, "rad")
        values = protocol.payload(np.asarray(values))
        if values.dtype.name not in protocol.RAD_DTYPES or values.ndim != 1 or values.size == 0:
            raise ValueError(f"values must be a non-empty 1-D {protocol.RAD_DTYPES} array")
        t_ns, dt_ns = _ns("t_ns", t_ns), _ns("dt_ns", dt_ns)
        if dt_ns <= 0:
            raise ValueError("dt_ns must be > 0")
        with self._lock:
            seq = self._next_seq[sensor]
            header = self._header(protocol.encode_rad_header, sensor, seq, t_ns, dt_ns, values, meta)
            self._send(self._topics["rad", sensor], header, values)
            self._next_seq[sensor] = seq + 1
        return seq

    def heartbeat(self, wait_ms: int = 0) -> None:
        """Send one heartbeat per sensor now (the background thread does this on its own).

        Heartbeats never block for long: on a PUSH socket with no reachable peer they would, and a
        heartbeat is worth less than not stalling the sensor. ``wait_ms`` bounds the wait.
        """
        with self._lock:
            now = self._clock()
            for sensor, nxt in self._next_seq.items():
                if wait_ms and not self._sock.poll(wait_ms, zmq.POLLOUT):
                    return
                hb = protocol.encode_heartbeat(self.group, sensor, self.session, now, nxt - 1 if nxt else None)
                try:
                    self._sock.send_multipart([self._topics["hb", sensor], hb], flags=zmq.NOBLOCK)
                except zmq.Again:
                    return

    def close(self) -> None:
        """Stop heartbeats, send a last one (it reveals any tail loss), and close the socket."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._hb_thread.join()
        try:
            self.heartbeat(wait_ms=1000)
        finally:
            self._sock.close()
            self._close_auth()

    def _close_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> SensorPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------

    def _expect(self, sensor: str, kind: str) -> None:
        actual = self.kinds.get(sensor)
        if actual != kind:
            raise ValueError(f"sensor {sensor!r} is {'not configured' if actual is None else repr(actual)}, not {kind}")

    def _header(
        self, encode: Callable, sensor: str, seq: int, t_ns: int, extra: int, data: np.ndarray, meta: object
    ) -> bytes:
        """The encoded header, after the daemon's own decoder has accepted the whole message: what it would
        reject (a bad time, shape or meta) is a ValueError here, before a seq is used, not a counted loss."""
        if meta is not None and not isinstance(meta, dict):
            raise ValueError(f"meta must be a dict (or None), got {type(meta).__name__}")
        try:
            header = encode(self.group, sensor, self.session, seq, t_ns, extra, data, meta)
        except (TypeError, ValueError, OverflowError) as exc:  # msgpack: numpy scalars, objects, huge ints
            raise ValueError(f"cannot encode the header (meta and times must be plain msgpack values): {exc}") from None
        if not self.check:
            return header
        try:
            frames = [self._topics[self.kinds[sensor], sensor], header, memoryview(data).cast("B")]
            protocol.decode(frames, _SEND_CHECK)
        except protocol.ProtocolError as exc:
            raise ValueError(f"the daemon would reject this message ({exc.reason}): {exc.detail}") from None
        return header

    def _send(self, topic: bytes, header: bytes, data: np.ndarray) -> None:
        if self._stop.is_set():
            raise RuntimeError("the publisher is closed")
        copy = data.nbytes < ZERO_COPY_BYTES
        try:
            self._sock.send_multipart([topic, header, data if not copy else data.tobytes()], copy=copy)
        except zmq.Again:  # only with send_timeout_ms; ZeroMQ takes all parts of a message or none
            raise TimeoutError(
                f"no peer took the message within send_timeout_ms={self.send_timeout_ms}: not sent, seq not used"
            ) from None

    def _heartbeat_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.heartbeat()
            except zmq.ZMQError:
                return  # socket closed under us during shutdown
