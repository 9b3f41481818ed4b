"""`sacmf bench-daemon`: the real `sacmf serve`, measured end to end, next to the bare model in one run.

Why one command for all of it: the daemon issue asks for ratios (the daemon's windows/s over the bare
model's) and these machines are shared and noisy, so both sides are measured in the same run, back to
back, with the same checkpoint and torch threads. Phases, in order:

1. **idle**: a live daemon with no input; CPU seconds of all its processes (serve, the ingest child,
   multiprocessing's helpers) over ``--idle-s``, as a percentage of one core.
2. **latency at nominal load**, for each G in ``--groups``: G sensor groups published into the live
   daemon (PUB -> SUB) at the simulator's default rates, paced on the wall clock, for ``--seconds``.
   Latency = window end (event time, which is wall-clock time here) -> result published, read two ways:
   the record's own ``latency_s`` (stamped as the result leaves for the sinks) and the subscriber's
   receive time minus ``end_ns``. Both include the allowed lateness the window waits for by design.
3. **saturation**, for each G: a daemon in replay mode (PUSH -> PULL, blocking queues, lossless), each
   group's stream published as fast as the sockets take it with event time running ahead of the wall
   clock. Daemon windows/s = results per second after a warm-up tenth.
4. **bare model**: the same checkpoint in this process, ``max_batch_size`` windows per call:
   ``forward`` only (batches prepared once) and ``runner`` (the model's preprocessing + forward +
   result records in one thread: the whole window -> result path without the daemon). The daemon
   under test preprocesses in its ingest process unless ``--prepare-in main``.

The ratio reported is saturation windows/s over bare ``forward`` windows/s. Frames are the simulator's
nominal 64x64 (the model's frame size), so no resize hides in either side.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from daemon import simulate
from daemon.cli_types import integer, number, sigterm_as_interrupt
from daemon.serve_process import DaemonProcess, ServeError, cpu_seconds, metric, process_tree, serve_config
from daemon.simulate import SceneSource, SimSettings
from daemon.soak import NOMINAL, ROLES, SENSORS
from ingest.publisher import SensorPublisher

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = ROOT / "model" / "weights" / "default.pt"
WINDOW_MS = 1000  # one simulator scene per window
POOL_WINDOWS = 8  # distinct windows of content replayed cyclically by the saturation publishers
T0_NS = 1_900_000_000 * 1_000_000_000  # event time of the saturation streams (far from any real clock)
READY_TIMEOUT_S = 180.0
WARMUP_WINDOWS = 2  # per latency phase, not counted
END_MARGIN_NS = 600_000_000  # > the default allowed lateness (200 ms) plus transport: see measure_latency


@dataclass(frozen=True)
class BenchOptions:
    checkpoint: Path = DEFAULT_CHECKPOINT
    groups: tuple[int, ...] = (1, 4, 16)
    seconds: float = 30.0  # per latency phase
    sat_seconds: float = 20.0  # per saturation phase
    idle_s: float = 30.0
    torch_threads: int = 1
    max_batch_size: int = 8
    bare_repeats: int = 200  # model calls for the bare figures
    prepare_in: str = "ingest"  # [inference] prepare_in of the daemon under test

    def __post_init__(self) -> None:
        if not self.groups or min(self.groups) < 1:
            raise ValueError("--groups needs positive counts")
        if self.seconds <= 0 or self.sat_seconds <= 0 or self.idle_s < 0:
            raise ValueError("--seconds and --sat-seconds must be > 0, --idle-s >= 0")
        shortest = (WARMUP_WINDOWS + 2) * WINDOW_MS / 1000 + END_MARGIN_NS / 1e9
        if self.seconds < shortest:  # fewer counted windows read as a daemon producing nothing (0.00 windows/s)
            raise ValueError(
                f"--seconds must be at least {shortest:g}: {WARMUP_WINDOWS} warm-up windows, 2 counted ones and "
                "the end margin"
            )
        if self.seconds > 86400 or self.sat_seconds > 86400 or self.idle_s > 86400:
            raise ValueError("--seconds, --sat-seconds and --idle-s must be at most 86400 (a day)")
        if self.prepare_in not in ("ingest", "main"):
            raise ValueError("--prepare-in must be ingest or main")


def group_name(i: int) -> str:
    return f"b{i + 1}"


def bench_config(opts: BenchOptions, mode: str, results_ep: str) -> str:
    """Every group the run may use is configured up front; unused ones stay idle."""
    return serve_config(
        generator="bench-daemon",
        mode=mode,
        groups={group_name(i): ROLES for i in range(max(opts.groups))},
        window_ms=WINDOW_MS,
        checkpoint=Path(opts.checkpoint),
        torch_threads=opts.torch_threads,
        results_endpoint=results_ep,
        shutdown_s=60,
        inference={
            "max_batch_size": opts.max_batch_size,
            "queue_size": max(64, 4 * opts.max_batch_size),
            "prepare_in": opts.prepare_in,
        },
    )


class _Results:
    """A SUB on the results socket: per result, (receive time ns, end_ns, latency_s, group)."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"det/")
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(endpoint)
        self.rows: list[tuple[int, int, float, str]] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench-results", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            while True:
                try:
                    _topic, body = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                now = time.time_ns()
                r = msgpack.unpackb(body)
                with self.lock:
                    self.rows.append((now, int(r["end_ns"]), float(r["latency_s"]), str(r["group"])))

    def take(self) -> list[tuple[int, int, float, str]]:
        with self.lock:
            rows, self.rows = self.rows, []
        return rows

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close(0)


