"""The one input contract between raw sensor data and the SA-CMF model, shared by files and streams.

Why a single function: the dataset reader, the training loop and the live daemon all hand a
:class:`RawSample` to :func:`preprocess` and nothing else touches pixels or samples on the way in, so a
model can never be trained on one enhancement and served with another. Every step is deterministic (no
randomness, no dependence on other samples), which also makes it safe to cache.

Images (per camera, each on its own):

1. non-finite pixels are replaced by the sky level, so one dead pixel cannot poison the statistics;
2. sky background and noise are estimated by a sigma-clipped median / MAD (:func:`sky_and_noise`) and the
   frame is expressed in noise sigmas, ``(x - sky) / noise``: this removes bias, sky brightness and gain,
   so frames from different cameras, exposures or ADC depths look alike and a pixel value reads as a
   per-pixel SNR;
3. the frame is resized (area averaging when shrinking, so faint point sources keep their flux;
   bilinear when enlarging) with one scale for both axes, then padded bottom/right with the sky value 0
   to the square model frame, so box coordinates only need multiplying by ``scale``;
4. an asinh stretch, linear around the noise and logarithmic for bright sources, maps the huge dynamic
   range of stars and streaks into about [-0.1, 1] without a per-frame percentile (which would let one
   bright star change how every faint source looks).

Sequences (per radiometer channel): non-finite samples become invalid; the series is binned or padded
to the model length (binning averages valid samples only; a bin without one stays invalid; padding is
always invalid: values are never invented); it is normalised by a robust z-score over valid samples and
compressed with asinh so glints cannot saturate the network; invalid samples are exactly 0.

The contract is computed in numpy (:func:`preprocess_arrays`) and needs no torch; :func:`preprocess`
only wraps its arrays as tensors. The daemon's ingest process runs the numpy contract on every window
and sends the arrays on: it never loads torch (about 470 MB resident), and a dozen tiny tensors per
window would cost more in torch's per-op overhead than the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

ROLES: tuple[str, ...] = ("image_a", "image_b", "seq_a", "seq_b")
IMAGE_ROLES: tuple[str, ...] = ("image_a", "image_b")
SEQ_ROLES: tuple[str, ...] = ("seq_a", "seq_b")
MAD_TO_SIGMA = 1.4826  # MAD of a Gaussian times this is its standard deviation
_Pair = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True, slots=True)
class PreprocessConfig:
    """Knobs of the input contract; the model's frame size and sequence length must match its config."""

    frame_size: int = 64  # square model frame, px
    seq_len: int = 256  # model sequence length, samples
    clip_sigma: float = 3.0  # sigma clipping of the sky estimate
    clip_iters: int = 5
    stretch_knee: float = 3.0  # asinh is linear below ~knee noise sigmas
    stretch_max: float = 1000.0  # this many noise sigmas map to 1.0; brighter pixels saturate there
    stretch_min: float = -5.0  # deeper negative excursions (bad pixels) are clipped here, in sigmas
    seq_fit: Literal["bin", "crop"] = "bin"  # longer sequences: average into bins, or keep the newest T
    seq_clip: float = 50.0  # robust z-scores beyond this are clipped before the asinh compression
    seq_scale_floor: float = 1e-3  # MAD floor relative to |median|, for flat noise-free series

    def __post_init__(self) -> None:
        if self.frame_size < 8:
            raise ValueError(f"frame_size must be >= 8, got {self.frame_size}")
        if self.seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {self.seq_len}")
        if self.stretch_knee <= 0 or self.stretch_max <= self.stretch_knee:
            raise ValueError("need 0 < stretch_knee < stretch_max")
        if self.seq_fit not in ("bin", "crop"):
            raise ValueError(f"seq_fit must be 'bin' or 'crop', got {self.seq_fit!r}")


