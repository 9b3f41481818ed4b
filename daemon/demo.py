"""`sacmf demo`: the whole system in one command - simulator -> daemon -> outputs, with a live view.

It starts the simulator (realistic scenes with known truth, daemon/simulate.py) and the real daemon
(daemon/service.py: ingest process, windows, SA-CMF, sinks, admin HTTP) in this process, reads the
daemon's ZeroMQ results like any consumer would (its SUB binds on loopback and the daemon's PUB connects,
so there is no socket file to clean up), and prints once a second what an operator wants to see: windows
per second, latency percentiles, the latest window's target class against the truth, its detections, the
fusion weights (image vs sequence) and the MI estimate. Outputs go to ``outputs/demo/``:
``results.jsonl``, pictures in ``detections/``, ``heatmaps/`` and ``fusion_weights/``, and an MCAP
``recording.mcap`` of inputs and results that ``sacmf evaluate-stream`` scores afterwards.

Why in one process with the daemon rather than beside a ``sacmf serve`` subprocess: one Ctrl-C, one
exit status, and the daemon's own signal handling (first signal: drain and exit 0; second: exit at
once) is what stops the demo, so the demo shows the real shutdown path. ``--duration``, ``stop`` and a
closed stdout (``sacmf demo | head``) start that same clean shutdown from a thread of their own.

Options are checked (checkpoint read, output folder writable) before anything is started or deleted;
only then are an earlier demo's outputs - its own files, nothing else in the folder - replaced.

The model: ``model/weights/default.pt`` when it exists (or ``--checkpoint``); otherwise a tiny random
network is saved to ``untrained.pt`` in the output folder and the view says, in capitals, that results
are untrained.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
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

from daemon import logs, simulate
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


# What the demo itself writes into its output folder, and nothing else: ``_fresh_outputs`` deletes only
# these, because ``--out`` may point at a folder holding other files (``sacmf test --vis`` writes its
# pictures into the same ``detections/``, ``heatmaps/`` and ``fusion_weights/`` sub-folders, named by
# scene id). The daemon's picture sink names a picture ``<group>_<window start in ns>.png`` - a 19-digit
# wall-clock time - and writes it through ``.<name>.tmp``; the JSONL sinks rotate to ``<file>.<N>``.
_OWN_FILES = re.compile(r"(results\.jsonl|late\.jsonl)(\.\d+)?|recording\.mcap|untrained\.pt|demo\.toml")
_OWN_PICTURES = re.compile(r"[A-Za-z0-9_.-]{1,64}_\d{19}\.png|\.[A-Za-z0-9_.-]{1,64}_\d{19}\.png\.tmp")
PICTURE_DIRS = ("detections", "heatmaps", "fusion_weights")


def _own_pictures(out: Path) -> list[Path]:
    """The demo's pictures under ``out`` (finished ones and leftover temporaries)."""
    return [p for sub in PICTURE_DIRS for p in sorted((out / sub).glob("*")) if _OWN_PICTURES.fullmatch(p.name)]


def _fresh_outputs(out: Path) -> None:
    """Remove what an earlier demo wrote there (only the demo's own files), so the outputs are this run's.

    Called only once every option has been checked: a demo that refuses to start leaves the results of
    the last one alone. Sub-folders stay (the picture sink re-creates them anyway), with whatever else
    is in them.
    """
    for old in [p for p in out.glob("*") if _OWN_FILES.fullmatch(p.name)] + _own_pictures(out):
        if old.is_file() or old.is_symlink():
            old.unlink(missing_ok=True)


def _prepare_out(out: Path) -> str | None:
    """Create ``out`` and check that files can be written there; the reason when not (``--out /proc/x``).

    Checked up front so a bad folder is a one-line error (exit 2) before anything starts or is deleted,
    rather than a traceback, or a daemon that loads its model and then fails to open its sinks.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".sacmf-demo-probe-"):
            pass
    except OSError as exc:
        return f"cannot use {out} as the output folder: {exc.strerror or exc}"
    return None


def _checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be served, or None. Read and checked (no forward pass) before the demo replaces
    earlier outputs: a garbage ``--checkpoint`` must not cost the user their last demo's results."""
    from model.checkpoint import CheckpointError, load_checkpoint

    try:
        load_checkpoint(path)
    except CheckpointError as exc:
        return str(exc)
    return None