def _start(opts: BenchOptions, mode: str, workdir: Path, ctx: zmq.Context) -> tuple[DaemonProcess, str, _Results]:
    results_ep = f"ipc://{workdir}/results-{mode}.ipc"  # workdir is a short /tmp path: ipc paths max ~100 B
    config = workdir / f"serve-{mode}.toml"
    config.write_text(bench_config(opts, mode, results_ep))
    daemon = DaemonProcess(config, workdir / f"serve-{mode}.log").start()
    ready = daemon.wait_ready(READY_TIMEOUT_S)
    return daemon, ready["ingest"][0], _Results(ctx, results_ep)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    a = np.asarray(values) * 1e3
    return {
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "max_ms": round(float(a.max()), 2),
    }


def measure_idle(daemon: DaemonProcess, seconds: float) -> dict[str, float]:
    time.sleep(2.0)  # let the start-up settle (warm-up forward, first snapshots)
    pids = process_tree(daemon.pid)
    c0, t0 = cpu_seconds(pids), time.monotonic()
    time.sleep(seconds)
    c1, t1 = cpu_seconds(pids), time.monotonic()
    return {
        "seconds": round(t1 - t0, 1),
        "cpu_s": round(c1 - c0, 3),
        "pct_of_core": round(100 * (c1 - c0) / (t1 - t0), 3),
    }


