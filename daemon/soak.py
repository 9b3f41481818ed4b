"""`sacmf soak`: a long run of the real daemon at nominal load while publishers reconnect, with the numbers.

Why a command and not only a test: leaks that matter (a file descriptor per reconnect, a few KiB per
session in the loss tracker) show after an hour, not after twenty seconds. This runs ``sacmf serve`` as
a subprocess with a generated config, drives it with sensor groups at the simulator's default rate,
closes and re-creates the publishers ``--reconnects`` times spread evenly over the run (outside the short
quiet windows the file-descriptor counts need, so that a count never holds a reconnect off), and checks:

* **memory**: RSS of the daemon's processes (serve, the ingest child, multiprocessing's helpers)
  sampled every few seconds; the growth from a baseline taken after the warm-up must stay under 5 %;
* **file descriptors**: their count must not grow (sampled away from reconnects, so a connection that
  is being replaced does not count twice);
* **liveness**: the daemon stays up and healthy, results keep flowing, it exits 0 on SIGTERM and logs no
  error;
* **loss accounting, exactly**: the command keeps its own ledger of every data message it sent per
  sensor, of the seqs it skipped on purpose (losses the daemon must count), of the messages it re-sent
  on purpose (duplicates the daemon must drop) and of the restarts, and at the end compares it with the
  daemon's ``/metrics``, number for number.

Topology, chosen so that the ledger is ground truth: the daemon binds, publishers connect. With
``--transport push`` (the default) they use PUSH -> PULL (the daemon's ``mode = "replay"``), which is
lossless, so every count must match the ledger exactly. ``--transport pub`` runs the live PUB -> SUB
path instead; a PUB socket drops what it sends before the daemon's subscription reaches it (the slow
joiner), which no sender can observe, so there the check is that the daemon accounts for every seq the
ledger used as delivered or missing (conservation), and the transport's own loss is reported.

Reconnects cycle through six kinds per group: ``restart`` (a new publisher with a new session: the
daemon must count a restart, not a gap), ``resume`` (a new socket continuing the same session and seqs:
the daemon must see nothing), ``resume_gap`` (resume 3 seqs further on and announce it by heartbeat:
3 gaps per sensor, revealed as tail loss), ``restart``, ``resume``, ``resume_dup`` (resume 2 seqs back
and send those 2 messages again: 2 duplicates per sensor).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog
import zmq

from daemon.cli_types import integer, number, stop_on_signals
from daemon.serve_process import (
    DaemonProcess,
    ServeError,
    fd_count,
    metric,
    process_name,
    process_tree,
    rss_kib,
    serve_config,
)
from daemon.simulate import SceneSource, SimSettings
from ingest.publisher import SensorPublisher

log = structlog.get_logger("sacmf.soak")

CAMERAS = ("cam_vis", "cam_ir")
RADIOMETERS = ("rad_vis", "rad_ir")
SENSORS = {"cam_vis": "img", "cam_ir": "img", "rad_vis": "rad", "rad_ir": "rad"}
ROLES = {"cam_vis": "image_a", "cam_ir": "image_b", "rad_vis": "seq_a", "rad_ir": "seq_b"}
RECONNECT_KINDS = ("restart", "resume", "resume_gap", "restart", "resume", "resume_dup")
GAP_SEQS = 3  # seqs skipped per sensor by a resume_gap
DUP_SEQS = 2  # messages re-sent per sensor by a resume_dup
QUIET_S = 0.3  # file descriptors are counted at least this long after the end of a reconnect
# No reconnect is planned from QUIET_S + SAMPLE_LEAD_S before a sample time to SAMPLE_HOLD_S after it, so
# that the fd count finds its quiet without holding the reconnects off (one that waited on the count went
# undone when it was among the last of the run, and a backlog done back to back reorders messages across
# the sockets closed and opened).
SAMPLE_LEAD_S = 0.05  # the sampler may wake a little early
SAMPLE_HOLD_S = 0.2  # what an fd count may take on a busy machine
# A reconnect takes about 1 ms (5 ms at the 95th percentile on two busy cores), and the sockets it closes
# need a moment to deliver what they hold: reconnects planned closer than this are refused up front
# instead of failing the run at the end.
MIN_RECONNECT_SPACING_S = 0.01
# Reconnects held up anyway (a late wake-up on a busy machine) are done this far apart, and the load goes
# on past its end, at most CATCH_UP_S, until the last of them is done.
CATCH_UP_SPACING_S = 0.005
CATCH_UP_S = 5.0
TRANSPORTS = {"push": "replay", "pub": "live"}  # publisher socket -> the daemon's [ingest] mode
NOMINAL = SimSettings(height=64, width=64)  # `sacmf simulate` defaults: 10 fps 64x64, 1000 Hz in 100s
READY_TIMEOUT_S = 180.0
FIRST_CONTACT_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 30.0


class SoakError(ServeError):
    """The soak could not start or run (no checkpoint, the daemon never got ready): exit status 2."""


@dataclass(frozen=True)
class SoakOptions:
    """What to run; the defaults are the one-hour soak of the security issue."""

    minutes: float = 60.0
    reconnects: int = 1000
    groups: int = 1
    checkpoint: Path = Path("model/weights/default.pt")
    transport: str = "push"
    sample_interval_s: float = 5.0
    warmup_s: float | None = None  # None: 10 % of the run, at least 60 s, at most half the run
    max_rss_growth_pct: float = 5.0
    fd_tolerance: int = 0
    stall_s: float = 30.0  # results "stopped flowing" when none arrives for this long
    settle_s: float = 60.0  # after the load, how long the daemon may take to account for everything
    workdir: Path | None = None  # config, daemon log, report; default: a new directory under /tmp
    sim: SimSettings = NOMINAL
    torch_threads: int = 0  # [model] torch_threads of the daemon (0: its automatic choice)

    def __post_init__(self) -> None:
        # not (x > 0) also refuses NaN, and isfinite infinity: either would start the daemon, then crash
        if not (math.isfinite(self.minutes) and self.minutes > 0) or self.reconnects < 0 or self.groups < 1:
            raise ValueError(
                f"minutes must be finite and > 0, reconnects >= 0 and groups >= 1, got minutes={self.minutes}, "
                f"reconnects={self.reconnects}, groups={self.groups}"
            )
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {sorted(TRANSPORTS)}, not {self.transport!r}")
        if not (math.isfinite(self.sample_interval_s) and self.sample_interval_s > 0):
            raise ValueError(f"sample_interval_s must be finite and > 0, got {self.sample_interval_s}")
        if self.warmup_s is not None and not (math.isfinite(self.warmup_s) and self.warmup_s >= 0):
            raise ValueError(f"warmup_s must be finite and >= 0, got {self.warmup_s}")
        if self.warmup_s is not None and self.warmup_s >= self.duration_s:  # nothing would be measured after it
            raise ValueError(f"warmup_s ({self.warmup_s:g}) must be shorter than the run ({self.duration_s:g} s)")
        if not (math.isfinite(self.max_rss_growth_pct) and self.max_rss_growth_pct > 0):
            raise ValueError(f"max_rss_growth_pct must be finite and > 0, got {self.max_rss_growth_pct}")
        if self.reconnects:
            free = sum(b - a for a, b in free_segments(self.duration_s, self.fd_count_windows()))
            fit = int(free / MIN_RECONNECT_SPACING_S)
            if self.reconnects > fit:
                raise ValueError(
                    f"{self.reconnects} reconnects do not fit in {self.duration_s:g} s with a sample every "
                    f"{self.sample_interval_s:g} s: at most {fit} (one per {MIN_RECONNECT_SPACING_S * 1000:g} ms "
                    f"in the {free:.3g} s the fd counts leave free); lower --reconnects, raise --minutes or "
                    f"--sample-interval"
                )

    @property
    def duration_s(self) -> float:
        return self.minutes * 60.0

    def fd_count_windows(self) -> list[tuple[float, float]]:
        """(from, to) in seconds of the load around each sample time (every ``sample_interval_s`` from the
        start): no reconnect is planned there."""
        span = QUIET_S + SAMPLE_LEAD_S + SAMPLE_HOLD_S
        if self.sample_interval_s <= span:  # they cover everything; and no list of a million windows
            return [(0.0, self.duration_s)]
        n = math.ceil(self.duration_s / self.sample_interval_s)
        times = (j * self.sample_interval_s for j in range(n))
        return [(max(0.0, t - QUIET_S - SAMPLE_LEAD_S), min(self.duration_s, t + SAMPLE_HOLD_S)) for t in times]

    def reconnect_times(self) -> list[float]:
        """When the reconnects are due (seconds from the start of the load)."""
        return reconnect_schedule(self.duration_s, self.reconnects, self.fd_count_windows())

    @property
    def warmup(self) -> float:
        """Seconds before the RSS/fd baseline: allocator pools, caches and the model settle first."""
        if self.warmup_s is not None:
            return min(self.warmup_s, self.duration_s)
        return min(max(60.0, 0.1 * self.duration_s), 0.5 * self.duration_s)


# ---------------------------------------------------------------- the ledger


@dataclass
class SensorLedger:
    """What the soak did to one sensor: ground truth for the daemon's loss accounting."""

    sent: int = 0  # data messages sent, re-sends included
    seqs: int = 0  # seqs used, summed over sessions (sum of highest seq + 1): delivered + missing
    skipped: int = 0  # seqs skipped on purpose: gaps the daemon must count
    resent: int = 0  # messages sent a second time on purpose: duplicates the daemon must drop
    restarts: int = 0  # new sessions after the first
    high: int = -1  # highest seq used in the current session

    def used(self, seq: int) -> None:
        if seq > self.high:
            self.seqs += seq - self.high
            self.high = seq


