"""`sacmf serve`: the daemon's processes, threads and lifecycle (docs/operations.md explains the why).

Layout, so that inference can never starve ingest:

* **ingest process** (multiprocessing *spawn*; its ZeroMQ context is created after the start): the
  IngestWorker receives, validates, accounts and windows; closed windows and late records go to the
  main process over a private ZeroMQ PUSH -> PULL ``ipc`` pipe, pickled with protocol 5 and
  out-of-band buffers, so frame arrays travel as their own ZeroMQ frames without extra copies. Every
  ``STATS_INTERVAL_S`` it also sends a snapshot of its Prometheus collector. It holds its own GIL, so
  a long forward pass in the main process cannot delay a ``recv`` (a delayed ``recv`` on PUB/SUB means
  silent loss at the high-water mark). By default (``[inference] prepare_in = "ingest"``) it also runs
  the model's preprocessing on each closed window, so that work does not share the main process's
  GIL with the model; only then does it import torch.
* **main process** threads: the *receiver* (pipe -> scheduler queue, late records -> late sinks,
  snapshots -> the metrics registry), the *prepare* thread (scheduler batches -> collation, or pixel
  fusion and the model's preprocessing when they run here; one batch ahead), the *inference* thread
  (prepared batch -> model, nothing else), the *finish* thread (model outputs -> result records ->
  sinks, while the next batch is in the model),
  the sink supervisors' workers, the admin HTTP server, and the main thread (signals, reloads,
  lifecycle). PyTorch gets ``torch_threads`` intra-op threads (default cores - 1), leaving a core to
  ingest.

Lifecycle: load + warm model -> open sinks -> start ingest -> ready. SIGHUP reloads the checkpoint.
SIGTERM/SIGINT: unready, the ingest process stops taking input, drains what libzmq already holds and
flushes its open windows (marked flushed), the queue is drained losslessly through the model, sinks are
closed; all within ``[shutdown] timeout_s``, then exit 0 (1 if the deadline passed). A second signal
exits at once (status 130).

This module is imported by the spawned ingest process, so it imports nothing heavy (torch, the model)
at module level.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import structlog
import zmq

from daemon import logs
from daemon.config import Config
from daemon.scheduler import BatchQueue, QueueClosed
from daemon.window_view import model_view
from ingest.settings import IngestSettings
from ingest.windowing import Window
from sinks.record import ImageFusion

log = structlog.get_logger("sacmf.daemon")

STATS_INTERVAL_S = 0.5  # ingest metrics in /metrics are at most this much older than the scrape
INPUT_DRAIN_S = 0.5  # at shutdown, the ingest process processes what libzmq already holds for this long
PIPE_HWM = 8  # windows in flight on the pipe: small, so a blocking queue pushes back promptly
INPUTS_HWM = 16  # input batches in flight to the recorder on each side; beyond it they are dropped
INPUTS_BATCH = 64  # input messages per batch (sent sooner when it holds INPUTS_BATCH_BYTES, or each poll)
INPUTS_BATCH_BYTES = 4 * 2**20
OUT_OF_BAND_BYTES = 4096  # pipe messages: smaller arrays ride inside the pickle (encode_message)
PNG_QUEUE = 16  # picture items waiting for the PNG sink (each holds a frame): most are skipped anyway
INGEST_START_TIMEOUT_S = 120.0

# pipe message kinds: frame 0 of each multipart message
WINDOW, LATE, STATS, READY, DONE, ERROR = b"W", b"L", b"S", b"R", b"D", b"E"
CHILD_IGNORES = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # the parent decides when ingest stops


# ---------------------------------------------------------------- pipe codec


def encode_message(kind: bytes, obj: object) -> list[Any]:
    """``[kind, pickle, *buffers]``: numpy arrays of at least ``OUT_OF_BAND_BYTES`` go out-of-band as
    separate frames (no copy); smaller ones (a window's scalars, masks and short series) are copied
    into the pickle, where a ZeroMQ frame each would cost more than the copy."""
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buf: pickle.PickleBuffer) -> bool:
        if buf.raw().nbytes < OUT_OF_BAND_BYTES:
            return True  # in-band
        buffers.append(buf)
        return False

    body = pickle.dumps(obj, protocol=5, buffer_callback=out_of_band)
    return [kind, body, *(b.raw() for b in buffers)]


def decode_message(frames: list[Any]) -> tuple[bytes, object]:
    """Inverse of ``encode_message``; arrays are views of the received frames (no copy)."""

    def buf(f: Any) -> Any:
        return f.buffer if isinstance(f, zmq.Frame) else f

    kind = bytes(buf(frames[0]))
    return kind, pickle.loads(buf(frames[1]), buffers=[buf(f) for f in frames[2:]])


@dataclass
class PreparedWindow:
    """A window and its model inputs, made in the ingest process (``[inference] prepare_in = "ingest"``).

    ``key`` is the (preprocessing config, resample method) they were made under; the main process uses
    ``inputs`` only while that is still its model's key (a reload may change it) and makes them again
    otherwise.
    """

    window: Window
    key: Any
    inputs: dict  # name -> numpy array: arrays cross the pipe out-of-band, without a copy (tensors would not)


def window_of(item: Window | PreparedWindow) -> Window:
    return item.window if isinstance(item, PreparedWindow) else item


@dataclass
class IngestSnapshot:
    """What the ingest process reports about itself, periodically and once at the end."""

    families: list  # prometheus Metric families from IngestCollector
    last_loop_ns: int  # wall clock of the worker's last loop iteration (liveness)
    windows_sent: int
    late_sent: int
    flushed: int = 0  # windows force-fired at shutdown (final snapshot only)
    inputs_sent: int = 0  # input messages handed to the recording pipe
    inputs_dropped: int = 0  # input messages not recorded because the recording pipe was full
    auth_rejected: dict = field(default_factory=dict)  # CURVE peers refused on the input, by reason


# ---------------------------------------------------------------- the ingest process


_NOBLOCK, _NOBLOCK_MORE = int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)


def send_nowait(sock: zmq.Socket, frames: list[Any]) -> None:
    """``sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)`` at half the cost for the pipe's
    ~20-frame messages: pyzmq ORs its enum flags for every frame. Raises ``zmq.Again`` only on the
    first frame; once that is queued, ZeroMQ takes the rest of the message (multipart is atomic)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, _NOBLOCK_MORE if i < last else _NOBLOCK, copy=False)


class _PipeSender:
    """PUSH end of the pipe. Blocks while the main process is behind (lossless), but never forever:
    if the parent process is gone it gives up and marks itself so the loop can exit."""

    def __init__(self, ctx: zmq.Context, endpoint: str, parent_pid: int, linger_ms: int) -> None:
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, PIPE_HWM)
        self.sock.setsockopt(zmq.LINGER, linger_ms)
        self.sock.connect(endpoint)
        self.parent_pid = parent_pid
        self.parent_gone = False

    def send(self, kind: bytes, obj: object) -> None:
        frames = encode_message(kind, obj)
        while not self.parent_gone:
            try:
                send_nowait(self.sock, frames)
                return
            except zmq.Again:
                self.sock.poll(100, zmq.POLLOUT)
                if os.getppid() != self.parent_pid:
                    self.parent_gone = True