class _Stdout:
    """The demo's printing, which must survive the reader going away (``sacmf demo | head -3``).

    The conventional reaction to a closed pipe is to stop writing, quietly; the demo then also stops (see
    ``run``). On the first broken write, fd 1 (and fd 2 when it is the same pipe, as with ``2>&1 |``) is
    pointed at /dev/null: the rest of the shutdown, log lines and the interpreter's final flush of
    whatever was left in the buffer then go nowhere instead of raising BrokenPipeError in some thread.
    """

    def __init__(self) -> None:
        self.closed = threading.Event()

    def say(self, text: str) -> bool:
        """Print ``text``; False once the reader has gone."""
        if self.closed.is_set():
            return False
        try:
            print(text, flush=True)
        except BrokenPipeError:
            self._detach()
            return False
        return True

    def _detach(self) -> None:
        self.closed.set()
        try:
            out = sys.stdout.fileno()
            logs.to_devnull(out, *([2] if _same_pipe(out, 2) else []))
        except (OSError, ValueError, AttributeError):  # no real stdout (embedded use): nothing to redirect
            pass


def _same_pipe(a: int, b: int) -> bool:
    try:
        sa, sb = os.fstat(a), os.fstat(b)
    except OSError:
        return False
    return stat.S_ISFIFO(sa.st_mode) and (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


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
            "zmq_bind": False,  # the view's SUB binds (run): no socket file
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
    return config_mod.parse(raw, "<demo>"), raw


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_str(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {type(v).__name__}")


def _toml_str(s: str) -> str:
    """A TOML basic string: JSON's escapes of quotes, backslashes and control characters are TOML's too;
    other characters stay as they are (JSON's surrogate-pair escapes are not valid TOML), and DEL,
    which JSON leaves alone, is escaped."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def write_demo_config(raw: dict, path: Path) -> None:
    """The config the demo's daemon ran with, so that ``sacmf evaluate-stream --config`` replays its
    recording with the same groups, windows and model from any folder (config.toml is only in a clone)."""
    lines = [
        "# The configuration `sacmf demo` served with (its endpoints were ephemeral).",
        f"# Score its recording: sacmf evaluate-stream {path.parent / 'recording.mcap'} --config {path}",
    ]
    for section, values in raw.items():
        lines.append(f"\n[{section}]")
        lines += [f"{_toml_str(key)} = {_toml_value(v)}" for key, v in values.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


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
    """Run the demo until Ctrl-C/SIGTERM, ``stop``, ``duration_s`` or a closed stdout; the exit status.

    The status is the daemon's (0: drained cleanly, 1: the drain missed its deadline or a part died,
    2: it could not start), 2 for a bad option (nothing started, nothing deleted), and at least 1 when
    the console view itself failed. A reader closing stdout (``| head``) stops the demo like Ctrl-C does:
    nobody is watching any more, and without it a demo with no ``--duration`` would hold the shell's
    pipeline open forever; the daemon drains, so the outputs are complete and the status is still 0.
    """
    out = Path(out_dir)
    ckpt = find_checkpoint(checkpoint)
    untrained = ckpt is None
    # the cheap checks first: a typo costs a second, not the import of torch that reading a checkpoint needs
    problem = (
        (None if untrained or ckpt.is_file() else f"no checkpoint at {ckpt}")
        or _prepare_out(out)
        or (None if untrained else _checkpoint_problem(ckpt))
    )
    lock = None if problem else _lock_out(out)
    if lock is None:
        print(f"error: {problem or f'another sacmf demo is writing to {out}; give this one its own --out'}",
              file=sys.stderr)  # fmt: skip
        return 2
    ctx = zmq.Context()
    try:
        return _run_checked(sim, stop, duration_s, out, ckpt, untrained, record, log_level, ctx)
    finally:
        ctx.destroy(linger=0)
        lock.close()  # releases the lock


def _lock_out(out: Path):
    """An exclusive lock on the output folder for this demo's life, or None when another demo holds it:
    a second demo on the same --out deleted the first one's files and interleaved its results."""
    fh = open(out / ".demo.lock", "w")  # noqa: SIM115 - held open for the demo's life (closed by run)
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    return fh


def _run_checked(
    sim: SimSettings,
    stop: threading.Event,
    duration_s: float | None,
    out: Path,
    ckpt: Path | None,
    untrained: bool,
    record: bool,
    log_level: str,
    ctx: zmq.Context,
) -> int:
    from daemon.config import ConfigError
    from daemon.service import Service

    # The view's SUB binds on loopback and the daemon's PUB connects to it: no ipc socket file, so no
    # temporary folder that a signal during start-up (before the daemon's handlers exist) could leak.
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"det/")
    sub.bind("tcp://127.0.0.1:*")
    results_ep = sub.getsockopt(zmq.LAST_ENDPOINT).decode()
    sensors = {c: "img" for c in sim.cameras} | {r: "rad" for r in sim.radiometers}
    pub = SensorPublisher("tcp://127.0.0.1:*", sim.group, sensors, context=ctx)
    try:
        served = out / "untrained.pt" if untrained else ckpt
        try:
            cfg, raw = demo_config(sim, pub.endpoints[0], served, out, results_ep, record, log_level)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        service = Service(cfg)
        # Every option has been checked: only now are the earlier demo's outputs replaced.
        _fresh_outputs(out)
        write_demo_config(raw, out / "demo.toml")
        if untrained:
            untrained_checkpoint(out)  # kept beside the recording, which it can then be scored with
        return _serve(service, sim, stop, duration_s, out, served, untrained, record, pub, sub)
    finally:
        pub.close()


