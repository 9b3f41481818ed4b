"""PNG sink: what the model saw and said about a window, as pictures (``detections/``, ``heatmaps/``,
``fusion_weights/`` under one directory, like the method's ``outputs/``).

Why a sink of its own with its own record type: a result record is deliberately small and free of
pixels (it crosses processes and languages), but a picture needs the Image-A frame and the detection
heatmap. The daemon builds a :class:`PngFrame` (the record plus those two arrays, already in Image-A
geometry) so this module needs nothing from ``ingest``, ``model`` or ``daemon``; a bare
:class:`~sinks.record.ResultRecord` is accepted too and gives the fusion-weight picture only.

Why rate-limited per group: drawing and compressing three PNGs costs tens of milliseconds, which is
more than a window's inference on a small model; a person looks at a few pictures per second at most.
A token bucket admits at most ``max_per_s`` windows per second per group on average; the others are
counted in ``skipped`` (``write`` returns False, so the supervisor counts them skipped, not written)
but still feed the fusion-weight history, so the sparkline has no holes. Its burst is 2: with a
burst of 1, windows arriving exactly at the rate with a millisecond of jitter found 0.999 tokens and
a third of them went undrawn.

Why a retention count (``keep_windows``): a daemon runs for months, and at one picture set per second
per group a directory gains over 250,000 files a day. The sink keeps the newest ``keep_windows``
windows' pictures (those already in the directory at start count too, oldest by file time first)
and deletes older ones; 0 keeps everything (then clean the directory up some other way).

Drawing uses Pillow only (no matplotlib): it is thread-safe, fast, and the sink runs in a supervisor
worker thread. Files are written to a temporary name and renamed, so a viewer never opens half a PNG.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sinks.record import ResultRecord

SUBDIRS = ("detections", "heatmaps", "fusion_weights")
RECENT_FILES = 300  # how many of the latest file paths ``files`` remembers (the demo's summary, tests)
_OWN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}_\d+\.png")  # <group>_<window start ns>.png: what we write
MIN_DISPLAY_SIDE = 256  # small frames are enlarged (nearest neighbour) to at least this many pixels
HISTORY = 120  # windows of fusion-weight history drawn per group

# Perceptually ordered dark -> bright anchors (black, purple, red, orange, pale yellow) for heatmaps.
_ANCHORS = np.array(
    [(0, 0, 4), (40, 11, 84), (101, 21, 110), (159, 42, 99), (212, 72, 66), (245, 125, 21), (250, 193, 39)]
    + [(252, 255, 164)],
    dtype=np.float64,
)
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)], 1
).astype(np.uint8)  # [256, 3]
_CLASS_COLOURS = [(255, 99, 71), (60, 179, 113), (65, 105, 225), (255, 215, 0), (186, 85, 211), (0, 206, 209)]
_IMAGE_COLOUR, _SEQ_COLOUR, _MI_COLOUR = (65, 105, 225), (255, 140, 0), (120, 120, 120)


@dataclass(slots=True)
class PngFrame:
    """A result plus the pixels it was computed from, for drawing only.

    ``heatmap`` is the detection head's object-centre probability (max over classes, 0-1) on its own
    grid; ``heatmap_extent`` is the (width, height) in Image-A pixels that grid spans from the top-left
    corner (the model frame is square and padded bottom/right, so it may extend past the image).
    """

    record: ResultRecord
    image: np.ndarray | None = None  # [H, W] or [H, W, C], the Image-A frame the detections refer to
    heatmap: np.ndarray | None = None  # [h, w] float in [0, 1]
    heatmap_extent: tuple[float, float] | None = None  # (width, height) in Image-A pixels

    def __post_init__(self) -> None:
        if not isinstance(self.record, ResultRecord):
            raise TypeError("PngFrame.record must be a ResultRecord")
        if self.image is not None and (self.image.ndim not in (2, 3) or 0 in self.image.shape[:2]):
            raise ValueError(f"image must be [H, W] or [H, W, C], got shape {self.image.shape}")
        if self.heatmap is not None:
            if self.heatmap.ndim != 2 or 0 in self.heatmap.shape:
                raise ValueError(f"heatmap must be [h, w], got shape {self.heatmap.shape}")
            if self.heatmap_extent is None:
                raise ValueError("a heatmap needs heatmap_extent (its span in Image-A pixels)")


class RateLimiter:
    """Token bucket per key: at most ``rate`` admissions per second on average, bursts of ``burst``."""

    def __init__(self, rate: float, burst: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"need rate > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate, self.burst, self.clock = rate, burst, clock
        self._tokens: dict[str, tuple[float, float]] = {}  # key -> (tokens, time of last update)

    def admit(self, key: str) -> bool:
        now = self.clock()
        tokens, last = self._tokens.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._tokens[key] = (tokens - 1.0, now)
            return True
        self._tokens[key] = (tokens, now)
        return False


@dataclass(slots=True)
class _History:
    image: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    sequence: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    mi: deque = field(default_factory=lambda: deque(maxlen=HISTORY))


class PngSink:
    """A sink (``name``/``write``/``close``) drawing at most ``max_per_s`` windows per second per group."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        *,
        max_per_s: float = 1.0,
        name: str = "png",
        clock: Callable[[], float] = time.monotonic,
        keep_windows: int = 0,
    ) -> None:
        if keep_windows < 0:
            raise ValueError(f"keep_windows must be >= 0 (0: keep all), got {keep_windows}")
        self.name = name
        self.out_dir = Path(out_dir)
        for sub in SUBDIRS:
            (self.out_dir / sub).mkdir(parents=True, exist_ok=True)
        self.keep_windows = keep_windows
        self._kept: deque[str] = deque(self._existing_stems() if keep_windows else ())  # oldest first
        self.deleted = 0  # windows whose pictures the retention removed
        self.limiter = RateLimiter(max_per_s, burst=2.0, clock=clock)
        self._history: dict[str, _History] = {}
        self._font = ImageFont.load_default()
        self.drawn = 0  # windows drawn (each gives up to three files)
        self.skipped = 0  # windows not drawn because of the rate limit
        self.files: deque[Path] = deque(maxlen=RECENT_FILES)  # the latest files written, in order
        self._failed: tuple | None = None  # the window whose drawing last failed: its retry is no new window

    def write(self, item: PngFrame | ResultRecord) -> bool | None:
        frame = item if isinstance(item, PngFrame) else PngFrame(item)
        rec = frame.record
        hist = self._history.setdefault(rec.group, _History())
        key = (rec.group, rec.start_ns, rec.revision)
        if key != self._failed:  # a retry was admitted and put in the history the first time
            hist.image.append(rec.fusion.image)
            hist.sequence.append(rec.fusion.sequence)
            hist.mi.append(rec.mi_nats)
            if not self.limiter.admit(rec.group):
                self.skipped += 1
                return False
        self._failed = key
        stem = f"{rec.group}_{rec.start_ns}.png"
        if frame.image is not None:
            base = _display(frame.image)
            zoom = _zoom(frame.image.shape[:2])
            self._save(_draw_detections(base, rec, zoom, self._font), "detections", stem)
            if frame.heatmap is not None and frame.heatmap_extent is not None:
                heat = _heat_on_image(frame.heatmap, frame.heatmap_extent, frame.image.shape[:2])
                self._save(_draw_heatmap(base, heat, self._font), "heatmaps", stem)
        self._save(_draw_fusion(rec, hist, self._font), "fusion_weights", stem)
        self._failed = None
        self.drawn += 1
        if self.keep_windows:
            self._retain(stem)

    def close(self) -> None:
        pass  # every file is complete once written

    def _existing_stems(self) -> list[str]:
        """Pictures a previous run left, oldest first (by file time): the retention counts them too."""
        newest: dict[str, float] = {}
        for sub in SUBDIRS:
            for entry in os.scandir(self.out_dir / sub):
                if entry.is_file(follow_symlinks=False) and _OWN_NAME.fullmatch(entry.name):
                    newest[entry.name] = max(newest.get(entry.name, 0.0), entry.stat().st_mtime)
        return sorted(newest, key=lambda stem: (newest[stem], stem))

    def _retain(self, stem: str) -> None:
        if stem in self._kept:  # a window drawn again (a revision): it is the newest now
            self._kept.remove(stem)
        self._kept.append(stem)
        while len(self._kept) > self.keep_windows:
            old = self._kept.popleft()
            for sub in SUBDIRS:
                (self.out_dir / sub / old).unlink(missing_ok=True)
            self.deleted += 1

    def _save(self, img: Image.Image, sub: str, stem: str) -> None:
        path = self.out_dir / sub / stem
        tmp = path.with_name(f".{stem}.tmp")
        try:
            img.save(tmp, format="PNG")
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
            raise
        self.files.append(path)


