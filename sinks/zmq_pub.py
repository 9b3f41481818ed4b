"""Results over ZeroMQ PUB: ``[b"det/<group>", msgpack(to_wire(record))]`` (docs/results.md §2).

Why PUB: any number of subscribers (dashboards, trackers, recorders) can come and go, filter by group
with a topic prefix, and a slow or dead one can never stall the daemon - PUB drops for that subscriber
at its high-water mark instead of blocking (daemon.md §3). The bounded ``sndhwm`` caps the memory a
stuck subscriber can pin, and the bounded ``linger`` makes ``close()`` return even when a peer is
unreachable (pyzmq's default linger of -1 would hang on unsent messages).

The socket is created where the publisher is constructed but is then used by one thread at a time
(the supervisor's worker writes and closes it), which is the migration pyzmq allows.

With ``secure`` (a CURVE set-up built by the daemon, SECURITY.md) results are encrypted and only key
holders can read them: bound, this PUB is the CURVE server and a ZAP handler on its own context admits
the readers' keys; connected (to a proxy or a bound subscriber), it pins the server key.
Subscribers only send subscriptions, so ``ZMQ_MAXMSGSIZE`` is small: nobody can make it buffer more.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from sinks.record import ResultRecord, to_wire

TOPIC_PREFIX = "det/"
MAX_INBOUND_BYTES = 4096  # subscribers send only subscription frames ("\x01det/<group>")


def result_topic(group: str) -> bytes:
    """The topic frame of a group's results; subscribe to ``b"det/"`` for all groups."""
    return f"{TOPIC_PREFIX}{group}".encode()


def encode_result(record: ResultRecord) -> list[bytes]:
    """The two frames a subscriber receives for ``record``."""
    return [result_topic(record.group), msgpack.packb(to_wire(record), use_bin_type=True)]


Secure = Callable[[zmq.Context, zmq.Socket, str, bool], Any]
"""Sets up authentication (CURVE, ZAP) on a fresh socket and binds or connects it; returns a handle with
``stop()`` (or None). The daemon builds it from ingest/security.py: sinks take it as a plain callable and
import nothing from ingest."""


class ZmqResultPublisher:
    """A sink (``name``/``write``/``close``) publishing result records on a PUB socket."""

    def __init__(
        self,
        endpoint: str,
        *,
        bind: bool = True,
        sndhwm: int = 1000,
        linger_ms: int = 1000,
        context: zmq.Context | None = None,
        name: str = "zmq",
        secure: Secure | None = None,
    ) -> None:
        if sndhwm < 1:
            raise ValueError(f"sndhwm must be >= 1 (0 would mean unbounded), got {sndhwm}")
        if linger_ms < 0:
            raise ValueError(f"linger_ms must be >= 0 (-1 could hang close()), got {linger_ms}")
        self.name = name
        self._own_context = context is None
        self._ctx = zmq.Context() if context is None else context
        self._sock = self._ctx.socket(zmq.PUB)
        self.auth: Any = None  # what ``secure`` returned: stopped on close
        try:
            self._sock.setsockopt(zmq.SNDHWM, sndhwm)
            self._sock.setsockopt(zmq.LINGER, linger_ms)
            self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_INBOUND_BYTES)
            if secure is not None:
                self.auth = secure(self._ctx, self._sock, endpoint, bind)
            elif bind:
                self._sock.bind(endpoint)
            else:
                self._sock.connect(endpoint)
        except (zmq.ZMQError, ValueError, RuntimeError):
            self._sock.close(linger=0)
            if self.auth is not None:
                self.auth.stop()
            if self._own_context:
                self._ctx.term()
            raise
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint
        self.sent = 0
        self._closed = False

    def write(self, record: ResultRecord) -> None:
        if self._closed:
            raise RuntimeError(f"sink {self.name!r} is closed")
        # NOBLOCK: a PUB drops at the HWM anyway; the flag guarantees we never wait even if libzmq
        # changes its mind (e.g. during a reconnect), and surfaces that as zmq.Again to the supervisor.
        self._sock.send_multipart(encode_result(record), flags=zmq.NOBLOCK)
        self.sent += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close()  # uses the socket's bounded LINGER
        if self.auth is not None:
            self.auth.stop()
        if self._own_context:
            self._ctx.term()
