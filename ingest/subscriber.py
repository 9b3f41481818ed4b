"""The ingest worker: socket -> validation -> loss accounting -> event-time windows.

One worker owns one ZeroMQ socket (pyzmq sockets are not thread-safe) connected or bound to all
configured endpoints, and the windowers of the groups it serves. It is single-threaded on purpose:
the per-message path is a few microseconds of Python, and keeping all state in one thread means no
locks on the hot path. Counters are plain integers that the Prometheus collector (ingest/metrics.py)
reads at scrape time, instead of touching a locked Prometheus child per message.

A bad message is rejected with a reason from protocol.REJECT_REASONS, counted, logged at a bounded
rate and optionally written to a dead-letter file; it never raises out of the loop. Because ZeroMQ
delivers multipart messages atomically and we read them one at a time, a bad message cannot corrupt
or cost its neighbours.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import msgpack
import structlog
import zmq
from zmq.utils.monitor import parse_monitor_message

from ingest import protocol, security
from ingest.accounting import ClockSkewEstimator, SequenceTracker
from ingest.settings import ROLE_KIND, IngestSettings
from ingest.windowing import Frame, GroupWindower, RadChunk, Window

log = structlog.get_logger("sacmf.ingest")

# Plain ints, not pyzmq's enum members: an enum argument costs a conversion per call on the hot path.
RCVMORE = int(zmq.RCVMORE)
NOBLOCK = int(zmq.NOBLOCK)
MAX_FRAMES_READ = 64  # frames beyond this are drained and dropped without being kept
# A message to a topic no route serves is dead-lettered with at most this many frames of at most this many
# bytes each: enough to see the topic and the header (what an operator needs to find the sender), and a
# bound on what an unconfigured sensor name can cost on disk whatever its payload size.
UNROUTED_DEAD_LETTER_FRAMES = 3
UNROUTED_DEAD_LETTER_FRAME_BYTES = 4096


def _read_rest(topic: bytes, recv: Callable, more: Callable) -> tuple[list, int, int]:
    """The frames after the topic, read to the end of the message (ZeroMQ delivers it whole), the
    number of frames beyond MAX_FRAMES_READ, and their bytes.

    Image payloads are received without a copy (the array is a view of the ZeroMQ frame); small
    radiation payloads are cheaper to copy than to wrap in a zmq.Frame. Frames beyond MAX_FRAMES_READ are
    drained (without a copy) and only counted, so a message of a million frames cannot hold memory; their
    bytes are counted too, so that the rate limit charges every byte received, kept or not.
    """
    frames = [topic]
    extra = extra_bytes = 0
    zero_copy = topic.startswith(b"img/")
    while more(RCVMORE):
        if len(frames) < MAX_FRAMES_READ:
            frames.append(recv(copy=not zero_copy or len(frames) < 2))
        else:
            extra += 1
            extra_bytes += len(recv(copy=False))
    return frames, extra, extra_bytes


RETRY_BASE_S, RETRY_MAX_S = 0.5, 30.0  # connecting again after refused handshakes
DROP_HINT = "a frame over [ingest] max_message_bytes + 64 KiB, or the publisher went away; reconnecting"


class RateLimitedLog:
    """At most one log line per reason and interval; the count of suppressed lines rides along."""

    def __init__(self, interval_s: float) -> None:
        self.interval_ns = int(interval_s * 1e9)
        self._last: dict[str, int] = {}
        self._suppressed: Counter[str] = Counter()

    def __call__(self, event: str, key: str, now_ns: int, **fields: object) -> None:
        last = self._last.get(key)
        if last is not None and now_ns - last < self.interval_ns:
            self._suppressed[key] += 1
            return
        self._last[key] = now_ns
        with contextlib.suppress(Exception):  # a broken log stream must never take the worker down
            log.warning(event, suppressed=self._suppressed.pop(key, 0), **fields)


class DeadLetterFile:
    """Appends rejected messages, as msgpack records, up to a byte budget; then only counts."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "ab")  # noqa: SIM115 - lives as long as the worker
        self.max_bytes = max_bytes
        self.written = self._fh.tell()
        self.skipped = 0

    def write(self, recv_ns: int, reason: str, detail: str, frames: list, max_frame_bytes: int | None = None) -> None:
        """One record; ``max_frame_bytes`` cuts each frame (the record then says ``truncated: true``)."""
        entry: dict = {
            "recv_ns": recv_ns,
            "reason": reason,
            "detail": detail,
            "frames": [bytes(protocol._buffer(f)[:max_frame_bytes]) for f in frames],
        }
        if max_frame_bytes is not None:
            entry["truncated"] = True
        record = msgpack.packb(entry)
        if self.written + len(record) > self.max_bytes:
            self.skipped += 1
            return
        self._fh.write(record)
        self.written += len(record)

    def close(self) -> None:
        self._fh.close()