# ---------------------------------------------------------------- drawing


def _display(image: np.ndarray) -> Image.Image:
    """Raw frame -> 8-bit RGB for people: robust percentile stretch with a square root, then enlarged."""
    x = image.astype(np.float64)
    if x.ndim == 3:
        x = x.mean(axis=2)
    finite = x[np.isfinite(x)]
    lo, hi = np.percentile(finite, [1.0, 99.8]) if finite.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    y = np.sqrt(np.clip((np.nan_to_num(x, nan=lo) - lo) / (hi - lo), 0.0, 1.0))
    grey = (y * 255.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(grey, mode="L").convert("RGB")
    k = _zoom(image.shape[:2])
    return img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST) if k > 1 else img


def _zoom(shape: tuple[int, ...]) -> int:
    return max(1, math.ceil(MIN_DISPLAY_SIDE / max(shape[0], shape[1])))


def _draw_detections(base: Image.Image, rec: ResultRecord, k: int, font: ImageFont.ImageFont) -> Image.Image:
    """Boxes (Image-A pixels, times the display zoom ``k``) in their class colour, best on top."""
    img = base.copy()
    draw = ImageDraw.Draw(img)
    for det in sorted(rec.detections, key=lambda d: d.score):  # the best one is drawn last, on top
        colour = _CLASS_COLOURS[rec.class_names.index(det.cls) % len(_CLASS_COLOURS)]
        x0, y0, x1, y1 = (v * k for v in det.box)
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour, width=2)
        draw.text((x0 + 2, max(0.0, y0 - 11)), f"{det.cls} {det.score:.2f}", fill=colour, font=font)
    target = rec.target_class
    p = rec.target_probs[rec.class_names.index(target)]
    _caption(draw, img.width, f"{rec.group} {_when(rec.start_ns)}  target {target} {p:.2f}", font)
    return img


