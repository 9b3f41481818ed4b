"""`sacmf simulate`: publishes a realistic synthetic sensor group in real time, with its ground truth.

It stands in for real sensors in demos, tests, benchmarks and evaluations. The scenes come from the
model's own generator (:mod:`model.synth`): a tracked target of a known class near the frame centre,
field stars and other objects with known classes and boxes, raw-ADU camera frames (visible and
infrared) and the target's light curves on both radiometers. So a stream from here can be scored.

How scenes map onto the stream, and why:

* **One scene per scene span** (``scene_ms``, default 1 s: the daemon's default window) on the
  epoch-aligned event-time grid: scene ``k`` covers ``[k * span, (k + 1) * span)`` on the sensors'
  clock, exactly like the daemon's tumbling windows. With equal sizes every window holds one scene, so
  its ground truth is unambiguous; scene ``k`` is ``generate_scene(scene_seed(seed, k))``, so the truth
  follows from (seed, time) alone and any two runs agree on it.
* **Frames**: every camera frame whose exposure starts inside a scene shows that scene's Image-A
  (visible camera) or Image-B (infrared camera) exposure; frames within one scene repeat it.
* **Light curves, time-lapsed**: the generator's classes differ by rotation periods of seconds to
  minutes, which a 1 s window cannot show in real time. Each scene therefore plays ``sky_span_s``
  seconds of the target's light curve (default 25.6 s, the generator's native series) within its span,
  at the configured sample rate. The daemon resamples a window onto the model's sequence length, so the
  model sees the same time scale it is trained on.
* **Frame size**: the generator makes square frames of at least 32 px; other shapes are a centred crop
  of a square scene of the larger side, with the boxes cropped alike.
* **Ground truth travels in the messages**, as protocol-v1 ``meta`` (at most 4 KiB): every data message
  carries ``{"truth": {"t0", "t1", "target"}}`` (scene span on the sensor clock and the target's class
  name); Image-A frames add ``boxes`` (Image-A pixels, x0 y0 x1 y1) and ``classes`` of every object, plus
  the target's SNRs. A recording of the stream (the daemon's, or ``--record`` here) therefore holds its
  own truth per window, and ``sacmf evaluate-stream`` needs nothing else.

Timing is paced on the wall clock and stamped with the sensor's (simulated) clock, so it exercises the
same paths a real group does. ``--record FILE`` writes every data message it publishes, byte for byte,
into an MCAP recording (heartbeats are not recorded: they come from the publisher's own thread).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import msgpack
import numpy as np
import zmq

from daemon.cli_types import stop_on_signals
from ingest import protocol
from ingest.publisher import SensorPublisher
from model.synth import CLASS_NAMES, SynthConfig, generate_scene, scene_seed
from sinks.mcap_recorder import McapRecorder

TRUTH_KEY = "truth"
MIN_SCENE_SIDE = 32  # model.synth needs at least this many pixels per side
NATIVE_SKY_SPAN_S = SynthConfig().seq_len / SynthConfig().seq_rate_hz  # 25.6 s


MAX_FRAME_RATE_HZ = 1000.0
MAX_SAMPLE_RATE_HZ = 1e6
# A PUSH send waits at most this long for the daemon to take a message before the loop looks at the stop
# flag and the end of the run again: with no daemon reading, a blocking send would ignore both.
SEND_TIMEOUT_MS = 200


@dataclass(frozen=True)
class SimSettings:
    group: str = "g1"
    cameras: tuple[str, str] = ("cam_vis", "cam_ir")
    radiometers: tuple[str, str] = ("rad_vis", "rad_ir")
    frame_rate_hz: float = 10.0
    sample_rate_hz: float = 1000.0
    chunk_samples: int = 100  # samples per radiation message
    height: int = 128
    width: int = 128
    exposure_ms: float = 20.0
    clock_offset_ms: float = 0.0  # the simulated sensors' clock error
    seed: int = 0
    scene_ms: float = 1000.0  # one scene per this span of event time, epoch-aligned (use the window size)
    sky_span_s: float = NATIVE_SKY_SPAN_S  # seconds of light curve played within one scene span
    # sensor -> ms its messages are held back after they are due: a lagging link, to try late_policy
    delays_ms: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # upper bounds: the pacing works in whole ns per frame and per sample
        if not (0 < self.frame_rate_hz <= MAX_FRAME_RATE_HZ and 0 < self.sample_rate_hz <= MAX_SAMPLE_RATE_HZ):
            raise ValueError(
                f"frame_rate_hz must be in (0, {MAX_FRAME_RATE_HZ:g}] and sample_rate_hz in "
                f"(0, {MAX_SAMPLE_RATE_HZ:g}], got {self.frame_rate_hz} and {self.sample_rate_hz}"
            )
        if self.chunk_samples < 1:
            raise ValueError(f"chunk_samples must be >= 1, got {self.chunk_samples}")
        if not protocol.NAME_RE.match(self.group):
            raise ValueError(f"group name {self.group!r} must match [A-Za-z0-9_.-]{{1,64}}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"frame size must be positive, got {self.height}x{self.width}")
        if not (0 < self.scene_ms < math.inf and 0 < self.sky_span_s < math.inf):
            raise ValueError(f"scene_ms and sky_span_s must be finite and > 0, got {self.scene_ms}, {self.sky_span_s}")
        sensors = (*self.cameras, *self.radiometers)
        for sensor, ms in self.delays_ms.items():
            if sensor not in sensors:
                raise ValueError(f"delay for unknown sensor {sensor!r}; sensors: {', '.join(sensors)}")
            if not ms >= 0:
                raise ValueError(f"delay of {sensor} must be >= 0 ms, got {ms}")


@dataclass(frozen=True)
class SceneTruth:
    """What is really in one scene; times on the sensors' clock, boxes in Image-A pixels."""

    t0_ns: int
    t1_ns: int
    target: str  # the tracked target's class name
    boxes: list[list[float]] = field(default_factory=list)  # [x0, y0, x1, y1] per object, target first
    classes: list[str] = field(default_factory=list)
    snr_img: float | None = None
    snr_seq: float | None = None

    def to_meta(self, full: bool) -> dict:
        """The ``meta`` of a message: the short form everywhere, boxes and SNRs on Image-A frames only."""
        truth: dict = {"t0": self.t0_ns, "t1": self.t1_ns, "target": self.target}
        if full:
            truth |= {"boxes": self.boxes, "classes": self.classes}
            if self.snr_img is not None and self.snr_seq is not None:
                truth |= {"snr_img": round(self.snr_img, 3), "snr_seq": round(self.snr_seq, 3)}
        return {TRUTH_KEY: truth}

    @classmethod
    def from_meta(cls, meta: object) -> SceneTruth | None:
        """The truth in a message's ``meta``, or None (no truth, or not in this form)."""
        t = meta.get(TRUTH_KEY) if isinstance(meta, dict) else None
        if not isinstance(t, dict) or not all(k in t for k in ("t0", "t1", "target")):
            return None
        boxes, classes = t.get("boxes", []), t.get("classes", [])
        if not isinstance(boxes, list) or not isinstance(classes, list) or len(boxes) != len(classes):
            return None
        return cls(int(t["t0"]), int(t["t1"]), str(t["target"]), boxes, classes, t.get("snr_img"), t.get("snr_seq"))

    @property
    def has_boxes(self) -> bool:
        return bool(self.classes)


