"""Event-time windows per sensor group (daemon.md §1.4).

Why this shape: the model needs every modality of a scene over the same time span, sensors arrive at
different rates with network jitter, and replays must reproduce live results bit for bit. So windows are
keyed by *corrected event time* (int ns, the caller has already applied the static clock offset), never
by arrival order, and every decision that could depend on arrival timing is either made from event time
alone (replay mode) or made explicit as a wall-clock budget (live mode).

Semantics, normative for the daemon:

* Windows are per group, half-open ``[start, start + size)``, aligned to the Unix epoch on the hop grid
  (``start = floor(t / hop) * hop``, ``hop = size`` for tumbling windows). With sliding windows a sample
  belongs to all ``size // hop`` windows that contain it. Window id = ``(group, start_ns)``.
* Watermark = min over *active* inputs (sensors) of their max event time, minus ``allowed_lateness``.
  An input never seen is inactive. An input is idle (inactive) when silent for ``idle_timeout``: live mode
  measures silence in receive time (``recv_ns`` / ``now_ns``), replay mode in event time (the input's max
  is more than ``idle_timeout`` behind the group max), so replay does not depend on arrival timing. If
  every seen input is idle (live only) the group max stands in for the minimum. The watermark never moves
  backwards (an input coming back from idleness cannot un-fire windows).
* Windows fire once, oldest first, when the *closing frontier* reaches their end. The frontier is the
  watermark, pushed further by live ``max_wait`` (``now - max_wait``), by replay overflow and by
  ``flush()``. Because every firing takes the oldest open window, "already fired" is one number: a sample
  is late iff its earliest window ends at or before the frontier. In live mode with ``max_wait`` this
  includes data arriving after its window's wall-clock deadline, even if that window never opened.
* Late data is never silently dropped: it is counted per sensor (``late_messages``, ``late_samples``; a
  frame counts as one sample) and handed to ``on_late(group, sensor, item, reason)``. ``reason`` is
  ``"closed"`` when the sample's window was opened and has already been emitted or dropped, ``"expired"``
  when that window never existed but the frontier has passed its end. A radiation chunk straddling the
  frontier is split by sample time; only the late prefix is reported (as a ``RadChunk`` view). With
  sliding windows a late sample is still added to those of its windows that are still open.
* ``late_policy = "update"`` uses late data instead of only reporting it: a fired window stays
  updatable while its end is within ``update_horizon`` of the frontier (event time). Its contents are
  kept, counted against ``max_open_windows`` and ``max_buffered_bytes`` together with the open windows,
  which take precedence: a kept window evicted for memory is no longer updatable, and nor is any window
  older than an open one dropped for memory in live mode (those are released too); their late data is
  reported, and so is late data after ``flush`` for what it emitted.
  Late data for an updatable window is added to it, and the window is emitted again with ``revision``
  + 1 and ``trigger="update"`` once every sensor that brought late data to it has moved past its end
  (one update per lagging stream, not one per late message), or when it leaves the horizon, or on
  ``flush``. Updates come out in start order, before the windows that fire in the same call.
  A window that never opened, or was dropped as incomplete, can be emitted this way too: its first
  emission has revision 0 (one that never opened and stays unacceptable is counted as dropped
  incomplete). Such late data is counted as late (``late_messages``, ``late_samples``) and in
  ``late_used``, and is not handed to ``on_late``; late data that no fired window within the horizon
  holds still is, and so is (without being counted twice) late data that sliding windows beyond the
  horizon also held: those windows missed it. The decisions use event time and the frontier only, so
  replays stay deterministic.
* Contents are sorted by event time with ties broken by ``(sensor, seq)``, so any arrival order that
  stays within the lateness bound gives identical windows.
* Each window lists frames per image role and samples per sequence role (keys for all roles; empty when
  absent) and ``presence`` for every *configured* role (a sensor maps to it). Acceptability: at least
  ``min_roles`` configured roles present and every ``required_roles`` present; unacceptable windows are
  dropped (``dropped["incomplete"]``). Acceptable windows missing a configured role are emitted with
  ``completeness="partial"`` under ``missing_policy="emit"`` and dropped (``"incomplete"``) under
  ``"drop"``. Flushed windows get ``completeness="flushed"`` after the same checks.
* Radiation values keep the chunk's dtype (numpy's promotion applies if chunks of one role disagree);
  timestamps are int64 ns. Arrays are views of the caller's buffers, which must not be mutated afterwards.

Bounded memory: per group at most ``max_open_windows`` open windows and ``max_buffered_bytes`` payload
bytes (image ``nbytes`` plus radiation sample bytes, each counted once, against the newest window that
holds it). When an arrival exceeds a cap the oldest open window goes first:

* live mode: its data is dropped (``dropped["overflow"]``) - latency and memory win over completeness;
* replay mode: lossless - the window is fired early with ``trigger="overflow"`` instead (counted in
  ``triggers["overflow"]``). Data for it arriving afterwards is late (and reported), never discarded.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

ROLES = ("image_a", "image_b", "seq_a", "seq_b")
IMAGE_ROLES = ROLES[:2]
SEQ_ROLES = ROLES[2:]
MODES = ("live", "replay")
MISSING_POLICIES = ("emit", "drop")
COMPLETENESS = ("full", "partial", "flushed")
TRIGGERS = ("watermark", "max_wait", "flush", "overflow")
DROP_REASONS = ("incomplete", "overflow")
LATE_REASONS = ("closed", "expired")
LATE_POLICIES = ("sink", "update")

OnLate = Callable[[str, str, object, str], None]

# Below any int64 timestamp: nothing is late before the first firing.
_NEVER = -(2**64)
# How many closed window starts to remember for the "closed" vs "expired" late reason.
_CLOSED_MEMORY = 4096
# a receive time this far behind the newest one is the host clock stepping back, not jitter (live mode)
CLOCK_STEP_NS = 1_000_000_000


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"WindowSpec.{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"WindowSpec.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """Window geometry, liveness and memory policy of one sensor group (see module docstring)."""

    size_ns: int
    hop_ns: int | None = None  # None -> tumbling
    allowed_lateness_ns: int = 0
    idle_timeout_ns: int = 2_000_000_000
    max_wait_ns: int = 0  # live only; 0 disables the wall-clock deadline
    mode: str = "live"
    missing_policy: str = "emit"
    min_roles: int = 1
    required_roles: tuple[str, ...] = ()
    max_open_windows: int = 64
    max_buffered_bytes: int = 256 * 2**20
    late_policy: str = "sink"  # "sink": late data goes to on_late only; "update": re-emit the window
    update_horizon_ns: int = 0  # "update": how long past the frontier a fired window's end stays updatable

    def __post_init__(self) -> None:
        _check_int("size_ns", self.size_ns, 1)
        if self.hop_ns is not None:
            _check_int("hop_ns", self.hop_ns, 1)
            if self.size_ns % self.hop_ns:
                raise ValueError(f"WindowSpec.size_ns ({self.size_ns}) must be a multiple of hop_ns ({self.hop_ns})")
        _check_int("allowed_lateness_ns", self.allowed_lateness_ns, 0)
        _check_int("idle_timeout_ns", self.idle_timeout_ns, 1)
        _check_int("max_wait_ns", self.max_wait_ns, 0)
        if self.mode not in MODES:
            raise ValueError(f"WindowSpec.mode must be one of {MODES}, got {self.mode!r}")
        if self.missing_policy not in MISSING_POLICIES:
            raise ValueError(
                f"WindowSpec.missing_policy must be one of {MISSING_POLICIES}, got {self.missing_policy!r}"
            )
        _check_int("min_roles", self.min_roles, 0)
        if self.min_roles > len(ROLES):
            raise ValueError(f"WindowSpec.min_roles must be <= {len(ROLES)}, got {self.min_roles}")
        if not isinstance(self.required_roles, tuple):
            raise ValueError(f"WindowSpec.required_roles must be a tuple, got {self.required_roles!r}")
        unknown = [r for r in self.required_roles if r not in ROLES]
        if unknown:
            raise ValueError(f"WindowSpec.required_roles has unknown roles {unknown}; known: {ROLES}")
        if len(set(self.required_roles)) != len(self.required_roles):
            raise ValueError(f"WindowSpec.required_roles has duplicates: {self.required_roles}")
        _check_int("max_open_windows", self.max_open_windows, 1)
        if self.max_open_windows < self.windows_per_sample:
            raise ValueError(
                f"WindowSpec.max_open_windows ({self.max_open_windows}) must be >= size_ns // hop_ns "
                f"({self.windows_per_sample}), or every sample would overflow"
            )
        _check_int("max_buffered_bytes", self.max_buffered_bytes, 1)
        if self.late_policy not in LATE_POLICIES:
            raise ValueError(f"WindowSpec.late_policy must be one of {LATE_POLICIES}, got {self.late_policy!r}")
        _check_int("update_horizon_ns", self.update_horizon_ns, 1 if self.late_policy == "update" else 0)

    @property
    def step_ns(self) -> int:
        """Hop of the window grid (the size for tumbling windows)."""
        return self.size_ns if self.hop_ns is None else self.hop_ns

    @property
    def windows_per_sample(self) -> int:
        return self.size_ns // self.step_ns


def window_starts(t_ns: int, size_ns: int, hop_ns: int | None = None) -> range:
    """Starts of every window containing ``t_ns``, oldest first.

    Floor division keeps negative times on the same epoch-aligned grid as positive ones.
    """
    hop = size_ns if hop_ns is None else hop_ns
    cell = t_ns - t_ns % hop
    return range(cell - size_ns + hop, cell + hop, hop)


@dataclass(slots=True)
class Frame:
    """One image; ``t_ns`` (corrected event time) decides its window, ``exp_ns`` is carried along."""

    sensor: str
    seq: int
    t_ns: int
    exp_ns: int
    image: np.ndarray
    meta: dict | None = None


@dataclass(slots=True)
class RadChunk:
    """A batch of radiation samples on a regular grid: sample ``i`` is at ``t_ns + i * dt_ns``.

    ``values`` has the samples along axis 0 (1-D for scalar detectors).
    """

    sensor: str
    seq: int
    t_ns: int
    dt_ns: int
    values: np.ndarray
    meta: dict | None = None


class Samples:
    """Samples of one sequence role inside a window, sorted by time.

    ``dt_ns`` is the common chunk period when every contributing chunk had the same one (a hint for
    resampling), else None. Regularly sampled data (back-to-back chunks, the usual case) keeps its
    timestamps as ``t0 + i * dt_ns`` and builds the int64 array only when ``t_ns`` is first read: it
    saves 8 bytes per sample while the window waits in queues, and the work when no one reads them.
    """

    __slots__ = ("_t", "_t0", "values", "dt_ns")

    def __init__(self, t_ns: np.ndarray | None, values: np.ndarray, dt_ns: int | None = None, *, t0: int | None = None):
        if t_ns is None and (t0 is None or dt_ns is None):
            raise ValueError("Samples needs t_ns, or t0 with dt_ns")
        self._t = t_ns  # int64[k], or None while implied by t0 and dt_ns
        self._t0 = t0
        self.values = values  # [k, ...], chunk dtype
        self.dt_ns = dt_ns

    @property
    def t_ns(self) -> np.ndarray:
        if self._t is None:
            self._t = self._t0 + self.dt_ns * np.arange(self.values.shape[0], dtype=np.int64)
        return self._t

    @classmethod
    def empty(cls) -> Samples:
        return cls(np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64), None)

    def __len__(self) -> int:
        return int(self.values.shape[0])

    def __repr__(self) -> str:
        return f"Samples(n={len(self)}, dt_ns={self.dt_ns})"


@dataclass(slots=True)
class Window:
    """One fired window; ``presence`` covers exactly the configured roles."""

    group: str
    start_ns: int
    end_ns: int
    frames: dict[str, list[Frame]]  # every image role -> frames sorted by (t_ns, sensor, seq)
    samples: dict[str, Samples]  # every sequence role -> samples in [start, end)
    presence: dict[str, bool]
    completeness: str
    trigger: str
    revision: int = 0

    @property
    def id(self) -> tuple[str, int]:
        return (self.group, self.start_ns)

    @property
    def counts(self) -> dict[str, int]:
        """Items per configured role (frames or samples), the 'sample counts' beside the mask."""
        return {r: len(self.frames[r]) if r in self.frames else len(self.samples[r]) for r in self.presence}


class _Input:
    __slots__ = ("role", "is_image", "max_t", "last_recv")

    def __init__(self, role: str) -> None:
        self.role = role
        self.is_image = role in IMAGE_ROLES
        self.max_t: int | None = None
        self.last_recv: int | None = None


class _Open:
    __slots__ = ("start", "frames", "pieces", "own_bytes")

    def __init__(self, start: int) -> None:
        self.start = start
        self.frames: list[Frame] = []
        # (t_first_ns, dt_ns, values_view, sensor, seq), each non-empty
        self.pieces: list[tuple[int, int, np.ndarray, str, int]] = []
        self.own_bytes = 0


class _Kept:
    """A fired window kept for late-data updates (``late_policy = "update"``)."""

    __slots__ = ("ow", "revision", "pending", "closed")

    def __init__(self, ow: _Open, revision: int, closed: bool) -> None:
        self.ow = ow  # its contents, late data added
        self.revision = revision  # what its next emission is numbered (0: never emitted)
        self.pending: set[str] = set()  # sensors whose late data it holds that no emission has carried yet
        self.closed = closed  # accounted as emitted or dropped; False: it never opened, only late data made it


def _frame_key(f: Frame) -> tuple[int, str, int]:
    return (f.t_ns, f.sensor, f.seq)


class GroupWindower:
    """Windows, watermark and late-data accounting for one sensor group.

    ``roles`` maps sensor id -> role. ``add_*``/``advance``/``flush`` return the windows they fired, in
    start order. Costs: O(1) amortised per frame (O(log open windows) when a window opens) and
    O(windows spanned) per radiation chunk, with no per-sample Python work.
    """

    def __init__(
        self,
        group: str,
        roles: dict[str, str],
        spec: WindowSpec,
        on_late: OnLate | None = None,
    ) -> None:
        if not roles:
            raise ValueError(f"group {group!r}: roles must map at least one sensor to a role")
        bad = {s: r for s, r in roles.items() if r not in ROLES}
        if bad:
            raise ValueError(f"group {group!r}: unknown roles {bad}; known: {ROLES}")
        configured = tuple(r for r in ROLES if r in set(roles.values()))
        missing_req = [r for r in spec.required_roles if r not in configured]
        if missing_req:
            raise ValueError(f"group {group!r}: required_roles {missing_req} have no sensor in roles")
        if spec.min_roles > len(configured):
            raise ValueError(f"group {group!r}: min_roles={spec.min_roles} but only {len(configured)} roles configured")
        self.group = group
        self.spec = spec
        self.configured_roles = configured
        self._on_late = on_late
        self._roles = dict(roles)
        self._rank = {s: i for i, s in enumerate(sorted(roles))}
        self._inputs = {s: _Input(r) for s, r in roles.items()}
        self._input_list = list(self._inputs.values())
        self._size = spec.size_ns
        self._hop = spec.step_ns
        self._tumbling = spec.windows_per_sample == 1
        self._lateness = spec.allowed_lateness_ns
        self._idle = spec.idle_timeout_ns
        self._replay = spec.mode == "replay"
        self._max_wait = 0 if self._replay else spec.max_wait_ns
        self._max_open = spec.max_open_windows
        self._max_bytes = spec.max_buffered_bytes

        self._open: dict[int, _Open] = {}
        self._heap: list[int] = []  # starts of open windows
        self._frontier: int | None = None  # windows with end <= frontier are closed
        self._late_bound = _NEVER  # samples with t < late_bound are late
        self._closed_set: set[int] = set()
        self._closed_fifo: deque[int] = deque()
        self._wm: int | None = None
        self._group_max: int | None = None
        self._now: int | None = None
        self.clock_steps_back = 0  # live: steps back of the receive clock seen (_clock_stepped_back)
        self._buffered = 0
        self._update = spec.late_policy == "update"
        self._horizon = spec.update_horizon_ns
        self._kept: dict[int, _Kept] = {}  # start -> fired window still open for updates
        self._kept_heap: list[int] = []  # their starts, oldest first out
        self._dirty: set[int] = set()  # starts of kept windows holding late data no emission has carried
        self._kept_bytes = 0
        self._update_floor = _NEVER  # windows starting before it are no longer updatable (memory, flush)

        self.emitted: dict[str, int] = dict.fromkeys(COMPLETENESS, 0)
        self.triggers: dict[str, int] = dict.fromkeys(TRIGGERS, 0)
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)
        self.late_messages: dict[str, int] = dict.fromkeys(roles, 0)
        self.late_samples: dict[str, int] = dict.fromkeys(roles, 0)
        self.late_used: dict[str, int] = dict.fromkeys(roles, 0)  # late messages that went into an update
        self.updated = 0  # emissions of a window with revision >= 1

    # ---------------------------------------------------------------- gauges
    @property
    def buffered_bytes(self) -> int:
        """Payload held: open windows, and fired ones kept for updates."""
        return self._buffered + self._kept_bytes

    @property
    def open_windows(self) -> int:
        return len(self._open)

    @property
    def kept_windows(self) -> int:
        """Fired windows still open for late-data updates (``late_policy = "update"``)."""
        return len(self._kept)

    @property
    def watermark_ns(self) -> int | None:
        return self._wm

    @property
    def watermark_lag_ns(self) -> int | None:
        """How far the watermark trails the newest event: the latency the lateness/idle policy costs."""
        if self._wm is None or self._group_max is None:
            return None
        return self._group_max - self._wm

    @property
    def closed_until_ns(self) -> int | None:
        """The closing frontier: windows ending at or before it have fired (or were dropped)."""
        return self._frontier

    # ---------------------------------------------------------------- ingest
    def add_frame(self, frame: Frame, recv_ns: int) -> list[Window]:
        inp = self._inputs.get(frame.sensor)
        if inp is None or not inp.is_image:
            raise ValueError(self._role_error(frame.sensor, "frame"))
        t = frame.t_ns
        hop = self._hop
        cell = t - t % hop
        if self._tumbling and t >= self._late_bound:  # the hot path
            ow = self._open.get(cell)
            if ow is None:
                ow = self._new_window(cell)
            ow.frames.append(frame)
            nbytes = frame.image.nbytes
            ow.own_bytes += nbytes
            self._buffered += nbytes
        else:
            if t < self._late_bound:
                first = cell - self._size + hop
                if not (self._update and self._absorb_frame(frame, cell)):
                    self._report_late(frame.sensor, frame, 1, first)
                elif first < self._horizon_start():  # sliding: its older windows are beyond the horizon
                    self._hand_late(frame.sensor, frame, first)  # counted late where it was absorbed
            frontier = self._frontier
            size = self._size
            for s in range(cell - size + hop, cell + hop, hop):
                if frontier is not None and s + size <= frontier:
                    continue
                ow = self._open.get(s)
                if ow is None:
                    ow = self._new_window(s)
                ow.frames.append(frame)
            if frontier is None or cell + size > frontier:
                nbytes = frame.image.nbytes
                self._open[cell].own_bytes += nbytes
                self._buffered += nbytes
        return self._progress(inp, t, recv_ns)

    def add_samples(self, chunk: RadChunk, recv_ns: int) -> list[Window]:
        inp = self._inputs.get(chunk.sensor)
        if inp is None or inp.is_image:
            raise ValueError(self._role_error(chunk.sensor, "radiation chunk"))
        values = chunk.values
        n = values.shape[0]
        t0 = chunk.t_ns
        dt = chunk.dt_ns
        if n == 0:
            # No event time to learn from; it still proves the input is alive.
            if not self._replay and inp.max_t is not None:
                return self._progress(inp, inp.max_t, recv_ns)
            return []
        if n > 1 and dt <= 0:
            raise ValueError(f"sensor {chunk.sensor!r}: dt_ns must be > 0 for {n} samples, got {dt}")
        step = dt if dt > 0 else 1  # index arithmetic only; with one sample any step works
        t_last = t0 + (n - 1) * dt
        hop = self._hop
        size = self._size
        first_cell = t0 - t0 % hop
        if self._tumbling and t0 >= self._late_bound and first_cell == t_last - t_last % hop:
            ow = self._open.get(first_cell)  # the hot path: whole chunk in one open window
            if ow is None:
                ow = self._new_window(first_cell)
            ow.pieces.append((t0, dt, values, chunk.sensor, chunk.seq))
            nbytes = values.nbytes
            ow.own_bytes += nbytes
            self._buffered += nbytes
            return self._progress(inp, t_last, recv_ns)

        per_sample = values.nbytes // n
        held: list[tuple[list, int, int, int]] = []  # the pieces this chunk added: (list, index, lo, hi)
        if t0 < self._late_bound:
            k = min(n, -((t0 - self._late_bound) // step))  # samples with t < late_bound
            j = k  # of those, the first j are reported; the rest go into updates
            m = k  # the first m go to on_late: they missed a fired window (m >= j)
            if self._update:
                horizon = self._horizon_start()
                # the fired windows from the horizon on hold every late sample from it on (size is a
                # multiple of hop); with none fired there yet (a horizon under a hop), all are reported
                if horizon + size <= self._frontier:  # type: ignore[operator]  # set: t0 is late
                    j = min(k, max(0, -((t0 - horizon) // step)))
                    m = j
                    if j < k:
                        held += self._absorb_samples(chunk, j, k, step, horizon)
                        # sliding windows: a sample before horizon + size - hop also belonged to a
                        # window older than the horizon, which it missed
                        m = min(k, max(0, -((t0 - (horizon + size - hop)) // step)))
            if m:
                item = chunk if m == n else RadChunk(chunk.sensor, chunk.seq, t0, dt, values[:m], chunk.meta)
                t_m = t0 + (m - 1) * dt
                first_start = t_m - t_m % hop - size + hop
                if j:
                    self._report_late(chunk.sensor, item, j, first_start)
                else:  # counted late by _absorb_samples
                    self._hand_late(chunk.sensor, item, first_start)
        frontier = self._frontier
        # Windows from the first one holding t0 to the last one holding t_last, skipping closed ones and any
        # that hold no sample: the work follows the samples, never the time span (two samples a century
        # apart must not walk the billions of windows between them).
        first = first_cell - size + hop
        if frontier is not None and first + size <= frontier:
            x = frontier - size
            first = x - x % hop + hop  # the first window on the grid that ends after the frontier
        for s, lo, hi, own in self._spans(t0, dt, step, 0, n, first, t_last - t_last % hop + hop):
            ow = self._open.get(s)
            if ow is None:
                ow = self._new_window(s)
            ow.pieces.append((t0 + lo * dt, dt, values[lo:hi], chunk.sensor, chunk.seq))
            held.append((ow.pieces, len(ow.pieces) - 1, lo, hi))
            if own > 0:
                ow.own_bytes += own * per_sample
                self._buffered += own * per_sample
        _unpin(values, held)
        return self._progress(inp, t_last, recv_ns)

    def advance(self, now_ns: int) -> list[Window]:
        """Live: re-evaluate idleness and ``max_wait`` at wall-clock ``now_ns``. Replay: no-op."""
        if self._replay:
            return []
        if self._now is None or now_ns > self._now:
            self._now = now_ns
        elif now_ns < self._now - CLOCK_STEP_NS:
            self._clock_stepped_back(self._now - now_ns)
        out = self._fire_ready()
        if self._kept:
            updates = self._service_kept()
            if updates:
                out[:0] = updates
        return out

    def flush(self) -> list[Window]:
        """Fire every open window now (shutdown, end of replay); they come out as ``"flushed"``."""
        out: list[Window] = []
        for start in sorted(self._dirty):  # older than any open window: their updates go first
            self._emit_update(start, self._kept[start], out)
        self._kept.clear()
        self._kept_heap.clear()
        self._kept_bytes = 0
        if self._heap:
            self._close_until(max(self._heap) + self._size, "flush", out)
        if self._update and self._frontier is not None:  # all of it is out: late data for it is reported,
            x = self._frontier - self._size  # never made into a second revision 0
            self._update_floor = max(self._update_floor, x - x % self._hop + self._hop)
        return out

    # ---------------------------------------------------------------- internals
    def _spans(
        self, t0: int, dt: int, step: int, j: int, k: int, s: int, s_stop: int
    ) -> Iterator[tuple[int, int, int, int]]:
        """(start, lo, hi, own) for each window from ``s`` (on the grid) up to ``s_stop`` that holds any of
        samples ``j:k`` of a chunk (sample i at ``t0 + i * dt``): it holds ``lo:hi``, and ``own`` of them
        have it as their newest window (their bytes are counted there). Windows without a sample are
        skipped, so the work follows the samples, never the time span."""
        size, hop = self._size, self._hop
        while s < s_stop:
            lo = max(j, -((t0 - s) // step))
            hi = min(k, -((t0 - s - size) // step))
            if lo >= hi:  # no sample in [s, s + size): on to the first window holding sample lo
                if lo >= k:
                    return
                t_lo = t0 + lo * dt
                s = max(s + hop, t_lo - t_lo % hop - size + hop)
                continue
            yield s, lo, hi, min(k, -((t0 - s - hop) // step)) - lo
            s += hop

    def _role_error(self, sensor: str, what: str) -> str:
        if sensor not in self._roles:
            return f"group {self.group!r}: unknown sensor {sensor!r} for a {what}"
        return f"group {self.group!r}: sensor {sensor!r} has role {self._roles[sensor]!r}, not valid for a {what}"

    def _new_window(self, start: int) -> _Open:
        ow = _Open(start)
        self._open[start] = ow
        heapq.heappush(self._heap, start)
        return ow

    def _report_late(self, sensor: str, item: object, n_samples: int, first_start: int) -> None:
        self.late_messages[sensor] += 1
        self.late_samples[sensor] += n_samples
        self._hand_late(sensor, item, first_start)

    def _hand_late(self, sensor: str, item: object, first_start: int) -> None:
        if self._on_late is not None:
            reason = "closed" if first_start in self._closed_set else "expired"
            self._on_late(self.group, sensor, item, reason)

    def _progress(self, inp: _Input, t_max: int, recv_ns: int) -> list[Window]:
        if inp.max_t is None or t_max > inp.max_t:
            inp.max_t = t_max
        if self._group_max is None or t_max > self._group_max:
            self._group_max = t_max
        if not self._replay:
            now = self._now
            if now is None or recv_ns > now:
                self._now = recv_ns
            elif recv_ns < now - CLOCK_STEP_NS:
                self._clock_stepped_back(now - recv_ns)
            if inp.last_recv is None or recv_ns > inp.last_recv:
                inp.last_recv = recv_ns
        out = self._fire_ready()
        if self._open and (len(self._open) > self._max_open or self._buffered > self._max_bytes):
            self._overflow(out)
        if self._kept:
            updates = self._service_kept()
            if updates:
                out[:0] = updates
        return out

    def _clock_stepped_back(self, delta: int) -> None:
        """The receive clock (the host's wall clock) went back by ``delta``: an NTP step, a VM restored.

        Receive times only ever moved forward here, so after a step back every input's silence stood
        still for the length of the step: a sensor that died then held the watermark for ``delta`` more
        than ``idle_timeout``, and open windows piled up (live mode drops them at the caps). Moving the
        clock and every input's last receive time back by the same amount keeps the silences right.
        ``max_wait`` is wall-clock time after a window's end, so it waits out the step (the watermark
        still closes windows as data arrives).
        """
        self._now -= delta  # type: ignore[operator]  # set: a step is seen against an earlier time
        for inp in self._input_list:
            if inp.last_recv is not None:
                inp.last_recv -= delta
        self.clock_steps_back += 1

    def _compute_watermark(self) -> int | None:
        gmax = self._group_max
        if gmax is None:
            return None
        lo = None
        if self._replay:
            floor = gmax - self._idle
            for inp in self._input_list:
                m = inp.max_t
                if m is not None and m >= floor and (lo is None or m < lo):
                    lo = m
        else:
            cutoff = self._now - self._idle  # type: ignore[operator]  # set whenever gmax is
            for inp in self._input_list:
                m = inp.max_t
                if m is not None and inp.last_recv > cutoff and (lo is None or m < lo):
                    lo = m
            if lo is None:
                lo = gmax
        return lo - self._lateness

    def _fire_ready(self) -> list[Window]:
        out: list[Window] = []
        wm = self._compute_watermark()
        if wm is not None:
            if self._wm is None or wm > self._wm:
                self._wm = wm
            self._close_until(self._wm, "watermark", out)
        if self._max_wait and self._now is not None:
            self._close_until(self._now - self._max_wait, "max_wait", out)
        return out

    def _advance_frontier(self, limit: int) -> None:
        if self._frontier is None or limit > self._frontier:
            self._frontier = limit
            self._late_bound = limit - limit % self._hop

    def _pop_oldest(self) -> _Open:
        start = heapq.heappop(self._heap)
        ow = self._open.pop(start)
        self._buffered -= ow.own_bytes
        self._closed_set.add(start)
        self._closed_fifo.append(start)
        if len(self._closed_fifo) > _CLOSED_MEMORY:
            self._closed_set.discard(self._closed_fifo.popleft())
        return ow

    def _close_until(self, limit: int, trigger: str, out: list[Window]) -> None:
        if self._frontier is None or limit > self._frontier:  # _advance_frontier, inlined: runs per message
            self._frontier = limit
            self._late_bound = limit - limit % self._hop
        heap = self._heap
        size = self._size
        while heap and heap[0] + size <= limit:
            w = self._finish(self._pop_oldest(), trigger)
            if w is not None:
                out.append(w)

    def _overflow(self, out: list[Window]) -> None:
        size = self._size
        while self._open and (len(self._open) > self._max_open or self._buffered > self._max_bytes):
            end = self._heap[0] + size
            if self._replay:
                self._close_until(end, "overflow", out)
            else:
                self._advance_frontier(end)
                start = self._pop_oldest().start
                self.dropped["overflow"] += 1
                # dropped for memory: late data for it goes to on_late, never into a new revision 0
                self._update_floor = max(self._update_floor, start + self._hop)

    def _finish(self, ow: _Open, trigger: str) -> Window | None:
        w = self._assemble(ow, trigger, 0)
        if w is None:
            self.dropped["incomplete"] += 1
        else:
            self.emitted[w.completeness] += 1
            self.triggers[trigger] += 1
        if self._update and trigger != "flush":
            self._kept[ow.start] = _Kept(ow, 0 if w is None else 1, True)
            heapq.heappush(self._kept_heap, ow.start)
            self._kept_bytes += ow.own_bytes
        return w

    def _assemble(self, ow: _Open, trigger: str, revision: int) -> Window | None:
        """The window ``ow`` holds, or None when it is not acceptable under the missing-data policy."""
        roles = self._roles
        frames: dict[str, list[Frame]] = {r: [] for r in IMAGE_ROLES}
        for f in ow.frames:
            frames[roles[f.sensor]].append(f)
        by_role: dict[str, list[tuple[int, int, np.ndarray, str, int]]] = {}
        for p in ow.pieces:
            by_role.setdefault(roles[p[3]], []).append(p)
        presence = {r: bool(frames[r]) if r in IMAGE_ROLES else r in by_role for r in self.configured_roles}
        n_present = sum(presence.values())
        spec = self.spec
        acceptable = n_present >= spec.min_roles and all(presence[r] for r in spec.required_roles)
        full = n_present == len(presence)
        if not acceptable or (not full and spec.missing_policy == "drop"):
            return None
        for lst in frames.values():
            if len(lst) > 1:
                lst.sort(key=_frame_key)
        samples = {r: self._merge(by_role[r]) if r in by_role else Samples.empty() for r in SEQ_ROLES}
        completeness = "flushed" if trigger == "flush" else ("full" if full else "partial")
        start = ow.start
        return Window(self.group, start, start + self._size, frames, samples, presence, completeness, trigger, revision)

    # ---------------------------------------------------------------- late_policy = "update"
    def _horizon_start(self) -> int:
        """The oldest window start still open for updates: windows ending after frontier - horizon."""
        x = self._frontier - self._horizon - self._size  # type: ignore[operator]  # set once anything is late
        return max(x - x % self._hop + self._hop, self._update_floor)

    def _kept_window(self, start: int) -> _Kept:
        kw = self._kept.get(start)
        if kw is None:  # a window that never opened (its data is all late): emitted first as revision 0
            kw = self._kept[start] = _Kept(_Open(start), 0, False)
            heapq.heappush(self._kept_heap, start)
        self._dirty.add(start)
        return kw

    def _absorb_frame(self, frame: Frame, cell: int) -> bool:
        """Add a late frame to its fired windows within the horizon; False if none is (report it late)."""
        size, hop, frontier = self._size, self._hop, self._frontier
        kw = None
        for s in range(max(cell - size + hop, self._horizon_start()), cell + hop, hop):
            if s + size > frontier:  # type: ignore[operator]
                break  # still open: add_frame puts it there
            kw = self._kept_window(s)
            kw.ow.frames.append(frame)
            kw.pending.add(frame.sensor)
        if kw is None:
            return False
        if cell + size <= frontier:  # type: ignore[operator]  # its newest window fired: its bytes are here
            nbytes = frame.image.nbytes  # (otherwise add_frame counts them against that open window)
            kw.ow.own_bytes += nbytes
            self._kept_bytes += nbytes
        self.late_messages[frame.sensor] += 1
        self.late_samples[frame.sensor] += 1
        self.late_used[frame.sensor] += 1
        return True

    def _absorb_samples(self, chunk: RadChunk, j: int, k: int, step: int, horizon: int) -> list:
        """Add samples ``j:k`` of a chunk (late, none before ``horizon``) to their fired windows; returns
        the pieces added, as ``(list, index, lo, hi)`` for :func:`_unpin`."""
        t0, dt, values = chunk.t_ns, chunk.dt_ns, chunk.values
        size, hop, frontier = self._size, self._hop, self._frontier
        per_sample = values.nbytes // values.shape[0]
        held: list[tuple[list, int, int, int]] = []
        t_j = t0 + j * dt
        first = max(t_j - t_j % hop - size + hop, horizon)
        # fired windows only (they end at or before the frontier); add_samples puts the rest in open ones
        for s, lo, hi, own in self._spans(t0, dt, step, j, k, first, frontier - size + 1):  # type: ignore[operator]
            kw = self._kept_window(s)
            kw.ow.pieces.append((t0 + lo * dt, dt, values[lo:hi], chunk.sensor, chunk.seq))
            held.append((kw.ow.pieces, len(kw.ow.pieces) - 1, lo, hi))
            kw.pending.add(chunk.sensor)
            if own > 0:
                kw.ow.own_bytes += own * per_sample
                self._kept_bytes += own * per_sample
        if j == 0:  # otherwise _report_late counts the message
            self.late_messages[chunk.sensor] += 1
        self.late_samples[chunk.sensor] += k - j
        self.late_used[chunk.sensor] += 1
        return held

    def _service_kept(self) -> list[Window]:
        """Emit kept windows whose late inputs have all moved past their end; then evict, oldest first,
        windows that left the horizon, can no longer be updated, or exceed the memory caps (shared with
        the open windows, which take precedence), emitting their pending late data. Returns the updates
        in start order: they are older than any window fired since they were."""
        out: list[Window] = []
        size = self._size
        if self._dirty:
            inputs = self._inputs
            for start in sorted(self._dirty):
                kw = self._kept[start]
                end = start + size
                if all(inputs[x].max_t >= end for x in kw.pending):  # type: ignore[operator]
                    self._emit_update(start, kw, out)
        heap, kept = self._kept_heap, self._kept
        limit = self._frontier - self._horizon  # type: ignore[operator]  # set once a window has fired
        while heap and (
            heap[0] + size <= limit
            or heap[0] < self._update_floor
            or len(kept) + len(self._open) > self._max_open
            or self._buffered + self._kept_bytes > self._max_bytes
        ):
            start = heapq.heappop(heap)
            kw = kept.pop(start)
            self._kept_bytes -= kw.ow.own_bytes
            # evicted before the horizon passed it (memory): must not come back as a second revision 0
            self._update_floor = max(self._update_floor, start + self._hop)
            if kw.pending:
                self._emit_update(start, kw, out)
        if len(out) > 1:
            out.sort(key=lambda w: w.start_ns)
        return out

    def _emit_update(self, start: int, kw: _Kept, out: list[Window]) -> None:
        kw.pending.clear()
        self._dirty.discard(start)
        w = self._assemble(kw.ow, "update", kw.revision)
        if w is None:  # not acceptable: dropped, counted once (when it closed, or now if it never opened)
            if not kw.closed:
                kw.closed = True
                self.dropped["incomplete"] += 1
            return
        if kw.revision == 0:
            self.emitted[w.completeness] += 1
        else:
            self.updated += 1
        kw.revision += 1
        out.append(w)

    def _merge(self, pieces: list[tuple[int, int, np.ndarray, str, int]]) -> Samples:
        dts = {p[1] for p in pieces}
        dt = next(iter(dts)) if len(dts) == 1 else None
        if dt is not None and dt <= 0:
            dt = None
        if len(pieces) == 1:
            t0, pdt, v, _, _ = pieces[0]
            return Samples(None, v, pdt, t0=t0) if pdt > 0 else Samples(np.full(v.shape[0], t0, np.int64), v, dt)
        rank = self._rank
        pieces.sort(key=lambda p: (p[0], rank[p[3]], p[4]))
        lens = np.array([p[2].shape[0] for p in pieces], dtype=np.int64)
        heads = np.cumsum(lens) - lens  # index of each piece's first sample in the concatenation
        t_first = np.array([p[0] for p in pieces], dtype=np.int64)
        values = np.concatenate([p[2] for p in pieces])
        if dt is not None and bool(np.all(t_first[1:] == t_first[:-1] + lens[:-1] * dt)):
            # the usual case: back-to-back chunks of one sensor; one arange instead of three repeats
            return Samples(None, values, dt, t0=int(t_first[0]))
        dts = np.array([p[1] for p in pieces], dtype=np.int64)
        offsets = np.arange(int(heads[-1] + lens[-1]), dtype=np.int64) - np.repeat(heads, lens)
        t = np.repeat(t_first, lens) + np.repeat(dts, lens) * offsets
        if not bool(np.all(t[1:] > t[:-1])):
            sensor_key = np.repeat(np.array([rank[p[3]] for p in pieces], dtype=np.int64), lens)
            seq_key = np.repeat(np.array([p[4] for p in pieces], dtype=np.uint64), lens)  # seq: uint64 on the wire
            order = np.lexsort((seq_key, sensor_key, t))  # stable: last key is primary
            t = t[order]
            values = values[order]
        return Samples(t, values, dt)


def _unpin(values: np.ndarray, held: list[tuple[list, int, int, int]]) -> None:
    """Re-point the pieces a chunk left in windows at a copy of just those samples, when they are under
    half of it. A piece is a view, and a view keeps its whole base buffer alive (the received message):
    a radiometer sending a long rolling buffer of which only the newest samples are in time would hold
    every message's full payload while ``buffered_bytes`` (and its cap) counted only the slices."""
    if not held:
        return
    lo = min(h[2] for h in held)
    hi = max(h[3] for h in held)
    if 2 * (hi - lo) >= values.shape[0]:
        return
    kept = values[lo:hi].copy()
    for pieces, i, a, b in held:
        t, dt, _, sensor, seq = pieces[i]
        pieces[i] = (t, dt, kept[a - lo : b - lo], sensor, seq)