def _heat_on_image(heat: np.ndarray, extent: tuple[float, float], shape: tuple[int, int]) -> np.ndarray:
    """Heatmap grid -> [H, W] in Image-A pixels (nearest cell), cropped to the image."""
    h, w = shape
    gh, gw = heat.shape
    ys = np.minimum(((np.arange(h) + 0.5) * gh / extent[1]).astype(int), gh - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * gw / extent[0]).astype(int), gw - 1)
    return np.clip(heat[ys[:, None], xs[None, :]], 0.0, 1.0)


def _draw_heatmap(base: Image.Image, heat: np.ndarray, font: ImageFont.ImageFont) -> Image.Image:
    """Heatmap over the frame, colours scaled to its own maximum (an untrained or unsure head peaks low,
    and a fixed 0-1 scale would show nothing); the caption gives the true maximum."""
    peak = float(heat.max())
    rel = heat / peak if peak > 0 else heat
    colour = Image.fromarray(_LUT[(rel * 255.0 + 0.5).astype(np.uint8)], mode="RGB")
    colour = colour.resize(base.size, Image.Resampling.NEAREST)
    alpha = Image.fromarray((np.sqrt(rel) * 200.0).astype(np.uint8), mode="L").resize(base.size)
    img = Image.composite(colour, base, alpha)
    _caption(ImageDraw.Draw(img), img.width, f"object-centre heatmap (colours to max {peak:.2f})", font)
    return img


