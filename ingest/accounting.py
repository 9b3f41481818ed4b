"""Exact loss accounting per sensor from publisher sequence numbers, and online clock-skew estimation.

ZeroMQ PUB/SUB drops silently (high-water mark, slow joiner, reconnects) and reports none of it, so the
publisher's per-session ``seq`` is the only ground truth about what was lost (daemon.md §3). Everything
here is pure bookkeeping on ints and dicts: the subscriber calls ``SequenceTracker.on_data`` for every
valid data message, so the in-order path is a dict lookup, two compares and three stores.

Counting rules (per sensor; a *session* is one publisher run, identified by its random id)
---------------------------------------------------------------------------------------------
``high`` is the highest seq known for a session, learned from data *or* from a heartbeat's
``last_seq``. Every seq in ``0..high`` of every session is in exactly one of three pools:

* delivered - arrived at least once and was handed on (exactly once: later copies are DUPLICATE);
* ``gaps`` - missing, never arrived (yet);
* ``joined_late`` - missing, but published before this daemon first heard of the sensor (slow
  joiner): these are not losses of a running system, so they are kept out of ``gaps``.

so at every moment ``delivered + gaps + joined_late == sum over sessions of (high + 1)``.

Data message with seq ``s`` for a known session:

* ``s == high + 1``: NEW.
* ``s > high + 1``: GAP; the ``s - high - 1`` seqs in between go to ``gaps`` (and ``gaps_detected``).
* ``s <= high - ring``: STALE, dropped. Too old for the ring of recent seqs, so it cannot be told apart
  from a duplicate; it is counted in ``stale`` and, if it really was missing, stays counted in ``gaps``.
  Dropping is the safe side: it guarantees nothing is ever delivered twice.
* ``s`` within the ring and already seen: DUPLICATE, dropped.
* ``s`` within the ring, not seen: REORDERED (a late arrival), delivered; ``reordered`` += 1 and the seq
  leaves its pool: ``joined_late`` if ``s`` lies below the session's join baseline, else ``gaps``.
  Hence ``gaps`` and ``joined_late`` are *net* (they can go down); ``gaps_detected`` never does, and
  ``gaps_detected - gaps`` is the number of gaps later healed by reordering.

Heartbeat ``last_seq = k`` for a known session: if ``k > high`` the seqs ``high+1..k`` were lost at the
tail (the case PUB/SUB overflow produces) and go to ``gaps``; ``high = k``. A smaller ``k`` or ``None``
says nothing new.

Sessions:

* First message of any kind from a sensor (*first contact*): no restart. Seqs the session had already
  used are ``joined_late``: ``s`` for a data message with seq ``s``, ``k + 1`` for a heartbeat with
  ``last_seq = k``, 0 for ``last_seq = None``.
* A session id not seen before on a known sensor: publisher restart, ``restarts`` += 1, never a gap by
  itself. The first data message of the new session returns RESTART (delivered). Because we were
  already subscribed when it started, seqs it used before its first message reached us *are* losses:
  ``s`` (data) or ``k + 1`` (heartbeat) go to ``gaps``.
* The session that was current before the last restart (``prev``) keeps full state, so in-flight
  stragglers are accounted normally against it (verdicts as above, plus ``old_session`` += 1) and
  never touch the new session. A heartbeat of ``prev`` can still reveal its tail loss.
* Sessions older than that (the last 8 ids are remembered) are *retired*: their data messages are
  STALE (dropped, ``stale`` and ``old_session`` += 1), their heartbeats ignored. A retired id that
  comes back cannot become current again; anything beyond the 8 remembered ids looks like a new
  session, which random 64-bit ids make a non-issue in practice.

Clock skew: ``ClockSkewEstimator`` keeps the minimum of ``recv_ns - event_ns`` over a sliding
receive-time window (daemon.md §1.4 item 10): the minimum strips queuing delay, so what remains is
clock offset plus the smallest transport delay, and its drift is relative clock skew.
"""

import enum
from collections import deque
from dataclasses import dataclass