def read_dead_letters(path: Path) -> list[dict]:
    """Reads a dead-letter file back (for operators and tests)."""
    with open(path, "rb") as fh:
        return list(msgpack.Unpacker(fh, raw=False))


class IngestStats:
    """Plain counters of one worker; read by the metrics collector at scrape time."""

    def __init__(self) -> None:
        self.rejected: Counter[str] = Counter()  # reason
        self.late_callback_errors = 0
        self.window_callback_errors = 0
        self.internal_errors = 0  # exceptions raised by our own handling of a message (bugs), counted
        self.raw_callback_errors = 0
        self.disconnects: Counter[str] = Counter()  # connected endpoint -> connections libzmq dropped


@dataclass(slots=True, eq=False)
class Route:
    """Everything the hot path needs about one configured sensor, found with one dict lookup."""

    group: str
    sensor: str
    kind: str  # the data kind its role takes: img or rad
    offset_ns: int  # static clock correction
    key: str  # "group/sensor": the loss tracker's key
    windower: GroupWindower
    skew: ClockSkewEstimator
    max_ahead_ns: int = 0  # live groups: data further ahead of its receive time is refused (0 = off)
    # event times whose windows stay within int64 ns (a window reaches one size beyond its samples)
    t_lo: int = protocol.INT64_MIN
    t_hi: int = protocol.INT64_MAX
    data_messages: int = 0
    heartbeats: int = 0
    bytes: int = 0


