"""Quality metrics for IR/visible image fusion, re-implemented from the research notes (fusion.md §5).

The fusion papers compare methods with numbers whose meaning depends on the metric code used
(MI in nats or bits, sums or means over the two sources, SSIM data ranges, ...). Numbers are only
comparable under one evaluator, so every convention that changes a value is explicit here:

* ``convention="cddfuse"`` (default) reproduces the de-facto Python evaluator of this literature
  (CDDFuse ``utils/Evaluator.py``, also used by CMMDL and ~20 other repositories), including its
  quirks: MI in nats over distinct gray levels, MI/VIF/SSIM/SCD summed over the two sources, SSIM
  with scikit-image defaults and the data range 2 that scikit-image <= 0.19 silently used for float
  input, PSNR with the fused image's maximum as peak, Qabf's ``g_A == g_F`` quirk.
* ``convention="cmmdl"``: as cddfuse, but SSIM uses ``data_range = max(F) - min(F)``.
* ``convention="metric"``: the widely copied Python "Metric" file: MI in bits, AG normalised by
  (H-1)(W-1), SSIM with an 11x11 Gaussian window and data range 255, PSNR of images divided by 255
  with peak 255 (i.e. +48.13 dB).

All metrics expect 2-D gray images on the 0-255 scale (``evaluate_pair`` rounds them to integers, as
the evaluator sees images saved as 8-bit PNG and re-read). Constants such as VIF's noise variance 2,
Nabf's threshold 2 and the SSIM constants only mean what they should on that scale.

Argument order is always ``(ir, vi, fused)``; "A" is the IR image, "B" the visible one.

Cost: EN, SD and SF need only the fused image and take ~0.2 ms together for a 256x256 uint8 frame
(``frame_metrics``), so the live daemon can log them per frame; MI/VIF/Qabf/SSIM take ~0.1-0.5 s
per 768x576 pair; FMI_* and MS-SSIM are offline metrics (seconds per pair).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import fft as sfft
from scipy import ndimage

Array = npt.NDArray[np.float64]
ImageLike = npt.ArrayLike

Reduce = Literal["sum", "mean"]

ALL: tuple[str, ...] = (
    "EN",
    "SD",
    "SF",
    "AG",
    "MI",
    "SCD",
    "VIF",
    "Qabf",
    "Nabf",
    "SSIM",
    "MS-SSIM",
    "FMI_pixel",
    "FMI_dct",
    "FMI_w",
    "CC",
    "PSNR",
    "MSE",
)
"""Every metric name ``evaluate_pair`` knows, in the order the papers usually print them."""

CDDFUSE_TABLE: tuple[str, ...] = ("EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM")
"""The eight columns of the CDDFuse/CMMDL result tables."""

CHEAP: tuple[str, ...] = ("EN", "SD", "SF", "AG")
"""Fused-image-only metrics cheap enough to compute on every frame of a live stream."""


@dataclass(frozen=True)
class Convention:
    """Every knob in which the public metric implementations disagree (fusion.md §5.2, §5.3)."""

    name: str
    mi_base: float = math.e  # e -> nats (sklearn, CDDFuse); 2 -> bits
    mi_normalise: bool = False  # VIFB: min-max stretch each image to 0..255 before the histogram
    reduce: Reduce = "sum"  # how MI, VIF, SSIM, MS-SSIM and SCD combine the two sources
    ssim_window: Literal["uniform7", "gaussian11"] = "uniform7"
    ssim_data_range: float | Literal["fused"] = 2.0
    ag_denominator: Literal["hw", "h1w1"] = "hw"
    psnr: Literal["fused_peak", "normalised_255"] = "fused_peak"


CONVENTIONS: dict[str, Convention] = {
    "cddfuse": Convention("cddfuse"),
    "cmmdl": Convention("cmmdl", ssim_data_range="fused"),
    "metric": Convention(
        "metric",
        mi_base=2.0,
        ssim_window="gaussian11",
        ssim_data_range=255.0,
        ag_denominator="h1w1",
        psnr="normalised_255",
    ),
}


def get_convention(convention: str | Convention = "cddfuse") -> Convention:
    """Resolve a preset name so callers can pass either a string or a customised ``Convention``."""
    if isinstance(convention, Convention):
        return convention
    try:
        return CONVENTIONS[convention]
    except KeyError:
        raise ValueError(f"unknown convention {convention!r}; known: {sorted(CONVENTIONS)}") from None


# ----------------------------------------------------------------------------------------------
# helpers


def _gray(img: ImageLike, name: str = "image") -> Array:
    """Float64 copy of a 2-D image: all metrics are defined on one gray channel."""
    a = np.asarray(img)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D gray image, got shape {a.shape}")
    return a.astype(np.float64, copy=False)


def _triplet(ir: ImageLike, vi: ImageLike, fused: ImageLike) -> tuple[Array, Array, Array]:
    a, b, f = _gray(ir, "ir"), _gray(vi, "vi"), _gray(fused, "fused")
    if not (a.shape == b.shape == f.shape):
        raise ValueError(f"shapes differ: ir {a.shape}, vi {b.shape}, fused {f.shape}")
    return a, b, f


def _combine(x: float, y: float, reduce: Reduce) -> float:
    if reduce == "sum":
        return x + y
    if reduce == "mean":
        return (x + y) / 2.0
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")


def _pearson(x: Array, y: Array) -> float:
    """Whole-image Pearson correlation; NaN (0/0) for a constant image, as numpy gives."""
    xc = x - x.mean()
    yc = y - y.mean()
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.sum(xc * yc) / np.sqrt(np.sum(xc * xc) * np.sum(yc * yc)))


class ImageTooSmall(ValueError):
    """The image is smaller than a metric's window (or its pyramid): the metric is undefined for it."""