__all__ = ["ClockSkewEstimator", "SensorStats", "SequenceTracker", "Verdict"]

_RETIRED_KEPT = 8
_SKEW_BUCKETS = 1024  # ClockSkewEstimator keeps about this many samples per window at most


class Verdict(enum.IntEnum):
    """Outcome of one data message; the caller delivers NEW/GAP/REORDERED/RESTART, drops the rest."""

    NEW = 0
    GAP = 1
    REORDERED = 2
    DUPLICATE = 3
    RESTART = 4
    STALE = 5

    @property
    def deliver(self) -> bool:
        """Kept as a property so callers need not remember which numeric values mean "drop"."""
        return self is not Verdict.DUPLICATE and self is not Verdict.STALE


# Module-level aliases: one global lookup on the hot path instead of a global plus an attribute.
_NEW = Verdict.NEW
_GAP = Verdict.GAP
_REORDERED = Verdict.REORDERED
_DUPLICATE = Verdict.DUPLICATE
_RESTART = Verdict.RESTART
_STALE = Verdict.STALE


@dataclass(frozen=True, slots=True)
class SensorStats:
    """Totals for one sensor summed over all its sessions (a copy: safe to hand to another thread).

    ``gaps`` and ``joined_late`` are net counts and can decrease when a missing message turns up late;
    export them as gauges. ``gaps_detected`` and all other counts only grow (Prometheus counters).
    Receive times are whatever clock the caller passes (``t_recv_ns``); None until the first message.
    """

    delivered: int = 0
    gaps: int = 0
    gaps_detected: int = 0
    joined_late: int = 0
    duplicates: int = 0
    reordered: int = 0
    stale: int = 0
    restarts: int = 0
    old_session: int = 0
    last_message_recv_ns: int | None = None  # data or heartbeat: the publisher is alive
    last_data_recv_ns: int | None = None  # data only: the sensor is producing


class _Session:
    """State of one publisher session; ``ring[s % n] == s`` iff seq ``s`` (within the ring) was seen."""

    __slots__ = ("id", "high", "base", "ring")

    def __init__(self, session_id: int, ring_size: int) -> None:
        self.id = session_id
        self.high = -1
        self.base = 0  # seqs below this were counted as joined_late, not gaps
        # A ring of seq values rather than a bitmask: a stored value can only equal s if s itself was
        # written, so advancing ``high`` over a gap needs no clearing and every check is O(1).
        self.ring = [-1] * ring_size


class _Sensor:
    """Mutable counters of one sensor plus its current and previous session."""

    __slots__ = (
        "cur",
        "prev",
        "retired",
        "delivered",
        "gaps",
        "gaps_detected",
        "joined_late",
        "duplicates",
        "reordered",
        "stale",
        "restarts",
        "old_session",
        "last_message_recv_ns",
        "last_data_recv_ns",
    )

    def __init__(self) -> None:
        self.cur: _Session | None = None
        self.prev: _Session | None = None
        self.retired: deque[int] = deque(maxlen=_RETIRED_KEPT)
        self.delivered = 0
        self.gaps = 0
        self.gaps_detected = 0
        self.joined_late = 0
        self.duplicates = 0
        self.reordered = 0
        self.stale = 0
        self.restarts = 0
        self.old_session = 0
        self.last_message_recv_ns: int | None = None
        self.last_data_recv_ns: int | None = None