# ---------------------------------------------------------------- one sensor group's publisher


class _Group:
    """The publisher of one sensor group, its ledger, and what a ``resume_dup`` must send again."""

    def __init__(self, name: str, endpoint: str, socket_type: str, ctx: zmq.Context) -> None:
        self.name = name
        self.endpoint = endpoint
        self.socket_type = socket_type
        self.ctx = ctx
        self.ledger = {s: SensorLedger() for s in SENSORS}
        self.recent: dict[str, deque] = {s: deque(maxlen=DUP_SEQS) for s in SENSORS}
        self.reconnects: Counter[str] = Counter()
        self.pub = self._open()
        self.next_frame = 0
        self.next_chunk = 0

    def _open(self, session: int | None = None, next_seq: dict[str, int] | None = None) -> SensorPublisher:
        return SensorPublisher(
            self.endpoint,
            self.name,
            SENSORS,
            bind=False,
            socket_type=self.socket_type,
            context=self.ctx,
            session=session,
            next_seq=next_seq,
            check=False,  # a load generator of known-good messages: measure the daemon, not this check
        )

    def send(self, sensor: str, item: tuple, resend: bool = False) -> int:
        kind, data, t_ns, extra, meta = item
        if kind == "img":
            seq = self.pub.send_image(sensor, data, t_ns, extra, meta=meta)
        else:
            seq = self.pub.send_samples(sensor, data, t_ns, extra, meta=meta)
        led = self.ledger[sensor]
        led.sent += 1
        if resend:
            led.resent += 1
        else:
            self.recent[sensor].append((seq, item))
        led.used(seq)
        return seq

    def reconnect(self, kind: str) -> None:
        """Close the publisher and open a new one, as ``kind`` says (see the module docstring)."""
        old = self.pub
        session, nxt = old.session, old.next_seq
        old.close()  # stops heartbeats, sends a last one, closes the socket (linger sends the rest)
        self.reconnects[kind] += 1
        if kind == "restart":
            self.pub = self._open()
            for sensor, led in self.ledger.items():
                led.restarts += 1
                led.high = -1
                self.recent[sensor].clear()
            return
        resend: dict[str, list] = {}
        if kind == "resume_gap":
            nxt = {s: n + GAP_SEQS for s, n in nxt.items()}
        elif kind == "resume_dup":
            resend = {s: list(self.recent[s]) for s in SENSORS}
            nxt = {s: n - len(resend[s]) for s, n in nxt.items()}
        elif kind != "resume":
            raise ValueError(f"unknown reconnect kind {kind!r}")
        self.pub = self._open(session, nxt)
        if kind == "resume_gap":
            for sensor, led in self.ledger.items():
                led.skipped += GAP_SEQS
                led.used(led.high + GAP_SEQS)
                self.recent[sensor].clear()  # a later resume_dup must re-send seqs that were really sent
            self.pub.heartbeat()  # announces the skipped seqs: the daemon counts them as tail loss
        for sensor, items in resend.items():
            for seq, item in items:
                again = self.send(sensor, item, resend=True)
                if again != seq:
                    raise AssertionError(f"{self.name}/{sensor}: re-sent seq {again}, expected {seq}")

    def close(self) -> None:
        self.pub.close()


