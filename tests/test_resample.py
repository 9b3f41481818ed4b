"""Resampling window samples onto a fixed grid: means against brute force, gaps masked, nothing invented."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.resample import infer_dt_ns, resample, resample_window
from ingest.windowing import GroupWindower, RadChunk, Samples, WindowSpec

PROPS = settings(max_examples=80, deadline=None)


def brute_force_mean(t: list[int], v: list[float], start: int, end: int, n: int) -> tuple[list, list]:
    """Exact bin edges start + k*(end-start)/n as fractions, one sample at a time."""
    width = Fraction(end - start, n)
    sums = [0.0] * n
    counts = [0] * n
    for ti, vi in zip(t, v, strict=True):
        if not (start <= ti < end) or not np.isfinite(vi):
            continue
        for k in range(n):
            if start + k * width <= ti < start + (k + 1) * width:
                sums[k] += vi
                counts[k] += 1
    return [s / c if c else 0.0 for s, c in zip(sums, counts, strict=True)], [c > 0 for c in counts]


@st.composite
def sample_sets(draw: st.DrawFn) -> tuple[Samples, int, int, int]:
    start = draw(st.integers(-(10**12), 10**12))
    width = draw(st.integers(1, 5_000))
    n = draw(st.integers(1, 64))
    k = draw(st.integers(0, 60))
    t = sorted(draw(st.lists(st.integers(start - 50, start + width + 50), min_size=k, max_size=k)))
    v = draw(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=k, max_size=k))
    return Samples(np.array(t, dtype=np.int64), np.array(v, dtype=np.float64)), start, start + width, n


@PROPS
@given(sample_sets())
def test_mean_matches_brute_force(case: tuple) -> None:
    samples, start, end, n = case
    values, valid = resample(samples, start, end, n)
    exp_v, exp_valid = brute_force_mean(samples.t_ns.tolist(), samples.values.tolist(), start, end, n)
    assert values.dtype == np.float32 and values.shape == (n,) and valid.dtype == bool
    assert valid.tolist() == exp_valid
    np.testing.assert_allclose(values, np.array(exp_v, dtype=np.float32), rtol=1e-6, atol=1e-6)


@PROPS
@given(sample_sets(), st.sampled_from(["mean", "linear"]))
def test_no_value_is_invented(case: tuple, method: str) -> None:
    """Invalid bins are exactly 0; valid ones lie within the range of the data actually present."""
    samples, start, end, n = case
    values, valid = resample(samples, start, end, n, method=method, dt_ns=7)
    assert np.all(values[~valid] == 0)
    inside = samples.values[(samples.t_ns >= start) & (samples.t_ns < end)]
    if inside.size == 0:
        assert not valid.any()
    else:
        lo, hi = np.float32(inside.min()), np.float32(inside.max())
        assert np.all((values[valid] >= lo - 1e-3 * abs(lo)) & (values[valid] <= hi + 1e-3 * abs(hi)))


def test_gap_is_masked_not_filled() -> None:
    t = np.array([0, 10, 20, 30, 70, 80, 90], dtype=np.int64)  # nothing in [40, 70)
    s = Samples(t, np.arange(7, dtype=np.float32) + 1, dt_ns=10)
    values, valid = resample(s, 0, 100, 10)
    assert valid.tolist() == [True] * 4 + [False] * 3 + [True] * 3
    assert values.tolist() == [1, 2, 3, 4, 0, 0, 0, 5, 6, 7]
    # linear: centres 45 and 55 are more than dt/2 from any sample; 35 and 65 are exactly dt/2 away
    values, valid = resample(s, 0, 100, 10, method="linear")
    assert valid.tolist() == [True] * 4 + [False] * 2 + [True] * 4
    assert values[4:6].tolist() == [0, 0] and values[3] == 4 and values[6] == 5


def test_mean_averages_within_bins_and_ignores_non_finite_and_outside() -> None:
    t = np.array([-5, 0, 1, 2, 5, 6, 9, 10], dtype=np.int64)
    v = np.array([100, 1, 2, np.nan, 4, np.inf, 8, 100], dtype=np.float64)
    values, valid = resample(Samples(t, v), 0, 10, 2)
    assert valid.tolist() == [True, True]
    assert values.tolist() == [1.5, 6.0]
    values, valid = resample(Samples(t, v), 0, 10, 5)  # [2,4) and [6,8) hold only non-finite samples
    assert valid.tolist() == [True, False, True, False, True]
    assert values.tolist() == [1.5, 0.0, 4.0, 0.0, 8.0]


def test_bins_are_exact_at_epoch_scale_timestamps() -> None:
    start = 1_763_000_000_123_456_789  # float64 cannot resolve single ns here
    t = np.array([start, start + 332, start + 333, start + 334, start + 999], dtype=np.int64)
    values, valid = resample(Samples(t, np.array([1.0, 2.0, 3.0, 4.0, 5.0])), start, start + 1000, 3)
    # bin edges at 333.33 and 666.67 ns: 333 is in bin 0, 334 in bin 1
    assert valid.tolist() == [True, True, True]
    assert values.tolist() == [2.0, 4.0, 5.0]


def test_linear_interpolates_a_ramp_and_uses_dt_to_bridge_or_mask() -> None:
    t = np.arange(0, 100, 10, dtype=np.int64)  # 0..90, period 10
    ramp = Samples(t, 3.0 * t + 1.0, dt_ns=10)
    values, valid = resample(ramp, 0, 100, 20, method="linear")  # centres 2.5, 7.5, ..., 97.5
    centres = (np.arange(20) + 0.5) * 5
    assert valid.tolist() == [True] * 19 + [False]  # 97.5 is 7.5 past the last sample > dt/2
    np.testing.assert_allclose(values[:18], 3.0 * centres[:18] + 1.0, rtol=1e-6)
    assert values[18] == 3.0 * 90 + 1.0  # 92.5: no right neighbour, the last sample is held, not extrapolated

    holed = Samples(np.delete(t, [4, 5]), np.delete(3.0 * t + 1.0, [4, 5]), dt_ns=10)  # 30 -> 60 gap
    _, valid = resample(holed, 0, 100, 20, method="linear")
    assert valid[7:11].tolist() == [False] * 4  # centres 37.5..52.5: > dt/2 from 30 and 60
    assert valid[6] and valid[11]  # 32.5 and 57.5 are within dt/2 of a sample
    _, valid = resample(holed, 0, 100, 20, method="linear", dt_ns=20)  # a coarser period bridges it
    assert valid.all()
    # Without any dt the median spacing (10) is inferred, matching the explicit case.
    inferred = Samples(holed.t_ns, holed.values)
    assert infer_dt_ns(inferred.t_ns) == 10
    v1, m1 = resample(inferred, 0, 100, 20, method="linear")
    v2, m2 = resample(holed, 0, 100, 20, method="linear")
    assert m1.tolist() == m2.tolist() and v1.tolist() == v2.tolist()


def test_linear_single_sample_without_period_only_matches_exactly() -> None:
    s = Samples(np.array([5], dtype=np.int64), np.array([2.0]))
    values, valid = resample(s, 0, 10, 1, method="linear")  # centre 5.0 hits the sample
    assert valid.tolist() == [True] and values.tolist() == [2.0]
    _, valid = resample(s, 0, 10, 2, method="linear")
    assert valid.tolist() == [False, False]


def test_multichannel_values_match_per_channel_resampling() -> None:
    rng = np.random.default_rng(3)
    t = np.sort(rng.integers(0, 1000, 50)).astype(np.int64)
    v = rng.normal(size=(50, 3))
    for method in ("mean", "linear"):
        values, valid = resample(Samples(t, v, 20), 0, 1000, 17, method=method)
        assert values.shape == (17, 3)
        for c in range(3):
            vc, mc = resample(Samples(t, v[:, c].copy(), 20), 0, 1000, 17, method=method)
            assert mc.tolist() == valid.tolist()
            np.testing.assert_allclose(values[:, c], vc, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "n must"),
        ({"end_ns": 0}, "end_ns"),
        ({"method": "cubic"}, "method"),
        ({"dt_ns": 0}, "dt_ns"),
        ({"n": 2**40, "end_ns": 2**30}, "overflows"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    args = {"start_ns": 0, "end_ns": 10, "n": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        resample(Samples.empty(), **args)


def test_resample_window_uses_window_span_and_chunk_period() -> None:
    w = GroupWindower("g", {"cam": "image_a", "rad": "seq_a"}, WindowSpec(1000, mode="replay"))
    w.add_samples(RadChunk("rad", 0, 100, 50, np.arange(4, dtype=np.float32)), 0)  # 100..250
    w.add_samples(RadChunk("rad", 1, 600, 50, np.arange(4, dtype=np.float32) + 10), 0)  # 600..750
    (win,) = w.flush()
    assert win.samples["seq_a"].dt_ns == 50
    values, valid = resample_window(win, "seq_a", 10)
    assert valid.tolist() == [False, True, True, False, False, False, True, True, False, False]
    assert values.tolist() == [0, 0.5, 2.5, 0, 0, 0, 10.5, 12.5, 0, 0]
    values, valid = resample_window(win, "seq_b", 10)
    assert not valid.any() and not values.any()
    with pytest.raises(ValueError, match="role"):
        resample_window(win, "image_a", 10)