def _valid_filter(img: Array, win1d: Array) -> Array:
    """Separable 'valid' correlation (the window is symmetric, so convolution is the same)."""
    k = win1d.size
    half = k // 2
    if img.shape[0] < k or img.shape[1] < k:
        raise ImageTooSmall(f"image {img.shape} is smaller than the {k}x{k} window")
    out = ndimage.correlate1d(img, win1d, axis=0, mode="constant")
    out = ndimage.correlate1d(out, win1d, axis=1, mode="constant")
    return out[half : img.shape[0] - half, half : img.shape[1] - half]


def _gaussian1d(size: int, sigma: float) -> Array:
    """Normalised 1-D Gaussian; the 2-D window is its outer product.

    MATLAB's fspecial also zeroes taps below eps*max; for the sizes used here (sigma >= size/5)
    the smallest 2-D tap is ~exp(-12.5) of the peak, far above eps, so nothing is zeroed.
    """
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


# ----------------------------------------------------------------------------------------------
# fused-image-only metrics (cheap; EN/SD/SF run per frame in the daemon)


def _uint8_histogram(fused: ImageLike) -> tuple[np.ndarray, npt.NDArray[np.int64]]:
    """(uint8 image, 256-bin counts): the image as the evaluator sees an 8-bit file."""
    a = np.asarray(fused)
    if a.ndim != 2:
        raise ValueError(f"fused must be a 2-D gray image, got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return a, np.bincount(a.ravel(), minlength=256)


def _entropy_from_counts(counts: npt.NDArray[np.int64]) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log2(p)))


def en(fused: ImageLike) -> float:
    """Entropy (bits) of the 256-bin histogram of the fused image rounded to uint8.

    Rounds first because the evaluator scores 8-bit files; values outside 0..255 are clipped (the
    reference wraps them via ``np.uint8``, which no caller wants). Cheap enough per frame.
    """
    return _entropy_from_counts(_uint8_histogram(fused)[1])


def sd(fused: ImageLike) -> float:
    """Population standard deviation: contrast. Cheap enough per frame."""
    a = np.asarray(fused)
    if a.dtype == np.uint8 and a.ndim == 2:
        return _sd_from_counts(np.bincount(a.ravel(), minlength=256))
    return float(np.std(_gray(fused, "fused")))


def _sd_from_counts(counts: npt.NDArray[np.int64]) -> float:
    """Exact std of a uint8 image from its histogram: 256 terms instead of H*W."""
    levels = np.arange(counts.size, dtype=np.float64)
    n = counts.sum()
    mean = float(levels @ counts) / n
    return math.sqrt(float(np.square(levels - mean) @ counts) / n)


def sf(fused: ImageLike) -> float:
    """Spatial frequency sqrt(RF^2 + CF^2), each mean over its own count of first differences.

    uint8 frames use exact integer arithmetic (faster than float64 and bit-identical results). NaN for an
    image one pixel high or wide: it has no differences one way.
    """
    a = np.asarray(fused)
    if a.ndim != 2:
        raise ValueError(f"fused must be a 2-D gray image, got shape {a.shape}")
    if min(a.shape) < 2:  # a row or a column has no neighbour: one of the two frequencies is undefined
        return float("nan")
    if a.dtype == np.uint8:
        x = a.astype(np.int32)
        dx = np.diff(x, axis=1)
        dy = np.diff(x, axis=0)
        rf2 = float(np.einsum("ij,ij->", dx, dx, dtype=np.int64)) / dx.size
        cf2 = float(np.einsum("ij,ij->", dy, dy, dtype=np.int64)) / dy.size
        return math.sqrt(rf2 + cf2)
    f = _gray(a, "fused")
    rf2 = np.mean(np.square(np.diff(f, axis=1)))
    cf2 = np.mean(np.square(np.diff(f, axis=0)))
    return float(np.sqrt(rf2 + cf2))


def frame_metrics(fused: ImageLike) -> dict[str, float]:
    """EN, SD and SF of one fused frame, sharing one histogram: the per-frame quality signal.

    Designed for the live daemon: ~1 ms for a 256x256 uint8 frame on one loaded core (budget
    5 ms). Float frames are rounded to uint8 first, matching what an 8-bit file would score.
    """
    a, counts = _uint8_histogram(fused)
    return {"EN": _entropy_from_counts(counts), "SD": _sd_from_counts(counts), "SF": sf(a)}


def ag(fused: ImageLike, *, denominator: Literal["hw", "h1w1"] = "hw") -> float:
    """Average gradient: mean of sqrt((Gx^2+Gy^2)/2), central differences inside, one-sided at edges.

    ``denominator="hw"`` averages over all H*W pixels (CDDFuse); ``"h1w1"`` divides the same sum by
    (H-1)(W-1) as the widely copied Metric file does, so its values are slightly larger.
    """
    f = _gray(fused, "fused")
    if min(f.shape) < 2:
        raise ImageTooSmall(f"AG needs at least 2x2 px (a gradient each way), got {f.shape}")
    gy, gx = np.gradient(f)
    total = float(np.sum(np.sqrt((gx * gx + gy * gy) / 2.0)))
    if denominator == "hw":
        return total / f.size
    if denominator == "h1w1":
        return total / ((f.shape[0] - 1) * (f.shape[1] - 1))
    raise ValueError(f"denominator must be 'hw' or 'h1w1', got {denominator!r}")