def _when(t_ns: int) -> str:
    """Window start as UTC time of day, to the millisecond."""
    return time.strftime("%H:%M:%S", time.gmtime(t_ns // 1_000_000_000)) + f".{t_ns // 1_000_000 % 1000:03d}Z"


def _caption(draw: ImageDraw.ImageDraw, width: int, text: str, font: ImageFont.ImageFont) -> None:
    draw.rectangle([0, 0, width, 12], fill=(0, 0, 0))
    draw.text((2, 1), text, fill=(255, 255, 255), font=font)


def _draw_fusion(rec: ResultRecord, hist: _History, font: ImageFont.ImageFont) -> Image.Image:
    """Left: this window's image vs sequence weight (with token-weight ranges); right: the recent past."""
    w, h = 480, 220
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    mi = "n/a" if rec.mi_nats is None else f"{rec.mi_nats:.3f} nats"
    d.text((8, 4), f"{rec.group} window {_when(rec.start_ns)}   MI {mi}", fill=(0, 0, 0), font=font)
    top, bottom = 30, h - 30
    scale = bottom - top
    d.line([30, bottom, 170, bottom], fill=(0, 0, 0))
    bars = (("image", rec.fusion.image, _IMAGE_COLOUR), ("sequence", rec.fusion.sequence, _SEQ_COLOUR))
    for i, (key, value, colour) in enumerate(bars):
        x0 = 40 + i * 65
        y = bottom - scale * min(max(value, 0.0), 1.0)
        d.rectangle([x0, y, x0 + 45, bottom], fill=colour)
        d.text((x0, bottom + 4), key, fill=(0, 0, 0), font=font)
        d.text((x0 + 8, y - 12), f"{value:.2f}", fill=(0, 0, 0), font=font)
        tok = rec.fusion.tokens.get(key)
        if tok is not None:
            d.text((x0 - 4, bottom + 16), f"tok {tok.min:.2f}-{tok.max:.2f}", fill=(90, 90, 90), font=font)
    # history panel: weights in [0, 1]; MI scaled to its own maximum
    x_left, x_right = 200, w - 10
    d.rectangle([x_left, top, x_right, bottom], outline=(180, 180, 180))
    d.text(
        (x_left, bottom + 4), f"last {len(hist.image)} windows: image, sequence, MI (grey)", fill=(0, 0, 0), font=font
    )
    mis = [m for m in hist.mi if m is not None]
    mi_max = max(mis) if mis and max(mis) > 0 else 1.0
    # image drawn wide under a thin sequence line: both stay visible where they coincide (e.g. 0.5/0.5)
    lines = (
        (hist.image, _IMAGE_COLOUR, 1.0, 4),
        (hist.sequence, _SEQ_COLOUR, 1.0, 1),
        (hist.mi, _MI_COLOUR, mi_max, 1),
    )
    for series, colour, norm, width in lines:
        pts = _polyline(list(series), norm, x_left, x_right, top, bottom)
        if len(pts) >= 2:
            d.line(pts, fill=colour, width=width)
        elif len(pts) == 1:
            x, y = pts[0]
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    return img


def _polyline(values: list, norm: float, x0: float, x1: float, y0: float, y1: float) -> list[tuple[float, float]]:
    """Newest value at the right edge, one step per window; None (no MI) leaves a gap in the points."""
    step = (x1 - x0) / (HISTORY - 1)
    return [
        (x1 - (len(values) - 1 - i) * step, y1 - (y1 - y0) * min(max(v / norm, 0.0), 1.0))
        for i, v in enumerate(values)
        if v is not None
    ]