# ---------------------------------------------------------------- the daemon's processes


def daemon_config(opts: SoakOptions, results_endpoint: str) -> str:
    """The serve config: see :func:`daemon.serve_process.serve_config`."""
    return serve_config(
        generator="soak",
        mode=TRANSPORTS[opts.transport],
        groups={name: ROLES for name in group_names(opts.groups)},
        window_ms=opts.sim.scene_ms,
        checkpoint=Path(opts.checkpoint),
        torch_threads=opts.torch_threads,
        results_endpoint=results_endpoint,
        shutdown_s=SHUTDOWN_TIMEOUT_S,
    )


def group_names(n: int) -> list[str]:
    return [f"soak{i + 1}" for i in range(n)]


# ---------------------------------------------------------------- sampling


@dataclass
class _Shared:
    """State shared by the driver (this thread) and the sampler thread."""

    quiet: threading.Lock = field(default_factory=threading.Lock)  # held by a reconnect and by an fd count
    last_reconnect: float = 0.0  # monotonic end of the last reconnect
    # set by the driver when the load starts (load_start: its monotonic time): the sampler's times count
    # from there, the same clock the reconnect plan leaves the fd counts' quiet windows on
    started: threading.Event = field(default_factory=threading.Event)
    load_start: float = 0.0
    abort: threading.Event = field(default_factory=threading.Event)
    died: bool = False


def take_sample(root: int, shared: _Shared | None = None) -> dict:
    """RSS and fds of every process of the daemon, away from any reconnect in progress."""
    lock = shared.quiet if shared is not None else contextlib.nullcontext()
    with lock:
        if shared is not None:
            wait = shared.last_reconnect + QUIET_S - time.monotonic()
            if wait > 0:
                time.sleep(wait)
        procs = {}
        for pid in process_tree(root):
            rss, fds = rss_kib(pid), fd_count(pid)
            if rss is not None and fds is not None:
                procs[str(pid)] = {"name": process_name(pid, root), "rss_kib": rss, "fds": fds}
    return {
        "rss_kib": sum(p["rss_kib"] for p in procs.values()),
        "fds": sum(p["fds"] for p in procs.values()),
        "procs": procs,
    }


def _sampler(
    daemon: DaemonProcess, opts: SoakOptions, t0: float, shared: _Shared, samples: list, done: threading.Event
) -> None:
    while not shared.started.wait(0.1):
        if done.is_set():
            return
    next_at = shared.load_start
    last_log = time.monotonic()
    while not done.wait(max(0.0, next_at - time.monotonic())):
        next_at += opts.sample_interval_s
        if not daemon.alive():
            shared.died = True
            shared.abort.set()
            return
        s = take_sample(daemon.pid, shared)
        m = daemon.metrics()
        s["t"] = round(time.monotonic() - t0, 3)
        s["results"] = None if m is None else int(metric(m, "sacmf_inference_requests_total", result="success"))
        s["healthy"] = daemon.healthy()
        samples.append(s)
        if time.monotonic() - last_log >= 60.0:
            last_log = time.monotonic()
            log.info("soak_progress", t_s=s["t"], rss_mib=round(s["rss_kib"] / 1024, 1), fds=s["fds"],
                     results=s["results"], healthy=s["healthy"])  # fmt: skip


# ---------------------------------------------------------------- the load