def encode_inputs(batch: list[tuple[int, list[Any]]]) -> list[Any]:
    """``[index, *large frames]`` for a batch of (recv_ns, frames): small frames ride inside the msgpack
    index as bin, frames of 64 KiB or more (camera payloads) follow as their own ZeroMQ frames, unsent
    copies of the received ones (pyzmq shares the buffer); the index refers to them by position."""
    large: list[Any] = []
    entries = []
    for recv_ns, frames in batch:
        parts: list[Any] = []
        for f in frames:
            if isinstance(f, bytes):  # topic, header and small payloads: received as bytes already
                parts.append(f)
                continue
            buf = f.buffer if isinstance(f, zmq.Frame) else memoryview(f)
            if buf.nbytes >= 65536:
                parts.append(len(large))
                large.append(f)
            else:
                parts.append(bytes(buf))
        entries.append((recv_ns, parts))
    return [msgpack.packb(entries, use_bin_type=True), *large]


def decode_inputs(parts: list[Any]) -> list[tuple[int, list[Any]]]:
    """Inverse of ``encode_inputs``: (recv_ns, frames) with large frames as views of the received ones."""

    def buf(f: Any) -> Any:
        return f.buffer if isinstance(f, zmq.Frame) else f

    large = [buf(f) for f in parts[1:]]
    entries = msgpack.unpackb(buf(parts[0]), raw=False)
    return [(recv_ns, [large[x] if isinstance(x, int) else x for x in frames]) for recv_ns, frames in entries]


class _InputSender:
    """PUSH end of the input-recording pipe, the IngestWorker's ``on_raw`` hook.

    Why a pipe of its own, batched, and never blocking: the recorder lives in the main process (one MCAP
    file holds inputs, results and late records, so an evaluation joins them by window id), but
    recording must not slow ingest down or stall it: a PUB/SUB receiver that stops reading loses data.
    A ZeroMQ send per message would cost more than ingest's own work on small messages, so messages are
    collected (a list append per message) and sent in batches without copying camera payloads; the
    ingest loop calls ``flush`` after every poll, so nothing waits longer than that. When the pipe is
    full the batch is dropped from the recording and counted (ingest itself loses nothing).
    """

    def __init__(self, ctx: zmq.Context, endpoint: str, linger_ms: int) -> None:
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, INPUTS_HWM)
        self.sock.setsockopt(zmq.LINGER, linger_ms)
        self.sock.connect(endpoint)
        self.sent = 0
        self.dropped = 0
        self._batch: list[tuple[int, list[Any]]] = []
        self._bytes = 0

    def __call__(self, frames: list, recv_ns: int, msg: Any) -> None:
        self._batch.append((recv_ns, frames))
        self._bytes += msg.nbytes
        if len(self._batch) >= INPUTS_BATCH or self._bytes >= INPUTS_BATCH_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self._batch:
            return
        n = len(self._batch)
        try:
            send_nowait(self.sock, encode_inputs(self._batch))
            self.sent += n
        except zmq.Again:
            self.dropped += n
        self._batch.clear()
        self._bytes = 0


def ingest_process_main(
    settings: IngestSettings,
    pipe_endpoint: str,
    stop: Any,  # multiprocessing Event
    log_level: str,
    log_format: str,
    parent_pid: int,
    linger_ms: int,
    inputs_endpoint: str | None = None,  # the input-recording pipe, or None when inputs are not recorded
    prepare_key: Any = None,  # (PreprocessConfig, resample method): prepare windows here; None: the main process does
    control: Any = None,  # multiprocessing Queue: a new prepare_key after a reload changed it
) -> None:
    """Entry point of the ingest process (spawned; everything it needs comes in as arguments).

    With ``prepare_key`` this process also runs the model's preprocessing on each closed window (numpy,
    one thread), so the main process's GIL and core are left to the model. A
    window whose preprocessing raises is sent on unprepared: the main process then fails it with the
    usual accounting instead of this process losing it.
    """
    # The process group gets the operator's Ctrl-C / systemd's SIGTERM too; only the parent decides
    # when ingest stops, so that it can flush in order.
    for sig in CHILD_IGNORES:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, CHILD_IGNORES)  # blocked by the parent around the start
    logs.configure(log_level, log_format)
    structlog.contextvars.bind_contextvars(process="ingest")
    from daemon.adapt import prepare_window_arrays  # numpy only: this process never loads torch
    from ingest.metrics import IngestCollector
    from ingest.security import RateLimitCollector
    from ingest.subscriber import IngestWorker
    from sinks.late import late_record

    ctx = zmq.Context()  # created here, after the start: never inherit a context across processes
    pipe = _PipeSender(ctx, pipe_endpoint, parent_pid, linger_ms)
    inputs = _InputSender(ctx, inputs_endpoint, linger_ms) if inputs_endpoint else None
    counts = {"windows": 0, "late": 0, "prepare_failed": 0}
    prep: dict[str, Any] = {"key": prepare_key}  # None: the main process prepares; a reload may change it

    def on_window(w: Window) -> None:
        w = model_view(w)  # one frame per camera: the rest is never used and costs pickling
        item: Window | PreparedWindow = w
        if prep["key"] is not None:
            cfg, method = prep["key"]
            try:
                item = PreparedWindow(w, prep["key"], prepare_window_arrays(w, cfg, method))
            except Exception as exc:  # the main process retries it and accounts a failure there
                counts["prepare_failed"] += 1
                if counts["prepare_failed"] <= 10 or counts["prepare_failed"] % 1000 == 0:
                    log.warning("ingest_prepare_failed", group=w.group, start_ns=w.start_ns, error=repr(exc)[:300])
        pipe.send(WINDOW, item)
        counts["windows"] += 1

    def on_late(group: str, sensor: str, item: object, reason: str) -> None:
        pipe.send(LATE, late_record(group, sensor, item, reason, time.time_ns()))
        counts["late"] += 1

    try:
        worker = IngestWorker(settings, on_window, on_late=on_late, on_raw=inputs, context=ctx)
    except Exception as exc:  # bad endpoint, address in use, ...: tell the parent, which exits
        pipe.send(ERROR, f"{type(exc).__name__}: {exc}")
        pipe.sock.close(linger=linger_ms)
        if inputs is not None:
            inputs.sock.close(linger=0)
        ctx.destroy(linger=0)  # closes whatever the failed start left open (term() would wait on it)
        return
    collector = IngestCollector([worker])
    limits = RateLimitCollector(lambda: [worker.rate_limiter, worker.unrouted_limiter])

    def snapshot(flushed: int = 0) -> IngestSnapshot:
        families = [*collector.collect(), *limits.collect()]
        rec = (inputs.sent, inputs.dropped) if inputs is not None else (0, 0)
        auth = worker.auth_rejected()
        return IngestSnapshot(
            families, worker.last_loop_ns, counts["windows"], counts["late"], flushed, *rec, auth_rejected=auth
        )

    pipe.send(READY, {"endpoints": worker.bound_endpoints or list(settings.endpoints), "pid": os.getpid()})
    last_stats = 0.0
    drops_logged, drops_log_at = 0, 0.0
    while not stop.is_set() and not pipe.parent_gone:
        worker.poll(50)
        if inputs is not None:
            inputs.flush()
        now = time.monotonic()
        if now - last_stats >= STATS_INTERVAL_S:
            last_stats = now
            pipe.send(STATS, snapshot())
            while control is not None and prep["key"] is not None and not control.empty():
                with contextlib.suppress(queue.Empty):
                    prep["key"] = control.get_nowait()
                    log.info("ingest_prepare_key_changed")
            if inputs is not None and inputs.dropped > drops_logged and now - drops_log_at >= 10.0:
                log.warning("input_recording_dropped", dropped=inputs.dropped - drops_logged, total=inputs.dropped)
                drops_logged, drops_log_at = inputs.dropped, now
        if os.getppid() != parent_pid:
            pipe.parent_gone = True
    if pipe.parent_gone:
        log.error("ingest_parent_gone")
        worker.close()
        ctx.destroy(linger=0)
        return
    # Stop taking input: process what libzmq already received (bounded), then force-fire open windows.
    deadline = time.monotonic() + INPUT_DRAIN_S
    while time.monotonic() < deadline and worker.poll(0) > 0:
        pass
    # force-fired windows; pending late-data updates (late_policy "update") come out here too, not flushed
    flushed = [w for w in worker.flush() if w.completeness == "flushed"]
    worker.close()
    if inputs is not None:  # hand every recorded input over before DONE, so the parent can drain them
        inputs.flush()
        inputs.sock.close(linger=linger_ms)
    pipe.send(DONE, snapshot(len(flushed)))
    log.info("ingest_stopped", windows=counts["windows"], flushed=len(flushed), late=counts["late"])
    pipe.sock.close(linger=linger_ms)
    ctx.term()