# ----------------------------------------------------------------------------------------------
# mutual information


def _labels(x: Array) -> tuple[npt.NDArray[np.intp], int]:
    """Map every distinct value to a label, as sklearn's contingency matrix does."""
    if np.all(x == np.round(x)) and x.min() >= 0 and x.max() < 65536:
        xi = x.astype(np.intp)
        return xi, int(xi.max()) + 1  # empty levels are harmless: zero counts drop out
    uniq, inv = np.unique(x, return_inverse=True)
    return inv.reshape(-1), uniq.size


def mutual_information(x: ImageLike, y: ImageLike, *, base: float = math.e, normalise: bool = False) -> float:
    """MI of two images from their joint histogram over distinct gray levels.

    Each distinct value is its own bin, which for 8-bit images is the 256x256 joint histogram and
    equals scikit-learn's ``mutual_info_score`` (``base=e``, nats). ``normalise=True`` min-max
    stretches each image to 0..255 and rounds before the histogram (VIFB's ``metricsMutinf``).
    """
    a = _gray(x).ravel()
    b = _gray(y).ravel()
    if a.shape != b.shape:
        raise ValueError("images must have the same number of pixels")
    if normalise:
        a, b = (np.round(_stretch255(v)) for v in (a, b))
    la, na = _labels(a)
    lb, nb = _labels(b)
    joint = np.bincount(la.ravel() * nb + lb.ravel(), minlength=na * nb).reshape(na, nb)
    n = a.size
    pa = joint.sum(axis=1) / n
    pb = joint.sum(axis=0) / n
    ia, ib = np.nonzero(joint)
    pab = joint[ia, ib] / n
    mi = float(np.sum(pab * np.log(pab / (pa[ia] * pb[ib]))))
    return max(mi, 0.0) / math.log(base)


def _stretch255(x: Array) -> Array:
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo) * 255.0


def mi(
    ir: ImageLike,
    vi: ImageLike,
    fused: ImageLike,
    *,
    base: float = math.e,
    normalise: bool = False,
    reduce: Reduce = "sum",
) -> float:
    """MI(F, IR) + MI(F, VI); defaults (nats, sum) are CDDFuse's. Bits = nats * 1.4427."""
    a, b, f = _triplet(ir, vi, fused)
    return _combine(
        mutual_information(f, a, base=base, normalise=normalise),
        mutual_information(f, b, base=base, normalise=normalise),
        reduce,
    )


# ----------------------------------------------------------------------------------------------
# correlation-type metrics


def scd(ir: ImageLike, vi: ImageLike, fused: ImageLike, *, reduce: Reduce = "sum") -> float:
    """Sum of correlations of differences: corr(IR, F - VI) + corr(VI, F - IR).

    F - VI is what the fusion added beyond the visible image; it should correlate with IR.
    """
    a, b, f = _triplet(ir, vi, fused)
    return _combine(_pearson(a, f - b), _pearson(b, f - a), reduce)


def cc(ir: ImageLike, vi: ImageLike, fused: ImageLike) -> float:
    """Mean of the Pearson correlations corr(IR, F) and corr(VI, F)."""
    a, b, f = _triplet(ir, vi, fused)
    return (_pearson(a, f) + _pearson(b, f)) / 2.0


def mse(ir: ImageLike, vi: ImageLike, fused: ImageLike) -> float:
    """Mean of the two mean squared errors MSE(F, IR) and MSE(F, VI) on the 0-255 scale."""
    a, b, f = _triplet(ir, vi, fused)
    return float((np.mean(np.square(a - f)) + np.mean(np.square(b - f))) / 2.0)


def psnr(
    ir: ImageLike,
    vi: ImageLike,
    fused: ImageLike,
    *,
    peak: Literal["fused_peak", "normalised_255"] | float = "fused_peak",
) -> float:
    """PSNR = 10 log10(peak^2 / MSE) with MSE the mean of the two source MSEs.

    ``"fused_peak"`` uses max(F) as peak (CDDFuse); a number uses that peak (e.g. 255.0);
    ``"normalised_255"`` reproduces the Metric file, which divides the images by 255 but keeps
    peak 255, adding 20 log10(255) = 48.13 dB. Infinite when F equals both sources.
    """
    m = mse(ir, vi, fused)
    f = _gray(fused, "fused")
    if peak == "fused_peak":
        p2 = float(np.max(f)) ** 2
    elif peak == "normalised_255":
        p2 = 255.0**2
        m = m / 255.0**2
    else:
        p2 = float(peak) ** 2
    with np.errstate(divide="ignore"):
        return float(10.0 * np.log10(p2 / m)) if m > 0 else math.inf


# ----------------------------------------------------------------------------------------------
# VIF (multi-scale pixel-domain VIF, "VIFF" in the CDDFuse evaluator)