@dataclass(slots=True)
class RawSample:
    """One window or one file set, as raw as it arrives; ``None`` marks an absent input.

    ``seq_*_valid`` come from the ingest resampler (None = every sample valid). ``presence`` is derived
    from None-ness when not given; an input given as present must have data, while data for an input
    marked absent is ignored. ``label``/``boxes``/``box_classes`` are optional training targets, boxes in
    Image-A pixels (x0, y0, x1, y1); NaN rows (object not in the frame) are dropped by :func:`preprocess`.
    """

    image_a: np.ndarray | None = None  # [H, W] uint8 / uint16 / float
    image_b: np.ndarray | None = None  # [H', W']
    seq_a: np.ndarray | None = None  # [T_a] float
    seq_b: np.ndarray | None = None  # [T_b] float
    seq_a_valid: np.ndarray | None = None  # [T_a] bool
    seq_b_valid: np.ndarray | None = None  # [T_b] bool
    presence: dict[str, bool] | None = None
    label: int | None = None
    boxes: np.ndarray | None = None  # [N, 4] float, Image-A px
    box_classes: np.ndarray | None = None  # [N] int
    meta: dict[str, Any] = field(default_factory=dict)  # for the caller (ids, timestamps); not preprocessed

    def __post_init__(self) -> None:
        given = {role: getattr(self, role) is not None for role in ROLES}
        if self.presence is None:
            self.presence = given
        else:
            unknown = set(self.presence) - set(ROLES)
            if unknown:
                raise ValueError(f"unknown presence roles {sorted(unknown)}; roles are {ROLES}")
            presence = {role: bool(self.presence.get(role, given[role])) for role in ROLES}
            missing = [r for r in ROLES if presence[r] and not given[r]]
            if missing:
                raise ValueError(f"presence marks {missing} present but no data was given")
            self.presence = presence
        for role in IMAGE_ROLES:
            img = getattr(self, role)
            if img is not None and np.ndim(img) != 2:
                raise ValueError(f"{role} must be a 2-D single-channel array, got shape {np.shape(img)}")
        for role in SEQ_ROLES:
            seq = getattr(self, role)
            valid = getattr(self, f"{role}_valid")
            if seq is not None and np.ndim(seq) != 1:
                raise ValueError(f"{role} must be 1-D, got shape {np.shape(seq)}")
            if valid is not None and (seq is None or np.shape(valid) != np.shape(seq)):
                raise ValueError(f"{role}_valid must have the shape of {role}")
        if (self.boxes is None) != (self.box_classes is None):
            raise ValueError("boxes and box_classes must be given together")
        if self.boxes is not None:
            n = np.shape(self.boxes)[0] if np.ndim(self.boxes) == 2 else -1
            if np.ndim(self.boxes) != 2 or np.shape(self.boxes)[1] != 4 or np.shape(self.box_classes) != (n,):
                raise ValueError("boxes must be [N, 4] and box_classes [N]")


# ----------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------


def _sorted_values(img: np.ndarray) -> np.ndarray:
    """The finite pixel values, ascending, as float64. Sensor frames of up to 16 bits sort by radix
    (``kind="stable"``), about five times faster than a float sort; converting afterwards keeps every
    value exact, so the order is the same."""
    a = np.asarray(img)
    if a.dtype.kind in "ub" or (a.dtype.kind == "i" and a.dtype.itemsize <= 2):
        return np.sort(a, axis=None, kind="stable").astype(np.float64)
    data = np.asarray(a, dtype=np.float64).ravel()
    finite = np.isfinite(data)
    return np.sort(data if finite.all() else data[finite])


def _median_of_sorted(s: np.ndarray) -> float:
    """np.median of ascending ``s``, to the bit (even counts average the middle two)."""
    mid = s.size // 2
    return float(s[mid]) if s.size % 2 else float((s[mid - 1] + s[mid]) / 2)


