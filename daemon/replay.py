"""Replay a recording through the serving pipeline, deterministically at any speed (daemon.md §7, §1.4-11).

The pipeline is the daemon's, in one process: a sender thread re-publishes the recorded input messages
(exact frames, file = arrival order) over ZeroMQ PUSH -> PULL (lossless: the sender blocks while the
pipeline is behind) into an :class:`~ingest.subscriber.IngestWorker` in replay mode, whose windows go
through the served :class:`~daemon.inference.InferenceRunner` to result sinks.

Why the results are identical at any speed:

* replay-mode windows are driven by event time alone (no wall-clock flush, idleness in event time), and
  PUSH/PULL over one connection keeps the recorded order, so the same windows come out in the same
  order whatever the pacing;
* the model runs in eval mode, where a sample's output does not depend on its batch-mates *in exact
  arithmetic* - but floating-point kernels do give slightly different bits for different batch shapes.
  So windows are batched by **count, not by time**: consecutive chunks of ``batch_size`` windows in
  emission order, the last one partial. The live daemon's time-based micro-batching would make the
  bits depend on timing. The price: with pacing, a window may wait for up to ``batch_size - 1``
  successors (use ``batch_size=1`` for live-like latency);
* only ``latency_s`` depends on time. In a replay it is measured on the *recording's* clock: the receive
  time of the newest message handed to ingest (plus, when paced, the wall time since then times the
  speed) minus the window end - at speed 1 that is what the live daemon measured, at ``--max`` it says
  how far behind the input the result came out. Comparisons exclude it (:func:`comparable`).

Not replayed: the live daemon's wall-clock decisions (``max_wait`` flushes, ``drop_oldest`` sheds), so a
live run's results may differ from its replay; the replay is the reference. Replayed: the pixel-level
fusion stage (``[image_fusion]``), window by window as the daemon runs it, so that a model trained on
fused frames is replayed on fused frames; a window whose fusion fails is failed as in the daemon.

This module also holds the small helpers that turn a batch into pictures for the PNG sink
(:class:`HeatmapTap`, :func:`png_frames`), shared with the live daemon.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
import zmq
from mcap.exceptions import McapError

from daemon.adapt import pick_frame
from daemon.config import Config
from ingest.settings import IngestSettings
from ingest.subscriber import IngestWorker
from ingest.windowing import Window
from sinks.late import late_record
from sinks.mcap_recorder import CONTENT_INPUT, CONTENT_RESULT, Damage, read_recording
from sinks.png import PngFrame
from sinks.record import ImageFusion, LateRecord, ResultRecord, to_wire

log = structlog.get_logger("sacmf.replay")

SEND_HWM = 256  # messages queued towards ingest; the sender blocks beyond it (lossless)
_ids = itertools.count()


# ---------------------------------------------------------------- recordings


def recorded_inputs(path: str | os.PathLike[str], damage: Damage | None = None) -> Iterator[tuple[int, list[bytes]]]:
    """(log time = receive time, exact frames) of every input message, in file (arrival) order.

    The recording's results are not decoded (a replay makes its own), so results written by a newer
    sacmf do not stop it. ``damage`` counts what a corrupt file lost (``sinks.mcap_recorder.Damage``)."""
    for rec in read_recording(path, contents=(CONTENT_INPUT,), damage=damage):
        yield rec.log_time, rec.body  # type: ignore[misc]  # inputs are frame lists


def recorded_results(path: str | os.PathLike[str]) -> list[ResultRecord]:
    """The results a live daemon wrote into the recording (its own latencies are the live ones)."""
    return [rec.body for rec in read_recording(path, contents=(CONTENT_RESULT,))]  # type: ignore[misc]


def comparable(record: ResultRecord) -> dict:
    """Everything in a result except the wall-clock-dependent ``latency_s``: what replays must agree on."""
    wire = to_wire(record)
    wire.pop("latency_s")
    return wire


# ---------------------------------------------------------------- configuration


def replay_settings(cfg: Config, endpoint: str) -> IngestSettings:
    """The config's ingest path in replay mode: event-time windows only, a bound lossless PULL socket.

    Rate limits are off (they run on the wall clock, so the pace of a replay would decide what they drop)
    and so is the dead-letter file (the live daemon's, not the replay's to append to)."""
    groups = {
        name: dataclasses.replace(g, window=dataclasses.replace(g.window, mode="replay", max_wait_ns=0))
        for name, g in cfg.ingest.groups.items()
    }
    return dataclasses.replace(
        cfg.ingest, endpoints=(endpoint,), groups=groups, bind=True, transport="pull", rate_limits={},
        dead_letter_path=None,
    )  # fmt: skip


# ---------------------------------------------------------------- pictures (shared with the daemon)


class HeatmapTap:
    """Keeps the detection heatmaps of the served model's latest forward pass, for the PNG sink.

    Why a forward hook: the runner returns plain records (no tensors), and a second forward pass just to
    draw would double the cost. The hook keeps a reference to a tensor the forward made anyway. ``arm``
    hooks whichever model is being served (a hot reload brings a new one) and clears the last capture,
    so a batch that ran on a model not hooked yet simply gets no heatmap.
    """

    def __init__(self) -> None:
        self._hooked: set[int] = set()
        self._handles: list[Any] = []
        self.last: Any = None  # det_logits [B, C, H_d, W_d] of the latest forward pass

    def arm(self, runner: Any) -> None:
        model = runner.current.model
        if id(model) not in self._hooked:
            self._handles.append(model.register_forward_hook(self._hook))
            self._hooked.add(id(model))
        self.last = None

    def _hook(self, module: Any, inputs: Any, output: Any) -> None:
        if isinstance(output, dict) and "det_logits" in output:
            self.last = output["det_logits"].detach()

    def heatmaps(self, n: int) -> Any:
        """[n, H_d, W_d] object-centre probabilities (max over classes), or None if not captured."""
        if self.last is None or self.last.shape[0] != n:
            return None
        return heatmaps(self.last)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked.clear()


def heatmaps(det_logits: Any) -> Any:
    """[B, C, H_d, W_d] detection logits -> [B, H_d, W_d] object-centre probabilities (max over classes)."""
    return det_logits.float().sigmoid().amax(dim=1).cpu().numpy()


def png_frames(records: Sequence[ResultRecord], windows: Sequence[Window], heat: Any = None) -> list[PngFrame]:
    """One picture item per record: its window's Image-A frame (the one the model saw) and heatmap.

    The model frame is square and the preprocessing scaled the image by ``frame_size / max(H, W)`` and
    padded bottom/right, so the heatmap grid spans ``max(H, W)`` Image-A pixels in both directions.
    """
    index = {(*w.id, w.revision): (i, w) for i, w in enumerate(windows)}  # one batch may hold two revisions
    out = []
    for rec in records:
        i, w = index[(rec.group, rec.start_ns, rec.revision)]
        frame = pick_frame(w.frames.get("image_a", ()), w.start_ns, w.end_ns) if w.presence.get("image_a") else None
        if frame is None:
            out.append(PngFrame(rec))
            continue
        side = float(max(frame.image.shape[:2]))
        hm = heat[i] if heat is not None else None
        out.append(PngFrame(rec, frame.image, hm, (side, side) if hm is not None else None))
    return out


# ---------------------------------------------------------------- the replay


@dataclass
class ReplayReport:
    """What a replay did; ``results`` in emission order."""

    results: list[ResultRecord] = field(default_factory=list)
    late: list[LateRecord] = field(default_factory=list)
    messages: int = 0  # input messages re-published
    rejected: dict[str, int] = field(default_factory=dict)  # ingest rejections by reason
    windows: int = 0
    flushed: int = 0  # windows force-fired at the end of the recording
    failed: int = 0  # windows with no result: the model failed on them, or (fusion_failed of them) their fusion
    fusion_failed: int = 0  # windows whose pixel fusion failed (failed under feed "image_a", served under "none")
    batches: int = 0
    wall_s: float = 0.0
    model_version: str = ""
    damage: Damage = field(default_factory=Damage)  # what a corrupt or unfinished recording lost


class _Sender:
    """The sender thread: recorded messages -> PUSH, paced by log time / speed or as fast as possible."""

    def __init__(self, ctx: zmq.Context, endpoint: str, inputs: Iterable[tuple[int, list[bytes]]], speed: float | None):
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.inputs, self.speed = inputs, speed
        self.sent = 0
        self.clock: tuple[int, int] | None = None  # (log time of the newest message sent, monotonic ns then)
        self.done = threading.Event()
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="replay-sender", daemon=True)

    def _run(self) -> None:
        try:
            origin: tuple[int, int] | None = None  # (first log time, monotonic ns at its send)
            for log_time, frames in self.inputs:
                if self.speed is not None:
                    if origin is None:
                        origin = (log_time, time.monotonic_ns())
                    due = origin[1] + (log_time - origin[0]) / self.speed
                    wait = (due - time.monotonic_ns()) / 1e9
                    if wait > 0 and self.stop.wait(wait):
                        return
                while not self.sock.poll(100, zmq.POLLOUT):  # lossless: wait for the pipeline
                    if self.stop.is_set():
                        return
                self.sock.send_multipart(frames, copy=len(frames) < 3 or len(frames[2]) < 65536)
                self.sent += 1
                self.clock = (log_time, time.monotonic_ns())
                if self.stop.is_set():
                    return
        except BaseException as exc:  # surfaced by the main loop
            self.error = exc
        finally:
            self.done.set()

    def recording_now(self) -> int | None:
        """The recording's clock now: newest log time sent (+ elapsed wall time x speed when paced)."""
        if self.clock is None:
            return None
        log_time, at = self.clock
        return log_time + (int((time.monotonic_ns() - at) * self.speed) if self.speed is not None else 0)