@dataclass(frozen=True)
class _Prepared:
    image_a: np.ndarray  # uint16 [height, width]
    image_b: np.ndarray
    seq_a: np.ndarray  # float32 [samples per scene]
    seq_b: np.ndarray
    truth: SceneTruth


class SceneSource:
    """Scene ``k`` of the stream, generated on first use and kept for a few spans (deterministic)."""

    def __init__(self, s: SimSettings, cache: int = 4) -> None:
        self.s = s
        self.scene_ns = int(round(s.scene_ms * 1e6))
        self.dt_ns = int(1e9 / s.sample_rate_hz)
        self.per_scene = math.ceil(self.scene_ns / self.dt_ns)  # samples whose time falls in one scene
        self.side = max(s.height, s.width, MIN_SCENE_SIDE)
        seq_len = max(16, self.per_scene)
        self.cfg = SynthConfig(size=self.side, seq_len=seq_len, seq_rate_hz=seq_len / s.sky_span_s)
        self._cache: OrderedDict[int, _Prepared] = OrderedDict()
        self._size = cache
        self._lock = threading.Lock()  # the demo's console thread reads truths while the simulator runs

    def index(self, t_ns: int) -> int:
        return t_ns // self.scene_ns

    def scene(self, k: int) -> _Prepared:
        with self._lock:
            hit = self._cache.get(k)
            if hit is not None:
                self._cache.move_to_end(k)
                return hit
        prepared = self._make(k)
        with self._lock:
            self._cache[k] = prepared
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return prepared

    def truth(self, k: int) -> SceneTruth:
        return self.scene(k).truth

    def frame(self, t_ns: int, band: int) -> tuple[np.ndarray, SceneTruth]:
        p = self.scene(self.index(t_ns))
        return (p.image_a if band == 0 else p.image_b), p.truth

    def samples(self, t0_ns: int, n: int, band: int) -> tuple[np.ndarray, SceneTruth]:
        """``n`` samples from ``t0_ns`` every ``dt_ns``; a run may cross into the next scene."""
        t = t0_ns + self.dt_ns * np.arange(n, dtype=np.int64)
        ks = t // self.scene_ns
        out = np.empty(n, np.float32)
        for k in np.unique(ks):
            sel = ks == k
            p = self.scene(int(k))
            series = p.seq_a if band == 0 else p.seq_b
            idx = np.minimum((t[sel] - int(k) * self.scene_ns) // self.dt_ns, series.size - 1)
            out[sel] = series[idx]
        return out, self.scene(int(ks[0])).truth

    def _make(self, k: int) -> _Prepared:
        s = self.s
        scene = generate_scene(scene_seed(s.seed, k), self.cfg)
        r0, c0 = (self.side - s.height) // 2, (self.side - s.width) // 2
        boxes, classes = [], []
        for box, cls in zip(scene.boxes.tolist(), scene.object_classes.tolist(), strict=True):
            x0, x1 = (min(max(v - c0, 0.0), float(s.width)) for v in (box[0], box[2]))
            y0, y1 = (min(max(v - r0, 0.0), float(s.height)) for v in (box[1], box[3]))
            if x1 - x0 >= 1.0 and y1 - y0 >= 1.0:  # still visible after the crop
                boxes.append([round(x0, 2), round(y0, 2), round(x1, 2), round(y1, 2)])
                classes.append(CLASS_NAMES[cls])
        t0 = k * self.scene_ns
        truth = SceneTruth(t0, t0 + self.scene_ns, CLASS_NAMES[scene.target_class], boxes, classes)
        truth = _fit_meta(SceneTruth(**{**truth.__dict__, "snr_img": scene.snr_img, "snr_seq": scene.snr_seq}))
        crop = (slice(r0, r0 + s.height), slice(c0, c0 + s.width))
        return _Prepared(
            np.ascontiguousarray(scene.image_a[crop]),
            np.ascontiguousarray(scene.image_b[crop]),
            scene.seq_a[: self.per_scene],
            scene.seq_b[: self.per_scene],
            truth,
        )


def _fit_meta(truth: SceneTruth) -> SceneTruth:
    """Drop the last objects (never the target) until the meta fits the protocol's 4 KiB."""
    while len(msgpack.packb(truth.to_meta(full=True))) > protocol.MAX_META_BYTES and len(truth.classes) > 1:
        truth = SceneTruth(**{**truth.__dict__, "boxes": truth.boxes[:-1], "classes": truth.classes[:-1]})
    return truth


def run(
    publisher: SensorPublisher,
    settings: SimSettings,
    stop: threading.Event,
    duration_s: float | None = None,
    *,
    source: SceneSource | None = None,
    recorder: McapRecorder | None = None,
) -> dict[str, int]:
    """Publish until ``stop`` is set or ``duration_s`` has passed. Returns data messages sent per sensor.

    ``recorder`` gets every data message exactly as published (log time = send time), so the file
    replays and evaluates like a daemon's recording. A sensor in ``settings.delays_ms`` sends each message
    that long after it is due (same event time): what a slow link does, and what late data looks like.
    """
    s = settings
    scenes = source or SceneSource(s)
    group, session = publisher.group, publisher.session
    offset_ns = int(s.clock_offset_ms * 1e6)
    exp_ns = int(s.exposure_ms * 1e6)
    dt_ns = scenes.dt_ns
    chunk_ns = dt_ns * s.chunk_samples
    frame_ns = int(1e9 / s.frame_rate_hz)
    scenes.scene(scenes.index(time.time_ns() + offset_ns))  # generated before the clock starts
    start = time.time_ns()
    next_frame, next_chunk = start, start
    sent = dict.fromkeys([*s.cameras, *s.radiometers], 0)
    end = start + int(duration_s * 1e9) if duration_s else None
    delays = {sensor: int(ms * 1e6) for sensor, ms in s.delays_ms.items() if ms > 0}
    held: list[tuple] = []  # heap of (send at ns, order, sensor, payload, t_ns, exp_ns or dt_ns, meta)

    def over() -> bool:
        return stop.is_set() or (end is not None and time.time_ns() >= end)

    def publish(sensor: str, payload: np.ndarray, t_ns: int, extra: int, meta: dict) -> None:
        camera = sensor in s.cameras
        while True:  # a PUSH socket without a reader times out (publisher's send_timeout_ms): try again
            try:
                if camera:
                    seq = publisher.send_image(sensor, payload, t_ns, extra, meta=meta)
                else:
                    seq = publisher.send_samples(sensor, payload, t_ns, extra, meta=meta)
                break
            except TimeoutError:
                if over():
                    return  # not sent, so not counted or recorded
        kind, header = ("img", protocol.encode_image_header) if camera else ("rad", protocol.encode_rad_header)
        if recorder is not None:
            head = header(group, sensor, session, seq, t_ns, extra, payload, meta)
            recorder.record_input([protocol.topic(kind, group, sensor), head, payload], time.time_ns())
        sent[sensor] += 1

    def due(sensor: str, payload: np.ndarray, t_ns: int, extra: int, meta: dict, now: int) -> None:
        if sensor in delays:
            heapq.heappush(held, (now + delays[sensor], next(order), sensor, payload, t_ns, extra, meta))
        else:
            publish(sensor, payload, t_ns, extra, meta)

    order = itertools.count()
    while not over():
        now = time.time_ns()
        if now >= next_frame:
            t_ns = next_frame + offset_ns
            for band, cam in enumerate(s.cameras):
                image, truth = scenes.frame(t_ns, band)
                due(cam, image, t_ns, exp_ns, truth.to_meta(full=band == 0), now)
            next_frame += frame_ns
        if now >= next_chunk + chunk_ns:  # a chunk is published once its last sample has been taken
            t_ns = next_chunk + offset_ns
            for band, rad in enumerate(s.radiometers):
                values, truth = scenes.samples(t_ns, s.chunk_samples, band)
                due(rad, values, t_ns, dt_ns, truth.to_meta(full=False), now)
            next_chunk += chunk_ns
        while held and held[0][0] <= now:
            publish(*heapq.heappop(held)[2:])
        scenes.scene(scenes.index(now + offset_ns) + 1)  # the next scene is made while idle, not when due
        wake = min(next_frame, next_chunk + chunk_ns, held[0][0] if held else next_frame)
        stop.wait(max(0.0, (wake - time.time_ns()) / 1e9))
    return sent


# ---------------------------------------------------------------- the command line


def parse_size(text: str) -> tuple[int, int]:
    """``HxW`` (``--size``) as (height, width); ValueError names the expected form."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 128x128 (height x width in px), got {text!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return h, w


def settings_from_args(args: argparse.Namespace) -> SimSettings:
    """The simulator options of `sacmf simulate` and `sacmf demo` (daemon/cli.py ``sim_args``)."""
    h, w = parse_size(args.size)
    return SimSettings(
        group=args.group,
        frame_rate_hz=args.frame_rate,
        sample_rate_hz=args.sample_rate,
        chunk_samples=args.chunk,
        height=h,
        width=w,
        seed=args.seed,
        scene_ms=getattr(args, "scene_ms", 1000.0),
        delays_ms=dict(args.delay),
    )


def publish_command(args: argparse.Namespace, s: SimSettings, stop: threading.Event, **curve: object) -> int:
    """The body of `sacmf simulate`, plain or with CURVE (``curve``: the publisher's CURVE arguments):
    open the publisher and the optional ``--record`` file, publish until ``stop`` or ``--duration``, print
    what was sent. A publisher or file that cannot be opened is an ``error:`` line and exit status 2.

    The publisher's sends time out (:data:`SEND_TIMEOUT_MS`) so that ``run`` can still stop at the end of
    ``--duration`` or on a signal while a PUSH socket has nobody reading."""
    from ingest.security import KeyFileError

    sensors = {c: "img" for c in s.cameras} | {r: "rad" for r in s.radiometers}
    record = getattr(args, "record", None)
    try:
        pub = SensorPublisher(
            args.endpoint,
            s.group,
            sensors,
            bind=not args.connect,
            socket_type=args.socket,
            send_timeout_ms=SEND_TIMEOUT_MS,
            **curve,  # type: ignore[arg-type]
        )
    except zmq.ZMQError as exc:  # endpoint in use or malformed
        print(f"error: {args.endpoint}: {exc}", file=sys.stderr)
        return 2
    except (KeyFileError, ValueError, RuntimeError) as exc:  # key files, CURVE options
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        recorder = McapRecorder(record) if record else None
    except OSError as exc:
        pub.close()
        print(f"error: cannot record to {record}: {exc}", file=sys.stderr)
        return 2
    if recorder is not None and recorder.earlier is not None:
        print(f"{record} existed: kept as {recorder.earlier}", file=sys.stderr)
    secured = " with CURVE" if curve else ""
    try:
        with pub:
            print(
                f"publishing group {s.group}{secured} on {', '.join(pub.endpoints)} (session {pub.session:#x}); "
                "Ctrl-C stops"
            )
            if recorder is not None:
                print(f"recording to {record}")
            sent = run(pub, s, stop, args.duration, recorder=recorder)
    finally:
        if recorder is not None:
            recorder.close()
    print("sent:", ", ".join(f"{k}={v}" for k, v in sent.items()))
    return 0


def curve_command(args: argparse.Namespace) -> int:
    """`sacmf simulate --curve-secret ...`: the command with a CURVE publisher (daemon/keygen.py adds the
    options). Why the simulator takes keys: it proves a secured daemon end to end before real sensors
    exist, with the publisher library real sensor hosts use. Key problems are reported, not raised.
    """
    try:
        s = settings_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    curve = {k: getattr(args, k) for k in ("curve_secret", "curve_server_public", "curve_clients")}
    return publish_command(args, s, stop_on_signals(), **curve)
