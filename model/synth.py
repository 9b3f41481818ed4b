"""Synthetic deep-space scenes: two camera frames plus two radiometer light curves per tracked target.

Why synthetic: no real image + light-curve benchmark for space objects is obtainable here (sacmf.md
section 3), and the reference's dataset is confidential. The generator follows sacmf.md section 5 and is
built so that neither modality alone suffices: the image separates star / satellite-like streak / false
alarm, the light curve separates the four streaking classes from one another, and only the two together
separate star from stable satellite and star from hot pixel.

Sensor model (all numpy, deterministic per seed):

* Image-A (visible) and Image-B (infrared) come from co-boresighted cameras under sidereal tracking that
  expose one after the other: B starts ``frame_gap * t_exp`` after A. Stars and hot pixels sit still,
  satellites streak and move ~1.5 streak lengths between the frames, cosmic rays hit frame A only. Pixel
  values are raw ADU at gain 1: bias + Poisson(signal + sky) + read noise, clipped at the full well.
* Seq-A (visible) and Seq-B (infrared) are the radiometers' relative flux of the tracked target, nominal
  mean 1, sampled at ``seq_rate_hz``. The IR band follows projected area but shows no specular glints.
* Every scene has a tracked target (object 0, near the frame centre) plus field stars and a few other
  objects, each with a ground-truth class and box.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

CLASS_NAMES: tuple[str, ...] = (
    "star",
    "stable_satellite",
    "spin_stabilised_satellite",
    "tumbling_rocket_body",
    "debris",
    "false_alarm",
)
STAR, STABLE, SPIN, ROCKET_BODY, DEBRIS, FALSE_ALARM = range(6)
NUM_CLASSES = len(CLASS_NAMES)
MOVING_CLASSES = (STABLE, SPIN, ROCKET_BODY, DEBRIS)

SPLITS = ("train", "val", "test")
MODALITY_DIRS = ("Image-A", "Image-B", "Seq-A", "Seq-B")
LABELS_FILE = "labels.jsonl"


@dataclass(frozen=True, slots=True)
class SynthConfig:
    """Generator knobs; defaults follow sacmf.md section 5.1/5.2 with 64 px frames for CPU training.

    Difficulty knobs: ``snr_img`` / ``snr_seq`` ranges (lower = harder), ``spin_period_s`` vs
    ``rb_period_s`` overlap (more overlap = harder sequences), ``star_scint_rms`` (smaller = star and hot
    pixel look alike in the sequences), ``cosmic_ray_seq_b`` ("flat" removes the easy IR cue for cosmic
    rays), ``stable_glint_prob``.
    """

    size: int = 64  # frame side, px
    seq_len: int = 256  # radiometer samples
    seq_rate_hz: float = 10.0
    t_exp_s: float = 1.0
    frame_gap: float = 1.5  # B starts this many exposure times after A starts
    fwhm_px: tuple[float, float] = (1.8, 3.0)  # visible PSF FWHM
    ir_fwhm_scale: float = 1.3  # IR PSF is wider (longer wavelength)
    moffat_prob: float = 0.5  # else Gaussian PSF
    moffat_beta: tuple[float, float] = (2.5, 4.5)
    streak_px: tuple[float, float] = (4.0, 16.0)  # streak length in one exposure
    sky_e: tuple[float, float] = (50.0, 200.0)  # per pixel per exposure
    read_noise_e: float = 5.0
    bias_adu: float = 100.0
    full_well_e: float = 60000.0
    snr_img: tuple[float, float] = (2.0, 60.0)  # integrated target SNR in Image-A, log-uniform
    snr_seq: tuple[float, float] = (0.5, 30.0)  # radiometer SNR per sample, log-uniform, independent
    low_snr_img: float = 6.0
    low_snr_seq: float = 2.0
    field_stars_mean: float = 3.0  # Poisson mean per frame
    field_star_snr: tuple[float, float] = (3.0, 30.0)
    extra_objects_max: int = 2  # other RSOs / false alarms besides target and field stars, uniform 0..max
    class_probs: tuple[float, ...] | None = None  # target class distribution; None = uniform
    star_ir_ratio: tuple[float, float] = (0.3, 1.0)  # IR/visible signal ratio
    rso_ir_ratio: tuple[float, float] = (0.5, 1.5)
    debris_dimming: tuple[float, float] = (0.3, 0.6)  # debris image signal relative to other RSOs
    star_scint_rms: tuple[float, float] = (0.01, 0.05)
    stable_trend: float = 0.10  # +- fractional phase-angle trend over the window
    stable_glint_prob: float = 0.4
    spin_period_s: tuple[float, float] = (2.0, 12.0)
    spin_amp: tuple[float, float] = (0.1, 0.4)
    rb_period_s: tuple[float, float] = (4.0, 30.0)
    rb_long_period_prob: float = 0.15
    rb_long_period_s: tuple[float, float] = (60.0, 120.0)
    debris_freq_hz: tuple[float, float] = (0.1, 2.0)
    eclipse_prob: float = 0.1  # satellites, rocket bodies and debris only
    hot_pixel_prob: float = 0.5  # false alarms: hot pixel, else cosmic ray
    cosmic_ray_seq_b: Literal["zero", "flat"] = "zero"

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError("size must be >= 32 px to hold a target and its motion")
        if self.seq_len < 16:
            raise ValueError("seq_len must be >= 16")
        if self.class_probs is not None and (
            len(self.class_probs) != NUM_CLASSES or abs(sum(self.class_probs) - 1.0) > 1e-6
        ):
            raise ValueError(f"class_probs must be {NUM_CLASSES} probabilities summing to 1")


@dataclass(slots=True)
class Scene:
    """One synthetic observation. Object 0 is the tracked target the radiometers measure."""

    image_a: np.ndarray  # uint16 [H, W] raw ADU, visible camera
    image_b: np.ndarray  # uint16 [H, W] raw ADU, infrared camera, exposed frame_gap * t_exp later
    seq_a: np.ndarray  # float32 [T] visible relative flux (nominal mean 1) plus noise
    seq_b: np.ndarray  # float32 [T] infrared relative flux plus noise
    seq_t: np.ndarray  # float32 [T] seconds since the radiometer window start
    boxes: np.ndarray  # float32 [N, 4] (x0, y0, x1, y1) px in Image-A, x1/y1 exclusive
    boxes_b: np.ndarray  # float32 [N, 4] in Image-B; NaN rows where the object is not in Image-B
    object_classes: np.ndarray  # int64 [N]
    target_class: int
    snr_img: float  # integrated target SNR in Image-A (after debris dimming)
    snr_seq: float  # radiometer SNR per sample of Seq-A (Seq-B has half)
    low_snr: bool
    t_image_a: float  # exposure start of Image-A on the seq_t clock
    t_image_b: float
    false_alarm_kind: str = ""  # "cosmic_ray" / "hot_pixel" for a false-alarm target, else ""


@dataclass(slots=True)
class _Obj:
    cls: int
    kind: Literal["psf", "hot", "cosmic"]
    seg_a: np.ndarray | None = None  # [2, 2] start/end (x, y) during exposure A; equal rows = point
    seg_b: np.ndarray | None = None
    sig_a: float = 0.0  # electrons in frame A
    sig_b: float = 0.0
    pixels: list[tuple[int, int]] = field(default_factory=list)  # (row, col) for sharp artefacts
    in_b: bool = True


# ----------------------------------------------------------------------------------------------------
# Image formation
# ----------------------------------------------------------------------------------------------------


def _log_uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _signal_for_snr(snr: float, n_pix: float, sky: float, read: float) -> float:
    """Solve the CCD equation SNR = S / sqrt(S + n_pix (sky + read^2)) for the source electrons S."""
    noise = n_pix * (sky + read * read)
    return 0.5 * (snr * snr + math.sqrt(snr**4 + 4.0 * snr * snr * noise))


@dataclass(frozen=True, slots=True)
class _Psf:
    fwhm: float
    beta: float | None  # None = Gaussian, else Moffat beta

    def scaled(self, k: float) -> _Psf:
        return _Psf(self.fwhm * k, self.beta)

    def profile(self, r2: np.ndarray) -> np.ndarray:
        """Unit-integral surface brightness at squared radius r2 (px^2)."""
        if self.beta is None:
            sigma2 = (self.fwhm / 2.3548200450309493) ** 2
            return np.exp(-0.5 * r2 / sigma2) / (2.0 * math.pi * sigma2)
        alpha2 = self.fwhm**2 / (4.0 * (2.0 ** (1.0 / self.beta) - 1.0))
        return (self.beta - 1.0) / (math.pi * alpha2) * (1.0 + r2 / alpha2) ** (-self.beta)


def _render_segment(size: int, seg: np.ndarray, psf: _Psf) -> np.ndarray:
    """Unit-flux PSF smeared along a segment [2, 2] (x, y); flux that falls off the frame is lost."""
    length = float(np.hypot(*(seg[1] - seg[0])))
    k = max(1, math.ceil(3.0 * length)) if length > 0 else 1
    frac = (np.arange(k) + 0.5) / k if k > 1 else np.array([0.5])
    pts = seg[0] + frac[:, None] * (seg[1] - seg[0])  # [k, 2]
    centres = np.arange(size) + 0.5  # pixel (i, j) covers [j, j+1) x [i, i+1)
    dx2 = (centres[None, :] - pts[:, 0:1]) ** 2  # [k, W]
    dy2 = (centres[None, :] - pts[:, 1:2]) ** 2  # [k, H]
    img = np.zeros((size, size))
    for i in range(k):
        img += psf.profile(dy2[i][:, None] + dx2[i][None, :])
    return img / k


def _segment_box(seg: np.ndarray, radius: float, size: int) -> np.ndarray | None:
    lo = seg.min(0) - radius
    hi = seg.max(0) + radius
    box = np.array([lo[0], lo[1], hi[0], hi[1]]).clip(0.0, size)
    return box if box[2] - box[0] >= 1.0 and box[3] - box[1] >= 1.0 else None


def _pixels_box(pixels: list[tuple[int, int]], size: int) -> np.ndarray:
    rows = [p[0] for p in pixels]
    cols = [p[1] for p in pixels]
    return np.array([min(cols) - 1, min(rows) - 1, max(cols) + 2, max(rows) + 2], dtype=float).clip(0, size)


def _expose(rng: np.random.Generator, signal: np.ndarray, sky: float, cfg: SynthConfig) -> np.ndarray:
    electrons = rng.poisson(signal + sky).astype(np.float64)
    electrons = np.minimum(electrons, cfg.full_well_e)
    adu = electrons + rng.normal(0.0, cfg.read_noise_e, signal.shape) + cfg.bias_adu
    return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)


def _moving_segments(
    rng: np.random.Generator, cfg: SynthConfig, centre: np.ndarray, length: float, centre_on_a: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Segments in A and B for a constant-velocity object.

    The target is centred on its whole A-to-B track so both frames contain it; other objects are centred
    on their A streak, so they are always in Image-A but may leave Image-B.
    """
    ang = rng.uniform(0.0, 2.0 * math.pi)
    d = np.array([math.cos(ang), math.sin(ang)]) * length  # px per exposure
    t_mid = 0.5 if centre_on_a else 0.5 * (cfg.frame_gap + 1.0)  # exposure units: A [0, 1], B [gap, gap+1]
    p0 = centre - t_mid * d
    seg_a = np.stack([p0, p0 + d])
    seg_b = np.stack([p0 + cfg.frame_gap * d, p0 + (cfg.frame_gap + 1.0) * d])
    return seg_a, seg_b