def vif_single(ref: ImageLike, dist: ImageLike, *, sigma_nsq: float = 2.0) -> float:
    """Pixel-domain VIF of ``dist`` w.r.t. ``ref`` over 4 scales (ratio of sums over all scales).

    Gaussian windows of size 17, 9, 5, 3 with sigma = size/5; for scales 2-4 both images are
    filtered and decimated by 2 first; 'valid' filtering; sigma_nsq = 2 assumes the 0-255 scale.
    Returns 1.0 when the ratio is NaN, as the evaluator does.
    """
    r = _gray(ref, "ref")
    d = _gray(dist, "dist")
    eps = 1e-10
    num = 0.0
    den = 0.0
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        win = _gaussian1d(n, n / 5.0)
        if scale > 1:
            r = _valid_filter(r, win)[::2, ::2]
            d = _valid_filter(d, win)[::2, ::2]
        mu1 = _valid_filter(r, win)
        mu2 = _valid_filter(d, win)
        s1 = _valid_filter(r * r, win) - mu1 * mu1
        s2 = _valid_filter(d * d, win) - mu2 * mu2
        s12 = _valid_filter(r * d, win) - mu1 * mu2
        s1 = np.maximum(s1, 0.0)
        s2 = np.maximum(s2, 0.0)
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        flat1 = s1 < eps
        g[flat1] = 0.0
        sv[flat1] = s2[flat1]
        s1[flat1] = 0.0
        flat2 = s2 < eps
        g[flat2] = 0.0
        sv[flat2] = 0.0
        neg = g < 0
        sv[neg] = s2[neg]
        g[neg] = 0.0
        sv = np.maximum(sv, eps)
        num += float(np.sum(np.log10(1.0 + g * g * s1 / (sv + sigma_nsq))))
        den += float(np.sum(np.log10(1.0 + s1 / sigma_nsq)))
    with np.errstate(invalid="ignore", divide="ignore"):
        value = num / den if den != 0 else math.nan
    return 1.0 if math.isnan(value) else value


def vif(ir: ImageLike, vi: ImageLike, fused: ImageLike, *, reduce: Reduce = "sum") -> float:
    """VIF(IR -> F) + VIF(VI -> F) (CDDFuse sums; ``reduce="mean"`` halves it)."""
    a, b, f = _triplet(ir, vi, fused)
    return _combine(vif_single(a, f), vif_single(b, f), reduce)


# ----------------------------------------------------------------------------------------------
# edge-based metrics: Qabf (Xydeas-Petrovic) and Nabf (Kumar's modified artefact measure)

_SOBEL_X = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_SOBEL_Y = np.array([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])


def _qabf_edges(img: Array) -> tuple[Array, Array]:
    """Sobel strength and arctan orientation with zero padding (borders count, pitfall 6)."""
    gx = ndimage.convolve(img, _SOBEL_X, mode="constant", cval=0.0)
    gy = ndimage.convolve(img, _SOBEL_Y, mode="constant", cval=0.0)
    g = np.sqrt(gx * gx + gy * gy)
    alpha = np.full_like(img, math.pi / 2)
    nz = gx != 0
    alpha[nz] = np.arctan(gy[nz] / gx[nz])
    return g, alpha


def _qabf_preservation(g_src: Array, a_src: Array, g_f: Array, a_f: Array) -> Array:
    ratio = np.empty_like(g_src)
    gt = g_src > g_f
    lt = g_src < g_f
    eq = ~(gt | lt)
    ratio[gt] = g_f[gt] / g_src[gt]
    ratio[lt] = g_src[lt] / g_f[lt]
    ratio[eq] = g_f[eq]  # evaluator quirk: equal strengths give g_F, not 1
    orient = 1.0 - np.abs(a_src - a_f) / (math.pi / 2)
    q_g = 0.9994 / (1.0 + np.exp(-15.0 * (ratio - 0.5)))
    q_a = 0.9879 / (1.0 + np.exp(-22.0 * (orient - 0.8)))
    return q_g * q_a


def qabf(ir: ImageLike, vi: ImageLike, fused: ImageLike) -> float:
    """Edge-information transfer Q^{AB/F} in [0, 1], weighted by source edge strength (L = 1).

    Keeps the evaluator's quirk that where g_A == g_F the relative strength is g_F instead of 1
    (it only matters where both are equal and non-zero, a small effect).
    """
    a, b, f = _triplet(ir, vi, fused)
    ga, aa = _qabf_edges(a)
    gb, ab = _qabf_edges(b)
    gf, af = _qabf_edges(f)
    qaf = _qabf_preservation(ga, aa, gf, af)
    qbf = _qabf_preservation(gb, ab, gf, af)
    den = float(np.sum(ga + gb))
    if den == 0:
        return math.nan
    return float(np.sum(qaf * ga + qbf * gb) / den)


def _kumar_edges(img: Array) -> tuple[Array, Array]:
    """Sobel/8 on a mirror-padded image (no edge duplication); orientation atan(gv/gh), 0 if flat."""
    p = np.pad(img, 1, mode="reflect")
    gv = ndimage.correlate(p, _SOBEL_X / 8.0)[1:-1, 1:-1]
    gh = ndimage.correlate(p, -_SOBEL_Y / 8.0)[1:-1, 1:-1]
    g = np.sqrt(gv * gv + gh * gh)
    with np.errstate(divide="ignore", invalid="ignore"):
        angle = np.arctan(gv / gh)  # gh == 0 -> +-pi/2, as MATLAB's atan(+-Inf)
    angle[(gv == 0) & (gh == 0)] = 0.0
    return g, angle