# ---------------------------------------------------------------- the main process


class _SharedRecorder:
    """The MCAP recorder seen from another supervisor (late records, inputs): same file, closed by the results one."""

    def __init__(self, recorder: Any, name: str = "mcap_late") -> None:
        self.name = name
        self._recorder = recorder

    def write(self, record: Any) -> None:
        self._recorder.write(record)

    def close(self) -> None:
        pass  # the results supervisor owns the file


@dataclass
class _Prepared:
    """A batch on its way from the prepare thread to the inference thread."""

    windows: list[Window]  # what goes to the model (fused where the stage fused them)
    prepared: Any  # the runner's PreparedBatch, None for no window, or the exception preparing raised
    prepare_s: float
    waits: list[float]  # per window of the batch (failed ones too): scheduler queue wait until preparation
    fusion: list[dict | None] = field(default_factory=list)  # per window: the stage's identity if fed fused
    failed: list[tuple[Window, Exception]] = field(default_factory=list)  # windows whose fusion failed


@dataclass
class _Forwarded:
    """A batch on its way from the inference thread to the finish thread."""

    prep: _Prepared
    forwarded: Any  # the runner's ForwardedBatch, or the exception preparing or the model raised
    forward_s: float


@dataclass
class _State:
    ingest_up: threading.Event = field(default_factory=threading.Event)
    ingest_error: str | None = None
    ingest_done: threading.Event = field(default_factory=threading.Event)
    snapshot: IngestSnapshot | None = None
    snapshot_at: float | None = None  # monotonic
    endpoints: list = field(default_factory=list)
    ticks: dict = field(default_factory=dict)  # loop name -> monotonic time of its last iteration
    sinks_open: bool = False
    draining: bool = False
    windows_received: int = 0
    windows_lost: int = 0  # received but never queued: the shutdown deadline passed first
    results_published: int = 0
    failed_windows: int = 0


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Service:
    """One daemon instance; ``run()`` blocks until shutdown and returns the exit status."""

    def __init__(self, cfg: Config) -> None:
        from daemon.metrics import DaemonMetrics, ImageFusionMetrics

        self.cfg = cfg
        inf = cfg.inference
        self.state = _State()
        self.queue: BatchQueue[Window | PreparedWindow] = BatchQueue(
            inf.max_batch_size, inf.max_delay_s, inf.queue_size, inf.policy
        )
        self.runner = make_runner(cfg)
        self.metrics = DaemonMetrics(
            latency_buckets_s=inf.latency_buckets_s, max_batch_size=inf.max_batch_size, build=_build_info()
        )
        self.metrics.register_state(self._state_for_metrics)
        from daemon.fusion_stage import FusionStage

        # None unless [image_fusion] method is set; weights that do not load and warm up raise
        # FusionLoadError, which serve() turns into exit status 2
        self.fusion = FusionStage.from_settings(cfg.image_fusion)
        self._fusion_metrics = (
            ImageFusionMetrics(self.metrics.registry, cfg.ingest.groups, self.fusion) if self.fusion else None
        )
        self._reload_lock = threading.Lock()  # SIGHUP and POST /reload: one reload (model + fusion) at a time
        if cfg.ingest.curve is not None or cfg.sinks.zmq_curve is not None:
            from ingest.security import AuthCollector

            self.metrics.registry.register(AuthCollector(self._auth_rejected))
        self.results = None
        self.late = None
        self.inputs = None  # input-recording supervisor ([sinks] mcap_inputs)
        self.png = None  # picture supervisor ([sinks] png_dir)
        self.admin = None
        self.stop = threading.Event()
        self._stop_at: float | None = None  # monotonic time of the first SIGTERM/SIGINT
        self.reload_requested = threading.Event()
        self._child_stop = None
        self._child_control: Any = None  # new preprocessing keys for the ingest process
        self._child: Any = None
        self._pipe_dir: str | None = None
        self._ctx: zmq.Context | None = None
        self._threads: list[threading.Thread] = []
        self._handoff: queue.Queue[_Prepared | None] = queue.Queue(maxsize=1)  # prepare -> inference
        self._finish: queue.Queue[_Forwarded | None] = queue.Queue(maxsize=1)  # inference -> finish
        self._zmq_sink: Any = None
        self._drain_deadline = float("inf")  # monotonic
        self._fail_log_at = 0.0
        self._fusion_log_at = 0.0  # image_fusion_failed is logged by the prepare thread, at most every 10 s
        self._fusion_failures = 0  # kept by the prepare thread, for the log line

    # ------------------------------------------------------------------ probes and admin
    def _auth_rejected(self) -> dict:
        """Refused CURVE peers per socket: the input's from the ingest snapshot, the results' from the sink."""
        out = {}
        if self.cfg.ingest.curve is not None:
            snap = self.state.snapshot
            out["ingest"] = snap.auth_rejected if snap is not None else {}
        auth = getattr(self._zmq_sink, "auth", None)
        if auth is not None:
            out["results"] = dict(auth.rejected)
        return out

    def _state_for_metrics(self) -> dict:
        st = self.state
        pipe_dropped = st.snapshot.inputs_dropped if st.snapshot else 0
        return {
            "queue_depth": self.queue.depth,
            "queue_dropped": self.queue.dropped,
            "shutdown_dropped": st.windows_lost,
            "reloads": dict(self.runner.reloads),
            "sinks": [s for s in (self.results, self.late, self.inputs, self.png) if s is not None],
            "snapshot_age_s": None if st.snapshot_at is None else time.monotonic() - st.snapshot_at,
            "recording_inputs_dropped": None if self.inputs is None else pipe_dropped,
        }

    def health(self) -> tuple[bool, dict]:
        """Liveness: every started loop ticked within health_max_age_s, and the ingest process lives."""
        now = time.monotonic()
        max_age = self.cfg.admin.health_max_age_s
        st = self.state
        ages = {name: round(now - t, 3) for name, t in dict(st.ticks).items()}
        if st.draining:  # loops end on purpose while draining; the shutdown deadline bounds it
            return True, {"loop_age_s": ages, "stale": [], "draining": True}
        if self._child is not None and st.snapshot_at is not None:
            ages["ingest"] = round(now - st.snapshot_at, 3)
        # Waiting on a full lossless queue is backpressure, not a hang: the receiver and the ingest
        # process may then be silent as long as the inference loop keeps ticking.
        backpressure = self.queue.policy == "block" and self.queue.depth >= self.queue.capacity
        exempt = {"receiver", "ingest"} if backpressure else set()
        stale = [name for name, age in ages.items() if age > max_age and name not in exempt]
        if self._child is not None and not self._child.is_alive():
            stale.append("ingest_process")
        return not stale, {"loop_age_s": ages, "stale": stale, "draining": st.draining}

    def ready(self) -> tuple[bool, dict]:
        st = self.state
        detail = {
            "model_warm": self.runner.warm,
            "sinks_open": st.sinks_open,
            "ingest_up": st.ingest_up.is_set() and st.ingest_error is None,
            "draining": st.draining,
        }
        detail["stopping"] = self.stop.is_set()  # SIGTERM: unready at once, before the drain begins
        ok = detail["model_warm"] and detail["sinks_open"] and detail["ingest_up"] and not detail["stopping"]
        if self.runner.warm:
            detail["model_version"] = self.runner.model_version
        return ok, detail

    def reload(self) -> tuple[int, dict]:
        """Reload the configured checkpoint and fusion weights (SIGHUP or POST /reload).

        The served model must have been trained on windows fused by the served fusion weights, so both
        are validated beside the serving pair (fusion first: loaded, checked finite, warmed up) and
        swapped only when both passed; on any failure the old pair keeps serving and
        ``sacmf_model_reloads_total{result="failure"}`` counts it. Fusion weights whose sha256 has not
        changed are kept as they are. A batch prepared just before the swap may still pair the old fusion
        with the new model; every record names both (``model_version``, ``image_fusion.sha256``).
        """
        if self.state.draining or self.stop.is_set():
            return 503, {"result": "refused", "error": "draining"}
        if not self.runner.warm:  # the first load is still running
            return 503, {"result": "refused", "error": "starting"}
        with self._reload_lock:
            if self.state.draining or self.stop.is_set():  # queued behind another reload when the stop came
                return 503, {"result": "refused", "error": "draining"}
            log.info("model_reload_started", path=str(self.cfg.model.checkpoint))
            candidate = None
            stage = self.fusion
            if stage is not None and stage.checkpoint is not None:
                try:
                    candidate = self._fusion_candidate(stage)
                except Exception as exc:  # the old model and fusion keep serving
                    self.runner.reloads["failure"] += 1
                    log.error("image_fusion_reload_failed", path=str(stage.checkpoint), error=str(exc)[:500])
                    return 422, {
                        "result": "failure",
                        "error": f"[image_fusion] {exc}"[:1000],
                        "version": self.runner.model_version,
                        "image_fusion": stage.identity,
                    }
            key = self.runner.preprocess_key
            outcome = self.runner.reload()
            if not outcome.ok:
                body = {"result": "failure", "error": outcome.error[:1000], "version": outcome.version}
                if stage is not None:
                    body["image_fusion"] = stage.identity
                return 422, body
            self.metrics.set_model(outcome.version, outcome.sha256)
            if candidate is not None:
                self.fusion = candidate  # one reference swap: the prepare thread takes it at its next batch
                self._fusion_metrics.set_info(candidate)
                log.info(
                    "image_fusion_reloaded",
                    method=candidate.method.name,
                    sha256=candidate.sha256,
                    previous=stage.sha256 if stage else None,
                )
            if self._child_control is not None and self.runner.preprocess_key != key:
                # until the ingest process takes it (<= STATS_INTERVAL_S), windows prepared under the old
                # key are made again here: correct, only slower
                self._child_control.put(self.runner.preprocess_key)
            body = {"result": "success", "version": outcome.version, "sha256": outcome.sha256}
            if self.fusion is not None:
                body["image_fusion"] = self.fusion.identity
            return 200, body

    def _await_reload(self) -> None:
        """Let a reload that was under way when the stop came finish before the interpreter exits.

        Reloads run on their own threads (SIGHUP) or the admin server's (POST), both daemonic: one still
        loading or warming up a model inside PyTorch when the interpreter shut down made the process
        abort (status 134) after a clean drain. Reloads asked for after the stop are refused at once; the
        one in flight gets what is left of the shutdown deadline (at least 5 s), then the exit goes on.
        """
        left = max(5.0, (self._stop_at or time.monotonic()) + self.cfg.shutdown_timeout_s - time.monotonic())
        if self._reload_lock.acquire(timeout=left):
            self._reload_lock.release()
        else:
            log.warning("reload_still_running_at_exit", waited_s=round(left, 1))

    def _fusion_candidate(self, stage: Any) -> Any:
        """A new stage from the configured fusion weights, validated; None when their sha256 is unchanged."""
        from daemon.fusion_stage import FusionStage, weights_sha256

        if weights_sha256(stage.checkpoint) == stage.sha256:
            return None
        return FusionStage.from_settings(self.cfg.image_fusion)

    # ------------------------------------------------------------------ lifecycle
    def _install_signals(self) -> None:
        def on_stop(signum: int, frame: object) -> None:
            if self.stop.is_set():  # second signal: leave now
                if self._child is not None and self._child.is_alive():
                    self._child.kill()
                os.write(2, b'{"event": "shutdown_forced", "level": "error"}\n')
                if self._pipe_dir:  # os._exit skips run()'s cleanup: the private pipe directory too
                    shutil.rmtree(self._pipe_dir, ignore_errors=True)
                os._exit(130)
            self._stop_at = time.monotonic()  # the drain's deadline counts from here
            self.stop.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, lambda signum, frame: self.reload_requested.set())

    def run(self, early_reload: threading.Event | None = None) -> int:
        import torch

        from daemon.admin import AdminHandlers, AdminServer

        self._install_signals()
        if early_reload is not None and early_reload.is_set():  # a SIGHUP before the handlers: honoured once ready
            log.info("reload_requested_during_start")
            self.reload_requested.set()
        threads = self.cfg.model.torch_threads or max(1, cpu_count() - 1)
        torch.set_num_threads(threads)
        with contextlib.suppress(RuntimeError):  # settable once per process, before any parallel work
            torch.set_num_interop_threads(1)
        a = self.cfg.admin
        try:
            self.admin = AdminServer(
                a.host,
                a.port,
                AdminHandlers(self.metrics.exposition, self.health, self.ready, self.reload),
                token=a.token,
                public_endpoints=a.public_endpoints,
            ).start()
        except OSError as exc:
            log.error("admin_listen_failed", listen=f"{a.host}:{a.port}", error=str(exc))
            return 2
        host, port = self.admin.address
        log.info("admin_listening", url=f"http://{host}:{port}", host=host, port=port)
        try:
            status = self._run_started(threads)
            self._await_reload()
            return status
        except Exception:  # a bug in the main loop: drain what can be drained, and never hang at exit
            log.exception("main_loop_failed")
            if not self.state.draining:
                with contextlib.suppress(Exception):
                    self._shutdown(time.monotonic() + self.cfg.shutdown_timeout_s)
            return 1
        finally:
            # the ingest process is not daemonic (it must flush its windows), so multiprocessing would
            # join it at interpreter exit, forever if nothing told it to stop: tell it, then make sure
            if self._child is not None and self._child.is_alive():
                self._end_child(5.0)
            self.admin.stop()
            if self._pipe_dir:
                shutil.rmtree(self._pipe_dir, ignore_errors=True)

    def _run_started(self, threads: int) -> int:
        from daemon.inference import CheckpointError

        # 1. model
        try:
            loaded = self.runner.load()
        except CheckpointError as exc:
            log.error("model_load_failed", error=str(exc))
            return 2
        self.metrics.set_model(loaded.version, loaded.sha256)
        if self.fusion is not None:
            f = self.fusion
            log.info(
                "image_fusion_loaded", method=f.method.name, sha256=f.sha256, feed=f.feed, path=str(f.checkpoint or "")
            )
        if self.stop.is_set():
            return 0
        # 2. sinks
        try:
            self._open_sinks()
        except (OSError, zmq.ZMQError, ValueError) as exc:
            log.error("sink_open_failed", error=str(exc))
            self._close_sinks(5.0)
            return 2
        self.state.sinks_open = True
        # 3. ingest
        if not self._start_ingest() and not self.stop.is_set():
            self._shutdown(time.monotonic() + self.cfg.shutdown_timeout_s)
            return 2
        # 4. ready (unless a signal arrived while starting: then straight to the drain)
        if not self.stop.is_set():
            self.metrics.ready.set(1)
            log.info(
                "ready",
                model_version=loaded.version,
                torch_threads=threads,
                ingest=self.state.endpoints,
                results=getattr(self._zmq_sink, "endpoint", None),
                policy=self.queue.policy,
            )
        status = 0
        reloading: threading.Thread | None = None
        while not self.stop.wait(0.2):
            if self.reload_requested.is_set() and (reloading is None or not reloading.is_alive()):
                # on its own thread, like POST /reload: a slow checkpoint read must not hold up SIGTERM
                self.reload_requested.clear()
                reloading = threading.Thread(target=self.reload, name="sighup-reload", daemon=True)
                reloading.start()
            if self.state.ingest_done.is_set():
                log.error("ingest_process_died", error=self.state.ingest_error)
                status = 1
                break
            if not all(t.is_alive() for t in self._threads):
                log.error("daemon_thread_died", threads=[t.name for t in self._threads if not t.is_alive()])
                status = 1
                break
        log.info("shutdown_started", timeout_s=self.cfg.shutdown_timeout_s)
        clean = self._shutdown((self._stop_at or time.monotonic()) + self.cfg.shutdown_timeout_s)
        return status if clean else 1

    def _open_sinks(self) -> None:
        from sinks.jsonl import JsonlSink
        from sinks.late import LateSink
        from sinks.mcap_recorder import McapRecorder
        from sinks.png import PngSink
        from sinks.supervisor import SinkSupervisor
        from sinks.zmq_pub import ZmqResultPublisher

        s = self.cfg.sinks
        results: list[Any] = []
        late: list[Any] = []
        inputs: list[Any] = []
        pictures: list[Any] = []
        self._zmq_sink = None
        try:
            if s.zmq_endpoint:
                from ingest.security import socket_securer

                self._zmq_sink = ZmqResultPublisher(
                    s.zmq_endpoint,
                    bind=s.zmq_bind,
                    sndhwm=s.zmq_sndhwm,
                    secure=socket_securer(s.zmq_curve, "results") if s.zmq_curve is not None else None,
                )
                results.append(self._zmq_sink)
            if s.jsonl_path:
                results.append(
                    JsonlSink(s.jsonl_path, max_bytes=s.jsonl_max_bytes, backups=s.jsonl_backups, fsync=s.fsync)
                )
            if s.mcap_path:
                recorder = McapRecorder(s.mcap_path)
                if recorder.earlier is not None:
                    log.info("recording_kept", path=str(s.mcap_path), earlier=str(recorder.earlier))
                results.append(recorder)
                late.append(_SharedRecorder(recorder))
                if s.mcap_inputs:
                    inputs.append(_SharedRecorder(recorder, "mcap_inputs"))
            if s.late_path:
                late.append(LateSink(s.late_path, max_bytes=s.jsonl_max_bytes, backups=s.jsonl_backups, fsync=s.fsync))
            if s.png_dir:
                pictures.append(PngSink(s.png_dir, max_per_s=s.png_max_per_s, keep_windows=s.png_keep_windows))
        except BaseException:
            for sink in [*late, *results]:
                sink.close()
            raise
        if not results:
            log.warning("no_result_sinks", hint="set [sinks] zmq_endpoint, jsonl_path or mcap_path")
        self.results = SinkSupervisor(results, queue_size=s.queue_size)
        self.late = SinkSupervisor(late, queue_size=s.queue_size)
        if inputs:
            self.inputs = SinkSupervisor(inputs, queue_size=s.queue_size)
        if pictures:
            self.png = SinkSupervisor(pictures, queue_size=PNG_QUEUE)

    def _close_sinks(self, timeout: float) -> bool:
        """Late, inputs and pictures drain side by side within the first half of ``timeout``, then the
        results get what is left: they close the MCAP file the late and inputs lanes also write, and they
        are what matters most, so a late or picture sink failing up to its deadline cannot take their
        time (they go on writing meanwhile: only closing waits)."""
        now = time.monotonic()
        deadline = now + timeout
        first = [sup for sup in (self.late, self.inputs, self.png) if sup is not None]
        early = now + timeout / 2 if self.results is not None else deadline
        for sup in first:
            sup.start_closing(early)
        clean = True
        for sup in first:
            clean &= sup.finish_closing(early)
        if self.results is not None:
            clean &= self.results.close(max(0.0, deadline - time.monotonic()))
        return clean

    def _sinks_lost(self) -> dict:
        out = {}
        for sup in (self.results, self.late, self.inputs, self.png):
            if sup is not None:
                for name in sup.names:
                    failed, abandoned = sup.failed[name], sup.abandoned[name]
                    if failed or abandoned:
                        out[name] = {"failed": failed, "abandoned": abandoned}
        return out

    def _start_ingest(self) -> bool:
        self._pipe_dir = tempfile.mkdtemp(prefix="sacmf-")  # mode 0700: only this user can reach the pipe
        endpoint = f"ipc://{self._pipe_dir}/ingest.ipc"
        self._ctx = zmq.Context()
        pull = self._ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, PIPE_HWM)
        pull.setsockopt(zmq.LINGER, 0)
        pull.bind(endpoint)
        inputs_endpoint = None
        if self.inputs is not None:
            inputs_endpoint = f"ipc://{self._pipe_dir}/inputs.ipc"
            inputs_pull = self._ctx.socket(zmq.PULL)
            inputs_pull.setsockopt(zmq.RCVHWM, INPUTS_HWM)
            inputs_pull.setsockopt(zmq.LINGER, 0)
            inputs_pull.bind(inputs_endpoint)
        spawn = mp.get_context("spawn")
        self._child_stop = spawn.Event()
        prepare_key = None
        if self.cfg.inference.prepare_in == "ingest" and self.fusion is None:  # fusion must come first: main
            prepare_key = self.runner.preprocess_key
            self._child_control = spawn.Queue()
        linger_ms = int(self.cfg.shutdown_timeout_s * 1000)
        self._child = spawn.Process(
            target=ingest_process_main,
            args=(
                self.cfg.ingest,
                endpoint,
                self._child_stop,
                self.cfg.log_level,
                self.cfg.log_format,
                os.getpid(),
                linger_ms,
                inputs_endpoint,
                prepare_key,
                self._child_control,
            ),
            name="sacmf-ingest",
        )
        # A Ctrl-C reaches the whole process group: a child still importing (before its SIG_IGN below) died
        # of it. The child inherits this mask across the exec and unblocks once it ignores the signals.
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_IGNORES)
        try:
            self._child.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self._threads = [
            threading.Thread(target=self._receiver_loop, args=(pull,), name="receiver", daemon=True),
            threading.Thread(target=self._prepare_loop, name="prepare", daemon=True),
            threading.Thread(target=self._inference_loop, name="inference", daemon=True),
            threading.Thread(target=self._finish_loop, name="finish", daemon=True),
        ]
        if inputs_endpoint is not None:
            self._threads.append(
                threading.Thread(target=self._inputs_loop, args=(inputs_pull,), name="inputs", daemon=True)
            )
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + INGEST_START_TIMEOUT_S
        while not self.state.ingest_up.wait(0.1):
            if self.stop.is_set() or time.monotonic() > deadline or not self._child.is_alive():
                break
        if self.state.ingest_error or not self.state.ingest_up.is_set():
            if not self.stop.is_set():
                log.error("ingest_start_failed", error=self.state.ingest_error or "the ingest process did not start")
            return False
        return True

    def _end_child(self, timeout: float) -> bool:
        """Tell the ingest process to stop (flushing its windows), wait up to ``timeout``, kill it past
        that; True when it exited by itself with status 0."""
        assert self._child is not None and self._child_stop is not None
        self._child_stop.set()
        self._child.join(timeout)
        if self._child.is_alive():
            self._child.kill()
            self._child.join(5)
            return False
        return self._child.exitcode == 0

    def _shutdown(self, deadline: float) -> bool:
        """Unready -> stop input and flush (ingest) -> drain the queue through the model -> close sinks."""
        st = self.state
        self._drain_deadline = deadline
        st.draining = True
        self.metrics.ready.set(0)
        self.queue.set_policy("block")  # from here on nothing that ingest produced may be dropped
        if self._child_stop is not None:
            self._child_stop.set()
        left = lambda: max(0.0, deadline - time.monotonic())  # noqa: E731
        for t in self._threads:
            t.join(left())
        threads_done = not any(t.is_alive() for t in self._threads)
        sinks_clean = self._close_sinks(left())
        child_ok = self._end_child(left()) if self._child is not None else True
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        clean = threads_done and sinks_clean and child_ok and time.monotonic() <= deadline
        # received but neither published, failed nor dropped: still queued, or inside a stage whose thread
        # the deadline left behind; lost like those the receiver could not queue in time
        unfinished = st.windows_received - st.results_published - st.failed_windows - self.queue.dropped
        unfinished -= st.windows_lost
        if unfinished > 0:
            st.windows_lost += unfinished
            log.error("windows_unfinished_at_shutdown", windows=unfinished, queued=self.queue.depth)
        snap = st.snapshot
        # inputs missing from the recording: dropped at the pipe (ingest process) or at the sink's queue
        inputs_dropped = (snap.inputs_dropped if snap else 0) + (
            sum(self.inputs.dropped.values()) if self.inputs else 0
        )
        log.info(
            "shutdown_complete",
            clean=clean,
            windows_emitted=snap.windows_sent if snap else 0,
            windows_flushed=snap.flushed if snap else 0,
            windows_received=st.windows_received,
            windows_dropped=self.queue.dropped + st.windows_lost,
            windows_failed=st.failed_windows,
            results_published=st.results_published,
            sinks_written=dict(self.results.written) if self.results else {},
            # records a sink did not write: failed after its retries, or still queued at the deadline
            sinks_lost=self._sinks_lost(),
            inputs_recorded=sum(self.inputs.written.values()) if self.inputs else 0,
            inputs_dropped=inputs_dropped,
        )
        return clean

    # ------------------------------------------------------------------ loops
    def _receiver_loop(self, pull: zmq.Socket) -> None:
        st = self.state
        try:
            while True:
                st.ticks["receiver"] = time.monotonic()
                if pull.poll(200, zmq.POLLIN):
                    kind, obj = decode_message(pull.recv_multipart(copy=False))
                    if self._dispatch(kind, obj):
                        break
                elif not self._child.is_alive():
                    if st.ingest_error is None:
                        st.ingest_error = f"ingest process exited with status {self._child.exitcode}"
                    break
        except Exception:
            log.exception("receiver_failed")
        finally:
            st.ingest_done.set()
            st.ingest_up.set()  # wake a start-up waiter
            pull.close(linger=0)
            self.queue.close()

    def _dispatch(self, kind: bytes, obj: Any) -> bool:
        """Route one pipe message; True after the last one (DONE or ERROR)."""
        st = self.state
        if kind == WINDOW:
            st.windows_received += 1
            self.metrics.windows_received.inc()
            timeout = None if not st.draining else max(0.0, self._drain_deadline - time.monotonic())
            w = window_of(obj)
            try:
                queued = self.queue.put(obj, timeout=timeout)
            except QueueClosed:
                queued = False
            if not queued:
                st.windows_lost += 1
                log.error("window_lost_at_shutdown", group=w.group, start_ns=w.start_ns)
        elif kind == LATE:
            self.metrics.late_records.inc()
            if self.late is not None:
                self.late.submit(obj)
        elif kind == STATS:
            self._take_snapshot(obj)
        elif kind == READY:
            st.endpoints = obj["endpoints"]
            st.ingest_up.set()
        elif kind == DONE:
            self._take_snapshot(obj)
            return True
        elif kind == ERROR:
            st.ingest_error = str(obj)
            return True
        else:
            log.error("pipe_unknown_message", kind=kind[:8].hex())
        return False

    def _inputs_loop(self, pull: zmq.Socket) -> None:
        """Input-recording pipe -> the MCAP recorder's input lane, until the ingest process is done."""
        from sinks.mcap_recorder import RawMessage

        try:
            while True:
                if pull.poll(200, zmq.POLLIN):
                    for recv_ns, frames in decode_inputs(pull.recv_multipart(copy=False)):
                        self.inputs.submit(RawMessage(frames, recv_ns))
                elif self.state.ingest_done.is_set() or not self._child.is_alive():
                    break  # the child hands over every input before DONE: an idle pipe now is empty
        except Exception:
            log.exception("inputs_loop_failed")
        finally:
            pull.close(linger=0)

    def _take_snapshot(self, snap: IngestSnapshot) -> None:
        self.state.snapshot = snap
        self.state.snapshot_at = time.monotonic()
        self.metrics.ingest.update(snap.families)

    def _prepare_loop(self) -> None:
        """Scheduler batches -> model inputs, one batch ahead of the model (see the module doc)."""
        st = self.state
        try:
            while True:
                st.ticks["prepare"] = time.monotonic()
                batch = self.queue.next_batch(timeout=0.25)
                if batch is None:
                    break
                if not batch:
                    continue
                windows = [window_of(q.item) for q in batch]
                started = time.monotonic()
                waits = [started - q.enqueued_s for q in batch]
                prepared: Any = None
                stage = self.fusion  # one stage for the whole batch, even if a reload swaps it meanwhile
                fusion: list[dict | None] = [None] * len(windows)
                failed: list[tuple[Window, Exception]] = []
                if stage is not None:  # pixel-level fusion of the two cameras first (docs/FUSION.md)
                    windows, fusion, failed = self._fuse(stage, windows)
                try:
                    if stage is not None:
                        prepared = self.runner.prepare(windows) if windows else None
                    else:  # inputs the ingest process made under the current model's key are used as they are
                        key = self.runner.preprocess_key
                        ready = [
                            q.item.inputs if isinstance(q.item, PreparedWindow) and q.item.key == key else None
                            for q in batch
                        ]
                        prepared = self.runner.prepare(windows, ready)
                except Exception as exc:  # the finish thread isolates the bad window(s)
                    prepared = exc
                item = _Prepared(windows, prepared, time.monotonic() - started, waits, fusion, failed)
                self._hand_on("prepare", self._handoff, item)
        except Exception:  # a bug here must not leave a zombie daemon: the main thread sees it and exits
            log.exception("prepare_loop_failed")
        finally:
            self._handoff.put(None)

    def _fuse(self, stage: Any, windows: list[Window]) -> tuple[list[Window], list[dict | None], list]:
        """Each window through the fusion stage on its own: (windows for the model, per kept window the
        stage's identity when it was fed fused, [(window, error)] of windows failed by their fusion).

        One window's failure costs only that window. Under ``feed = "image_a"`` such a window is failed
        (counted like a failed model pass: the served model was trained on fused frames, so its answer on
        an unfused one would be served as if it were valid); under ``feed = "none"`` the model never sees
        fused frames and the window goes on. Either way ``sacmf_image_fusion_failures_total{reason}`` and
        ``sacmf_image_fusion_windows_total{group,result="failed"}`` count it and ``image_fusion_failed``
        is logged (at most every 10 s). The loop ticks after every window: one network pass can take
        seconds, and a batch of them is work, not a hang (``/healthz``).
        """
        from daemon.fusion_stage import FAILED

        kept: list[Window] = []
        fusion: list[dict | None] = []
        failed: list[tuple[Window, Exception]] = []
        fm = self._fusion_metrics
        for w in windows:
            outcome = stage.apply(w)
            self.state.ticks["prepare"] = time.monotonic()
            fm.windows.labels(w.group, outcome.status).inc()
            if outcome.status == FAILED:
                err = outcome.error
                fm.failures.labels(err.reason).inc()
                self._fusion_failures += 1
                now = time.monotonic()
                if now - self._fusion_log_at >= 10.0:
                    self._fusion_log_at = now
                    log.error(
                        "image_fusion_failed",
                        group=w.group,
                        start_ns=w.start_ns,
                        reason=err.reason,
                        error=str(err)[:300],
                        window="served (feed none)" if outcome.served else "failed",
                        failures_total=self._fusion_failures,
                    )
                if not outcome.served:
                    failed.append((w, err))
                    continue
            elif outcome.quality is not None:
                self.metrics.observe_fusion_quality(w.group, outcome.quality)
            kept.append(outcome.window)
            fusion.append(outcome.identity)
        return kept, fusion, failed

    def _hand_on(self, name: str, q: queue.Queue, item: Any) -> None:
        """A bounded hand-off to the next stage: the slower stage sets the pace, and the waiting loop keeps
        ticking so /healthz does not take backpressure for a hang."""
        while True:
            try:
                q.put(item, timeout=0.25)
                return
            except queue.Full:
                self.state.ticks[name] = time.monotonic()

    def _stage_loop(self, name: str, source: queue.Queue, handle: Any, sink: queue.Queue | None = None) -> None:
        """Items from ``source`` through ``handle`` (its result to ``sink``) until the None that ends it;
        the None is passed on, so shutdown runs down the stages in order."""
        st = self.state
        try:
            while True:
                st.ticks[name] = time.monotonic()
                try:
                    item = source.get(timeout=0.25)
                except queue.Empty:
                    continue
                if item is None:
                    break
                result = handle(item)
                if sink is not None:
                    self._hand_on(name, sink, result)
        except Exception:  # a bug here must not leave a zombie daemon: the main thread sees it and exits
            log.exception(f"{name}_loop_failed")
        finally:
            if sink is not None:
                sink.put(None)

    def _inference_loop(self) -> None:
        """Prepared batches -> the model, nothing else: decoding and publishing happen on the finish thread
        while the next batch is in the model."""
        self._stage_loop("inference", self._handoff, self._forward, self._finish)

    def _forward(self, item: _Prepared) -> _Forwarded:
        started = time.monotonic()
        if not item.windows:  # every window of the batch failed its fusion: nothing for the model
            return _Forwarded(item, None, 0.0)
        try:
            if isinstance(item.prepared, Exception):
                raise item.prepared
            forwarded: Any = self.runner.forward(item.windows, item.prepared)
        except Exception as exc:  # the finish thread isolates the bad window(s)
            forwarded = exc
        return _Forwarded(item, forwarded, time.monotonic() - started)

    def _finish_loop(self) -> None:
        self._stage_loop("finish", self._finish, self._publish)

    def _publish(self, item: _Forwarded) -> None:
        """Model outputs -> records -> sinks; a failed batch is retried window by window."""
        windows = item.prep.windows
        started = time.monotonic()
        for w, exc in item.prep.failed:  # failed by their fusion (logged by the prepare thread)
            self._failed(w, exc, logged=True)
        records: list = []
        if windows:
            try:
                if isinstance(item.forwarded, Exception):
                    raise item.forwarded
                records = list(self.runner.records(windows, item.forwarded))
            except Exception as exc:
                records = self._isolate(windows, exc) if len(windows) > 1 else self._failed(windows[0], exc)
            for record, identity in zip(records, item.prep.fusion, strict=True):
                if record is not None and identity is not None:  # the model was fed this window fused
                    record.image_fusion = ImageFusion(identity["method"], identity["sha256"])
        # inference duration: this batch's own work (preparation, model, decoding), not the hand-off waits
        duration = item.prep.prepare_s + item.forward_s + time.monotonic() - started
        self.metrics.observe_batch(len(windows) + len(item.prep.failed), duration, item.prep.waits)
        for record in records:
            if record is None:
                continue
            record.latency_s = (time.time_ns() - record.end_ns) / 1e9  # as it leaves for the sinks
            self.results.submit(record)
            self.state.results_published += 1
            self.metrics.observe_published(record)
        if self.png is not None and windows:
            from daemon.replay import heatmaps, png_frames

            # the batch's own heatmaps; windows retried one by one after a failure get pictures without
            heat = None if isinstance(item.forwarded, Exception) else heatmaps(item.forwarded.out["det_logits"])
            for item_png in png_frames([r for r in records if r is not None], windows, heat):
                self.png.submit(item_png)

    def _isolate(self, windows: list[Window], exc: Exception) -> list:
        """A batch failed: retry each window alone so one bad window costs only itself.

        The windows are the ones the model was given (fused where the stage fused them). The result is
        aligned with ``windows``: None where the window failed again."""
        out: list = []
        for w in windows:
            try:
                out.extend(self.runner.run([w]))
            except Exception as one:
                out.extend(self._failed(w, one))
        return out

    def _failed(self, window: Window, exc: Exception, logged: bool = False) -> list:
        """Count one failed window ([None], to keep a batch's records aligned with its windows)."""
        self.state.failed_windows += 1
        self.metrics.requests.labels("failure").inc()
        now = time.monotonic()
        if not logged and now - self._fail_log_at >= 10.0:  # bounded: a broken model must not flood the log
            self._fail_log_at = now
            log.error(
                "inference_failed",
                group=window.group,
                start_ns=window.start_ns,
                error=repr(exc)[:300],
                failed_total=self.state.failed_windows,
            )
        return [None]