def replay(
    path: str | os.PathLike[str],
    cfg: Config,
    *,
    speed: float | None = None,
    batch_size: int | None = None,
    sinks: Sequence[Any] = (),
    png: Any = None,
    runner: Any = None,
    fusion: Any = None,
    on_result: Callable[[ResultRecord], None] | None = None,
) -> ReplayReport:
    """Feed ``path``'s input messages through ingest (replay mode) and the model; results to ``sinks``.

    ``speed``: None = as fast as possible, else the recording's pace times ``speed``. ``batch_size``:
    windows per model call (default ``[inference] max_batch_size``). ``sinks`` get every result in
    order, synchronously (a replay is lossless); ``png`` (a PngSink) gets picture items. ``runner``: a
    loaded InferenceRunner to reuse, else one is loaded from ``[model]``. ``fusion``: the
    ``daemon.fusion_stage.FusionStage`` of ``[image_fusion]`` (None: off), applied as the daemon does.
    """
    if speed is not None and not speed > 0:
        raise ValueError(f"speed must be > 0 (or None for as fast as possible), got {speed}")
    batch_size = batch_size or cfg.inference.max_batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if runner is None:
        from daemon.inference import InferenceRunner

        m = cfg.model
        runner = InferenceRunner(
            m.checkpoint,
            device=m.device,
            max_batch_size=batch_size,
            det_threshold=m.det_threshold,
            det_max_detections=m.det_max_detections,
            resample_method=m.resample,
        )
        runner.load()
    report = ReplayReport(model_version=runner.model_version)
    tap = HeatmapTap() if png is not None else None
    ctx = zmq.Context()
    endpoint = f"inproc://sacmf-replay-{os.getpid()}-{next(_ids)}"
    pending: list[Window] = []

    def on_late(group: str, sensor: str, item: object, reason: str) -> None:
        report.late.append(late_record(group, sensor, item, reason, time.time_ns()))

    worker = IngestWorker(replay_settings(cfg, endpoint), pending.append, on_late=on_late, context=ctx)
    sender = _Sender(ctx, endpoint, recorded_inputs(path, report.damage), speed)

    def infer(windows: list[Window]) -> None:
        report.batches += 1
        fused: dict[tuple, Any] = {}  # (group, start_ns, revision) -> the stage's identity, fed fused
        if fusion is not None:
            windows = fuse(windows, fused)
            if not windows:
                return
        if tap is not None:
            tap.arm(runner)
        try:
            records = runner.run(windows)
            heat = tap.heatmaps(len(windows)) if tap is not None else None
        except Exception as exc:  # one bad window must cost only itself, as in the daemon
            log.warning("replay_batch_failed", windows=len(windows), error=repr(exc)[:300])
            records, heat = [], None
            for w in windows:
                try:
                    records.extend(runner.run([w]))
                except Exception as one:
                    report.failed += 1
                    log.error("replay_window_failed", group=w.group, start_ns=w.start_ns, error=repr(one)[:300])
        now = sender.recording_now()
        for rec in records:
            identity = fused.get((rec.group, rec.start_ns, rec.revision))
            if identity is not None:
                rec.image_fusion = ImageFusion(identity["method"], identity["sha256"])
            if now is not None:
                rec.latency_s = (now - rec.end_ns) / 1e9
            for sink in sinks:
                sink.write(rec)
            if on_result is not None:
                on_result(rec)
            report.results.append(rec)
        if png is not None:
            for item in png_frames(records, windows, heat):
                png.write(item)

    def fuse(windows: list[Window], fused: dict[tuple, Any]) -> list[Window]:
        """The windows the model gets after the fusion stage, as the daemon decides it (``FusionOutcome``)."""
        from daemon.fusion_stage import FAILED

        kept = []
        for w in windows:
            outcome = fusion.apply(w)
            if outcome.status == FAILED:
                report.fusion_failed += 1
                err = str(outcome.error)[:300]
                log.error("replay_image_fusion_failed", group=w.group, start_ns=w.start_ns, error=err)
                if not outcome.served:  # the model was trained on fused frames: no result for this one
                    report.failed += 1
                    continue
            if outcome.identity is not None:
                fused[(w.group, w.start_ns, w.revision)] = outcome.identity
            kept.append(outcome.window)
        return kept

    def handled() -> int:
        return sum(worker.messages().values()) + sum(worker.stats.rejected.values())

    started = time.monotonic()
    sender.thread.start()
    try:
        while True:
            worker.poll(20)
            while len(pending) >= batch_size:
                report.windows += batch_size
                infer(pending[:batch_size])
                del pending[:batch_size]
            if sender.error is not None:
                if isinstance(sender.error, McapError):  # the file itself: not MCAP, or not sacmf's channels
                    raise sender.error
                raise RuntimeError(f"replay sender failed: {sender.error!r}") from sender.error
            if sender.done.is_set() and handled() >= sender.sent:
                break
        report.flushed = sum(w.completeness == "flushed" for w in worker.flush())  # end of the recording: fire the rest
        while pending:
            chunk = pending[:batch_size]
            report.windows += len(chunk)
            infer(chunk)
            del pending[:batch_size]
    finally:
        sender.stop.set()
        sender.thread.join(5)
        sender.sock.close(linger=0)
        worker.close()
        ctx.destroy(linger=0)
        if tap is not None:
            tap.close()
    report.messages = sender.sent
    report.rejected = dict(worker.stats.rejected)
    report.wall_s = time.monotonic() - started
    return report


def default_output_dir(recording: str | os.PathLike[str], kind: str) -> Path:
    """``outputs/<kind>/<recording file name without its extension>`` (outputs/ is git-ignored); the
    whole stem, so that ``day.1.mcap`` and ``day.2.mcap`` do not share (and overwrite) one folder."""
    return Path("outputs") / kind / Path(recording).stem
