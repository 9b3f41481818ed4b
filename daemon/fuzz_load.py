"""`sacmf fuzz-load`: a million malformed messages against a live `sacmf serve`, counted to the last one.

Why a command and not only a test: the security issue asks for evidence that a real daemon, its real
ZeroMQ socket and its real metrics survive a flood of bad input: no crash, no stall, every bad message
counted under the reason it deserves, and every valid message interleaved with the flood delivered. A
unit test can only afford a short flood (tests/test_fuzz_load.py runs this module with 20,000); the full
run and its numbers go in BENCHMARKS.md.

How: the command starts `sacmf serve` as a subprocess with a generated config in replay mode (PUSH ->
PULL, lossless: the sender blocks while the daemon is behind, so every count must be exact), binds the
PUSH socket the daemon connects to, and sends malformed messages of every family of
``ingest.fuzzcases`` (each built with the one reason it must get) with a valid four-sensor stream
interleaved (every ``valid_every``-th message; heartbeats included). A tail of valid data then moves
event time on so that every window of the flood closes. It then reads ``/metrics`` until the counters
settle and checks:

* the daemon process is alive and ``/healthz`` answered 200 throughout;
* ``sacmf_ingest_rejected_messages_total{reason}`` equals, reason by reason, what was sent (so the sum is
  exactly the number of malformed messages);
* ``sacmf_ingest_messages_total`` equals the valid messages sent, per sensor and kind, with no gaps and
  no duplicates; no internal errors in ingest;
* the pipeline did not stall: the windows after the flood produce results on the results socket, no
  window was dropped or failed in the model, and the counters never stopped moving for ``stall_s``;
* every window went through: windows emitted by ingest == received by inference == succeeded == results
  received here (a window lost between ingest and the model would otherwise pass every check above);
* SIGTERM then shuts the daemon down cleanly (exit status 0).

It prints messages sent, msgs/s, per-reason counts, valid messages delivered, the daemon's RSS before
and after (its main and ingest processes) and the elapsed time, optionally writes them as JSON, and
exits 1 if any check fails. SIGINT or SIGTERM (Ctrl-C) stops the run where it is, stops the daemon and
reports what was done, with the folder the daemon's log was kept in, and exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import zmq

from daemon.cli_types import integer
from daemon.serve_process import DaemonProcess, ServeError, metric
from daemon.soak import pipeline_counts, pipeline_ok
from ingest import fuzzcases, protocol

ROOT = Path(__file__).resolve().parents[1]
SEC = 1_000_000_000
T0 = 1_800_000_000 * SEC  # event time of the valid stream (replay mode: windows follow event time only)
GROUP = "g1"
NOBLOCK = int(zmq.NOBLOCK)
CAMERAS = ("cam_vis", "cam_ir")
RADIOMETERS = ("rad_vis", "rad_ir")
ROLES = {"cam_vis": "image_a", "cam_ir": "image_b", "rad_vis": "seq_a", "rad_ir": "seq_b"}
TICK_NS = 100_000_000  # one frame per camera and one chunk per radiometer every 100 ms of event time
CHUNK = 25  # samples per radiation chunk (250 Hz)
FRAME = (64, 64)  # uint16 camera frames
TICKS_PER_HEARTBEAT = 10  # each sensor sends a heartbeat every second of event time
WINDOW_MS = 1000
LATENESS_MS = 100
TAIL_TICKS = 40  # valid data after the flood: 4 s of event time, enough to close every flood window


@dataclass
class LoadOptions:
    """What to send and how long to wait; the defaults are the full run of the issue."""

    messages: int = 1_000_000
    valid_every: int = 10  # every K-th message is valid; the other K-1 are malformed
    seed: int = 0
    checkpoint: Path = Path("model/weights/default.pt")
    workdir: Path | None = None  # where the config and logs go; default: a temporary directory, removed
    start_timeout_s: float = 180.0
    stall_s: float = 60.0  # counters that stop moving this long before they match are a stall
    health_interval_s: float = 1.0


@dataclass
class LoadReport:
    """Everything the run measured and every check with its outcome."""

    messages: int = 0
    valid_every: int = 0
    seed: int = 0
    malformed_sent: int = 0
    valid_sent: int = 0
    sent_total: int = 0
    send_s: float = 0.0  # first to last message handed to ZeroMQ (lossless: paced by the daemon)
    processed_s: float = 0.0  # first message sent to the daemon's counters matching
    elapsed_s: float = 0.0  # the whole command, daemon start and shutdown included
    msgs_per_s: float = 0.0  # sent_total / processed_s
    families: dict[str, int] = field(default_factory=dict)
    expected_reasons: dict[str, int] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)
    valid_expected: dict[str, int] = field(default_factory=dict)  # "sensor/kind" -> messages
    valid_delivered: dict[str, int] = field(default_factory=dict)
    gaps: int = 0
    duplicates: int = 0
    internal_errors: int = 0
    windows_emitted: int = 0
    windows_dropped: int = 0
    windows_received: int = 0  # by inference
    windows_succeeded: int = 0  # went through the model
    results_received: int = 0
    results_after_flood: int = 0
    health_checks: int = 0
    health_failures: int = 0
    rss_before_mb: dict[str, float] = field(default_factory=dict)
    rss_after_mb: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds each daemon process spent on the run
    exit_code: int | None = None
    checks: dict[str, bool] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    def check(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks[name] = bool(ok)
        if not ok:
            self.failures.append(f"{name}: {detail}" if detail else name)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items()}
        out["ok"] = self.ok
        return out


class Interrupted(Exception):
    """SIGINT or SIGTERM during the run: raised at the next point the run waits or sends, so that it stops
    the daemon and reports instead of leaving a traceback, a running daemon and an unnamed folder."""


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise Interrupted("interrupted by SIGINT/SIGTERM")


# ---------------------------------------------------------------- the valid stream


class ValidStream:
    """A real four-sensor group: frames, radiation chunks and heartbeats with consecutive seqs, in event
    time order, so that the daemon's windows fill, close and go through the model."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.session = int(rng.integers(0, 2**63))
        self.images = [rng.integers(0, 4096, FRAME, dtype=np.uint16) for _ in range(8)]
        self.chunks = [rng.normal(100.0, 5.0, CHUNK).astype(np.float32) for _ in range(8)]
        self.sent: Counter[str] = Counter()  # "sensor/kind" -> messages
        self.tick = 0
        self.last_t_ns = T0
        self.pending: deque[list[bytes]] = deque()  # the rest of the current tick

    def next(self) -> list[bytes]:
        """The next valid message of the stream."""
        if not self.pending:
            self.pending.extend(self._tick())
        return self.pending.popleft()

    def _tick(self) -> Iterator[list[bytes]]:
        k, t = self.tick, T0 + self.tick * TICK_NS
        self.tick += 1
        self.last_t_ns = t
        for sensor in CAMERAS:
            image = self.images[k % len(self.images)]
            header = protocol.encode_image_header(GROUP, sensor, self.session, k, t, 20_000_000, image)
            self.sent[f"{sensor}/img"] += 1
            yield [protocol.topic("img", GROUP, sensor), header, image.tobytes()]
        for sensor in RADIOMETERS:
            values = self.chunks[k % len(self.chunks)]
            header = protocol.encode_rad_header(GROUP, sensor, self.session, k, t, TICK_NS // CHUNK, values)
            self.sent[f"{sensor}/rad"] += 1
            yield [protocol.topic("rad", GROUP, sensor), header, values.tobytes()]
        if k % TICKS_PER_HEARTBEAT == TICKS_PER_HEARTBEAT - 1:
            for sensor in (*CAMERAS, *RADIOMETERS):
                self.sent[f"{sensor}/hb"] += 1
                header = protocol.encode_heartbeat(GROUP, sensor, self.session, t, k)
                yield [protocol.topic("hb", GROUP, sensor), header]


# ---------------------------------------------------------------- the daemon


def _config(endpoint: str, results_ep: str, checkpoint: Path) -> str:
    sensors = ", ".join(f'{s} = "{r}"' for s, r in ROLES.items())
    return f"""# written by sacmf fuzz-load
[ingest]
mode = "replay"
endpoints = ["{endpoint}"]
bind = false
[window]
size_ms = {WINDOW_MS}
allowed_lateness_ms = {LATENESS_MS}
[groups.{GROUP}]
sensors = {{ {sensors} }}
[logging]
format = "json"
[model]
checkpoint = "{checkpoint}"
torch_threads = 1
[inference]
max_batch_size = 8
max_delay_ms = 20
[sinks]
zmq_endpoint = "{results_ep}"
[admin]
listen = "127.0.0.1:0"
[shutdown]
timeout_s = 60
"""


class _Health:
    """Polls /healthz in the background for the whole flood: a stall or a crash shows up as it happens."""

    def __init__(self, daemon: DaemonProcess, interval: float) -> None:
        self.daemon, self.interval = daemon, interval
        self.checks = self.failures = 0
        self.last_failure = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        # the first poll right away: waiting an interval first meant a flood shorter than the interval was
        # never polled at all, and "0 checks, 0 failures" passed
        while True:
            status, body = self.daemon.get("/healthz", timeout=10.0)
            self.checks += 1
            if status != 200:
                self.failures += 1
                self.last_failure = f"{status} {body[:200]}"
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> _Health:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


class _Results:
    """Collects result records from the daemon's results socket (window start times)."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"det/")
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.sub.connect(endpoint)  # before the daemon binds: ZeroMQ reconnects until it does
        self.starts: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.sub.poll(50):
                _, body = self.sub.recv_multipart()
                self.starts.append(int(msgpack.unpackb(body)["start_ns"]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sub.close(linger=0)


def _lossless_sender(
    push: zmq.Socket, stall_s: float, daemon: DaemonProcess, stop: threading.Event | None = None
) -> Callable[[list[bytes]], None]:
    """``send(frames)`` that waits while the daemon is behind (PUSH is lossless), but not forever: a daemon
    that takes nothing for ``stall_s``, or exits, ends the flood with TimeoutError instead of a hang; a set
    ``stop`` ends it with Interrupted."""
    raw = push.send_multipart
    stall_ms = int(stall_s * 1000)

    def send(frames: list[bytes]) -> None:
        try:
            raw(frames, NOBLOCK)  # the usual case: room in the queues
            return
        except zmq.Again:
            pass
        waited = 0
        while not push.poll(1000, zmq.POLLOUT):
            _check_stop(stop)
            waited += 1000
            if waited >= stall_ms or not daemon.alive():
                raise TimeoutError(f"the daemon took no message for {waited / 1000:g} s (alive: {daemon.alive()})")
        raw(frames, NOBLOCK)

    return send


def _send(
    push: zmq.Socket, opts: LoadOptions, report: LoadReport, daemon: DaemonProcess, stop: threading.Event | None = None
) -> tuple[ValidStream, int]:
    """The flood: malformed messages with the valid stream interleaved, then the valid tail.

    Returns the valid stream and its tick at the end of the flood (the tail starts there)."""
    rng = np.random.default_rng(opts.seed)
    factory = fuzzcases.MalformedFactory(GROUP, "rad_vis", "rad_ir", "cam_vis", t0_ns=T0)
    stream = ValidStream(np.random.default_rng(opts.seed + 1))
    families: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    send = _lossless_sender(push, opts.stall_s, daemon, stop)
    k = opts.valid_every
    since_valid = 0
    sent_valid = sent_malformed = 0
    try:
        for _ in range(opts.messages):
            if not sent_malformed & 1023:
                _check_stop(stop)
            case = factory.make(rng)
            send(case.frames)
            families[case.family] += 1
            reasons[case.reason] += 1
            sent_malformed += 1
            since_valid += 1
            if since_valid == k - 1:
                send(stream.next())
                sent_valid += 1
                since_valid = 0
        flood_end_tick = stream.tick
        while stream.tick < flood_end_tick + TAIL_TICKS or stream.pending:  # close every window of the flood
            send(stream.next())
            sent_valid += 1
    finally:  # an interrupted run reports what it sent (it said 0 + 0 = 0 messages)
        report.families = dict(sorted(families.items()))
        report.expected_reasons = dict(sorted(reasons.items()))
        report.malformed_sent = sent_malformed
        report.valid_sent = sent_valid
        report.sent_total = sent_malformed + sent_valid
    return stream, flood_end_tick


def _settle(
    daemon: DaemonProcess, report: LoadReport, stream: ValidStream, stall_s: float, stop: threading.Event | None = None
) -> dict:
    """Metrics once every message is counted; raises if the counters stop moving for ``stall_s``."""
    want_valid = sum(stream.sent.values())
    last, last_change = (-1, -1), time.monotonic()
    while True:
        _check_stop(stop)
        m = daemon.metrics()
        if m is None:
            raise RuntimeError("/metrics did not answer")
        rejected = int(metric(m, "sacmf_ingest_rejected_messages_total"))
        valid = int(metric(m, "sacmf_ingest_messages_total"))
        if (rejected, valid) == (report.malformed_sent, want_valid):
            return m
        if (rejected, valid) != last:
            last, last_change = (rejected, valid), time.monotonic()
        elif time.monotonic() - last_change > stall_s:
            raise TimeoutError(
                f"counters stalled for {stall_s:g} s at rejected={rejected}/{report.malformed_sent}, "
                f"valid={valid}/{want_valid}"
            )
        if not daemon.alive():
            raise RuntimeError(f"daemon exited ({daemon.returncode}) during the run")
        time.sleep(0.25)


def _wait_ready(daemon: DaemonProcess, timeout: float, stop: threading.Event | None) -> None:
    """``daemon.wait_ready`` in short steps, so that Ctrl-C during the start (a minute on a slow machine)
    is not ignored until the daemon is up."""
    deadline = time.monotonic() + timeout
    while True:
        _check_stop(stop)
        try:
            daemon.wait_ready(max(0.0, min(0.5, deadline - time.monotonic())))
            return
        except ServeError:
            if not daemon.alive():
                raise
            if time.monotonic() >= deadline:
                raise ServeError(f"the daemon was not ready within {timeout:g} s; log: {daemon.log_path}") from None


def check_options(opts: LoadOptions) -> None:
    """ValueError for options the run cannot use, before anything starts (the command line refuses them
    already; this is for callers of :func:`run`)."""
    if opts.valid_every < 2:
        raise ValueError("valid_every must be >= 2 (every K-th message is valid, the other K-1 malformed)")
    if opts.messages < 1:
        raise ValueError("messages must be >= 1")
    if opts.seed < 0:
        raise ValueError(f"seed must be >= 0 (numpy's generators take no negative seed), got {opts.seed}")
    for name in ("start_timeout_s", "stall_s", "health_interval_s"):
        value = getattr(opts, name)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be finite and > 0, got {value}")


def run(opts: LoadOptions, stop: threading.Event | None = None) -> LoadReport:
    """The whole run: start the daemon, flood it, check it, stop it. Never raises for a failed check.

    ``stop`` (set by SIGINT/SIGTERM in the command) ends the run early: the daemon is stopped, the report
    fails ``run_completed`` and names the folder its log was kept in."""
    check_options(opts)
    checkpoint = Path(opts.checkpoint).resolve()
    if not checkpoint.is_file():
        raise FileNotFoundError(f"no checkpoint at {checkpoint} (--checkpoint)")
    t_start = time.perf_counter()
    report = LoadReport(messages=opts.messages, valid_every=opts.valid_every, seed=opts.seed)
    own_dir = opts.workdir is None
    # absolute: the daemon runs in the repository root, where a relative config path names another file
    workdir = Path(opts.workdir).resolve() if not own_dir else Path(tempfile.mkdtemp(prefix="sacmf-fuzz-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ipc_dir = tempfile.mkdtemp(prefix="sacmf-fuzz-ipc-")  # short and absolute: ipc paths hold ~100 bytes
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 1000)
    push.setsockopt(zmq.LINGER, 0)
    push.bind("tcp://127.0.0.1:*")
    endpoint = push.getsockopt_string(zmq.LAST_ENDPOINT)
    results_ep = f"ipc://{ipc_dir}/results.ipc"
    results = _Results(ctx, results_ep)
    config = workdir / "serve.toml"
    config.write_text(_config(endpoint, results_ep, checkpoint))
    daemon = DaemonProcess(config, workdir / "daemon.log")
    try:
        daemon.start()
        _wait_ready(daemon, opts.start_timeout_s, stop)
        report.rss_before_mb = daemon.rss_mb()
        cpu_before = daemon.cpu_s()
        with _Health(daemon, opts.health_interval_s) as health:
            t0 = time.perf_counter()
            stream, flood_end_tick = _send(push, opts, report, daemon, stop)
            report.send_s = time.perf_counter() - t0
            try:
                m = _settle(daemon, report, stream, opts.stall_s, stop)
                report.check("no_stall", True)
            except (TimeoutError, RuntimeError) as exc:
                report.check("no_stall", False, str(exc))
                m = (daemon.metrics() if daemon.alive() else None) or {}
            report.processed_s = time.perf_counter() - t0
            report.msgs_per_s = report.sent_total / report.processed_s if report.processed_s else 0.0
            _wait_results(daemon, results, flood_end_tick, opts.stall_s, stop)
            if report.checks["no_stall"]:  # a stalled daemon has waited long enough: report what it did
                m = _wait_pipeline(daemon, results, opts.stall_s, stop) or m
        report.health_checks, report.health_failures = health.checks, health.failures
        _evaluate(report, daemon, m, stream, results, flood_end_tick, health)
        report.rss_after_mb = daemon.rss_mb()
        cpu_after = daemon.cpu_s()
        spent = {k: cpu_after[k] - cpu_before.get(k, 0.0) for k in ("serve", "ingest") if k in cpu_after}
        report.cpu_s = {k: round(v, 2) for k, v in spent.items()}
        report.exit_code = daemon.stop(timeout=90)
        report.check("clean_shutdown", report.exit_code == 0, f"exit status {report.exit_code}")
    except Interrupted as exc:
        report.check("run_completed", False, str(exc))
    except TimeoutError as exc:  # the flood could not be delivered: the daemon stopped taking input
        report.check("no_stall", False, str(exc))
    except Exception as exc:  # a daemon that never started, or died: a failed run with its reason
        report.check("run_completed", False, f"{type(exc).__name__}: {exc}")
    finally:
        if stop is not None and stop.is_set() and "run_completed" not in report.checks:
            report.check("run_completed", False, "interrupted by SIGINT/SIGTERM")  # after the last wait
        results.close()
        if daemon.alive():  # SIGTERM first: killed, its ingest process would be left behind
            daemon.stop(timeout=30)
        daemon.close()
        push.close(linger=0)
        ctx.term()
        shutil.rmtree(ipc_dir, ignore_errors=True)
        report.elapsed_s = time.perf_counter() - t_start
        if own_dir and report.ok:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not report.ok:
            report.failures.append(f"daemon log and config kept in {workdir}")
    return report


def _wait_results(
    daemon: DaemonProcess, results: _Results, flood_end_tick: int, timeout: float, stop: threading.Event | None = None
) -> None:
    """Until the window holding the flood's last valid data has a result (or ``timeout`` passes)."""
    last_window = (T0 + (flood_end_tick - 1) * TICK_NS) // (WINDOW_MS * 1_000_000) * WINDOW_MS * 1_000_000
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and daemon.alive():
        _check_stop(stop)
        if results.starts and max(results.starts) >= last_window:
            return
        time.sleep(0.1)


def _wait_pipeline(
    daemon: DaemonProcess, results: _Results, timeout: float, stop: threading.Event | None = None
) -> dict | None:
    """Metrics once every window ingest emitted went through the model and its result arrived here, the
    same three scrapes 0.5 s apart (the ingest process's counters are snapshots up to 0.5 s old); after
    ``timeout`` the last metrics, for the ``pipeline`` check to report what is missing."""
    deadline = time.monotonic() + timeout
    previous, stable, m = None, 0, None
    while True:
        _check_stop(stop)
        m = daemon.metrics() or m
        if m is not None:
            now = (pipeline_counts(m), len(results.starts))
            stable = stable + 1 if now == previous else 0
            previous = now
            if stable >= 2 and _pipeline_through(now[0], now[1]):
                return m
        if time.monotonic() > deadline or not daemon.alive():
            return m
        time.sleep(0.5)


def _pipeline_through(p: dict[str, int], results: int) -> bool:
    """Every window emitted was received by inference, succeeded and its result received (soak's
    ``pipeline_ok``, which allows counted drops, and none dropped, failed or queued). At least one: a
    check that saw no window proves nothing."""
    return pipeline_ok(p) and p["emitted"] == p["succeeded"] == results > 0


def _evaluate(
    report: LoadReport,
    daemon: DaemonProcess,
    m: dict,
    stream: ValidStream,
    results: _Results,
    flood_end_tick: int,
    health: _Health,
) -> None:
    report.check("daemon_alive", daemon.alive(), f"exit status {daemon.returncode}")
    status, body = daemon.get("/healthz")
    report.check("healthz_ok", status == 200, f"{status} {body[:200]}")
    check_health_polls(report, health.checks, health.failures, health.last_failure)
    reasons = protocol.REJECT_REASONS
    rejected = {r: int(metric(m, "sacmf_ingest_rejected_messages_total", reason=r)) for r in reasons}
    report.rejected = {r: v for r, v in rejected.items() if v}
    total = sum(rejected.values())
    report.check("rejected_sum", total == report.malformed_sent, f"{total} counted, {report.malformed_sent} sent")
    mismatched = {r: (rejected[r], report.expected_reasons.get(r, 0)) for r in protocol.REJECT_REASONS
                  if rejected[r] != report.expected_reasons.get(r, 0)}  # fmt: skip
    report.check("rejected_by_reason", not mismatched, f"(counted, sent) {mismatched}")
    delivered = {}
    for key in stream.sent:
        sensor, kind = key.split("/")
        delivered[key] = int(metric(m, "sacmf_ingest_messages_total", group=GROUP, sensor=sensor, kind=kind))
    report.valid_expected = dict(sorted(stream.sent.items()))
    report.valid_delivered = dict(sorted(delivered.items()))
    report.check("valid_delivered", delivered == dict(stream.sent), f"{delivered} of {dict(stream.sent)}")
    report.gaps = int(metric(m, "sacmf_ingest_gap_messages_total"))
    report.duplicates = int(metric(m, "sacmf_ingest_duplicate_messages_total"))
    loss = f"gaps {report.gaps}, duplicates {report.duplicates}"
    report.check("no_loss", report.gaps == 0 and report.duplicates == 0, loss)
    report.internal_errors = int(metric(m, "sacmf_ingest_callback_errors_total"))
    report.check("no_internal_errors", report.internal_errors == 0, f"{report.internal_errors} callback errors")
    report.windows_emitted = int(metric(m, "sacmf_windows_emitted_total", group=GROUP))
    report.windows_dropped = int(metric(m, "sacmf_windows_dropped_total", group=GROUP)) + int(
        metric(m, "sacmf_inference_windows_dropped_total")
    )
    failed = int(metric(m, "sacmf_inference_requests_total", result="failure"))
    report.check("no_window_lost", report.windows_dropped == 0 and failed == 0,
                 f"{report.windows_dropped} dropped, {failed} failed in the model")  # fmt: skip
    last_window = (T0 + (flood_end_tick - 1) * TICK_NS) // (WINDOW_MS * 1_000_000) * WINDOW_MS * 1_000_000
    report.results_received = len(results.starts)
    report.results_after_flood = sum(1 for s in results.starts if s >= last_window)
    report.check("results_after_flood", report.results_after_flood > 0,
                 f"no result for windows from {last_window} on; {len(results.starts)} results in all")  # fmt: skip
    check_pipeline(report, m, len(results.starts))


def check_health_polls(report: LoadReport, checks: int, failures: int, last_failure: str) -> None:
    """``healthz_ok_throughout``: polled at least once, never failed (0 polls observed nothing)."""
    detail = f"{failures} of {checks} polls failed: {last_failure}" if checks else "/healthz was never polled"
    report.check("healthz_ok_throughout", checks > 0 and failures == 0, detail)


def check_pipeline(report: LoadReport, m: dict, results_received: int) -> None:
    """``pipeline``: windows emitted by ingest == received by inference == succeeded == results received.
    The other checks count messages and drops; a window lost between ingest and the model, or a result
    lost on the way out, would pass all of them."""
    p = pipeline_counts(m)
    report.windows_received, report.windows_succeeded = p["received"], p["succeeded"]
    report.results_received = results_received
    report.check(
        "pipeline",
        _pipeline_through(p, results_received),
        f"windows emitted {p['emitted']}, received {p['received']}, succeeded {p['succeeded']}, failed "
        f"{p['failed']}, dropped {p['dropped_queue_full']}, queued {p['queue_depth']}; results {results_received}",
    )


# ---------------------------------------------------------------- the command


def format_report(r: LoadReport) -> str:
    lines = [
        f"sacmf fuzz-load: {r.malformed_sent:,} malformed + {r.valid_sent:,} valid = {r.sent_total:,} messages "
        f"(every {r.valid_every}th valid, seed {r.seed})",
        f"  sent in {r.send_s:.1f} s, all counted after {r.processed_s:.1f} s: {r.msgs_per_s:,.0f} msg/s; "
        f"elapsed {r.elapsed_s:.1f} s (daemon start and shutdown included)",
        "  rejected by reason (counted / sent):",
        *(f"    {reason:16} {r.rejected.get(reason, 0):>10,} / {n:,}" for reason, n in r.expected_reasons.items()),
        f"  families: {', '.join(f'{k} {v:,}' for k, v in r.families.items())}",
        f"  valid delivered: {sum(r.valid_delivered.values()):,} / {sum(r.valid_expected.values()):,} "
        f"(gaps {r.gaps}, duplicates {r.duplicates}, internal errors {r.internal_errors})",
        f"  windows emitted {r.windows_emitted:,}, received by inference {r.windows_received:,}, succeeded "
        f"{r.windows_succeeded:,}, dropped {r.windows_dropped}; results received {r.results_received:,} "
        f"({r.results_after_flood} after the flood)",
        f"  /healthz: {r.health_checks} checks, {r.health_failures} failures; exit status {r.exit_code}",
        f"  daemon RSS MB before {r.rss_before_mb}, after {r.rss_after_mb}",
        f"  daemon CPU s during the run {r.cpu_s}"
        + (f" (ingest {r.cpu_s['ingest'] / r.sent_total * 1e6:.1f} us per message)" if r.cpu_s.get("ingest") else ""),
        f"  checks: {'all passed' if r.ok else 'FAILED'} ({', '.join(k for k, v in r.checks.items() if v)})",
        *(f"  FAILED {f}" for f in r.failures),
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """0: every check passed; 1: a check failed or the run was interrupted; 2: bad options."""
    opts = LoadOptions(messages=args.messages, valid_every=args.valid_every, seed=args.seed,
                       checkpoint=args.checkpoint, workdir=args.workdir)  # fmt: skip
    # Ctrl-C and SIGTERM only set ``stop``: the run notices it where it waits or sends, stops the daemon
    # and reports; a KeyboardInterrupt could strike in the middle of the clean-up
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        report = run(opts, stop)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(format_report(report), flush=True)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        print(f"  report {out}")
    return 0 if report.ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("fuzz-load", help="flood a live daemon with malformed messages; check every one is counted")
    f.add_argument("--messages", type=integer(1), default=1_000_000,
                   help="malformed messages to send (default 1,000,000)")  # fmt: skip
    f.add_argument("--valid-every", type=integer(2), default=10, help="every K-th message is valid (default 10)")
    f.add_argument("--seed", type=integer(0), default=0, help="of the malformed messages and the valid stream")
    f.add_argument("--checkpoint", type=Path, default=Path("model/weights/default.pt"), help="the model to serve")
    f.add_argument("--workdir", type=Path, default=None, help="keep the config and daemon log here")
    f.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    f.set_defaults(func=main)


if __name__ == "__main__":  # python -m daemon.fuzz_load ...
    _p = argparse.ArgumentParser(prog="sacmf")
    register(_p.add_subparsers(dest="command", required=True))
    sys.exit(main(_p.parse_args(["fuzz-load", *sys.argv[1:]])))