class SequenceTracker:
    """Per-sensor sequence accounting with a bounded reorder/duplicate horizon of ``ring`` seqs.

    Not thread-safe: one tracker per subscriber thread. Memory is two rings of ``ring`` ints per sensor.
    """

    __slots__ = ("_n", "_sensors")

    def __init__(self, ring: int = 4096) -> None:
        if ring < 1:
            raise ValueError(f"ring must be >= 1, got {ring}")
        self._n = ring
        self._sensors: dict[str, _Sensor] = {}

    def on_data(self, sensor: str, session: int, seq: int, recv_ns: int) -> Verdict:
        """Account one data message; the verdict tells the caller whether to deliver or drop it."""
        s = self._sensors.get(sensor)
        if s is None:
            s = self._sensors[sensor] = _Sensor()
        s.last_message_recv_ns = recv_ns
        s.last_data_recv_ns = recv_ns
        st = s.cur
        if st is not None and st.id == session:
            if seq == st.high + 1:  # the in-order fast path
                st.high = seq
                st.ring[seq % self._n] = seq
                s.delivered += 1
                return _NEW
            return self._account(s, st, seq)
        return self._other_session(s, session, seq)

    def on_heartbeat(self, sensor: str, session: int, last_seq: int | None, recv_ns: int) -> None:
        """Use the publisher's last seq to reveal tail loss, which no data message could show."""
        if last_seq is not None and last_seq < 0:
            raise ValueError(f"negative last_seq {last_seq} from sensor {sensor!r}")
        s = self._sensors.get(sensor)
        if s is None:
            s = self._sensors[sensor] = _Sensor()
        s.last_message_recv_ns = recv_ns
        st = s.cur
        if st is None:  # first contact: whatever the session already published was before our time
            st = s.cur = _Session(session, self._n)
            if last_seq is not None:
                st.base = last_seq + 1
                st.high = last_seq
                s.joined_late += last_seq + 1
            return
        if st.id != session:
            prev = s.prev
            if prev is not None and prev.id == session:
                st = prev
            elif session in s.retired:
                return
            else:
                st = self._restart(s, session)
        if last_seq is not None and last_seq > st.high:
            missing = last_seq - st.high
            s.gaps += missing
            s.gaps_detected += missing
            st.high = last_seq

    def stats(self, sensor: str) -> SensorStats:
        """Snapshot for metrics; a sensor that never sent anything reads as all zeros (it is configured)."""
        s = self._sensors.get(sensor)
        if s is None:
            return SensorStats()
        return SensorStats(
            delivered=s.delivered,
            gaps=s.gaps,
            gaps_detected=s.gaps_detected,
            joined_late=s.joined_late,
            duplicates=s.duplicates,
            reordered=s.reordered,
            stale=s.stale,
            restarts=s.restarts,
            old_session=s.old_session,
            last_message_recv_ns=s.last_message_recv_ns,
            last_data_recv_ns=s.last_data_recv_ns,
        )

    def snapshot(self) -> dict[str, SensorStats]:
        """All sensors at once, so one metrics scrape sees one consistent pass."""
        return {name: self.stats(name) for name in self._sensors}

    def sensors(self) -> list[str]:
        """Sensors heard from so far, in order of first contact."""
        return list(self._sensors)

    def current_session(self, sensor: str) -> int | None:
        """The session id now treated as live (for logs on restart); None before first contact."""
        s = self._sensors.get(sensor)
        return None if s is None or s.cur is None else s.cur.id

    # -- slow paths -------------------------------------------------------------------------------

    def _account(self, s: _Sensor, st: _Session, seq: int) -> Verdict:
        """Everything except the in-order case, for a session whose state we hold."""
        high = st.high
        n = self._n
        if seq > high:
            st.high = seq
            st.ring[seq % n] = seq
            s.delivered += 1
            missing = seq - high - 1
            if missing:
                s.gaps += missing
                s.gaps_detected += missing
                return _GAP
            return _NEW
        if seq < 0:
            raise ValueError(f"negative seq {seq}")
        if seq <= high - n:
            s.stale += 1
            return _STALE
        slot = seq % n
        if st.ring[slot] == seq:
            s.duplicates += 1
            return _DUPLICATE
        st.ring[slot] = seq
        s.delivered += 1
        s.reordered += 1
        if seq < st.base:
            s.joined_late -= 1
        else:
            s.gaps -= 1
        return _REORDERED

    def _other_session(self, s: _Sensor, session: int, seq: int) -> Verdict:
        """Data from a session that is not the current one: first contact, straggler or restart."""
        if seq < 0:
            raise ValueError(f"negative seq {seq}")
        if s.cur is None:
            st = s.cur = _Session(session, self._n)
            st.base = seq
            st.high = seq - 1  # so that _account sees seq as the next one: NEW, no gap
            s.joined_late += seq
            return self._account(s, st, seq)
        prev = s.prev
        if prev is not None and prev.id == session:
            s.old_session += 1
            return self._account(s, prev, seq)
        if session in s.retired:
            s.old_session += 1
            s.stale += 1
            return _STALE
        self._account(s, self._restart(s, session), seq)
        return _RESTART

    def _restart(self, s: _Sensor, session: int) -> _Session:
        s.restarts += 1
        if s.prev is not None:
            s.retired.append(s.prev.id)
        s.prev = s.cur
        st = s.cur = _Session(session, self._n)
        return st