def _kth_of_two(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """The k-th smallest (0-based) of the union of two ascending arrays, by bisection: O(log n)."""
    lo, hi = max(0, k + 1 - len(b)), min(k + 1, len(a))  # how many of the k+1 smallest come from a
    while True:
        i = (lo + hi) // 2
        j = k + 1 - i
        if i < len(a) and j > 0 and b[j - 1] > a[i]:
            lo = i + 1
        elif i > 0 and j < len(b) and a[i - 1] > b[j]:
            hi = i - 1
        else:
            return float(max(a[i - 1] if i > 0 else -np.inf, b[j - 1] if j > 0 else -np.inf))


def _median_and_mad(s: np.ndarray) -> tuple[float, float]:
    """np.median of ascending ``s`` and of its absolute deviations from that median, to the bit: the
    median is an index, and the deviations are two ascending runs (below and above it), so their
    median is a bisection instead of a partition."""
    med = _median_of_sorted(s)
    dev = s - med
    m = int(np.searchsorted(dev, 0.0))
    below, above = -dev[:m][::-1], dev[m:]
    n = s.size
    mad = _kth_of_two(below, above, n // 2)
    if n % 2 == 0:
        mad = (_kth_of_two(below, above, n // 2 - 1) + mad) / 2
    return med, mad


def sky_and_noise(img: np.ndarray, clip_sigma: float = 3.0, iters: int = 5) -> tuple[float, float]:
    """Sky level and per-pixel noise from a sigma-clipped median and MAD.

    Stars, streaks and hot pixels occupy a small fraction of a deep-space frame, so clipping them away
    leaves the sky; the median/MAD pair tolerates whatever clipping misses. Frames are small (64-128 px),
    so one global level is used: a mesh would have too few pixels per cell to be reliable.

    The values are sorted once: every clipped set is then a contiguous slice (``|x - sky| <= t`` is an
    interval), its median an index and its MAD a bisection over the two sides of the sky. This gives
    the same numbers, to the bit, as repeated ``np.median`` calls on the clipped pixels, at a fraction of
    the cost (it runs for every camera frame of every window).
    """
    data = _sorted_values(img)
    if data.size == 0:
        return 0.0, 1.0
    lo, hi = 0, data.size  # the kept pixels are data[lo:hi]
    sky, noise = _median_of_sorted(data), 0.0
    for _ in range(iters):
        sky, mad = _median_and_mad(data[lo:hi])
        noise = MAD_TO_SIGMA * mad
        if noise <= 0:
            break
        dev_all = data - sky
        limit = clip_sigma * noise
        new_lo, new_hi = int(np.searchsorted(dev_all, -limit)), int(np.searchsorted(dev_all, limit, "right"))
        if new_hi - new_lo == hi - lo or new_hi - new_lo < 8:
            break
        lo, hi = new_lo, new_hi
    if noise <= 0:
        # quantised or constant sky (e.g. a uint8 frame with most pixels equal): fall back to the std
        # of the unclipped data (in pixel order, as np.std sums it), then to one unit, so the frame still
        # scales sanely
        flat = np.asarray(img, dtype=np.float64).ravel()
        std = float(np.std(flat[np.isfinite(flat)]))
        noise = std if std > 0 else 1.0
    return sky, noise


def _resize_axis(x: np.ndarray, n_out: int, shrink: bool, axis: int) -> np.ndarray:
    """[n_in, W] -> [n_out, W] (axis 0) or [H, n_in] -> [H, n_out] (axis 1), as torch's ``F.interpolate``.

    Written out so that the preprocessing runs without torch (the daemon's ingest process then never
    loads it). Shrinking is ``mode="area"`` (adaptive average pooling): output i averages the inputs
    [floor(i*n_in/n_out), ceil((i+1)*n_in/n_out)); neighbouring spans share at most one input. Enlarging
    is ``mode="bilinear", align_corners=False``: output i samples the input at ``(i + 0.5) * n_in/n_out
    - 0.5`` (clamped at 0), linearly between its two neighbours. A whole-number shrink factor is one
    reshaped sum; any other takes one numpy call per output row or column (at most the model's frame
    size). Either way a 4k x 4k frame costs a pass over its pixels (``np.add.reduceat`` along the first
    axis was 10x slower than that, and torch's pooling 1.5x)."""
    n_in = x.shape[axis]
    i = np.arange(n_out)
    if shrink:
        if n_in % n_out == 0:  # whole-number factor (128 -> 64, 640 x 480 -> 64 x 48): equal, disjoint spans
            k = n_in // n_out
            if axis == 0:
                return x.reshape(n_out, k, -1).sum(1) / k
            return x.reshape(x.shape[0], n_out, k).sum(2) / k
        lo = (i * n_in) // n_out
        hi = -((-(i + 1) * n_in) // n_out)  # ceil
        if axis == 0:
            return np.stack([x[a:b].sum(0) / (b - a) for a, b in zip(lo, hi, strict=True)])
        return np.stack([x[:, a:b].sum(1) / (b - a) for a, b in zip(lo, hi, strict=True)], axis=1)
    src = np.maximum((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = src.astype(np.int64)  # floor: src >= 0
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    if axis == 0:
        return x[i0] * (1.0 - frac)[:, None] + x[i1] * frac[:, None]
    return x[:, i0] * (1.0 - frac) + x[:, i1] * frac


def _resize(img: np.ndarray, scale: float) -> np.ndarray:
    """[H, W] float64 -> [round(H*s), round(W*s)]; area averaging when shrinking keeps point-source flux,
    bilinear when enlarging. Separable: rows, then columns."""
    h, w = img.shape
    out_hw = (max(1, round(h * scale)), max(1, round(w * scale)))
    if out_hw == (h, w):
        return img
    shrink = scale < 1.0
    rows = _resize_axis(img, out_hw[0], shrink, 0) if out_hw[0] != h else img
    return _resize_axis(rows, out_hw[1], shrink, 1) if out_hw[1] != w else rows


def preprocess_image(img: np.ndarray, cfg: PreprocessConfig) -> tuple[np.ndarray, float]:
    """Raw 2-D frame -> ([1, S, S] float32 stretched frame, scale model-px per raw-px).

    Float64 throughout (it keeps the resize exact enough to be reproducible), in numpy: on 64-px frames
    torch's per-op overhead and its scalar float64 asinh cost more than the arithmetic.
    """
    sky, noise = sky_and_noise(img, cfg.clip_sigma, cfg.clip_iters)
    x = (np.asarray(img, dtype=np.float64) - sky) / noise  # noise sigmas above the sky
    finite = np.isfinite(x)
    if not finite.all():
        x[~finite] = 0.0  # a dead pixel reads as sky
    h, w = x.shape
    scale = cfg.frame_size / max(h, w)
    t = _resize(x, scale)
    out = np.zeros((cfg.frame_size, cfg.frame_size))
    out[: t.shape[0], : t.shape[1]] = t[: cfg.frame_size, : cfg.frame_size]
    np.clip(out, cfg.stretch_min, cfg.stretch_max, out=out)
    out = np.arcsinh(out / cfg.stretch_knee) / np.arcsinh(cfg.stretch_max / cfg.stretch_knee)
    return out.astype(np.float32)[None], float(scale)


# ----------------------------------------------------------------------------------------------------
# Sequences
# ----------------------------------------------------------------------------------------------------


def fit_length(values: np.ndarray, valid: np.ndarray, n: int, mode: str = "bin") -> _Pair:
    """Bring a series to ``n`` samples without inventing data: ([n] float64, [n] bool).

    Longer series: "bin" averages the valid samples falling in each of n equal index bins (sample i goes
    to bin floor(i*n/T), the ingest resampler's rule), so the whole window span is kept; "crop" keeps the
    newest n samples at their native rate. Shorter series are padded at the end with invalid zeros.
    """
    t = values.shape[0]
    if t == n:
        return np.where(valid, values, 0.0), valid.copy()
    if t < n:
        out = np.zeros(n)
        ok = np.zeros(n, dtype=bool)
        out[:t] = np.where(valid, values, 0.0)
        ok[:t] = valid
        return out, ok
    if mode == "crop":
        return np.where(valid[-n:], values[-n:], 0.0), valid[-n:].copy()
    bins = (np.arange(t, dtype=np.int64) * n) // t
    sums = np.bincount(bins, weights=np.where(valid, values, 0.0), minlength=n)
    counts = np.bincount(bins, weights=valid.astype(np.float64), minlength=n)
    ok = counts > 0
    return np.where(ok, sums / np.maximum(counts, 1.0), 0.0), ok


def robust_normalise(values: np.ndarray, valid: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Robust z-score over valid samples, then asinh; invalid samples are exactly 0.

    Median and MAD ignore glints and eclipses when setting the scale, so a light curve's shape, not its
    absolute level (which depends on range, aperture and units), is what the model sees. A MAD of 0 (a
    count series that mostly reads the same value) falls back to the standard deviation, as the image
    sky does, so a burst still stands out from a single count. The scale has a floor relative to the
    level so a noise-free flat series does not blow up. asinh keeps sign and order while compressing a
    100-sigma glint to about 5, which keeps activations bounded.
    """
    out = np.zeros_like(values, dtype=np.float64)
    if not valid.any():
        return out
    v = values[valid]  # finite (preprocess_sequence)
    med, mad = _median_and_mad(np.sort(v))
    scale = MAD_TO_SIGMA * mad if mad > 0 else float(np.std(v))
    scale = max(scale, cfg.seq_scale_floor * abs(med), 1e-12)
    z = np.clip((values - med) / scale, -cfg.seq_clip, cfg.seq_clip)
    out[valid] = np.arcsinh(z[valid])
    return out


def preprocess_sequence(seq: np.ndarray, valid: np.ndarray | None, cfg: PreprocessConfig) -> _Pair:
    """Raw 1-D series and optional mask -> ([T] float32 normalised, [T] bool validity)."""
    x = np.asarray(seq, dtype=np.float64)
    ok = np.isfinite(x) if valid is None else np.asarray(valid, dtype=bool) & np.isfinite(x)
    x, ok = fit_length(np.where(ok, x, 0.0), ok, cfg.seq_len, cfg.seq_fit)
    ok &= np.isfinite(x)  # a bin of huge values can overflow to inf: invalid, not a NaN in the batch
    x = robust_normalise(x, ok, cfg)
    return x.astype(np.float32), ok


# ----------------------------------------------------------------------------------------------------
# The contract
# ----------------------------------------------------------------------------------------------------


def preprocess(raw: RawSample, cfg: PreprocessConfig) -> dict[str, Tensor]:
    """RawSample -> model inputs (and targets when given) as tensors: :func:`preprocess_arrays`, wrapped
    without a copy. Keys, shapes and dtypes as there."""
    import torch

    return {k: torch.from_numpy(v) for k, v in preprocess_arrays(raw, cfg).items()}


def preprocess_arrays(raw: RawSample, cfg: PreprocessConfig) -> dict[str, np.ndarray]:
    """RawSample -> model inputs (and targets when given) as numpy arrays. Deterministic, sample-local.

    Keys: ``image_a``/``image_b`` [1, S, S] float32; ``seq_a``/``seq_b`` [T] float32 and
    ``seq_a_valid``/``seq_b_valid`` [T] bool; ``presence`` [4] bool in :data:`ROLES` order (a series
    with no valid sample, or a frame with no finite pixel, counts as absent: it carries nothing);
    ``scale_a``/``scale_b`` [] float32 model px per raw px (1 when absent); ``label`` [] int64 (-1
    unknown); ``boxes`` [N, 4] float32 in model-frame px, ``box_classes`` [N] int64, ``boxes_known``
    [] bool (False: no box labels at all, as opposed to a labelled empty frame). Absent inputs are
    zeros with presence False.
    """
    assert raw.presence is not None  # set by RawSample.__post_init__
    s, t = cfg.frame_size, cfg.seq_len
    out: dict[str, np.ndarray] = {}
    presence = dict(raw.presence)
    for role, key in (("image_a", "scale_a"), ("image_b", "scale_b")):
        img = getattr(raw, role)
        if presence[role] and img is not None:
            out[role], scale = preprocess_image(img, cfg)
            if np.asarray(img).dtype.kind == "f" and not np.isfinite(img).any():
                presence[role] = False  # a dead camera's all-NaN frame carries nothing: absent, like a series
        else:
            out[role], scale = np.zeros((1, s, s), np.float32), 1.0
        out[key] = np.array(scale, np.float32)
    for role in SEQ_ROLES:
        seq = getattr(raw, role)
        if presence[role] and seq is not None:
            out[role], out[f"{role}_valid"] = preprocess_sequence(seq, getattr(raw, f"{role}_valid"), cfg)
            presence[role] = bool(out[f"{role}_valid"].any())
        else:
            out[role], out[f"{role}_valid"] = np.zeros(t, np.float32), np.zeros(t, bool)
    out["presence"] = np.array([presence[r] for r in ROLES], bool)
    out["label"] = np.array(-1 if raw.label is None else int(raw.label), np.int64)
    out["boxes_known"] = np.array(raw.boxes is not None)
    if raw.boxes is not None and raw.box_classes is not None:
        boxes = np.asarray(raw.boxes, dtype=np.float64).reshape(-1, 4)
        classes = np.asarray(raw.box_classes, dtype=np.int64).reshape(-1)
        keep = np.isfinite(boxes).all(1)
        out["boxes"] = (boxes[keep] * float(out["scale_a"])).astype(np.float32)
        out["box_classes"] = classes[keep]
    else:
        out["boxes"] = np.zeros((0, 4), np.float32)
        out["box_classes"] = np.zeros(0, np.int64)
    return out


def collate(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Stack preprocessed samples; boxes are padded to the batch maximum with ``box_valid`` [B, N_max]."""
    import torch

    if not samples:
        raise ValueError("cannot collate an empty list")
    batch: dict[str, Tensor] = {}
    for key in samples[0]:
        if key in ("boxes", "box_classes"):
            continue
        batch[key] = torch.stack([sample[key] for sample in samples])
    n_max = max(sample["boxes"].shape[0] for sample in samples)
    b = len(samples)
    boxes = torch.zeros(b, n_max, 4)
    classes = torch.zeros(b, n_max, dtype=torch.int64)
    valid = torch.zeros(b, n_max, dtype=torch.bool)
    for i, sample in enumerate(samples):
        n = sample["boxes"].shape[0]
        boxes[i, :n] = sample["boxes"]
        classes[i, :n] = sample["box_classes"]
        valid[i, :n] = True
    batch["boxes"], batch["box_classes"], batch["box_valid"] = boxes, classes, valid
    return batch


def raw_from_scene(scene: Any) -> RawSample:
    """Adapter for :class:`model.synth.Scene` (duck-typed so this module stays import-light)."""
    return RawSample(
        image_a=scene.image_a,
        image_b=scene.image_b,
        seq_a=scene.seq_a,
        seq_b=scene.seq_b,
        label=int(scene.target_class),
        boxes=scene.boxes,
        box_classes=scene.object_classes,
    )


def raw_from_dataset_item(item: dict[str, Any]) -> RawSample:
    """Adapter for one item of :class:`model.dataset.FourModalityDataset`.

    An unlabelled layout (no boxes in labels.jsonl) yields ``boxes=None`` so the detection loss skips it
    instead of learning "empty sky"; a record saying ``"boxes": []`` is a labelled empty frame, learnt
    and scored as one (``boxes_known``; items without that key count as labelled when they hold a box).
    """
    boxes = item.get("boxes")
    classes = item.get("object_classes")
    known = item.get("boxes_known", boxes is not None and np.shape(boxes)[0] > 0)
    labelled = bool(known) and boxes is not None and classes is not None
    return RawSample(
        image_a=item.get("image_a"),
        image_b=item.get("image_b"),
        seq_a=item.get("seq_a"),
        seq_b=item.get("seq_b"),
        label=item.get("label"),
        boxes=boxes if labelled else None,
        box_classes=classes if labelled else None,
        meta={"id": item["id"]} if "id" in item else {},
    )