def make_runner(cfg: Config) -> Any:
    """The model runner ``[model]`` and ``[inference]`` describe, pinned to ``[model] sha256`` when set: what
    serve loads, and what check-config loads to say whether serve would."""
    from daemon.inference import InferenceRunner  # torch: main process only

    runner_cls = _pinned_runner(InferenceRunner, cfg.model.sha256) if cfg.model.sha256 else InferenceRunner
    m = cfg.model
    return runner_cls(
        m.checkpoint,
        device=m.device,
        max_batch_size=cfg.inference.max_batch_size,
        det_threshold=m.det_threshold,
        det_max_detections=m.det_max_detections,
        resample_method=m.resample,
    )


def _pinned_runner(base: type, sha256: str) -> type:
    """The runner class refusing any checkpoint whose bytes do not hash to ``[model] sha256``.

    The hash is the one ``load_checkpoint`` computed from the very bytes it parsed (no window between
    checking and loading), and ``weights_only`` parsing runs no code, so checking after the parse is
    safe. At start a mismatch is a CheckpointError (exit 2); on reload the old model keeps serving and
    the failure is counted, like any other bad file.
    """
    from daemon.inference import CheckpointError

    class PinnedRunner(base):  # type: ignore[misc, valid-type]
        def _load_validated(self, path: Any) -> Any:
            loaded = super()._load_validated(path)
            if loaded.sha256 != sha256:
                raise CheckpointError(
                    f"{path}: sha256 {loaded.sha256} differs from [model] sha256 {sha256}; refusing this file"
                )
            return loaded

    return PinnedRunner