def _max_streak(cfg: SynthConfig, psf_fwhm: float) -> float:
    """Longest streak whose A-to-B track still fits in the frame around the centre."""
    margin = 1.5 * psf_fwhm * cfg.ir_fwhm_scale + 4.0
    return max(1.0, min(cfg.streak_px[1], (cfg.size - 2.0 * margin) / (cfg.frame_gap + 1.0)))


def _n_pix(fwhm: float, length: float) -> float:
    """Aperture pixels for the CCD equation (sacmf.md section 5.1)."""
    if length <= 0:
        return math.pi * (1.5 * fwhm) ** 2
    return 2.0 * fwhm * length + math.pi * fwhm**2


def _make_object(
    rng: np.random.Generator,
    cfg: SynthConfig,
    cls: int,
    centre: np.ndarray,
    snr: float,
    sky: float,
    psf: _Psf,
    false_alarm_kind: str,
    is_target: bool = False,
) -> _Obj:
    size = cfg.size
    if cls == FALSE_ALARM:
        r, c = (int(np.clip(math.floor(v), 0, size - 1)) for v in (centre[1], centre[0]))
        if false_alarm_kind == "hot_pixel":
            sig = _signal_for_snr(snr, 1.0, sky, cfg.read_noise_e)
            return _Obj(cls, "hot", sig_a=sig, sig_b=sig, pixels=[(r, c)], in_b=True)
        # cosmic ray: a sharp track of 1-3 pixels, frame A only
        n = int(rng.integers(1, 4))
        dr, dc = [(0, 1), (1, 0), (1, 1), (1, -1)][int(rng.integers(4))]
        pixels = [(int(np.clip(r + i * dr, 0, size - 1)), int(np.clip(c + i * dc, 0, size - 1))) for i in range(n)]
        sig = _signal_for_snr(snr, float(n), sky, cfg.read_noise_e)
        return _Obj(cls, "cosmic", sig_a=sig, sig_b=0.0, pixels=pixels, in_b=False)
    if cls == STAR:
        point = np.stack([centre, centre])
        sig = _signal_for_snr(snr, _n_pix(psf.fwhm, 0.0), sky, cfg.read_noise_e)
        ratio = rng.uniform(*cfg.star_ir_ratio)
        return _Obj(cls, "psf", seg_a=point, seg_b=point.copy(), sig_a=sig, sig_b=sig * ratio)
    length = rng.uniform(cfg.streak_px[0], _max_streak(cfg, cfg.fwhm_px[1]))
    seg_a, seg_b = _moving_segments(rng, cfg, centre, length, centre_on_a=not is_target)
    sig = _signal_for_snr(snr, _n_pix(psf.fwhm, length), sky, cfg.read_noise_e)
    ratio = rng.uniform(*cfg.rso_ir_ratio)
    return _Obj(cls, "psf", seg_a=seg_a, seg_b=seg_b, sig_a=sig, sig_b=sig * ratio)