def free_segments(duration_s: float, blocked: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The parts of ``[0, duration_s]`` outside the ``blocked`` (from, to) windows, in order."""
    free, at = [], 0.0
    for a, b in sorted(blocked):
        if a > at:
            free.append((at, min(a, duration_s)))
        at = max(at, b)
        if at >= duration_s:
            break
    if at < duration_s:
        free.append((at, duration_s))
    return [(a, b) for a, b in free if b > a]


def reconnect_schedule(duration_s: float, n: int, blocked: Sequence[tuple[float, float]] = ()) -> list[float]:
    """``n`` reconnect times (seconds from the start), evenly spread over the time outside ``blocked``:
    one in the middle of each 1/n of it."""
    free = free_segments(duration_s, list(blocked))
    total = sum(b - a for a, b in free)
    if n and not free:
        raise ValueError(f"no time outside {list(blocked)} for {n} reconnects")
    times, passed, seg = [], 0.0, 0
    for i in range(n):
        x = (i + 0.5) * total / n
        while seg < len(free) - 1 and x > passed + free[seg][1] - free[seg][0]:
            passed += free[seg][1] - free[seg][0]
            seg += 1
        times.append(free[seg][0] + x - passed)
    return times


def _drive(
    groups: list[_Group], opts: SoakOptions, scenes: SceneSource, shared: _Shared, stop: threading.Event
) -> float:
    """Publishes every group at the nominal rate, paced on the wall clock (like `sacmf simulate`), and
    performs the reconnects when due (``opts.reconnect_times``: none in the fd counts' quiet windows).
    Returns the time the load really ran (s).

    A reconnect held up past its time anyway (a late wake-up, an fd count that ran long) is done as soon
    as possible, at most one per CATCH_UP_SPACING_S, and the load goes on past its end (at most
    CATCH_UP_S) until every planned reconnect is done: the last one is due 1/2n of the run before the
    end, and one held up there used to be left undone."""
    s = opts.sim
    exp_ns = int(s.exposure_ms * 1e6)
    dt_ns = scenes.dt_ns
    chunk_ns = dt_ns * s.chunk_samples
    frame_ns = int(1e9 / s.frame_rate_hz)
    scenes.scene(scenes.index(time.time_ns()))  # generated before the clock starts
    start = time.time_ns()
    end = start + int(opts.duration_s * 1e9)
    shared.load_start = time.monotonic()
    shared.started.set()
    give_up = end + int(CATCH_UP_S * 1e9)
    due = [start + int(t * 1e9) for t in opts.reconnect_times()]
    spacing_ns = int(CATCH_UP_SPACING_S * 1e9)
    last_ns = 0  # when the last reconnect ended
    k = 0
    for g in groups:
        g.next_frame = g.next_chunk = start
    while not stop.is_set() and not shared.abort.is_set():
        now = time.time_ns()
        if now >= end and (k >= len(due) or now >= give_up):
            break
        for g in groups:
            if now >= g.next_frame:
                t_ns = g.next_frame
                for band, cam in enumerate(CAMERAS):
                    image, truth = scenes.frame(t_ns, band)
                    g.send(cam, ("img", image, t_ns, exp_ns, truth.to_meta(full=band == 0)))
                g.next_frame += frame_ns
            if now >= g.next_chunk + chunk_ns:  # a chunk is published once its last sample was taken
                t_ns = g.next_chunk
                for band, rad in enumerate(RADIOMETERS):
                    values, truth = scenes.samples(t_ns, s.chunk_samples, band)
                    g.send(rad, ("rad", values, t_ns, dt_ns, truth.to_meta(full=False)))
                g.next_chunk += chunk_ns
        retry = False
        if k < len(due) and now >= max(due[k], last_ns + spacing_ns):
            # never while the sampler counts file descriptors; the data keeps flowing meanwhile
            if shared.quiet.acquire(blocking=False):
                try:
                    g = groups[k % len(groups)]
                    g.reconnect(RECONNECT_KINDS[(k // len(groups)) % len(RECONNECT_KINDS)])
                    shared.last_reconnect = time.monotonic()
                    last_ns = time.time_ns()
                finally:
                    shared.quiet.release()
                k += 1
            else:
                retry = True
        scenes.scene(scenes.index(now) + 1)  # the next scene is made while idle, not when due
        wake = min([*(g.next_frame for g in groups), *(g.next_chunk + chunk_ns for g in groups)])
        if now < end:
            wake = min(wake, end)
        if k < len(due):
            wake = min(wake, max(due[k], last_ns + spacing_ns) if not retry else time.time_ns() + 10_000_000)
        stop.wait(max(0.0, (wake - time.time_ns()) / 1e9))
    return (time.time_ns() - start) / 1e9


def _wait_first_contact(daemon: DaemonProcess, groups: list[_Group], timeout: float) -> None:
    """Until the daemon has heard a heartbeat of every sensor: before that, a PUB publisher's data could
    be lost to the slow joiner and counted as ``joined_late``, which /metrics does not show."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = daemon.metrics()
        if m is not None and all(
            metric(m, "sacmf_ingest_messages_total", group=g.name, sensor=s, kind="hb") > 0
            for g in groups
            for s in SENSORS
        ):
            return
        if not daemon.alive():
            raise SoakError(f"the daemon exited ({daemon.proc.returncode}); log: {daemon.log_path}")
        time.sleep(0.2)
    raise SoakError(f"the daemon heard no heartbeat of some sensor within {timeout:.0f} s")


# ---------------------------------------------------------------- accounting


def daemon_counts(m: dict[str, dict[tuple, float]], group: str, sensor: str) -> dict[str, int]:
    """The daemon's loss accounting of one sensor, from /metrics."""
    lab = {"group": group, "sensor": sensor}
    return {
        "received": int(metric(m, "sacmf_ingest_messages_total", kind=SENSORS[sensor], **lab)),
        "gaps_detected": int(metric(m, "sacmf_ingest_gap_messages_total", **lab)),
        "missing": int(metric(m, "sacmf_ingest_missing_messages", **lab)),
        "duplicates": int(metric(m, "sacmf_ingest_duplicate_messages_total", **lab)),
        "reordered": int(metric(m, "sacmf_ingest_reordered_messages_total", **lab)),
        "stale": int(metric(m, "sacmf_ingest_stale_messages_total", **lab)),
        "restarts": int(metric(m, "sacmf_publisher_restarts_total", **lab)),
    }


def compare_sensor(led: SensorLedger, d: dict[str, int], lossless: bool) -> tuple[dict, list[str]]:
    """Expected vs the daemon's counts for one sensor; the list names every mismatch.

    Always: every seq the ledger used is delivered or missing (conservation), a missing seq is a detected
    gap not healed by a late arrival, nothing is stale, each restart is counted. Lossless (PUSH): also
    every message arrived, the missing ones are exactly those skipped, the duplicates exactly those re-sent.
    """
    delivered = d["received"] - d["duplicates"] - d["stale"]
    expected: dict[str, int] = {"stale": 0, "restarts": led.restarts}
    if lossless:
        expected |= {"received": led.sent, "missing": led.skipped, "duplicates": led.resent}
    problems = [f"{k}: daemon {d[k]}, expected {v}" for k, v in expected.items() if d[k] != v]
    if delivered + d["missing"] != led.seqs:
        hint = "" if lossless else " (PUB/SUB: a session's tail sent on a socket that closed before its subscription"
        hint += "" if lossless else " reached the daemon, final heartbeat included, is invisible to it)"
        problems.append(
            f"conservation: delivered {delivered} + missing {d['missing']} = {delivered + d['missing']}, "
            f"but {led.seqs} seqs were used{hint}"
        )
    if d["gaps_detected"] - d["reordered"] != d["missing"]:
        problems.append(
            f"gaps: detected {d['gaps_detected']} - healed by reordering {d['reordered']} != missing {d['missing']}"
        )
    return expected, problems


def compare_accounting(groups: list[_Group], m: dict[str, dict[tuple, float]], lossless: bool) -> dict:
    """Ledger against /metrics for every sensor, plus what no message of this soak may cause."""
    sensors, problems = {}, []
    for g in groups:
        for sensor, led in g.ledger.items():
            d = daemon_counts(m, g.name, sensor)
            expected, wrong = compare_sensor(led, d, lossless)
            key = f"{g.name}/{sensor}"
            sensors[key] = {
                "ledger": {k: v for k, v in asdict(led).items() if k != "high"},
                "daemon": d,
                "expected": expected,
                "transport_lost": led.sent - d["received"],
                "ok": not wrong,
            }
            problems.extend(f"{key} {p}" for p in wrong)
    rejected = {
        dict(k).get("reason", "?"): int(v) for k, v in m.get("sacmf_ingest_rejected_messages_total", {}).items()
    }
    callback = {
        dict(k).get("callback", "?"): int(v) for k, v in m.get("sacmf_ingest_callback_errors_total", {}).items()
    }
    problems.extend(f"rejected {r}: {n}" for r, n in rejected.items() if n)
    problems.extend(f"ingest {c} errors: {n}" for c, n in callback.items() if n)
    return {
        "ok": not problems,
        "lossless": lossless,
        "problems": problems,
        "sensors": sensors,
        "rejected": {r: n for r, n in rejected.items() if n},
    }


def pipeline_counts(m: dict[str, dict[tuple, float]]) -> dict[str, int]:
    """Windows through the daemon: every window ingest emitted reached the model or was counted dropped."""
    return {
        "emitted": int(metric(m, "sacmf_windows_emitted_total")),
        "received": int(metric(m, "sacmf_inference_windows_received_total")),
        "succeeded": int(metric(m, "sacmf_inference_requests_total", result="success")),
        "failed": int(metric(m, "sacmf_inference_requests_total", result="failure")),
        "dropped_queue_full": int(metric(m, "sacmf_inference_windows_dropped_total")),
        "queue_depth": int(metric(m, "sacmf_inference_queue_depth")),
        "dropped_in_ingest": int(metric(m, "sacmf_windows_dropped_total")),
        "late_messages": int(metric(m, "sacmf_ingest_late_messages_total")),
    }


def pipeline_ok(p: dict[str, int]) -> bool:
    done = p["succeeded"] + p["failed"] + p["dropped_queue_full"] + p["queue_depth"]
    return p["emitted"] == p["received"] == done and p["failed"] == 0


def _settle(daemon: DaemonProcess, groups: list[_Group], lossless: bool, timeout: float) -> tuple[dict, dict, dict]:
    """Scrape until the accounting and the window pipeline stop changing and check out (or the timeout)."""
    deadline = time.monotonic() + timeout
    previous = None
    stable = 0
    while True:
        m = daemon.metrics()
        if m is not None:
            acc = compare_accounting(groups, m, lossless)
            pipe = pipeline_counts(m)
            now = ({k: v["daemon"] for k, v in acc["sensors"].items()}, pipe)
            stable = stable + 1 if now == previous else 0
            previous = now
            # snapshots of the ingest process are at most 0.5 s old: three equal scrapes 0.5 s apart
            if stable >= 3 and acc["ok"] and pipeline_ok(pipe):
                return m, acc, pipe
        if time.monotonic() > deadline or not daemon.alive():
            if m is None:
                raise SoakError("no /metrics from the daemon at the end of the run")
            return m, acc, pipe
        time.sleep(0.5)


# ---------------------------------------------------------------- the run


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


MIN_SAMPLES_AFTER_WARMUP = 6  # two disjoint medians of three: baseline and final


def summarise_resources(samples: list[dict], load_s: float, warmup_s: float) -> dict:
    """Baseline (median of the first 3 samples after the warm-up), final (median of the last 3 of the
    load), max, and growth: a median of three ignores one garbage-collection spike."""
    during = [s for s in samples if s["t"] <= load_s + 1.0]
    measured = [s for s in during if s["t"] >= warmup_s]
    after = measured or during[-3:]
    if not after:
        return {}
    head, tail = after[:3], after[-3:]
    out: dict[str, Any] = {"samples": len(samples), "baseline_at_s": head[0]["t"], "final_at_s": tail[-1]["t"]}
    # baseline and final are medians of 3 each: with fewer than 6 samples after the warm-up they share
    # samples, and the growth says nothing (0 % when they are the same three)
    out["samples_after_warmup"] = len(measured)
    for key in ("rss_kib", "fds"):
        base = _median([s[key] for s in head])
        final = _median([s[key] for s in tail])
        peak = max(s[key] for s in during)
        out[key] = {
            "first": during[0][key],
            "baseline": base,
            "final": final,
            "max": peak,
            "max_after_warmup": max(s[key] for s in after),
            "growth_pct": round(100.0 * (final - base) / base, 3) if base else None,
            "max_growth_pct": round(100.0 * (max(s[key] for s in after) - base) / base, 3) if base else None,
        }
    procs: dict[str, dict] = {}
    for s in (head[0], tail[-1]):
        for pid, p in s["procs"].items():
            entry = procs.setdefault(pid, {"name": p["name"]})
            entry["baseline" if s is head[0] else "final"] = {"rss_kib": p["rss_kib"], "fds": p["fds"]}
    out["processes"] = procs
    return out


def results_flow(samples: list[dict], load_s: float) -> dict:
    """When the first result came and the longest span without a new one during the load (resolution:
    the sample interval), from the samples' result counts."""
    during = [s for s in samples if s["t"] <= load_s + 1.0 and s["results"] is not None]
    first = next((s["t"] for s in during if s["results"] > 0), None)
    longest, last_t, last_n = 0.0, 0.0, None
    for s in during:
        if last_n is None or s["results"] > last_n:
            if last_n:  # pauses count from the first result on
                longest = max(longest, s["t"] - last_t)
            last_t, last_n = s["t"], s["results"]
    if last_n:
        longest = max(longest, during[-1]["t"] - last_t)
    return {"first_result_at_s": first, "longest_pause_s": round(longest, 3), "results": last_n or 0}


def run_soak(opts: SoakOptions, stop: threading.Event | None = None) -> dict:
    """Run the soak; returns the report (``report["ok"]`` is the verdict). Raises SoakError when the run
    could not start. ``stop`` ends the load early (Ctrl-C); the checks still run on what was done."""
    stop = stop or threading.Event()
    # absolute: the daemon runs in the repository root, so a relative config path (or checkpoint) would
    # name a file there, not the one written here
    ckpt = Path(opts.checkpoint).resolve()
    if not ckpt.is_file():
        raise SoakError(f"no model checkpoint at {ckpt} (--checkpoint)")
    workdir = Path(opts.workdir).resolve() if opts.workdir else Path(tempfile.mkdtemp(prefix="sacmf-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ipc_dir = tempfile.mkdtemp(prefix="sacmf-soak-ipc-")  # short: ipc paths are limited to ~100 bytes
    results_ep = f"ipc://{ipc_dir}/results.ipc"
    config = workdir / "serve.toml"
    config.write_text(daemon_config(opts, results_ep))
    daemon = DaemonProcess(config, workdir / "serve.log")
    ctx = zmq.Context()
    groups: list[_Group] = []
    shared = _Shared()
    samples: list[dict] = []
    sampler_done = threading.Event()
    sampler: threading.Thread | None = None
    results: Counter[str] = Counter()
    sub_stop = threading.Event()
    sub_thread: threading.Thread | None = None
    report: dict[str, Any] = {
        "options": {**{k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}},
        "workdir": str(workdir),
        "config": str(config),
        "daemon_log": str(daemon.log_path),
    }
    report["options"]["warmup_s"] = opts.warmup
    load_s = 0.0
    exit_code: int | None = None
    try:
        daemon.start()
        ready = daemon.wait_ready(READY_TIMEOUT_S)
        endpoint = ready["ingest"][0]
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"det/")
        sub.connect(results_ep)
        sub_thread = threading.Thread(target=_collect, args=(sub, results, sub_stop), name="soak-results", daemon=True)
        sub_thread.start()
        socket_type = opts.transport
        groups = [_Group(name, endpoint, socket_type, ctx) for name in group_names(opts.groups)]
        _wait_first_contact(daemon, groups, FIRST_CONTACT_TIMEOUT_S)
        scenes = SceneSource(opts.sim)
        log.info(
            "soak_started",
            pid=daemon.pid,
            endpoint=endpoint,
            admin=daemon.admin,
            minutes=opts.minutes,
            reconnects=opts.reconnects,
            groups=opts.groups,
            transport=opts.transport,
            workdir=str(workdir),
        )
        t0 = time.monotonic()
        sampler = threading.Thread(
            target=_sampler, args=(daemon, opts, t0, shared, samples, sampler_done), name="soak-sampler", daemon=True
        )
        sampler.start()
        load_s = _drive(groups, opts, scenes, shared, stop)
        sampler_done.set()
        sampler.join(60)
        alive_at_end = daemon.alive() and not shared.died
        if alive_at_end:  # the final sample: publishers still connected, right at the end of the load
            final = take_sample(daemon.pid, shared)
            final |= {"t": round(time.monotonic() - t0, 3), "healthy": daemon.healthy()}
            m = daemon.metrics()
            final["results"] = None if m is None else int(metric(m, "sacmf_inference_requests_total", result="success"))
            samples.append(final)
        for g in groups:
            g.close()
        if alive_at_end:
            m, acc, pipe = _settle(daemon, groups, opts.transport == "push", opts.settle_s)
            closed = take_sample(daemon.pid)
        else:
            m, acc, pipe, closed = None, None, None, None
        report["after_publishers_closed"] = closed and {"rss_kib": closed["rss_kib"], "fds": closed["fds"]}
        report["accounting"] = acc
        report["pipeline"] = pipe
        report["alive_at_end"] = alive_at_end
    finally:
        sampler_done.set()
        for g in groups:
            with contextlib.suppress(Exception):
                g.close()
        exit_code = daemon.stop(SHUTDOWN_TIMEOUT_S + 30.0)
        sub_stop.set()
        if sub_thread is not None:
            sub_thread.join(5)
        ctx.destroy(linger=0)
        shutil.rmtree(ipc_dir, ignore_errors=True)
    report["exit_code"] = exit_code
    report["load_s"] = round(load_s, 3)
    report["interrupted"] = stop.is_set()
    report["reconnects"] = dict(sum((g.reconnects for g in groups), Counter()))
    report["reconnects_total"] = sum(report["reconnects"].values())
    report["sent"] = sum(led.sent for g in groups for led in g.ledger.values())
    report["results_received"] = dict(results)
    report["resources"] = summarise_resources(samples, load_s, opts.warmup)
    report["results_flow"] = results_flow(samples, load_s)
    report["log_errors"] = [
        {k: e.get(k) for k in ("event", "level", "error", "timestamp") if k in e} for e in daemon.errors
    ]
    shutdown = daemon.events.get("shutdown_complete")
    report["shutdown"] = None if shutdown is None else {k: v for k, v in shutdown.items() if k not in ("level",)}
    report["samples"] = samples
    report["checks"] = _checks(report, opts, samples, shared)
    report["ok"] = all(c["ok"] for c in report["checks"])
    return report


def _collect(sub: zmq.Socket, results: Counter, stop: threading.Event) -> None:
    while not stop.is_set():
        if sub.poll(100):
            topic = sub.recv_multipart()[0]
            results[topic.decode(errors="replace")] += 1
    sub.close(linger=0)


def _checks(report: dict, opts: SoakOptions, samples: list[dict], shared: _Shared) -> list[dict]:
    checks = []

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"name": name, "ok": bool(ok), "detail": detail})

    res = report["resources"]
    check(
        "completed",
        not report["interrupted"] and report["reconnects_total"] == opts.reconnects,
        f"load {report['load_s']:.0f} s of {opts.duration_s:.0f} s, {report['reconnects_total']} of "
        f"{opts.reconnects} reconnects" + (" (interrupted)" if report["interrupted"] else ""),
    )
    check(
        "daemon_alive",
        report.get("alive_at_end", False) and not shared.died,
        "up through the whole load" if report.get("alive_at_end") else "the daemon died during the load",
    )
    check("clean_exit", report["exit_code"] == 0, f"exit status {report['exit_code']} on SIGTERM")
    unhealthy = [s["t"] for s in samples if not s.get("healthy", True)]
    check("healthy", not unhealthy, f"/healthz 200 in all {len(samples)} samples" if not unhealthy
          else f"/healthz failed at t = {unhealthy[:10]} s")  # fmt: skip
    flow = report["results_flow"]
    first = flow["first_result_at_s"]
    check(
        "results_flowing",
        first is not None and first <= opts.stall_s and flow["longest_pause_s"] < opts.stall_s,
        f"{flow['results']} results; first at {first} s, longest pause {flow['longest_pause_s']} s "
        f"(limit {opts.stall_s:g} s)",
    )
    if res:
        rss, fds = res["rss_kib"], res["fds"]
        if res["samples_after_warmup"] < MIN_SAMPLES_AFTER_WARMUP:  # a growth of 0 % measured nothing
            n = res["samples_after_warmup"]
            check("rss_growth", False, f"only {n} samples after the warm-up (at least {MIN_SAMPLES_AFTER_WARMUP} "
                  "needed): run longer, or lower --sample-interval or --warmup")  # fmt: skip
        else:
            check(
                "rss_growth",
                rss["growth_pct"] is not None and rss["growth_pct"] < opts.max_rss_growth_pct,
                f"{rss['baseline'] / 1024:.1f} MiB at {res['baseline_at_s']:.0f} s -> {rss['final'] / 1024:.1f} MiB "
                f"({rss['growth_pct']:+.2f} %, limit {opts.max_rss_growth_pct:g} %), max {rss['max'] / 1024:.1f} MiB",
            )
        check(
            "fds",
            fds["final"] <= fds["baseline"] + opts.fd_tolerance,
            f"{fds['baseline']:g} at {res['baseline_at_s']:.0f} s -> {fds['final']:g} (max {fds['max']:g}, "
            f"tolerance {opts.fd_tolerance})",
        )
    else:
        check("rss_growth", False, "no samples")
        check("fds", False, "no samples")
    acc = report.get("accounting")
    if acc is None:
        check("accounting", False, "not compared: the daemon died")
    else:
        kind = "exact (lossless PUSH)" if acc["lossless"] else "conserved (PUB/SUB)"
        lost = sum(s["transport_lost"] for s in acc["sensors"].values())
        detail = f"{kind} for {len(acc['sensors'])} sensors" + (f"; transport lost {lost}" if lost else "")
        check("accounting", acc["ok"], detail if acc["ok"] else "; ".join(acc["problems"][:20]))
    pipe = report.get("pipeline")
    if pipe is None:
        check("pipeline", False, "not compared: the daemon died")
    else:
        check(
            "pipeline",
            pipeline_ok(pipe),
            f"windows emitted {pipe['emitted']}, received {pipe['received']}, succeeded {pipe['succeeded']}, "
            f"failed {pipe['failed']}, dropped {pipe['dropped_queue_full']}, queued {pipe['queue_depth']}",
        )
    errors = report["log_errors"]
    check("no_errors", not errors, "no error in the daemon log" if not errors
          else f"{len(errors)} error events: {sorted({e.get('event') for e in errors})}")  # fmt: skip
    return checks


# ---------------------------------------------------------------- output and the command


def format_summary(report: dict) -> str:
    """The human summary printed at the end (the JSON report has every number)."""
    o = report["options"]
    lines = [
        f"sacmf soak: {'PASS' if report['ok'] else 'FAIL'} ({report['load_s'] / 60:.1f} min of {o['minutes']:g}, "
        f"{report['reconnects_total']} reconnects {report['reconnects']}, {o['groups']} group(s), "
        f"transport {o['transport']}, {report['sent']} data messages sent)",
    ]
    res = report["resources"]
    if res:
        r, f = res["rss_kib"], res["fds"]
        lines.append(
            f"  RSS  baseline {r['baseline'] / 1024:.1f} MiB (t={res['baseline_at_s']:.0f} s, warm-up "
            f"{o['warmup_s']:.0f} s), final {r['final'] / 1024:.1f} MiB, max {r['max'] / 1024:.1f} MiB: growth "
            f"{r['growth_pct']:+.2f} % (max {r['max_growth_pct']:+.2f} %)"
        )
        after = report.get("after_publishers_closed") or {}
        lines.append(
            f"  fds  baseline {f['baseline']:g}, final {f['final']:g}, max {f['max']:g}, after publishers closed "
            f"{after.get('fds', '-')}"
        )
        for pid, p in res["processes"].items():
            b, e = p.get("baseline", {}), p.get("final", {})
            lines.append(
                f"       {p['name']:<16} pid {pid:>7}: RSS {b.get('rss_kib', 0) / 1024:7.1f} -> "
                f"{e.get('rss_kib', 0) / 1024:7.1f} MiB, fds {b.get('fds', '-')} -> {e.get('fds', '-')}"
            )
    acc = report.get("accounting")
    if acc:
        lines.append("  accounting per sensor (ledger | daemon):")
        for key, s in acc["sensors"].items():
            led, d = s["ledger"], s["daemon"]
            lines.append(
                f"       {key:<18} sent {led['sent']} | received {d['received']}; skipped {led['skipped']} | "
                f"missing {d['missing']} (gaps {d['gaps_detected']}, reordered {d['reordered']}); resent "
                f"{led['resent']} | duplicates {d['duplicates']}; restarts {led['restarts']} | {d['restarts']}; "
                f"stale {d['stale']}{'' if s['ok'] else '  MISMATCH'}"
            )
    for c in report["checks"]:
        lines.append(f"  [{'ok' if c['ok'] else 'FAIL'}] {c['name']}: {c['detail']}")
    lines.append(f"  daemon log {report['daemon_log']}")
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `sacmf soak`."""
    p = sub.add_parser("soak", help="run the daemon at nominal load with reconnecting publishers; check leaks")
    p.add_argument("--minutes", type=number(0, above=True), default=60.0, help="load duration (default 60)")
    p.add_argument("--reconnects", type=integer(0), default=1000, help="publisher reconnects in total (default 1000)")
    p.add_argument("--groups", type=integer(1), default=1, help="sensor groups, each 2 cameras + 2 radiometers")
    p.add_argument("--checkpoint", type=Path, default=Path("model/weights/default.pt"), help="model to serve")
    p.add_argument("--transport", default="push", choices=sorted(TRANSPORTS),
                   help="push: lossless PUSH/PULL, exact ledger (default); pub: live PUB/SUB")  # fmt: skip
    p.add_argument("--sample-interval", type=number(0, above=True), default=5.0,
                   help="seconds between RSS/fd samples")  # fmt: skip
    p.add_argument("--warmup", type=number(0), default=None, help="seconds before the baseline (default 10 %%, >= 60)")
    p.add_argument("--max-rss-growth", type=number(0, above=True), default=5.0,
                   help="failing RSS growth in %% (default 5)")  # fmt: skip
    p.add_argument("--workdir", type=Path, default=None, help="config, daemon log (default: a new /tmp dir)")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the full report here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """0: every check passed; 1: a check failed; 2: the soak could not run."""
    try:
        opts = SoakOptions(
            minutes=args.minutes,
            reconnects=args.reconnects,
            groups=args.groups,
            checkpoint=args.checkpoint,
            transport=args.transport,
            sample_interval_s=args.sample_interval,
            warmup_s=args.warmup,
            max_rss_growth_pct=args.max_rss_growth,
            workdir=args.workdir,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = stop_on_signals()
    try:
        report = run_soak(opts, stop)
    except ServeError as exc:  # SoakError included
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str))
        print(f"  report {args.json}")
    return 0 if report["ok"] else 1