class IngestWorker:
    """Receives, validates, accounts and windows; hands closed windows to ``on_window``."""

    def __init__(
        self,
        settings: IngestSettings,
        on_window: Callable[[Window], None],
        *,
        on_late: Callable[[str, str, object, str], None] | None = None,
        on_raw: Callable[[list, int, protocol.Message], None] | None = None,
        context: zmq.Context | None = None,
        clock: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.settings = settings
        self.on_window = on_window
        self._user_on_late = on_late
        # Called with (frames as received, recv_ns, decoded message) for every valid message, before
        # deduplication, so a recorder sees the stream exactly as it arrived (duplicates and heartbeats
        # included) and a replay reproduces the accounting too. None costs one attribute test per message.
        self.on_raw = on_raw
        self.clock = clock  # wall clock: receive times, event-time windows, clock-skew estimates
        # Rate-limit buckets run on this one: a wall clock stepped back (NTP, a VM resumed) must not starve
        # every limited sensor for the length of the step.
        self.monotonic = monotonic
        self.stats = IngestStats()
        self.tracker = SequenceTracker()
        self.windowers: dict[str, GroupWindower] = {}
        self.routes: dict[tuple[str, str], Route] = {}  # (group, sensor)
        for g in settings.groups.values():
            windower = GroupWindower(g.name, g.sensors, g.window, on_late=self._on_late)
            self.windowers[g.name] = windower
            for sensor, role in g.sensors.items():
                skew = ClockSkewEstimator(int(settings.skew_window_s * 1e9))
                offset = g.offsets_ns.get(sensor, 0)
                ahead = settings.max_future_ns if g.window.mode == "live" else 0  # replay: event time only
                size = g.window.size_ns
                self.routes[g.name, sensor] = Route(
                    g.name, sensor, ROLE_KIND[role], offset, f"{g.name}/{sensor}", windower, skew, ahead,
                    t_lo=protocol.INT64_MIN + size, t_hi=protocol.INT64_MAX - size,
                )  # fmt: skip
        # Every topic a route serves (all kinds): anything else is refused by its topic, before decoding.
        self._routed_topics = frozenset(
            protocol.topic(kind, group, sensor) for (group, sensor) in self.routes for kind in protocol.KINDS
        )
        self.unrouted_limiter = security.UnroutedLimiter(self.windowers, monotonic())
        self.limits = settings.limits
        self._reject_log = RateLimitedLog(settings.reject_log_interval_s)
        self.dead_letter = (
            DeadLetterFile(settings.dead_letter_path, settings.dead_letter_max_bytes)
            if settings.dead_letter_path
            else None
        )
        self._ctx = context or zmq.Context.instance()
        self._pins: dict[str, tuple] = {}  # connected CURVE: endpoint -> (our key pair, its pinned server key)
        # Security (ingest/security.py): None/empty unless configured, so the plain path stays as it was.
        self.auth: security.ZapHandler | None = None  # the ZAP handler when we bind with CURVE
        self._acl: dict[str, frozenset[bytes]] | None = None  # key name -> groups it may publish into
        self._peers: dict[zmq.Socket, str | None] = {}  # with an ACL: socket -> its pinned publisher, or None
        self._poller: zmq.Poller | None = None
        limiter = security.RateLimiter(settings.rate_limits, protocol.KINDS, monotonic())
        self.rate_limiter: security.RateLimiter | None = limiter if limiter else None
        self.sock = self._open_socket()
        # Connected sockets: libzmq drops a connection for a frame over ZMQ_MAXMSGSIZE (or another protocol
        # error) and then never reconnects it, so one oversized frame would cut a publisher off for good.
        # A monitor sees the drop; the timer loop counts it and connects again.
        # With CURVE the same monitor sees handshakes with a pinned publisher fail (an impostor, a wrong key
        # pinned): libzmq retries some of those every 100 ms and others never, so they are counted as
        # refusals, the endpoint is disconnected, and it is connected again after a growing wait.
        self._drops: dict[zmq.Socket, zmq.Socket] = {}
        self._refused: dict[str, int] = {}  # endpoint -> handshakes refused in a row
        self._retry_at: dict[str, tuple[zmq.Socket, int]] = {}  # endpoint -> (socket, monotonic ns)
        # connected CURVE: refused handshakes, by reason (every reason present, as the ZAP handler's)
        self.client_rejected: Counter[str] = Counter(dict.fromkeys(security.AUTH_REJECT_REASONS, 0))
        if not settings.bind and any(not ep.startswith("inproc://") for ep in settings.endpoints):
            events = zmq.EVENT_DISCONNECTED
            if settings.curve is not None:
                events |= security.CLIENT_HANDSHAKE_EVENTS
            for sock in self._peers or [self.sock]:
                if isinstance(sock, zmq.Socket):
                    self._drops[sock] = sock.get_monitor_socket(events)
        self._last_advance: int | None = None  # monotonic ns of the last timer check
        self.last_loop_ns = clock()  # liveness for /healthz
        self.started_ns = self.last_loop_ns  # a sensor never heard from has been silent since then

    # -- socket ---------------------------------------------------------------------------------

    def _open_socket(self) -> zmq.Socket:
        s = self.settings
        if security.uses_curve(s.curve, s.endpoints):
            return self._open_curve()
        sock = self._new_socket()
        try:
            for ep in s.endpoints:
                (sock.bind if s.bind else sock.connect)(ep)
        except BaseException:  # an open socket would block the context's term() for good
            sock.close(linger=0)
            raise
        return sock

    def _new_socket(self) -> zmq.Socket:
        s = self.settings
        sock = self._ctx.socket(zmq.SUB if s.transport == "sub" else zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, s.rcvhwm)
        sock.setsockopt(zmq.LINGER, 0)
        # libzmq drops (and disconnects) peers sending a single frame larger than this: the header and
        # the metadata cap are small, so the payload bound plus slack is the right limit.
        sock.setsockopt(zmq.MAXMSGSIZE, s.limits.max_message_bytes + 65536)
        if s.transport == "sub":
            for group in s.groups:  # topic-prefix routing: a replica only receives its own groups
                for kind in protocol.KINDS:
                    sock.setsockopt(zmq.SUBSCRIBE, f"{kind}/{group}/".encode())
        return sock

    def _open_curve(self) -> zmq.Socket:
        """CURVE sockets: bound, we are the server and ZAP admits publishers' keys; connected, we pin each
        publisher's server key. With a group allow-list each message's sender must be known: bound, from
        its ZAP User-Id; connected, from the socket, so each endpoint then gets a socket of its own."""
        s, curve = self.settings, self.settings.curve
        assert curve is not None
        keys = security.load_secret_certificate(curve.secret_file)
        if s.bind:
            if curve.authorized_dir is None:
                raise security.KeyFileError("a CURVE server needs a directory of admitted client keys")
            self.auth = security.ZapHandler(
                self._ctx,
                curve.authorized_dir,
                allow_ips=curve.allow_ips,
                deny_ips=curve.deny_ips,
                log_interval_s=curve.log_interval_s,
                socket_name="ingest",
            )
            if curve.groups:
                refused = security.refused_key_names(self.auth.refused_files)
                self._acl = security.resolve_groups(curve.groups, self.auth.keys, refused)
            sock = self._new_socket()
            try:
                security.make_server(sock, keys)
                self.auth.watch(sock)
                self.auth.start()  # before bind: no handshake may happen without the handler
                for ep in s.endpoints:
                    sock.bind(ep)
            except BaseException:
                sock.close(linger=0)
                self.auth.stop()
                raise
            socks: dict[zmq.Socket, str | None] = {sock: None}
        else:
            pinned = {ep: security.load_public_certificate(curve.server_key_for(ep)) for ep in s.endpoints}
            if curve.groups:
                names = {pub: security.key_name(curve.server_key_for(ep)) for ep, pub in pinned.items()}
                self._acl = security.resolve_groups(curve.groups, names)
            socks = {}
            sock = None
            try:
                for ep in s.endpoints:
                    if sock is None or self._acl is not None:
                        sock = self._new_socket()
                        socks[sock] = security.key_name(curve.server_key_for(ep))
                    security.make_client(sock, keys, pinned[ep])
                    sock.connect(ep)
                # libzmq copies a socket's options at connect: a later connect of one endpoint (after a drop)
                # must pin that endpoint's key again, not whichever was set last
                self._pins = {ep: (keys, pinned[ep]) for ep in s.endpoints}
            except BaseException:
                for opened in socks:
                    opened.close(linger=0)
                raise
        if self._acl is not None:
            self._peers = socks
            self._poller = zmq.Poller()
            for opened in socks:
                self._poller.register(opened, zmq.POLLIN)
        return next(iter(socks))

    @property
    def bound_endpoints(self) -> list[str]:
        return [self.sock.getsockopt_string(zmq.LAST_ENDPOINT)] if self.settings.bind else []

    # -- loop -----------------------------------------------------------------------------------

    def run(self, stop: threading.Event, poll_ms: int = 50) -> None:
        """Process messages until ``stop`` is set."""
        while not stop.is_set():
            self.poll(poll_ms)

    def poll(self, timeout_ms: int = 50, max_messages: int = 4096) -> int:
        """Wait up to ``timeout_ms`` for input, process what is queued (bounded), run the timers."""
        n = 0
        if self._poller is not None:  # CURVE with a group allow-list: every message's sender is checked
            n = self._poll_authorised(timeout_ms, max_messages)
        elif self.sock.poll(timeout_ms, zmq.POLLIN):
            sock = self.sock
            recv = sock.recv
            more = sock.getsockopt  # not the sock.rcvmore property: that goes through a slow generic lookup
            while n < max_messages:
                try:
                    first = recv(NOBLOCK)
                except zmq.Again:
                    break
                frames, extra, extra_bytes = _read_rest(first, recv, more)
                try:
                    self.handle(frames, extra, extra_bytes=extra_bytes)
                except Exception:  # a bug in our own code: count it, keep serving the other messages
                    self._internal_error(frames)
                n += 1
        now = self.clock()
        self.last_loop_ns = now
        tick = self.monotonic()  # the interval on the wall clock stopped for as long as a step back
        if self._last_advance is None or tick - self._last_advance >= self.settings.advance_interval_s * 1e9:
            self._last_advance = tick
            if self._drops:
                self._reconnect_dropped()
            for windower in self.windowers.values():
                try:
                    fired = windower.advance(now)
                except Exception:  # a bug in our own code: count it, keep the other groups' timers running
                    self._internal_error([])
                    continue
                self._emit(fired)
        return n

    def _poll_authorised(self, timeout_ms: int, max_messages: int) -> int:
        """The receive loop when groups are granted per key: who sent it, and may they publish there?

        Bound, the sender is the ZAP User-Id (the key's name) of the message's first frame, which must
        then be received as a zmq.Frame; connected, it is the socket's pinned publisher. The group comes
        from the topic frame (``<kind>/<group>/<sensor>``) before anything is decoded.
        """
        assert self._poller is not None
        n = 0
        acl = self._acl or {}
        for sock, _ in self._poller.poll(timeout_ms):
            peer = self._peers[sock]
            recv = sock.recv
            more = sock.getsockopt
            while n < max_messages:
                try:
                    first = recv(NOBLOCK, copy=False)
                except zmq.Again:
                    break
                who = peer if peer is not None else security.user_id(first)
                topic = first.bytes
                frames, extra, extra_bytes = _read_rest(topic, recv, more)
                n += 1
                parts = topic.split(b"/", 2)
                granted = acl.get(who) if who is not None else None
                if granted is None or (len(parts) == 3 and parts[1] not in granted):
                    group = parts[1].decode(errors="replace")[:64] if len(parts) == 3 else "?"
                    detail = f"key {who!r} may not publish into group {group!r}"
                    self._reject(protocol.ProtocolError("unauthorised_group", detail), frames, self.clock())
                    continue
                try:
                    self.handle(frames, extra, extra_bytes=extra_bytes)
                except Exception:  # a bug in our own code: count it, keep serving the other messages
                    self._internal_error(frames)
        return n

    def handle(self, frames: list, extra_frames: int = 0, recv_ns: int | None = None, *, extra_bytes: int = 0) -> None:
        """Validate one message and route it; never raises for bad input.

        Order, cheapest refusal first: the sensor's rate limit (by topic, on every received byte), then
        the frame count, then the topic: a topic that names no configured (group, sensor) is refused
        before its header or payload is looked at, so an unconfigured name costs what a rate-limited
        message costs, whatever its size. Only then is the message decoded.
        """
        recv_ns = self.clock() if recv_ns is None else recv_ns
        if self.rate_limiter is not None and not self.rate_limiter.admit(frames, self.monotonic(), extra_bytes):
            self._rate_limited(frames, recv_ns)
            return
        try:
            if extra_frames:
                raise protocol.ProtocolError("frame_count", f"{len(frames) + extra_frames} frames")
            routed = frames and type(frames[0]) is bytes and frames[0] in self._routed_topics  # the common case
            if frames and not routed and self._unrouted(frames, recv_ns, extra_bytes):
                return
            msg = protocol.decode(frames, self.limits)
            route = self.routes.get((msg.group, msg.sensor))
            if route is None:
                raise self._unknown(msg.group, msg.sensor)
            if msg.kind != route.kind and msg.kind != "hb":
                raise protocol.ProtocolError("wrong_kind", f"sensor {msg.sensor!r} takes {route.kind}, got {msg.kind}")
            kind = msg.kind
            if kind != "hb":
                t = msg.t_ns + route.offset_ns
                # when the data was complete: a frame's exposure end, a chunk's last sample
                if kind == "img":
                    t_end = t + msg.exp_ns
                else:
                    n = len(msg.data)
                    t_end = t + (n - 1) * msg.dt_ns if n else t
                if route.max_ahead_ns and t_end - recv_ns > route.max_ahead_ns:
                    raise self._future(route, t_end - recv_ns)
                if t < route.t_lo or t_end > route.t_hi:
                    raise self._out_of_range(route, t, t_end)
        except protocol.ProtocolError as exc:
            self._reject(exc, frames, recv_ns)
            return
        if self.on_raw is not None:
            try:
                self.on_raw(frames, recv_ns, msg)
            except Exception:  # a recorder bug must not cost the pipeline its input
                self.stats.raw_callback_errors += 1
                log.exception("raw_callback_failed", group=msg.group, sensor=msg.sensor)
        route.bytes += msg.nbytes
        if msg.kind == "hb":
            route.heartbeats += 1
            self.tracker.on_heartbeat(route.key, msg.session, msg.last_seq, recv_ns)
            return
        route.data_messages += 1
        if not self.tracker.on_data(route.key, msg.session, msg.seq, recv_ns).deliver:  # duplicate or stale
            return
        # the skew estimate compares receive time with when the data was complete, the earliest it could be
        # sent (not a chunk's first sample: 100 ms chunks read as a clock 100 ms behind, which an operator
        # would then "correct" with clock_offset_ms)
        route.skew.observe(t_end, recv_ns)
        if kind == "img":
            fired = route.windower.add_frame(Frame(msg.sensor, msg.seq, t, msg.exp_ns, msg.data, msg.meta), recv_ns)
        else:
            fired = route.windower.add_samples(RadChunk(msg.sensor, msg.seq, t, msg.dt_ns, msg.data, msg.meta), recv_ns)
        if fired:
            self._emit(fired)

    @staticmethod
    def _future(route: Route, ahead: int) -> protocol.ProtocolError:
        """Data from too far in the future is refused: one frame stamped years ahead (a sensor clock reset
        to a bad RTC value) would otherwise carry the group's watermark with it, and every window up to
        that time would close: the group's later data, from every sensor, would all be late."""
        return protocol.ProtocolError(
            "future_time",
            f"{route.key}: event time {ahead / 1e9:.3f} s ahead of its receive time (more than [ingest] "
            f"max_future_ms = {route.max_ahead_ns / 1e6:g}; fix the sensor's clock or its clock_offset_ms)",
        )

    @staticmethod
    def _out_of_range(route: Route, t: int, t_end: int) -> protocol.ProtocolError:
        """Event times within a window of the int64 limits (years 1677 and 2262: a sensor clock gone
        wrong) would give windows whose bounds do not fit the int64 ns that results and arrays carry."""
        return protocol.ProtocolError(
            "field_type",
            f"{route.key}: event time {t}..{t_end} ns (clock offset applied) puts its windows outside the "
            f"int64 ns range [{route.t_lo}, {route.t_hi}]; fix the sensor's clock or its clock_offset_ms",
        )

    def messages(self) -> dict[tuple[str, str, str], int]:
        """Valid messages received, by (group, sensor, kind)."""
        out = {}
        for r in list(self.routes.values()):
            out[r.group, r.sensor, r.kind] = r.data_messages
            out[r.group, r.sensor, "hb"] = r.heartbeats
        return out

    def flush(self) -> list[Window]:
        """Force-fire every open window (shutdown, end of replay); also hands them to on_window."""
        out: list[Window] = []
        for windower in self.windowers.values():
            windows = windower.flush()
            self._emit(windows)
            out.extend(windows)
        return out

    def _reconnect_dropped(self) -> None:
        """Connect again every endpoint whose connection libzmq dropped (see ``__init__``): at once after
        a drop, after a growing wait (0.5 s doubling to 30 s) after refused handshakes."""
        now, wall = self.monotonic(), self.clock()
        for sock, monitor in self._drops.items():
            while monitor.poll(0):
                event = parse_monitor_message(monitor.recv_multipart())
                endpoint = bytes(event.get("endpoint") or b"").decode("utf-8", "replace")
                kind = event["event"]
                if endpoint not in self.settings.endpoints:
                    continue
                if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._refused.pop(endpoint, None)
                elif kind & security.CLIENT_HANDSHAKE_FAILED:
                    self._handshake_refused(sock, endpoint, security.client_refusal(kind, event["value"]), now, wall)
                elif kind == zmq.EVENT_DISCONNECTED and endpoint not in self._refused:
                    self.stats.disconnects[endpoint] += 1
                    self._reject_log(
                        "publisher_connection_dropped", f"drop:{endpoint}", wall, endpoint=endpoint,
                        drops=self.stats.disconnects[endpoint],
                        hint=DROP_HINT,
                    )  # fmt: skip
                    self._retry_at[endpoint] = (sock, now)
        for endpoint, (sock, at) in list(self._retry_at.items()):
            if now >= at:
                del self._retry_at[endpoint]
                with contextlib.suppress(zmq.ZMQError):  # already gone from libzmq's side
                    sock.disconnect(endpoint)
                if endpoint in self._pins:
                    security.make_client(sock, *self._pins[endpoint])
                sock.connect(endpoint)

    def _handshake_refused(
        self, sock: zmq.Socket, endpoint: str, refusal: tuple[str, str], now: int, wall: int
    ) -> None:
        reason, hint = refusal
        n = self._refused[endpoint] = self._refused.get(endpoint, 0) + 1
        self.client_rejected[reason] += 1
        wait_s = min(RETRY_MAX_S, RETRY_BASE_S * 2 ** min(n - 1, 16))
        with contextlib.suppress(zmq.ZMQError):  # libzmq would retry every 100 ms (reconnect_ivl) meanwhile
            sock.disconnect(endpoint)
        self._retry_at[endpoint] = (sock, now + int(wait_s * 1e9))
        self._reject_log(
            "curve_peer_rejected", f"curve:{endpoint}", wall, socket="ingest", reason=reason, endpoint=endpoint,
            total=self.client_rejected[reason], refused_in_a_row=n, retry_in_s=wait_s, hint=hint,
        )  # fmt: skip

    def auth_rejected(self) -> dict[str, int]:
        """Refused CURVE peers by reason: bound, the ZAP handler's; connected, the refused handshakes."""
        return dict(self.auth.rejected) if self.auth is not None else dict(self.client_rejected)

    def close(self) -> None:
        for monitor_of, monitor in self._drops.items():
            with contextlib.suppress(zmq.ZMQError):
                monitor_of.disable_monitor()
            monitor.close(linger=0)
        self._drops = {}
        self.sock.close(linger=0)
        for sock in self._peers:
            sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()
        if self.dead_letter:
            self.dead_letter.close()

    # -- internals ------------------------------------------------------------------------------

    def _emit(self, windows: list[Window]) -> None:
        for w in windows:
            try:
                self.on_window(w)
            except Exception:  # a consumer bug must not kill ingest; it is counted and logged
                self.stats.window_callback_errors += 1
                log.exception("window_callback_failed", group=w.group, start_ns=w.start_ns)

    def _on_late(self, group: str, sensor: str, item: object, reason: str) -> None:
        if self._user_on_late is not None:
            try:
                self._user_on_late(group, sensor, item, reason)
            except Exception:
                self.stats.late_callback_errors += 1
                log.exception("late_callback_failed", group=group, sensor=sensor)

    def _unrouted(self, frames: list, recv_ns: int, extra_bytes: int) -> bool:
        """True when a well-framed message's topic names a (group, sensor) no route serves: refused,
        counted under unknown_group / unknown_sensor whatever its header and payload, and dead-lettered
        (cut to a few KiB) only while the group's ``UnroutedLimiter`` bucket allows. A topic that does not
        parse, or the wrong number of frames for its kind, is left to the decoder, which names the fault."""
        topic = frames[0]
        if type(topic) is not bytes:  # a zmq.Frame (replayed or received without a copy)
            topic = bytes(protocol._buffer(topic))
            if topic in self._routed_topics:
                return False
        try:
            kind, group, sensor = protocol.parse_topic(topic)
        except protocol.ProtocolError:
            return False
        if len(frames) != (2 if kind == "hb" else 3):  # structural: the decoder's frame_count, as before
            return False
        exc = self._unknown(group, sensor)
        nbytes = sum(map(len, frames)) + extra_bytes
        if self.unrouted_limiter.admit(group, nbytes, self.monotonic()):
            kept = frames[:UNROUTED_DEAD_LETTER_FRAMES]
            self._reject(exc, kept, recv_ns, max_frame_bytes=UNROUTED_DEAD_LETTER_FRAME_BYTES)
        else:  # over the limit: counted (here and in the bucket), neither logged nor written
            self.stats.rejected[exc.reason] += 1
        return True

    def _unknown(self, group: str, sensor: str) -> protocol.ProtocolError:
        """The refusal of a (group, sensor) no route serves: which of the two is not configured."""
        if group in self.windowers:
            return protocol.ProtocolError("unknown_sensor", f"sensor {sensor!r} not in group {group!r}")
        return protocol.ProtocolError("unknown_group", f"group {group!r} is not configured here")

    def _rate_limited(self, frames: list, recv_ns: int) -> None:
        """Counted (by reason and per sensor, in the bucket) and logged at a bounded rate; never
        dead-lettered: copying a flood to disk would spend the very resources the limit protects."""
        self.stats.rejected["rate_limited"] += 1
        topic = bytes(frames[0][:200]).decode(errors="replace")
        self._reject_log("message_rejected", "rate_limited", recv_ns, reason="rate_limited", detail=topic)

    def _internal_error(self, frames: list) -> None:
        self.stats.internal_errors += 1
        with contextlib.suppress(Exception):
            log.exception("ingest_internal_error", frames=len(frames))

    def _reject(
        self, exc: protocol.ProtocolError, frames: list, recv_ns: int, max_frame_bytes: int | None = None
    ) -> None:
        self.stats.rejected[exc.reason] += 1
        self._reject_log("message_rejected", exc.reason, recv_ns, reason=exc.reason, detail=exc.detail[:200])
        if self.dead_letter is not None:
            self.dead_letter.write(recv_ns, exc.reason, exc.detail, frames, max_frame_bytes)