class ClockSkewEstimator:
    """Sliding-window minimum of ``recv_ns - event_ns`` for one sensor (O(1) amortised per sample).

    The window is in receive time and half-open: a sample observed at ``t`` counts while the latest
    receive time is < ``t + window_ns``. ``recv_ns`` should come from one clock; if it steps backwards
    the window keeps using the latest time seen, so a step never resurrects expired samples.

    Drift is measured against a baseline taken the first time the estimator has seen a full window
    (a one-sample minimum still contains queuing delay, so an earlier baseline would report drift that
    is really congestion going away). ``rebaseline()`` accepts the current offset, e.g. after an
    operator has corrected the sensor clock.
    """

    __slots__ = ("window_ns", "_bucket_ns", "_q", "_now", "_first_ns", "_baseline")

    def __init__(self, window_ns: int = 60_000_000_000) -> None:
        if window_ns <= 0:
            raise ValueError(f"window_ns must be > 0, got {window_ns}")
        self.window_ns = window_ns
        # A larger sample within this much receive time of the last kept one is not kept: its only use
        # would be to outlive it by less than this. Bounds the queue at about _SKEW_BUCKETS entries for
        # a sensor whose delay only grows (a stuck clock at a high rate), at an error in the window's
        # length of at most this (59 ms of the default 60 s).
        self._bucket_ns = window_ns // _SKEW_BUCKETS
        # (receive time, delta) with strictly increasing delta from left to right: the left end is
        # the minimum, and a sample is dropped as soon as a newer one is no larger (it can never be
        # the minimum again, since the newer one outlives it).
        self._q: deque[tuple[int, int]] = deque()
        self._now: int | None = None
        self._first_ns: int | None = None
        self._baseline: int | None = None

    def observe(self, event_ns: int, recv_ns: int) -> None:
        """Add one sample (sensor event time, daemon receive time)."""
        now = self._now
        if now is None:
            now = self._first_ns = recv_ns
        elif recv_ns > now:
            now = recv_ns
        self._now = now
        delta = recv_ns - event_ns
        q = self._q
        while q and q[-1][1] >= delta:
            q.pop()
        if not q or now - q[-1][0] >= self._bucket_ns:
            q.append((now, delta))
        horizon = now - self.window_ns
        while q[0][0] <= horizon:  # never empties: the newest entry is within a bucket (< window) of ``now``
            q.popleft()
        if self._baseline is None and now - self._first_ns >= self.window_ns:
            self._baseline = q[0][1]

    @property
    def offset_ns(self) -> int | None:
        """Current estimate of ``recv - event`` (add to event time to correct it); None before data."""
        return self._q[0][1] if self._q else None

    @property
    def baseline_ns(self) -> int | None:
        """Offset at the end of the first full window (or at the last ``rebaseline``)."""
        return self._baseline

    @property
    def drift_ns(self) -> int | None:
        """How far the offset moved since the baseline; None until there is a baseline."""
        if self._baseline is None or not self._q:
            return None
        return self._q[0][1] - self._baseline

    def drift_exceeded(self, threshold_ns: int) -> bool:
        """True when the offset moved by more than ``threshold_ns`` (either way) since the baseline."""
        drift = self.drift_ns
        return drift is not None and abs(drift) > threshold_ns

    def rebaseline(self) -> None:
        """Accept the current offset as the new baseline."""
        self._baseline = self._q[0][1] if self._q else None