def _kumar_preservation(g_src: Array, a_src: Array, g_f: Array, a_f: Array) -> Array:
    ratio = np.zeros_like(g_src)
    both = (g_src != 0) & (g_f != 0)
    ratio[both] = np.minimum(g_src[both], g_f[both]) / np.maximum(g_src[both], g_f[both])
    orient = np.abs(np.abs(a_src - a_f) - math.pi / 2) * 2.0 / math.pi
    q_g = 0.9999 / (1.0 + np.exp(-19.0 * (ratio - 0.5)))
    q_a = 0.9995 / (1.0 + np.exp(-22.0 * (orient - 0.5)))
    return np.sqrt(q_g * q_a)


def nabf(ir: ImageLike, vi: ImageLike, fused: ImageLike) -> float:
    """Kumar's modified fusion-artefact measure N^{AB/F} in [0, 1]; lower is better.

    Counts edge-preservation loss only where the fused edge is stronger than both source edges
    (i.e. edges the fusion invented). Weights are g^1.5 where g >= 2, else 0.001.
    """
    a, b, f = _triplet(ir, vi, fused)
    ga, aa = _kumar_edges(a)
    gb, ab = _kumar_edges(b)
    gf, af = _kumar_edges(f)
    qaf = _kumar_preservation(ga, aa, gf, af)
    qbf = _kumar_preservation(gb, ab, gf, af)
    wa = np.where(ga >= 2.0, ga**1.5, 0.001)
    wb = np.where(gb >= 2.0, gb**1.5, 0.001)
    artefact = (gf > ga) & (gf > gb)
    num = np.sum(artefact * ((1.0 - qaf) * wa + (1.0 - qbf) * wb))
    return float(num / np.sum(wa + wb))


# ----------------------------------------------------------------------------------------------
# SSIM and MS-SSIM


