"""`sacmf demo`: the whole system in one command - simulator -> daemon -> outputs, with a live view.

It starts the simulator (realistic scenes with known truth, daemon/simulate.py) and the real daemon
(daemon/service.py: ingest process, windows, SA-CMF, sinks, admin HTTP) in this process, subscribes to
the daemon's ZeroMQ results like any consumer would, and prints once a second what an operator wants to
see: windows per second, latency percentiles, the latest window's target class against the truth, its
detections, the fusion weights (image vs sequence) and the MI estimate. Outputs go to ``outputs/demo/``:
``results.jsonl``, pictures in ``detections/``, ``heatmaps/`` and ``fusion_weights/``, and an MCAP
``recording.mcap`` of inputs and results that ``sacmf evaluate-stream`` scores afterwards.

Why in one process with the daemon rather than beside a ``sacmf serve`` subprocess: one Ctrl-C, one
exit status, and the daemon's own signal handling (first signal: drain and exit 0; second: exit at
once) is what stops the demo, so the demo shows the real shutdown path.

The model: ``model/weights/default.pt`` when it exists (or ``--checkpoint``); otherwise a tiny random
network is saved to a temporary checkpoint and the view says, in capitals, that results are untrained.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

import msgpack
import numpy as np
import structlog
import zmq

from daemon import simulate
from daemon.simulate import SceneSource, SimSettings
from ingest.publisher import SensorPublisher
from sinks.record import ResultRecord, from_wire

log = structlog.get_logger("sacmf.demo")

DEFAULT_CHECKPOINT = Path("model/weights/default.pt")
DEFAULT_OUT = Path("outputs/demo")
ROLES = ("image_a", "image_b", "seq_a", "seq_b")
REFRESH_S = 1.0


def find_checkpoint(explicit: str | os.PathLike[str] | None) -> Path | None:
    """``explicit``, else the default checkpoint beside the working directory or beside this package."""
    if explicit:
        return Path(explicit)
    for candidate in (DEFAULT_CHECKPOINT, Path(__file__).resolve().parents[1] / DEFAULT_CHECKPOINT):
        if candidate.is_file():
            return candidate
    return None


def untrained_checkpoint(directory: Path) -> Path:
    """A tiny random SA-CMF saved as a servable checkpoint: the demo runs before any training has."""
    import torch

    from daemon.inference import save_checkpoint
    from model.sacmf import SACMFConfig, build_model

    torch.manual_seed(0)
    cfg = SACMFConfig(backbone="tiny", d_model=32, heads=2, img_layers=1, seq_layers=1, token_grid=4, dropout=0.0)
    path = directory / "untrained.pt"
    save_checkpoint(build_model(cfg), path, "untrained-random")
    return path


def _fresh_outputs(out: Path) -> None:
    """Remove what an earlier demo wrote there (only the demo's own files), so the outputs are this run's."""
    for name in ("results.jsonl", "late.jsonl", "recording.mcap", "untrained.pt"):
        for old in out.glob(f"{name}*"):
            old.unlink()
    for sub in ("detections", "heatmaps", "fusion_weights"):
        shutil.rmtree(out / sub, ignore_errors=True)


def demo_config(
    sim: SimSettings, pub_endpoint: str, checkpoint: Path, out: Path, results_ep: str, record: bool, log_level: str
):
    """The daemon's config for the demo: live mode on the simulator, every output under ``out``."""
    from daemon import config as config_mod

    raw = {
        "ingest": {"mode": "live", "endpoints": [pub_endpoint]},
        "window": {"size_ms": sim.scene_ms, "allowed_lateness_ms": 200, "max_wait_ms": 1000},
        "groups": {sim.group: {"sensors": dict(zip([*sim.cameras, *sim.radiometers], ROLES, strict=True))}},
        "model": {"checkpoint": str(checkpoint)},
        "inference": {"max_batch_size": 4, "max_delay_ms": 50},
        "sinks": {
            "zmq_endpoint": results_ep,
            "jsonl_path": str(out / "results.jsonl"),
            "late_path": str(out / "late.jsonl"),
            "mcap_path": str(out / "recording.mcap") if record else "",
            "png_dir": str(out),
            "png_max_per_s": 1.0,
        },
        "admin": {"listen": "127.0.0.1:0"},
        "shutdown": {"timeout_s": 20},
        "logging": {"level": log_level},
    }
    return config_mod.parse(raw, "<demo>")


class ConsoleView:
    """Collects results from the daemon's PUB socket and renders the one-second view."""

    def __init__(self, scenes: SceneSource) -> None:
        self.scenes = scenes
        self.results: deque[ResultRecord] = deque(maxlen=200)
        self.arrivals: deque[float] = deque(maxlen=1000)  # monotonic time of each result
        self.total = 0
        self.correct = 0

    def add(self, rec: ResultRecord) -> None:
        self.results.append(rec)
        self.arrivals.append(time.monotonic())
        self.total += 1
        self.correct += rec.target_class == self._truth(rec)

    def _truth(self, rec: ResultRecord) -> str:
        return self.scenes.truth(self.scenes.index((rec.start_ns + rec.end_ns) // 2)).target

    def render(self, elapsed_s: float) -> str:
        now = time.monotonic()
        rate = sum(1 for t in self.arrivals if now - t <= 5.0) / min(5.0, max(elapsed_s, 1e-9))
        head = f"[{elapsed_s:6.1f} s] windows {self.total} ({rate:.1f}/s)"
        if not self.results:
            return head + "  waiting for the first window to close..."
        lat = np.array([r.latency_s for r in list(self.results)[-60:]])
        head += f"  latency p50 {np.percentile(lat, 50):.2f} s  p99 {np.percentile(lat, 99):.2f} s"
        r = self.results[-1]
        when = datetime.fromtimestamp(r.start_ns / 1e9, UTC).strftime("%H:%M:%S.%f")[:-3]
        p = r.target_probs[r.class_names.index(r.target_class)]
        truth = self._truth(r)
        mark = "right" if truth == r.target_class else "wrong"
        lines = [
            head,
            f"  latest window {r.group} {when}Z: target {r.target_class} ({p:.2f}), truth {truth} -> {mark}"
            f"   [{self.correct}/{self.total} right so far]",
            f"  fusion weights: image {r.fusion.image:.2f} | sequence {r.fusion.sequence:.2f}   "
            f"MI {'n/a' if r.mi_nats is None else f'{r.mi_nats:.3f} nats'}",
        ]
        dets = sorted(r.detections, key=lambda d: -d.score)[:3]
        shown = "; ".join(f"{d.cls} {d.score:.2f} at [{', '.join(f'{v:.0f}' for v in d.box)}]" for d in dets)
        lines.append(f"  detections ({len(r.detections)}): {shown or 'none above the threshold'}")
        return "\n".join(lines)


def _family_total(families: list, name: str) -> int:
    return int(sum(s.value for f in families for s in f.samples if s.name == f"{name}_total"))


def run(
    sim: SimSettings,
    stop: threading.Event,
    duration_s: float | None = None,
    *,
    out_dir: str | os.PathLike[str] = DEFAULT_OUT,
    checkpoint: str | os.PathLike[str] | None = None,
    record: bool = True,
    log_level: str = "warning",
) -> int:
    """Run the demo until Ctrl-C/SIGTERM, ``stop`` or ``duration_s``; returns the daemon's exit status."""
    from daemon.service import Service

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _fresh_outputs(out)
    tmp = Path(tempfile.mkdtemp(prefix="sacmf-demo-"))
    ckpt = find_checkpoint(checkpoint)
    untrained = ckpt is None
    if untrained:
        ckpt = untrained_checkpoint(out)  # kept beside the recording, which it can then be scored with
    elif not ckpt.is_file():
        print(f"error: no checkpoint at {ckpt}", file=sys.stderr)
        return 2
    ctx = zmq.Context()
    sensors = {c: "img" for c in sim.cameras} | {r: "rad" for r in sim.radiometers}
    pub = SensorPublisher("tcp://127.0.0.1:*", sim.group, sensors, context=ctx)
    results_ep = f"ipc://{tmp}/results.ipc"
    service = Service(demo_config(sim, pub.endpoints[0], ckpt, out, results_ep, record, log_level))
    scenes = SceneSource(sim)
    view = ConsoleView(scenes)
    finished = threading.Event()  # service.run() returned
    sim_stop = threading.Event()

    def wait_ready() -> bool:
        while not (service.stop.is_set() or finished.is_set() or stop.is_set()):
            if service.ready()[0]:
                return True
            time.sleep(0.1)
        return False

    def simulator() -> None:
        if wait_ready():
            time.sleep(0.3)  # the ingest process's subscription reaches the publisher (ZeroMQ slow joiner)
            simulate.run(pub, sim, sim_stop, None, source=scenes)

    banner = [f"sacmf demo: simulator on {pub.endpoints[0]} -> daemon ({sim.scene_ms / 1000:g} s windows) -> {out}/"]
    if untrained:
        banner.append(
            "model: NO TRAINED MODEL (model/weights/default.pt missing): serving an UNTRAINED random network;"
        )
        banner.append("       its classes, boxes and fusion weights are meaningless. Train one with `sacmf train`.")
    else:
        banner.append(f"model: {ckpt}")
    banner.append("Ctrl-C stops.")
    redraw = sys.stdout.isatty()  # a terminal gets the view redrawn in place; a pipe or file gets a log

    def console() -> None:
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"det/")
        sub.connect(results_ep)
        try:
            if not wait_ready():
                return
            host, port = service.admin.address
            banner.append(f"metrics: http://{host}:{port}/metrics   (also /healthz, /readyz)")
            print(banner[-1], flush=True)
            started = next_draw = time.monotonic()
            while not finished.is_set():
                if stop.is_set():
                    service.stop.set()  # the daemon drains and returns; then we finish
                if duration_s is not None and time.monotonic() - started >= duration_s:
                    service.stop.set()
                if sub.poll(100):
                    _, body = sub.recv_multipart()
                    rec = from_wire(msgpack.unpackb(body, raw=False))
                    if isinstance(rec, ResultRecord):
                        view.add(rec)
                if time.monotonic() >= next_draw and not service.stop.is_set():
                    next_draw += REFRESH_S
                    block = view.render(time.monotonic() - started)
                    print("\x1b[H\x1b[J" + "\n".join([*banner, "", block]) if redraw else block, flush=True)
        finally:
            sub.close(linger=0)

    print("\n".join(banner), flush=True)
    threads = [threading.Thread(target=f, name=f.__name__, daemon=True) for f in (simulator, console)]
    for t in threads:
        t.start()
    try:
        status = service.run()  # blocks; its SIGINT/SIGTERM handler starts the clean shutdown
    finally:
        finished.set()
        sim_stop.set()
        for t in threads:
            t.join(10)
        pub.close()
        ctx.destroy(linger=0)
        shutil.rmtree(tmp, ignore_errors=True)
    snap = service.state.snapshot
    families = snap.families if snap else []
    messages = _family_total(families, "sacmf_ingest_messages")
    rejected = _family_total(families, "sacmf_ingest_rejected_messages")
    pictures = sum(1 for _ in out.glob("*/*.png"))
    print(
        f"demo: {service.state.results_published} windows, {messages} messages, {rejected} rejected, "
        f"{view.correct}/{view.total} target classes right{' (untrained model)' if untrained else ''}; "
        f"exit status {status}"
    )
    outputs = f"{out}/results.jsonl, {pictures} PNGs in {out}/{{detections,heatmaps,fusion_weights}}/"
    if record:
        outputs += f", {out}/recording.mcap"
    print(f"outputs: {outputs}")
    if record:
        model = f" --checkpoint {ckpt}" if untrained or checkpoint else ""
        print(f"score the recording: sacmf evaluate-stream {out}/recording.mcap{model}", flush=True)
    return status