def _serve(
    service,
    sim: SimSettings,
    stop: threading.Event,
    duration_s: float | None,
    out: Path,
    ckpt: Path,
    untrained: bool,
    record: bool,
    pub: SensorPublisher,
    sub: zmq.Socket,
) -> int:
    scenes = SceneSource(sim)
    view = ConsoleView(scenes)
    output = _Stdout()
    finished = threading.Event()  # service.run() returned
    sim_stop = threading.Event()
    console_failed = threading.Event()

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

    def stopper() -> None:
        # Its own thread, apart from the console's: whatever happens to the view (a closed pipe, a bug),
        # ``stop`` and ``--duration`` still end the demo. The duration counts from ready, like the view's
        # clock; ``stop`` and a closed stdout count from the start, even before the model has loaded.
        ready_at = None
        while not finished.wait(0.05):
            if ready_at is None and service.ready()[0]:
                ready_at = time.monotonic()
            timed_out = duration_s is not None and ready_at is not None and time.monotonic() - ready_at >= duration_s
            if stop.is_set() or output.closed.is_set() or console_failed.is_set() or timed_out:
                service.stop.set()  # the daemon drains and returns, as on the first Ctrl-C
                return

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

    def show(rec_body: bytes) -> None:
        try:
            rec = from_wire(msgpack.unpackb(rec_body, raw=False))
        except (ValueError, TypeError, KeyError, msgpack.UnpackException):
            return  # the results port is on loopback: a stray sender must not take the view down
        if isinstance(rec, ResultRecord):
            view.add(rec)

    def console() -> None:
        try:
            if not wait_ready():
                return
            host, port = service.admin.address
            banner.append(f"metrics: http://{host}:{port}/metrics   (also /healthz, /readyz)")
            if not output.say(banner[-1]):
                return
            started = next_draw = time.monotonic()
            while not finished.is_set():
                if sub.poll(100):
                    frames = sub.recv_multipart()
                    if len(frames) == 2:
                        show(frames[1])
                if time.monotonic() >= next_draw and not service.stop.is_set():
                    next_draw += REFRESH_S
                    block = view.render(time.monotonic() - started)
                    if not output.say("\x1b[H\x1b[J" + "\n".join([*banner, "", block]) if redraw else block):
                        return
        except Exception:  # a bug in the view: say so, and stop the demo (exit status 1), not a silent view
            log.exception("demo_console_failed")
            console_failed.set()
        finally:
            sub.close(linger=0)

    output.say("\n".join(banner))
    threads = [threading.Thread(target=f, name=f.__name__, daemon=True) for f in (simulator, console, stopper)]
    for t in threads:
        t.start()
    try:
        status = service.run()  # blocks; its SIGINT/SIGTERM handler starts the clean shutdown
    finally:
        finished.set()
        sim_stop.set()
        for t in threads:
            t.join(10)
    if console_failed.is_set():
        status = status or 1
    snap = service.state.snapshot
    families = snap.families if snap else []
    messages = _family_total(families, "sacmf_ingest_messages")
    rejected = _family_total(families, "sacmf_ingest_rejected_messages")
    output.say(
        f"demo: {service.state.results_published} windows, {messages} messages, {rejected} rejected, "
        f"{view.correct}/{view.total} target classes right{' (untrained model)' if untrained else ''}; "
        f"exit status {status}"
    )
    # Only what this run left on disk: a daemon that never opened its sinks (a checkpoint that fails its
    # warm-up, say) wrote nothing, and pointing the user at missing files would send them hunting.
    written = [f"{out}/results.jsonl"] if (out / "results.jsonl").is_file() else []
    pictures = len([p for p in _own_pictures(out) if p.suffix == ".png"])
    if pictures:
        written.append(f"{pictures} PNGs in {out}/{{{','.join(PICTURE_DIRS)}}}/")
    recording = out / "recording.mcap"
    if record and recording.is_file():
        written.append(str(recording))
    if written:
        output.say(f"outputs: {', '.join(written)}")
    if record and recording.is_file() and service.state.results_published:
        # the demo's own config: its group, windows and model, wherever the user runs it from
        output.say(f"score the recording: sacmf evaluate-stream {recording} --config {out / 'demo.toml'}")
    return status