# ----------------------------------------------------------------------------------------------------
# Light curves
# ----------------------------------------------------------------------------------------------------


def _gauss_bumps(t: np.ndarray, centres: np.ndarray, amps: np.ndarray, fwhm: np.ndarray) -> np.ndarray:
    if centres.size == 0:
        return np.zeros_like(t)
    sig = fwhm[:, None] / 2.3548200450309493
    return (amps[:, None] * np.exp(-0.5 * ((t[None, :] - centres[:, None]) / sig) ** 2)).sum(0)


def _ar1(rng: np.random.Generator, n: int, phi: float, rms: float) -> np.ndarray:
    eps = rng.normal(0.0, rms * math.sqrt(1.0 - phi * phi), n)
    out = np.empty(n)
    out[0] = rng.normal(0.0, rms)
    for i in range(1, n):
        out[i] = phi * out[i - 1] + eps[i]
    return out


def _light_curves(
    rng: np.random.Generator, cfg: SynthConfig, cls: int, t: np.ndarray, false_alarm_kind: str
) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free (visible, infrared) relative flux of the target, nominal mean 1."""
    dur = float(t[-1] + t[1] - t[0])
    ones = np.ones_like(t)
    if cls == STAR:
        scint = _ar1(rng, t.size, rng.uniform(0.5, 0.95), rng.uniform(*cfg.star_scint_rms))
        return ones + scint, ones.copy()
    if cls == FALSE_ALARM:
        vis = ones.copy()
        if false_alarm_kind == "cosmic_ray":
            vis[int(rng.integers(t.size))] += rng.uniform(3.0, 10.0)
            ir = np.zeros_like(t) if cfg.cosmic_ray_seq_b == "zero" else ones.copy()
            return vis, ir
        return vis, ones.copy()
    if cls == STABLE:
        trend = rng.uniform(-cfg.stable_trend, cfg.stable_trend) * (t - 0.5 * dur) / dur
        vis = 1.0 + trend
        ir = 1.0 + 0.5 * trend
        if rng.random() < cfg.stable_glint_prob:
            vis = vis + _gauss_bumps(
                t, np.array([rng.uniform(0, dur)]), np.array([rng.uniform(0.5, 3.0)]), np.array([rng.uniform(0.2, 1.0)])
            )
    elif cls == SPIN:
        period = rng.uniform(*cfg.spin_period_s)
        amp = rng.uniform(*cfg.spin_amp)
        amp2 = amp * rng.uniform(0.05, 0.3)
        ph, ph2 = rng.uniform(0, 2 * math.pi, 2)
        w = 2.0 * math.pi * t / period
        vis = 1.0 + amp * np.sin(w + ph) + amp2 * np.sin(2.0 * w + ph2)
        ir = 1.0 + 0.3 * amp * np.sin(w + ph)
    elif cls == ROCKET_BODY:
        long = rng.random() < cfg.rb_long_period_prob
        period = rng.uniform(*(cfg.rb_long_period_s if long else cfg.rb_period_s))
        ph = rng.uniform(0, 2 * math.pi)
        area = 0.25 + 0.75 * np.abs(np.sin(2.0 * math.pi * t / period + ph))
        area = area / (0.25 + 0.75 * 2.0 / math.pi)  # nominal mean 1
        # glints where the cylinder is broadside (|sin| = 1): twice per period
        k = np.arange(-3, math.ceil(2.0 * dur / period) + 3)
        centres = (0.5 * math.pi + k * math.pi - ph) * period / (2.0 * math.pi)
        centres = centres[(centres > -period) & (centres < dur + period)]
        base = rng.uniform(1.0, 4.0)
        amps = base * rng.uniform(0.7, 1.3, centres.size)
        width = np.full(centres.size, rng.uniform(0.02, 0.08) * period)
        vis = area + _gauss_bumps(t, centres, amps, width)
        ir = area.copy()
    elif cls == DEBRIS:
        n_sin = int(rng.integers(2, 4))
        freqs = rng.uniform(*cfg.debris_freq_hz, n_sin)
        amps = rng.uniform(0.2, 0.6, n_sin)
        amps *= min(1.0, 0.9 / amps.sum())  # keep the flux positive
        ph = rng.uniform(0, 2 * math.pi, n_sin)
        shift = rng.uniform(0.3, 1.5, n_sin)
        arg = 2.0 * math.pi * freqs[:, None] * t[None, :]
        vis = 1.0 + (amps[:, None] * np.sin(arg + ph[:, None])).sum(0)
        ir = 1.0 + 0.5 * (amps[:, None] * np.sin(arg + (ph + shift)[:, None])).sum(0)
        n_glint = int(rng.poisson(rng.uniform(0.1, 0.5) * dur))
        vis = vis + _gauss_bumps(
            t, rng.uniform(0, dur, n_glint), rng.uniform(0.5, 2.0, n_glint), rng.uniform(0.1, 0.2, n_glint)
        )
    else:
        raise ValueError(f"unknown class {cls}")
    if rng.random() < cfg.eclipse_prob:
        # Earth-shadow entry: reflected light ramps to 0 over 8-10 s; thermal IR lags, so it is kept
        start = rng.uniform(0.2, 0.6) * dur
        ramp = rng.uniform(8.0, 10.0)
        vis = vis * np.clip(1.0 - (t - start) / ramp, 0.0, 1.0)
    return vis, ir


# ----------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------


def _rng(rng_or_seed: np.random.Generator | np.random.SeedSequence | int) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def scene_seed(seed: int, index: int, stream: int = 0) -> np.random.SeedSequence:
    """Seed of scene ``index`` in ``stream``: each scene is reproducible on its own, in any order.

    ``write_dataset`` uses streams 0/1/2 for train/val/test, so ``scene_stream(seed, cfg, stream=0)``
    replays the training split.
    """
    return np.random.SeedSequence([seed, stream, index])


def generate_scene(
    rng_or_seed: np.random.Generator | np.random.SeedSequence | int,
    cfg: SynthConfig | None = None,
    target_class: int | None = None,
) -> Scene:
    """Draw one scene; same seed and config give byte-identical output."""
    cfg = cfg or SynthConfig()
    rng = _rng(rng_or_seed)
    size = cfg.size
    if target_class is None:
        probs = None if cfg.class_probs is None else np.asarray(cfg.class_probs)
        target_class = int(rng.choice(NUM_CLASSES, p=probs))
    elif not 0 <= target_class < NUM_CLASSES:
        raise ValueError(f"target_class must be in [0, {NUM_CLASSES}), got {target_class}")

    beta = rng.uniform(*cfg.moffat_beta) if rng.random() < cfg.moffat_prob else None
    psf_a = _Psf(rng.uniform(*cfg.fwhm_px), beta)
    psf_b = psf_a.scaled(cfg.ir_fwhm_scale)
    sky_a, sky_b = rng.uniform(*cfg.sky_e), rng.uniform(*cfg.sky_e)

    fa_kind = ""
    if target_class == FALSE_ALARM:
        fa_kind = "hot_pixel" if rng.random() < cfg.hot_pixel_prob else "cosmic_ray"
    snr_img = _log_uniform(rng, cfg.snr_img)
    if target_class == DEBRIS:
        snr_img *= rng.uniform(*cfg.debris_dimming)
    centre = np.full(2, size / 2.0) + rng.uniform(-3.0, 3.0, 2)
    objects = [_make_object(rng, cfg, target_class, centre, snr_img, sky_a, psf_a, fa_kind, is_target=True)]

    for _ in range(int(rng.poisson(cfg.field_stars_mean))):
        pos = rng.uniform(2.0, size - 2.0, 2)
        objects.append(_make_object(rng, cfg, STAR, pos, _log_uniform(rng, cfg.field_star_snr), sky_a, psf_a, ""))
    for _ in range(int(rng.integers(0, cfg.extra_objects_max + 1))):
        cls = int(rng.integers(1, NUM_CLASSES))
        kind = ("hot_pixel" if rng.random() < cfg.hot_pixel_prob else "cosmic_ray") if cls == FALSE_ALARM else ""
        pos = rng.uniform(4.0, size - 4.0, 2)
        snr = _log_uniform(rng, cfg.snr_img) * (rng.uniform(*cfg.debris_dimming) if cls == DEBRIS else 1.0)
        objects.append(_make_object(rng, cfg, cls, pos, snr, sky_a, psf_a, kind))

    sig_a = np.zeros((size, size))
    sig_b = np.zeros((size, size))
    boxes, boxes_b, classes = [], [], []
    nan_box = np.full(4, np.nan)
    for i, obj in enumerate(objects):
        if obj.kind == "psf":
            assert obj.seg_a is not None and obj.seg_b is not None
            sig_a += obj.sig_a * _render_segment(size, obj.seg_a, psf_a)
            sig_b += obj.sig_b * _render_segment(size, obj.seg_b, psf_b)
            box = _segment_box(obj.seg_a, 1.5 * psf_a.fwhm, size)
            box_b = _segment_box(obj.seg_b, 1.5 * psf_b.fwhm, size)
        else:
            per_pix = obj.sig_a / len(obj.pixels)
            for r, c in obj.pixels:
                sig_a[r, c] += per_pix
                if obj.in_b:
                    sig_b[r, c] += per_pix
            box = _pixels_box(obj.pixels, size)
            box_b = box.copy() if obj.in_b else None
        if box is None:  # every object is centred inside Image-A, so this is a geometry bug
            raise AssertionError(f"object {i} ({CLASS_NAMES[obj.cls]}) has no footprint in Image-A")
        boxes.append(box)
        boxes_b.append(nan_box if box_b is None else box_b)
        classes.append(obj.cls)

    image_a = _expose(rng, sig_a, sky_a, cfg)
    image_b = _expose(rng, sig_b, sky_b, cfg)

    seq_t = np.arange(cfg.seq_len) / cfg.seq_rate_hz
    clean_a, clean_b = _light_curves(rng, cfg, target_class, seq_t, fa_kind)
    snr_seq = _log_uniform(rng, cfg.snr_seq)
    seq_a = clean_a + rng.normal(0.0, 1.0 / snr_seq, seq_t.size)
    seq_b = clean_b + rng.normal(0.0, 2.0 / snr_seq, seq_t.size)
    dur = seq_t.size / cfg.seq_rate_hz
    t_a = float(rng.uniform(0.0, max(0.0, dur - (cfg.frame_gap + 1.0) * cfg.t_exp_s)))

    return Scene(
        image_a=image_a,
        image_b=image_b,
        seq_a=seq_a.astype(np.float32),
        seq_b=seq_b.astype(np.float32),
        seq_t=seq_t.astype(np.float32),
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        boxes_b=np.asarray(boxes_b, dtype=np.float32).reshape(-1, 4),
        object_classes=np.asarray(classes, dtype=np.int64),
        target_class=target_class,
        snr_img=float(snr_img),
        snr_seq=float(snr_seq),
        low_snr=bool(snr_img < cfg.low_snr_img or snr_seq < cfg.low_snr_seq),
        t_image_a=t_a,
        t_image_b=t_a + cfg.frame_gap * cfg.t_exp_s,
        false_alarm_kind=fa_kind,
    )


def scene_stream(seed: int, cfg: SynthConfig | None = None, stream: int = 0, start: int = 0) -> Iterator[Scene]:
    """Endless, reproducible scenes for a live simulator: scene k is ``generate_scene(scene_seed(seed, k))``."""
    cfg = cfg or SynthConfig()
    index = start
    while True:
        yield generate_scene(scene_seed(seed, index, stream), cfg)
        index += 1


# ----------------------------------------------------------------------------------------------------
# On-disk layout
# ----------------------------------------------------------------------------------------------------


def _box_list(boxes: np.ndarray) -> list[list[float] | None]:
    return [None if np.isnan(b).any() else [round(float(v), 3) for v in b] for b in boxes]


def scene_label(scene_id: str, scene: Scene) -> dict[str, object]:
    """The labels.jsonl record of one scene (boxes rounded to 1e-3 px; absent Image-B boxes are null)."""
    return {
        "id": scene_id,
        "class": scene.target_class,
        "class_name": CLASS_NAMES[scene.target_class],
        "boxes": _box_list(scene.boxes),
        "boxes_b": _box_list(scene.boxes_b),
        "object_classes": [int(c) for c in scene.object_classes],
        "snr_img": round(scene.snr_img, 4),
        "snr_seq": round(scene.snr_seq, 4),
        "low_snr": scene.low_snr,
        "false_alarm_kind": scene.false_alarm_kind,
    }


def write_scene(split_dir: Path, scene_id: str, scene: Scene) -> None:
    """Write the four modality files of one scene (16-bit PNG images, float32 .npy sequences)."""
    Image.fromarray(scene.image_a).save(split_dir / "Image-A" / f"{scene_id}.png")
    Image.fromarray(scene.image_b).save(split_dir / "Image-B" / f"{scene_id}.png")
    np.save(split_dir / "Seq-A" / f"{scene_id}.npy", scene.seq_a)
    np.save(split_dir / "Seq-B" / f"{scene_id}.npy", scene.seq_b)


def write_dataset(
    out: Path,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int,
    cfg: SynthConfig | None = None,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write ``out/{train,val,test}/{Image-A,Image-B,Seq-A,Seq-B}/<id>.<ext>`` plus ``labels.jsonl``.

    Files of one scene share the id (zero-padded index), which is how readers align the modalities.
    ``out/dataset.json`` records the seed and config. An existing non-empty split directory is an error
    unless ``overwrite``, because stale files from an older run would silently misalign the layout.
    """
    cfg = cfg or SynthConfig()
    if seed < 0:  # SeedSequence refuses it, but only after the directories were made
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = Path(out)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for split in SPLITS:
        split_dir = out / split
        if split_dir.exists() and any(split_dir.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{split_dir} is not empty (sacmf synth --overwrite replaces it)")
            shutil.rmtree(split_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stream, split in enumerate(SPLITS):
        split_dir = out / split
        for modality in MODALITY_DIRS:
            (split_dir / modality).mkdir(parents=True, exist_ok=True)
        width = max(6, len(str(max(counts[split] - 1, 0))))
        with open(split_dir / LABELS_FILE, "w", encoding="utf-8") as labels:
            for index in range(counts[split]):
                scene_id = f"{index:0{width}d}"
                scene = generate_scene(scene_seed(seed, index, stream), cfg)
                write_scene(split_dir, scene_id, scene)
                labels.write(json.dumps(scene_label(scene_id, scene), sort_keys=True) + "\n")
    meta = {"seed": seed, "counts": counts, "class_names": list(CLASS_NAMES), "config": asdict(cfg)}
    (out / "dataset.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return counts