def ssim_index(
    x: ImageLike,
    y: ImageLike,
    *,
    window: Literal["uniform7", "gaussian11"] = "uniform7",
    data_range: float = 2.0,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Mean SSIM of two images.

    ``window="uniform7"``: scikit-image ``structural_similarity`` defaults (7x7 box, sample
    covariance N/(N-1), reflect-filtered, 3-pixel border cropped before the mean), computed in
    float32 like scikit-image does for the evaluator's float32 input (float64 moves the value by
    ~1e-6). The default
    ``data_range=2`` is what scikit-image <= 0.19 inferred for float images, which makes C1, C2
    ~0 on 0-255 data: that is how the published CDDFuse SSIM values arise (pass 255 for the
    textbook value).
    ``window="gaussian11"``: Wang et al.'s reference (11x11 Gaussian, sigma 1.5, population
    statistics, 'valid' filtering), as used by the Metric file with data_range 255.
    """
    return float(np.mean(_ssim_maps(x, y, window=window, data_range=data_range, k1=k1, k2=k2)[0]))


def _ssim_maps(
    x: ImageLike,
    y: ImageLike,
    *,
    window: Literal["uniform7", "gaussian11"],
    data_range: float,
    k1: float = 0.01,
    k2: float = 0.03,
) -> tuple[npt.NDArray[np.floating], npt.NDArray[np.floating]]:
    """SSIM map and contrast-structure map (the latter is what MS-SSIM uses at coarse scales)."""
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    if window == "uniform7":
        a = _gray(x).astype(np.float32)
        b = _gray(y).astype(np.float32)
        size = 7
        if min(a.shape) < size:
            raise ImageTooSmall(f"image {a.shape} is smaller than the 7x7 SSIM window")
        cov_norm = size * size / (size * size - 1.0)

        def filt(v: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
            return ndimage.uniform_filter(v, size=size)

        mx, my = filt(a), filt(b)
        vx = cov_norm * (filt(a * a) - mx * mx)
        vy = cov_norm * (filt(b * b) - my * my)
        vxy = cov_norm * (filt(a * b) - mx * my)
        pad = (size - 1) // 2
        crop = (slice(pad, a.shape[0] - pad), slice(pad, a.shape[1] - pad))
    elif window == "gaussian11":
        a = _gray(x)
        b = _gray(y)
        win = _gaussian1d(11, 1.5)
        mx, my = _valid_filter(a, win), _valid_filter(b, win)
        vx = _valid_filter(a * a, win) - mx * mx
        vy = _valid_filter(b * b, win) - my * my
        vxy = _valid_filter(a * b, win) - mx * my
        crop = (slice(None), slice(None))
    else:
        raise ValueError(f"window must be 'uniform7' or 'gaussian11', got {window!r}")
    cs = (2.0 * vxy + c2) / (vx + vy + c2)
    s = (2.0 * mx * my + c1) / (mx * mx + my * my + c1) * cs
    return s[crop].astype(np.float64), cs[crop].astype(np.float64)


def ssim(
    ir: ImageLike,
    vi: ImageLike,
    fused: ImageLike,
    *,
    window: Literal["uniform7", "gaussian11"] = "uniform7",
    data_range: float | Literal["fused"] = 2.0,
    reduce: Reduce = "sum",
) -> float:
    """SSIM(F, IR) + SSIM(F, VI): a sum, so ~1 means ~0.5 per source (CDDFuse defaults).

    ``data_range="fused"`` uses max(F) - min(F), as CMMDL's copy of the evaluator does.
    """
    a, b, f = _triplet(ir, vi, fused)
    dr = float(f.max() - f.min()) if data_range == "fused" else float(data_range)
    return _combine(
        ssim_index(f, a, window=window, data_range=dr),
        ssim_index(f, b, window=window, data_range=dr),
        reduce,
    )


_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _halve(img: Array) -> Array:
    """2x2 box average then decimation; odd sizes repeat the last row/column (MATLAB 'symmetric')."""
    h, w = img.shape
    p = np.pad(img, ((0, h % 2), (0, w % 2)), mode="symmetric")
    return 0.25 * (p[0::2, 0::2] + p[1::2, 0::2] + p[0::2, 1::2] + p[1::2, 1::2])


def ms_ssim_index(x: ImageLike, y: ImageLike, *, data_range: float = 255.0) -> float:
    """Wang et al.'s 5-scale MS-SSIM (11x11 Gaussian, weights 0.0448..0.1333, 2x2-average pyramid).

    Needs >= 176 pixels per side so the coarsest scale still holds one 11x11 window. A negative
    contrast-structure term at some scale is clipped to 0 (a fractional power of it is undefined).
    """
    a = _gray(x)
    b = _gray(y)
    if min(a.shape) < 11 * 2 ** (len(_MS_SSIM_WEIGHTS) - 1):
        raise ImageTooSmall(f"MS-SSIM needs >= 176 px per side, got {a.shape}")
    value = 1.0
    for level, weight in enumerate(_MS_SSIM_WEIGHTS):
        s_map, cs_map = _ssim_maps(a, b, window="gaussian11", data_range=data_range)
        term = float(np.mean(s_map if level == len(_MS_SSIM_WEIGHTS) - 1 else cs_map))
        value *= max(term, 0.0) ** weight
        a, b = _halve(a), _halve(b)
    return value


def ms_ssim(
    ir: ImageLike,
    vi: ImageLike,
    fused: ImageLike,
    *,
    data_range: float = 255.0,
    reduce: Reduce = "sum",
) -> float:
    """MS-SSIM(F, IR) + MS-SSIM(F, VI), summed like SSIM (the CDDFuse evaluator has no MS-SSIM)."""
    a, b, f = _triplet(ir, vi, fused)
    return _combine(ms_ssim_index(f, a, data_range=data_range), ms_ssim_index(f, b, data_range=data_range), reduce)


# ----------------------------------------------------------------------------------------------
# FMI (Haghighat's feature mutual information, fmi.m semantics)

FmiFeature = Literal["none", "dct", "wavelet", "gradient"]


def _meyer_lowpass(length: int = 62) -> Array:
    """FIR approximation of the Meyer scaling filter, computed from its frequency response.

    Stands in for MATLAB's tabulated 'dmey' filter (not available here): same construction
    (Meyer's auxiliary polynomial, even-length symmetric taps normalised to sum sqrt(2)), but the
    taps are not MATLAB's, so FMI_w agrees with MATLAB only approximately.
    """
    w = np.linspace(-math.pi, math.pi, 16385)
    xi = 2.0 * np.abs(w)
    t = np.clip(3.0 * xi / (2.0 * math.pi) - 1.0, 0.0, 1.0)
    nu = t**4 * (35.0 - 84.0 * t + 70.0 * t * t - 20.0 * t**3)
    resp = np.where(xi <= 2 * math.pi / 3, 1.0, np.where(xi <= 4 * math.pi / 3, np.cos(math.pi / 2 * nu), 0.0))
    n = np.arange(length, dtype=np.float64) - (length // 2 - 1) - 0.5  # centred on a half sample
    taps = np.trapezoid(resp[None, :] * np.cos(np.outer(n, w)), w, axis=1) / (2 * math.pi)
    return taps * (math.sqrt(2.0) / taps.sum())


def _dwt_axis(x: Array, lo: Array, hi: Array, axis: int) -> tuple[Array, Array]:
    """One-level DWT along an axis: half-point symmetric extension, 'valid' conv, keep odd samples.

    Output length floor((N + L - 1) / 2), MATLAB ``dwt`` with the default 'sym' mode.
    """
    k = lo.size
    pad = [(0, 0), (0, 0)]
    pad[axis] = (k - 1, k - 1)
    ext = np.pad(x, pad, mode="symmetric")
    keep = [slice(None), slice(None)]
    keep[axis] = slice(k // 2 + 1, k // 2 + x.shape[axis] + k - 1, 2)  # 'valid' part, odd samples
    bands = []
    for f in (lo, hi):
        # convolution == correlation with the reversed filter
        full = ndimage.correlate1d(ext, f[::-1], axis=axis, mode="constant")
        bands.append(full[tuple(keep)])
    return bands[0], bands[1]


def dwt2_tiled(img: ImageLike, lowpass: Array | None = None) -> Array:
    """Single-level 2-D DWT arranged as [[cA, cH], [cV, cD]], the FMI_w feature image."""
    x = _gray(img)
    lo = _meyer_lowpass() if lowpass is None else np.asarray(lowpass, dtype=np.float64)
    hi = lo[::-1] * np.where(np.arange(lo.size) % 2 == 0, 1.0, -1.0)
    lx, hx = _dwt_axis(x, lo, hi, axis=1)
    ca, ch = _dwt_axis(lx, lo, hi, axis=0)
    cv, cd = _dwt_axis(hx, lo, hi, axis=0)
    return np.block([[ca, ch], [cv, cd]])


def _fmi_feature(img: Array, feature: FmiFeature) -> Array:
    if feature == "none":
        return img
    if feature == "dct":
        return sfft.dctn(img, type=2, norm="ortho")  # whole-image orthonormal DCT-II, like dct2
    if feature == "wavelet":
        return dwt2_tiled(img)
    if feature == "gradient":
        gx = ndimage.sobel(img, axis=1, mode="nearest")
        gy = ndimage.sobel(img, axis=0, mode="nearest")
        return np.hypot(gx, gy)
    raise ValueError(f"unknown FMI feature {feature!r}")


def _windows(img: Array, w: int) -> Array:
    """All w x w windows, each flattened column-major (MATLAB order, which fixes the CDF order)."""
    v = np.lib.stride_tricks.sliding_window_view(img, (w, w))  # (H-w+1, W-w+1, w, w)
    return np.swapaxes(v, -1, -2).reshape(-1, w * w)


@dataclass(frozen=True)
class _WindowStats:
    """Per-window quantities of fmi.m that do not depend on the other image (computed once for F)."""

    raw: Array  # (n, l) window values
    pdf: Array  # (n, l) min-max normalised, summing to 1 (a constant window becomes uniform)
    cdf: Array  # (n, l)
    centred: Array  # (n, l) pdf minus its mean, for the Pearson correlation of two pdfs
    sd: Array  # (n,) std of the window index 1..l under the pdf

    @classmethod
    def of(cls, v: Array) -> _WindowStats:
        lo = v.min(axis=1, keepdims=True)
        span = v.max(axis=1, keepdims=True) - lo
        flat = span == 0
        u = np.where(flat, 1.0, (v - lo) / np.where(flat, 1.0, span))
        pdf = u / u.sum(axis=1, keepdims=True)
        idx = np.arange(1, v.shape[1] + 1, dtype=np.float64)
        var = pdf @ (idx * idx) - (pdf @ idx) ** 2
        return cls(
            raw=v,
            pdf=pdf,
            cdf=np.cumsum(pdf, axis=1),
            centred=pdf - pdf.mean(axis=1, keepdims=True),
            sd=np.sqrt(np.maximum(var, 0.0)),
        )


def _entropy_rows(p: Array) -> Array:
    """-sum p log2 p over the last axis, skipping p <= 0 (the mixture joint can dip below 0)."""
    lg = np.zeros_like(p)
    np.log2(p, out=lg, where=p > 0)
    return -np.einsum("...i,...i->...", p, lg)


def _fmi_windows(src: _WindowStats, fus: _WindowStats) -> Array:
    """Normalised MI 2*MI/(H1+H2) per window pair, with fmi.m's copula-mixture joint pdf.

    The joint pdf mixes the Frechet bound joint (upper bound for positive, lower bound for
    negative correlation) with the independent joint, in the proportion (correlation of the two
    pdfs) / (correlation the bound joint would have, via Hoeffding's covariance identity).
    Returns (n,); identical windows give 1.
    """
    n = src.pdf.shape[0]
    num = np.einsum("ij,ij->i", src.centred, fus.centred)
    den = np.sqrt(np.einsum("ij,ij->i", src.centred, src.centred) * np.einsum("ij,ij->i", fus.centred, fus.centred))
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.where(num == 0, 0.0, num / den)
    positive = c >= 0
    cf = fus.cdf[:, :, None]  # rows index F, columns the source
    cs = src.cdf[:, None, :]
    bound = np.minimum(cf, cs)  # (n, l, l) upper Frechet bound of the joint CDF
    neg = np.flatnonzero(~positive)
    if neg.size:
        bound[neg] = np.maximum(cf[neg] + cs[neg] - 1.0, 0.0)  # lower bound
    sd_prod = src.sd * fus.sd
    cov_bound = bound.sum(axis=(1, 2)) - fus.cdf.sum(axis=1) * src.cdf.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mix = c / (cov_bound / sd_prod)
    degenerate = (sd_prod == 0) | (c == 0) | (cov_bound == 0) | ~np.isfinite(mix)
    mix = np.where(degenerate, 0.0, mix)[:, None, None]
    # joint pdf of the bound = 2-D finite difference of its CDF (in place)
    bound[:, 1:, :] -= bound[:, :-1, :].copy()
    bound[:, :, 1:] -= bound[:, :, :-1].copy()
    joint = mix * bound + (1.0 - mix) * (fus.pdf[:, :, None] * src.pdf[:, None, :])
    hj = _entropy_rows(joint.reshape(n, -1))
    hs = _entropy_rows(src.pdf)
    hf = _entropy_rows(fus.pdf)
    info = hs + hf - hj
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(info == 0, 0.0, 2.0 * info / (hs + hf))
    return np.where(np.all(src.raw == fus.raw, axis=1), 1.0, out)


def fmi_maps(
    ir: ImageLike, vi: ImageLike, fused: ImageLike, *, feature: FmiFeature = "none", window: int = 3
) -> tuple[Array, Array]:
    """Per-window FMI maps (IR-F, VI-F), each (H'-window+1, W'-window+1) on the feature images."""
    a, b, f = _triplet(ir, vi, fused)
    fa, fb, ff = (_fmi_feature(x, feature) for x in (a, b, f))
    rows = ff.shape[0] - window + 1
    cols = ff.shape[1] - window + 1
    if rows < 1 or cols < 1:
        raise ImageTooSmall(f"FMI needs images of at least {window}x{window} px (its window), got {ff.shape}")
    out_a = np.empty((rows, cols))
    out_b = np.empty((rows, cols))
    chunk = max(1, 8000 // max(1, cols))  # bounds the (n, l, l) temporaries to a few MB
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        band = slice(r0, r1 + window - 1)
        sf_ = _WindowStats.of(_windows(ff[band], window))
        out_a[r0:r1] = _fmi_windows(_WindowStats.of(_windows(fa[band], window)), sf_).reshape(r1 - r0, cols)
        out_b[r0:r1] = _fmi_windows(_WindowStats.of(_windows(fb[band], window)), sf_).reshape(r1 - r0, cols)
    return out_a, out_b


def fmi(
    ir: ImageLike,
    vi: ImageLike,
    fused: ImageLike,
    *,
    feature: FmiFeature = "none",
    window: int = 3,
) -> float:
    """Feature mutual information (Haghighat et al.): mean over windows of (FMI_AF + FMI_BF) / 2.

    ``feature="none"`` is FMI_pixel, ``"dct"`` FMI_dct (whole-image orthonormal DCT-II, as the
    Python ports do), ``"wavelet"`` FMI_w (single-level DWT tiled [[cA,cH],[cV,cD]] with a computed
    discrete-Meyer approximation, see ``_meyer_lowpass``), ``"gradient"`` Sobel magnitude.
    Vectorised over windows; a 768x576 pair takes a few seconds per feature on one core.
    """
    map_a, map_b = fmi_maps(ir, vi, fused, feature=feature, window=window)
    return float(np.mean((map_a + map_b) / 2.0))


# ----------------------------------------------------------------------------------------------
# evaluation entry point


def _metric_table(conv: Convention) -> dict[str, Callable[[Array, Array, Array], float]]:
    return {
        "EN": lambda a, b, f: en(f),
        "SD": lambda a, b, f: sd(f),
        "SF": lambda a, b, f: sf(f),
        "AG": lambda a, b, f: ag(f, denominator=conv.ag_denominator),
        "MI": lambda a, b, f: mi(a, b, f, base=conv.mi_base, normalise=conv.mi_normalise, reduce=conv.reduce),
        "SCD": lambda a, b, f: scd(a, b, f, reduce=conv.reduce),
        "VIF": lambda a, b, f: vif(a, b, f, reduce=conv.reduce),
        "Qabf": qabf,
        "Nabf": nabf,
        "SSIM": lambda a, b, f: ssim(
            a, b, f, window=conv.ssim_window, data_range=conv.ssim_data_range, reduce=conv.reduce
        ),
        "MS-SSIM": lambda a, b, f: ms_ssim(a, b, f, reduce=conv.reduce),
        "FMI_pixel": lambda a, b, f: fmi(a, b, f, feature="none"),
        "FMI_dct": lambda a, b, f: fmi(a, b, f, feature="dct"),
        "FMI_w": lambda a, b, f: fmi(a, b, f, feature="wavelet"),
        "CC": cc,
        "PSNR": lambda a, b, f: psnr(a, b, f, peak=conv.psnr),
        "MSE": mse,
    }


def _looks_unit_range(arr: np.ndarray) -> bool:
    """Float data inside [0, 1] with fractional values is almost surely a network output not yet x255."""
    if not np.issubdtype(arr.dtype, np.floating) or arr.size == 0:
        return False
    return bool(arr.min() >= 0.0 and arr.max() <= 1.0 and np.any((arr > 0) & (arr < 1)))


def evaluate_pair(
    ir: ImageLike,
    vi: ImageLike,
    fused: ImageLike,
    *,
    metrics: Iterable[str] = ALL,
    convention: str | Convention = "cddfuse",
    round_inputs: bool = True,
    check_scale: bool = True,
) -> dict[str, float]:
    """Score one fused image against its two sources; keys are the requested metric names.

    Inputs are 2-D gray images on the 0-255 scale (uint8 or float). With ``round_inputs`` they are
    rounded and clipped to integers 0..255 first, because the reference numbers were computed on
    8-bit files: scoring a float network output directly would shift EN/MI noticeably. Data that
    looks like [0, 1] floats is rejected, since every constant here assumes 0-255 (pitfall 1); callers
    that scaled the data themselves (files read at their bit depth) pass ``check_scale=False``, since a
    dark 16-bit image scaled to 0-255 can lie below 1 everywhere.
    FMI_* and MS-SSIM are the slow ones (seconds per 768x576 pair); everything else takes well
    under a second.
    """
    conv = get_convention(convention)
    for name, raw in (("ir", ir), ("vi", vi), ("fused", fused)):
        if check_scale and _looks_unit_range(np.asarray(raw)):
            raise ValueError(f"{name} looks like [0, 1] data; metrics expect the 0-255 scale")
    a, b, f = _triplet(ir, vi, fused)
    if round_inputs:
        a, b, f = (np.clip(np.round(v), 0.0, 255.0) for v in (a, b, f))
    table = _metric_table(conv)
    wanted = list(metrics)
    unknown = [m for m in wanted if m not in table]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {list(ALL)}")
    out = {}
    for name in wanted:
        try:
            out[name] = float(table[name](a, b, f))
        except ImageTooSmall:  # VIF needs 41 px per side, SSIM 7, MS-SSIM 176: undefined, not an abort
            out[name] = math.nan
    return out


def with_options(convention: str | Convention = "cddfuse", **changes: object) -> Convention:
    """A preset with some fields changed, e.g. ``with_options("cddfuse", ssim_data_range=255.0)``."""
    return replace(get_convention(convention), **changes)  # type: ignore[arg-type]