def checkpoint_sha256(path: os.PathLike[str] | str) -> str:
    """The sha256 of a file, read in chunks (a checkpoint may be large)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _build_info() -> dict[str, str]:
    import platform

    import torch

    try:
        from importlib.metadata import version

        own = version("sacmf")
    except Exception:
        own = "unknown"
    return {"version": own, "python": platform.python_version(), "torch": torch.__version__}


def serve(cfg: Config, early_reload: threading.Event | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the process exit status. ``early_reload``: set by a
    SIGHUP that came before the daemon's own handlers (``sacmf serve`` installs it first thing); the
    reload then runs once the daemon is ready."""
    ckpt = cfg.model.checkpoint
    if not ckpt.is_file():  # checked before torch is imported: a clear, fast failure
        print(
            f"error: no model checkpoint at {ckpt} ([model] checkpoint in {cfg.source}).\n"
            "Train one and save it with daemon.inference.save_checkpoint (see docs/operations.md, "
            '"Model checkpoints"), or point [model] checkpoint at an existing checkpoint file.',
            file=sys.stderr,
        )
        return 2
    if cfg.model.sha256:  # before torch is imported and anything starts: a clear, fast refusal
        actual = checkpoint_sha256(ckpt)
        if actual != cfg.model.sha256:
            print(
                f"error: checkpoint {ckpt} has sha256 {actual}, but [model] sha256 in {cfg.source} expects "
                f"{cfg.model.sha256}; refusing to serve it (update the pin only for a file you trust).",
                file=sys.stderr,
            )
            return 2
    structlog.contextvars.bind_contextvars(process="main")
    from daemon.fusion_stage import FusionLoadError

    try:
        service = Service(cfg)
    except FusionLoadError as exc:  # weights that do not load or warm up: a clear refusal, not a traceback
        print(
            f"error: [image_fusion] checkpoint in {cfg.source}: {str(exc)[:600]}\n"
            "Point [image_fusion] checkpoint at the fusion network's weights the served model was trained "
            'with, or set [image_fusion] method = "none".',
            file=sys.stderr,
        )
        return 2
    return service.run(early_reload)
