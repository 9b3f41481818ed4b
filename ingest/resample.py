"""Put a window's irregular radiation samples on the fixed grid the model expects.

Why masks instead of filled values: a detector dropout or a network gap must look like "no data" to the
fusion stage (its weight for that modality goes to 0), not like a plausible flat signal. So a bin gets a
value only from samples that really fall in (or, for ``"linear"``, right next to) it; every other bin is
``valid=False`` with value 0. Non-finite samples (detector dead time is often sent as NaN) are treated as
missing for the same reason.

Bins split ``[start, end)`` into ``n`` equal parts; bin ``k`` holds times
``start + k*W/n <= t < start + (k+1)*W/n`` (``W = end - start``), computed in exact integer arithmetic
relative to ``start`` so that epoch-scale ns timestamps lose no precision.
"""

from __future__ import annotations

import numpy as np

from ingest.windowing import SEQ_ROLES, Samples, Window

METHODS = ("mean", "linear")


def _finite_mask(values: np.ndarray) -> np.ndarray | None:
    if values.dtype.kind not in "fc":
        return None
    ok = np.isfinite(values)
    if ok.ndim > 1:
        ok = ok.reshape(ok.shape[0], -1).all(axis=1)
    return None if bool(ok.all()) else ok


def infer_dt_ns(t_ns: np.ndarray) -> int | None:
    """Nominal sample period: the median positive spacing (robust to the odd gap), None if unknowable."""
    if t_ns.shape[0] < 2:
        return None
    d = np.diff(t_ns)
    d = d[d > 0]
    if d.shape[0] == 0:
        return None
    return int(np.median(d))


def resample(
    samples: Samples,
    start_ns: int,
    end_ns: int,
    n: int,
    *,
    dt_ns: int | None = None,
    method: str = "mean",
) -> tuple[np.ndarray, np.ndarray]:
    """Resample onto ``n`` bins of ``[start_ns, end_ns)``; returns ``(values float32[n, ...], valid bool[n])``.

    ``method="mean"``: a bin is the mean of the samples inside it; no sample -> invalid. Never upsamples.
    ``method="linear"``: a bin is the value at its centre, interpolated between the two neighbouring
    samples when they are at most 1.5 periods apart, else the nearest sample if it lies within half a
    period of the centre (a sample stands for its own period), else invalid. Samples sharing a timestamp
    are averaged first. ``dt_ns`` (the period) defaults to ``samples.dt_ns``, then to the median spacing;
    with a single sample and no period only a centre that hits it exactly is valid.
    Samples outside the range are ignored. Values are averaged in float64, returned as float32.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    width = end_ns - start_ns
    if width <= 0:
        raise ValueError(f"end_ns ({end_ns}) must be > start_ns ({start_ns})")
    if width * n >= 2**62:
        raise ValueError(f"window width {width} ns times n={n} overflows int64 bin arithmetic")
    if dt_ns is not None and dt_ns <= 0:
        raise ValueError(f"dt_ns must be > 0, got {dt_ns}")

    t = np.asarray(samples.t_ns, dtype=np.int64)
    values = np.asarray(samples.values)
    if values.shape[0] != t.shape[0]:
        raise ValueError(f"{t.shape[0]} timestamps but {values.shape[0]} values")
    tail = values.shape[1:]
    keep = (t >= start_ns) & (t < end_ns)
    finite = _finite_mask(values)
    if finite is not None:
        keep &= finite
    if not bool(keep.all()):
        t = t[keep]
        values = values[keep]
    rel = t - start_ns  # int64[k], 0 <= rel < width
    vals = values.reshape(values.shape[0], int(np.prod(tail))).astype(np.float64, copy=False)  # [k, c]

    if method == "mean":
        out, valid = _mean_bins(rel, vals, width, n)
    else:
        if dt_ns is None:
            dt_ns = samples.dt_ns if samples.dt_ns is not None else infer_dt_ns(t)
        out, valid = _linear_bins(rel, vals, width, n, dt_ns or 0)
    return out.reshape((n, *tail)).astype(np.float32), valid


def _mean_bins(rel: np.ndarray, vals: np.ndarray, width: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    idx = (rel * n) // width  # exact: rel * n < 2**62
    counts = np.bincount(idx, minlength=n)
    sums = np.zeros((n, vals.shape[1]), dtype=np.float64)
    if vals.shape[1] == 1:
        sums[:, 0] = np.bincount(idx, weights=vals[:, 0], minlength=n)
    else:
        np.add.at(sums, idx, vals)
    valid = counts > 0
    out = np.zeros_like(sums)
    out[valid] = sums[valid] / counts[valid, None]
    return out, valid


def _linear_bins(rel: np.ndarray, vals: np.ndarray, width: int, n: int, dt: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((n, vals.shape[1]), dtype=np.float64)
    valid = np.zeros(n, dtype=bool)
    if rel.shape[0] == 0:
        return out, valid
    # Average duplicate timestamps (two sensors feeding one role) so neighbours are well defined.
    order = np.argsort(rel, kind="stable")
    rel, vals = rel[order], vals[order]
    uniq, inverse, counts = np.unique(rel, return_inverse=True, return_counts=True)
    if uniq.shape[0] != rel.shape[0]:
        sums = np.zeros((uniq.shape[0], vals.shape[1]), dtype=np.float64)
        np.add.at(sums, inverse, vals)
        vals = sums / counts[:, None]
    rel = uniq.astype(np.float64)  # small relative offsets: exact in float64

    centre = (2 * np.arange(n, dtype=np.float64) + 1) * width / (2 * n)
    j = np.searchsorted(rel, centre, side="right")  # rel[j-1] <= centre < rel[j]
    has_l = j > 0
    has_r = j < rel.shape[0]
    jl = np.clip(j - 1, 0, rel.shape[0] - 1)
    jr = np.clip(j, 0, rel.shape[0] - 1)
    tl, tr = rel[jl], rel[jr]
    interp = has_l & has_r & (tr - tl <= 1.5 * dt)
    frac = np.where(interp, (centre - tl) / np.where(interp, tr - tl, 1.0), 0.0)
    out[interp] = vals[jl[interp]] + frac[interp, None] * (vals[jr[interp]] - vals[jl[interp]])
    valid |= interp

    dl = np.where(has_l, centre - tl, np.inf)
    dr = np.where(has_r, tr - centre, np.inf)
    use_r = dr < dl
    nearest = np.where(use_r, jr, jl)
    hold = ~interp & (np.minimum(dl, dr) <= dt / 2)
    out[hold] = vals[nearest[hold]]
    valid |= hold
    return out, valid


def resample_window(
    window: Window, role: str, n: int, *, dt_ns: int | None = None, method: str = "mean"
) -> tuple[np.ndarray, np.ndarray]:
    """``resample`` of one sequence role over the window's own span (absent role -> all invalid)."""
    if role not in SEQ_ROLES:
        raise ValueError(f"role must be one of {SEQ_ROLES}, got {role!r}")
    return resample(window.samples[role], window.start_ns, window.end_ns, n, dt_ns=dt_ns, method=method)