def measure_latency(daemon: DaemonProcess, endpoint: str, res: _Results, g: int, seconds: float) -> dict[str, Any]:
    """G simulator publishers at nominal rate for ``seconds``; only windows they covered in full count."""
    ctx = zmq.Context.instance()
    stop = threading.Event()
    pubs, threads = [], []
    for i in range(g):
        pub = SensorPublisher(endpoint, group_name(i), SENSORS, bind=False, context=ctx, check=False)
        sim = SimSettings(**{**NOMINAL.__dict__, "group": group_name(i), "seed": i})
        t = threading.Thread(target=simulate.run, args=(pub, sim, stop), daemon=True)
        pubs.append(pub)
        threads.append(t)
    time.sleep(0.5)  # the subscriptions reach the publishers (slow joiner)
    cpu_pids = process_tree(daemon.pid)
    res.take()
    c0 = cpu_seconds(cpu_pids)
    for t in threads:
        t.start()
    t_start = time.time_ns()
    time.sleep(seconds)
    t_stop = time.time_ns()
    c1 = cpu_seconds(cpu_pids)
    stop.set()
    for t in threads:
        t.join(10)
    time.sleep(2.5)  # the last windows close (lateness + idleness) and come out
    for p in pubs:
        p.close()
    rows = res.take()
    win = WINDOW_MS * 1_000_000
    # the windows the publishers covered in full, after a warm-up of WARMUP_WINDOWS (a sensor's first
    # messages set its watermark; until every sensor of a group has spoken, a window may wait for
    # max_wait_ms instead), and before the last END_MARGIN_NS (a window ending less than the allowed
    # lateness before the publishers stop is never closed by their data, only by max_wait_ms after it)
    lo, hi = -(-t_start // win) * win + WARMUP_WINDOWS * win, (t_stop - END_MARGIN_NS) // win * win
    kept = [r for r in rows if lo <= r[1] - win and r[1] <= hi]
    return {
        "groups": g,
        "windows": len(kept),
        "windows_per_s": round(len(kept) / max(1e-9, (hi - lo) / 1e9), 2),
        "latency_record": _percentiles([r[2] for r in kept]),
        "latency_subscriber": _percentiles([(r[0] - r[1]) / 1e9 for r in kept]),
        "daemon_cpu_pct_of_core": round(100 * (c1 - c0) / ((t_stop - t_start) / 1e9), 1),
    }


@dataclass
class _Pool:
    frames: list[list[np.ndarray]]  # [window][camera] -> frames of that window, in time order
    chunks: list[list[np.ndarray]]  # [window][radiometer] -> chunks
    frame_ns: int
    chunk_ns: int
    dt_ns: int


def make_pool(sim: SimSettings = NOMINAL, n: int = POOL_WINDOWS) -> _Pool:
    """Content of ``n`` windows at nominal rates, made once: the saturation senders must not spend the
    CPU they share with the daemon on generating scenes."""
    src = SceneSource(sim)
    frame_ns = int(1e9 / sim.frame_rate_hz)
    chunk_ns = src.dt_ns * sim.chunk_samples
    win_ns = WINDOW_MS * 1_000_000
    frames, chunks = [], []
    base = (time.time_ns() // win_ns) * win_ns
    for w in range(n):
        t0 = base + w * win_ns
        frames.append([[src.frame(t, band)[0] for t in range(t0, t0 + win_ns, frame_ns)] for band in (0, 1)])
        chunks.append(
            [[src.samples(t, sim.chunk_samples, band)[0] for t in range(t0, t0 + win_ns, chunk_ns)] for band in (0, 1)]
        )
    return _Pool(frames, chunks, frame_ns, chunk_ns, src.dt_ns)


def _saturate(
    endpoint: str, names: list[str], pool: _Pool, stop: threading.Event, sent: list[int], window: list[int]
) -> None:
    """Every group's stream, window after window and group after group, as fast as PUSH takes it (each
    socket blocks at its HWM). One thread for all groups: on two cores, one sender thread per group
    would spend the CPU the daemon needs on contending for this process's GIL.

    ``window[0]`` is the first window index (event time T0 + index * window) and is left at the next
    unused one: a later phase that reuses a group must continue its event time, or all of that group's
    data would be late (work the daemon does without producing a window)."""
    now = [T0_NS + window[0] * WINDOW_MS * 1_000_000]  # heartbeats carry event time: never ahead of the data
    ctx = zmq.Context.instance()
    pubs = [
        SensorPublisher(
            endpoint, name, SENSORS, bind=False, socket_type="push", context=ctx, clock=lambda: now[0], check=False
        )
        for name in names
    ]
    cams, rads = ("cam_vis", "cam_ir"), ("rad_vis", "rad_ir")
    win_ns = WINDOW_MS * 1_000_000
    w = window[0]
    try:
        while not stop.is_set():
            k = w % len(pool.frames)
            t0 = T0_NS + w * win_ns
            now[0] = t0
            for pub in pubs:
                for i, t in enumerate(range(t0, t0 + win_ns, pool.frame_ns)):
                    for band, cam in enumerate(cams):
                        pub.send_image(cam, pool.frames[k][band][i], t, 20_000_000)
                for i, t in enumerate(range(t0, t0 + win_ns, pool.chunk_ns)):
                    for band, rad in enumerate(rads):
                        pub.send_samples(rad, pool.chunks[k][band][i], t, pool.dt_ns)
                sent[0] += 1
            w += 1
    finally:
        window[0] = w + 1
        for pub in pubs:
            pub.close()


def measure_saturation(
    daemon: DaemonProcess,
    endpoint: str,
    res: _Results,
    g: int,
    seconds: float,
    pool: _Pool,
    window: list[int] | None = None,
) -> dict[str, Any]:
    """Windows/s at saturation, and where the CPU went: the daemon's main process, its other processes
    (ingest), and this process (the load generator and the result subscriber) share the machine."""
    stop = threading.Event()
    sent = [0]
    res.take()
    names = [group_name(i) for i in range(g)]
    window = [0] if window is None else window
    threads = [threading.Thread(target=_saturate, args=(endpoint, names, pool, stop, sent, window), daemon=True)]
    pids = process_tree(daemon.pid)
    for t in threads:
        t.start()
    time.sleep(min(2.0, seconds / 4))  # CPU is counted after the warm-up, like the windows below
    n0, main0, rest0, own0 = len(res.rows), cpu_seconds(pids[:1]), cpu_seconds(pids[1:]), time.process_time()
    m0 = daemon.metrics() or {}
    time.sleep(seconds - min(2.0, seconds / 4))
    n1, main1, rest1, own1 = len(res.rows), cpu_seconds(pids[:1]), cpu_seconds(pids[1:]), time.process_time()
    m1 = daemon.metrics() or {}
    rows = res.take()
    stop.set()
    for t in threads:
        t.join(30)
    _drain(res)
    times = sorted(r[0] for r in rows)
    skip = len(times) // 10
    if len(times) - skip < 2:
        return {"groups": g, "windows": len(times), "windows_per_s": 0.0}
    span = (times[-1] - times[skip]) / 1e9
    counted = max(1, n1 - n0)
    return {
        "groups": g,
        "windows": len(times),
        "windows_per_s": round((len(times) - 1 - skip) / span, 1),
        "windows_sent": sent[0],
        "cpu_ms_per_window": {
            "daemon_main": round(1e3 * (main1 - main0) / counted, 3),
            "daemon_other": round(1e3 * (rest1 - rest0) / counted, 3),
            "load_generator": round(1e3 * (own1 - own0) / counted, 3),
        },
        "pipeline": _pipeline_counts(m0, m1),
    }


def _drain(res: _Results, quiet_s: float = 1.5, limit_s: float = 120.0) -> None:
    """Wait until the daemon has worked off this phase's backlog (no result for ``quiet_s``), and drop it.

    At 16 groups the sockets buffer hundreds of windows. A next phase started on top of that backlog
    interleaves its newer streams with the old ones of the same groups: the windows then jump ahead
    and the backlog arrives late (seen as thousands of late messages). A fixed pause was not enough."""
    deadline = time.monotonic() + limit_s
    seen = -1
    while time.monotonic() < deadline:
        n = len(res.rows)
        if n == seen:
            break
        seen = n
        time.sleep(quiet_s)
    res.take()  # the tail of this phase must not count in the next


def _pipeline_counts(m0: dict[str, dict[tuple, float]], m1: dict[str, dict[tuple, float]]) -> dict[str, float]:
    """What the daemon did in the measured span, from its own counters: where a per-window cost comes from
    (small batches, incomplete or dropped windows, late data) is then visible next to the CPU figures."""

    def delta(name: str, **labels: str) -> float:
        return metric(m1, name, **labels) - metric(m0, name, **labels)

    calls = delta("sacmf_inference_batch_size_count")
    return {
        "model_calls": calls,
        "mean_batch": round(delta("sacmf_inference_batch_size_sum") / calls, 2) if calls else 0.0,
        "windows_full": delta("sacmf_windows_emitted_total", completeness="full"),
        "windows_emitted": delta("sacmf_windows_emitted_total"),
        "windows_dropped": delta("sacmf_windows_dropped_total") + delta("sacmf_inference_windows_dropped_total"),
        "late_messages": delta("sacmf_ingest_late_messages_total"),
        "messages": delta("sacmf_ingest_messages_total"),
    }


def measure_bare(opts: BenchOptions, pool: _Pool) -> dict[str, Any]:
    """The model alone, ``max_batch_size`` windows per call, like the daemon's inference thread."""
    import torch

    from daemon.adapt import prepare_window_arrays, windows_to_batch
    from daemon.inference import InferenceRunner
    from ingest.windowing import Frame, Samples, Window

    torch.set_num_threads(opts.torch_threads)
    runner = InferenceRunner(opts.checkpoint, max_batch_size=opts.max_batch_size)
    loaded = runner.load()
    windows = []
    win_ns = WINDOW_MS * 1_000_000
    for b in range(opts.max_batch_size):  # the same content the saturation senders publish
        k = b % len(pool.frames)
        t0 = T0_NS + b * win_ns
        frames = {
            role: [
                # own copies: frames decoded from messages are distinct buffers (the pool may repeat one)
                Frame(f"cam{band}", i, t0 + i * pool.frame_ns, 20_000_000, img.copy())
                for i, img in enumerate(pool.frames[k][band])
            ]
            for band, role in enumerate(("image_a", "image_b"))
        }
        seqs = {
            role: Samples(None, np.concatenate(pool.chunks[k][band]), pool.dt_ns, t0=t0)
            for band, role in enumerate(("seq_a", "seq_b"))
        }
        presence = dict.fromkeys(("image_a", "image_b", "seq_a", "seq_b"), True)
        windows.append(Window(f"b{b}", t0, t0 + win_ns, frames, seqs, presence, "full", "watermark"))
    batch = windows_to_batch(windows, loaded.config.preprocess_config())

    def timed(fn: Any) -> float:
        for _ in range(5):
            fn()
        ts = []
        for _ in range(opts.bare_repeats):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)

    with torch.inference_mode():
        fwd = timed(lambda: loaded.model(batch))
    run = timed(lambda: runner.run(windows))
    cfg = loaded.config.preprocess_config()
    prep = timed(lambda: [prepare_window_arrays(w, cfg) for w in windows])  # as the ingest process does
    b = opts.max_batch_size
    return {
        "batch": b,
        "forward_ms_per_batch": round(fwd * 1e3, 3),
        "forward_windows_per_s": round(b / fwd, 1),
        "runner_ms_per_batch": round(run * 1e3, 3),
        "runner_windows_per_s": round(b / run, 1),
        "prepare_ms_per_window": round(prep / b * 1e3, 3),
        "pipe_us_per_window": _pipe_costs(windows, runner.preprocess_key, timed),
    }


def _pipe_costs(windows: list, key: Any, timed: Any) -> dict[str, float]:
    """The ingest → main hand-off of one prepared window (pickle, the daemon's own send, unpickle; inproc,
    so without the kernel copy of the real ipc pipe), as the daemon sends it (one frame per camera) and
    with every frame of the window, which is what it sent before ``model_view``."""
    from daemon.adapt import prepare_window_arrays
    from daemon.service import WINDOW, PreparedWindow, decode_message, encode_message, send_nowait
    from daemon.window_view import model_view

    ctx = zmq.Context.instance()
    endpoint = f"inproc://bench-pipe-{id(windows)}"
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind(endpoint)
    push.connect(endpoint)

    def round_trips(items: list) -> None:
        for item in items:
            send_nowait(push, encode_message(WINDOW, item))  # one message in flight: never over the HWM
            decode_message(pull.recv_multipart(copy=False))

    cfg, method = key
    inputs = [prepare_window_arrays(w, cfg, method) for w in windows]
    out = {}
    try:
        for name, view in (("model_view", model_view), ("every_frame", lambda w: w)):
            items = [PreparedWindow(view(w), key, x) for w, x in zip(windows, inputs, strict=True)]
            out[name] = round(timed(lambda items=items: round_trips(items)) / len(items) * 1e6, 1)
    finally:
        push.close(0)
        pull.close(0)
    return out


def run_bench(opts: BenchOptions, say: Any = print) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="sacmf-bench-daemon-"))
    ctx = zmq.Context.instance()
    report: dict[str, Any] = {"options": {k: str(v) for k, v in opts.__dict__.items()}, "workdir": str(workdir)}
    say(
        f"bench-daemon: checkpoint {opts.checkpoint}, torch threads {opts.torch_threads}, batch {opts.max_batch_size}, "
        f"preprocessing in the {opts.prepare_in} process"
    )
    pool = make_pool()

    daemon, endpoint, res = _start(opts, "live", workdir, ctx)
    try:
        if opts.idle_s > 0:
            report["idle"] = measure_idle(daemon, opts.idle_s)
            say(f"idle: {report['idle']['pct_of_core']:.2f} % of one core over {report['idle']['seconds']} s")
        report["latency"] = []
        for g in opts.groups:
            row = measure_latency(daemon, endpoint, res, g, opts.seconds)
            report["latency"].append(row)
            lr, ls = row["latency_record"], row["latency_subscriber"]
            say(
                f"nominal load, {g:2d} group(s): {row['windows_per_s']:6.2f} windows/s, latency p50 {lr['p50_ms']} ms "
                f"p99 {lr['p99_ms']} ms (record), p50 {ls['p50_ms']} p99 {ls['p99_ms']} ms (subscriber), "
                f"daemon CPU {row['daemon_cpu_pct_of_core']} % of a core"
            )
        m = daemon.metrics() or {}
        report["live_dropped_windows"] = metric(m, "sacmf_inference_windows_dropped_total") if m else None
    finally:
        res.close()
        report["live_exit"] = daemon.stop(90)

    daemon, endpoint, res = _start(opts, "replay", workdir, ctx)
    try:
        report["bare_before"] = measure_bare(opts, pool)
        report["saturation"] = []
        window = [0]  # event time continues across phases (the groups of one phase are reused by the next)
        for g in opts.groups:
            row = measure_saturation(daemon, endpoint, res, g, opts.sat_seconds, pool, window)
            report["saturation"].append(row)
            cpu = row.get("cpu_ms_per_window", {})
            say(
                f"saturation, {g:2d} group(s): {row['windows_per_s']:7.1f} windows/s; CPU ms per window: "
                f"daemon main {cpu.get('daemon_main')}, ingest {cpu.get('daemon_other')}, "
                f"load generator {cpu.get('load_generator')}"
            )
            p = row.get("pipeline", {})
            if p:
                say(
                    f"    in that span: {p['model_calls']:.0f} model calls, mean batch {p['mean_batch']}, windows "
                    f"emitted {p['windows_emitted']:.0f} (full {p['windows_full']:.0f}), dropped "
                    f"{p['windows_dropped']:.0f}, late messages {p['late_messages']:.0f}, messages {p['messages']:.0f}"
                )
        report["bare_after"] = measure_bare(opts, pool)
    finally:
        res.close()
        report["replay_exit"] = daemon.stop(120)
    bare = statistics.median(
        [report["bare_before"]["forward_windows_per_s"], report["bare_after"]["forward_windows_per_s"]]
    )
    runner = statistics.median(
        [report["bare_before"]["runner_windows_per_s"], report["bare_after"]["runner_windows_per_s"]]
    )
    say(f"bare model (batch {opts.max_batch_size}): forward {bare:.1f} windows/s, preprocessing+forward {runner:.1f}")
    after = report["bare_after"]
    pipe = after["pipe_us_per_window"]
    say(
        f"per window (bare, after): model preprocessing {after['prepare_ms_per_window']} ms; ingest -> main hand-off "
        f"{pipe['model_view']} us as sent (one frame per camera), {pipe['every_frame']} us with every frame"
    )
    for row in report["saturation"]:
        row["ratio_to_forward"] = round(row["windows_per_s"] / bare, 3)
        row["ratio_to_runner"] = round(row["windows_per_s"] / runner, 3)
        say(
            f"ratio, {row['groups']:2d} group(s): daemon / bare forward = {row['ratio_to_forward']:.3f}, "
            f"daemon / (preprocessing + forward) = {row['ratio_to_runner']:.3f}"
        )
    return report


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-daemon", help="end-to-end throughput, latency and idle CPU of serve vs the bare model")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--groups", default="1,4,16", help="comma-separated group counts")
    p.add_argument("--seconds", type=number(0, above=True), default=30.0, help="per nominal-load latency phase")
    p.add_argument("--sat-seconds", type=number(0, above=True), default=20.0, help="per saturation phase")
    p.add_argument("--idle-s", type=number(0), default=30.0, help="idle CPU phase (0 skips it)")
    p.add_argument("--torch-threads", type=integer(1), default=1)
    p.add_argument("--max-batch-size", type=integer(1), default=8)
    p.add_argument("--prepare-in", default="ingest", help="the daemon's [inference] prepare_in: ingest or main")
    p.add_argument("--json", type=Path, default=None, help="write the full report here")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    try:
        opts = BenchOptions(
            checkpoint=args.checkpoint,
            groups=tuple(int(x) for x in str(args.groups).split(",") if x.strip()),
            seconds=args.seconds,
            sat_seconds=args.sat_seconds,
            idle_s=args.idle_s,
            torch_threads=args.torch_threads,
            max_batch_size=args.max_batch_size,
            prepare_in=args.prepare_in,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not Path(opts.checkpoint).is_file():
        print(f"error: no checkpoint at {opts.checkpoint}", file=sys.stderr)
        return 2
    try:
        with sigterm_as_interrupt():  # run_bench's finally blocks stop the daemon (its own session: no signal)
            report = run_bench(opts)
    except ServeError as exc:  # the daemon did not start or died: its log says why
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    shutil.rmtree(report["workdir"], ignore_errors=True)  # configs, logs, ipc sockets: kept only on failure
    return 0
