"""Fusion metrics: reference values of fusion.md §5.4 on the real TNO/CMMDL images, plus properties."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from model import fusion_metrics as fm
from model.fusion_io import luma, read_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "fusion_testdata"
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data missing at {DATA}")

# fusion.md §5.4: CMMDL fused outputs vs TNO sources, CDDFuse evaluator semantics.
# columns: EN, SD, SF, MI (nats, sum), SCD, VIF (sum), Qabf, SSIM (sum, dr=2), AG, SSIM (sum, dr=255)
COLUMNS = ("EN", "SD", "SF", "MI", "SCD", "VIF", "Qabf", "SSIM", "AG", "SSIM255")
REFERENCE = {
    "01": (7.1596, 48.9705, 12.6760, 2.0833, 1.7533, 0.6955, 0.5772, 0.8838, 5.0130, 1.3098),
    "02": (7.4722, 51.3792, 15.5004, 2.7258, 1.5054, 0.7789, 0.6410, 0.9349, 5.9751, 1.2260),
    "03": (7.3318, 47.9866, 14.4700, 2.4468, 1.7611, 0.7415, 0.6389, 0.8878, 4.9820, 1.3681),
    "04": (7.1437, 37.4762, 15.3715, 2.3274, 1.6892, 0.9429, 0.7007, 0.8977, 5.7063, 1.3244),
    "05": (6.8852, 34.7278, 12.5620, 1.7895, 1.6202, 0.5920, 0.5419, 0.9277, 5.8682, 1.1781),
    "06": (7.6411, 52.2768, 20.4261, 2.4533, 1.4112, 0.6318, 0.5422, 0.8436, 5.7975, 0.9613),
}
REFERENCE_MEAN = (7.2723, 45.4695, 15.1677, 2.3043, 1.6234, 0.7304, 0.6070, 0.8959, 5.5570, 1.2280)
# trivial baseline F = round((IR + VI) / 2), means over TNO 01-10 (no SSIM255 column)
BASELINE_MEAN = (6.2538, 26.4281, 7.7990, 1.6485, 1.4581, 0.6257, 0.3846, 1.0817, 2.9956)
REL = 1e-3


def gray255(path: Path) -> np.ndarray:
    """Float32 0-255 gray as the evaluator reads it (cv2 BGR2GRAY = rounded BT.601 luma)."""
    img = read_image(path)
    if img.ndim == 3:
        img = np.round(luma(img.astype(np.float64)))
    return img.astype(np.float32)


def tno(name: str) -> tuple[np.ndarray, np.ndarray]:
    return gray255(DATA / "TNO" / "ir" / f"{name}.png"), gray255(DATA / "TNO" / "vi" / f"{name}.png")


def table_row(ir: np.ndarray, vi: np.ndarray, fused: np.ndarray) -> list[float]:
    scores = fm.evaluate_pair(ir, vi, fused, metrics=COLUMNS[:9])
    return [*scores.values(), fm.ssim(ir, vi, fused, data_range=255.0)]


@pytest.fixture(scope="module")
def cmmdl_rows() -> dict[str, list[float]]:
    rows = {}
    for name in REFERENCE:
        ir, vi = tno(name)
        rows[name] = table_row(ir, vi, gray255(DATA / "CMMDL_result" / f"{name}.png"))
    return rows


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_values_per_pair(cmmdl_rows: dict[str, list[float]], name: str) -> None:
    for column, got, want in zip(COLUMNS, cmmdl_rows[name], REFERENCE[name], strict=True):
        assert got == pytest.approx(want, rel=REL), f"{name} {column}: {got} vs {want}"


def test_reference_means(cmmdl_rows: dict[str, list[float]]) -> None:
    means = np.mean(list(cmmdl_rows.values()), axis=0)
    for column, got, want in zip(COLUMNS, means, REFERENCE_MEAN, strict=True):
        assert got == pytest.approx(want, rel=REL), column


def test_mi_in_bits_via_metric_convention(cmmdl_rows: dict[str, list[float]]) -> None:
    # §5.4: "MI in bits: 3.32 mean"; the Metric-file convention reports bits
    bits = []
    for name in REFERENCE:
        ir, vi = tno(name)
        fused = gray255(DATA / "CMMDL_result" / f"{name}.png")
        bits.append(fm.evaluate_pair(ir, vi, fused, metrics=["MI"], convention="metric")["MI"])
    assert np.mean(bits) == pytest.approx(3.32, abs=0.005)
    nats = np.mean([row[COLUMNS.index("MI")] for row in cmmdl_rows.values()])
    assert np.mean(bits) / nats == pytest.approx(1 / math.log(2), rel=1e-9)


def test_baseline_average_fusion_means() -> None:
    rows = []
    for i in range(1, 11):
        ir, vi = tno(f"{i:02d}")
        fused = np.round((ir + vi) / 2)  # float32, round-half-even, as measured for the notes
        rows.append(list(fm.evaluate_pair(ir, vi, fused, metrics=COLUMNS[:9]).values()))
    for column, got, want in zip(COLUMNS, np.mean(rows, axis=0), BASELINE_MEAN, strict=False):
        assert got == pytest.approx(want, rel=REL), column


def test_cmmdl_convention_uses_fused_range_for_ssim() -> None:
    ir, vi = tno("01")
    fused = gray255(DATA / "CMMDL_result" / "01.png")
    assert fused.max() - fused.min() == 255  # so CMMDL's data_range equals 255 here (§5.4 note)
    got = fm.evaluate_pair(ir, vi, fused, metrics=["SSIM"], convention="cmmdl")["SSIM"]
    assert got == pytest.approx(REFERENCE["01"][COLUMNS.index("SSIM255")], rel=REL)
    dim = np.round(fused * 0.5)
    half = fm.evaluate_pair(ir, vi, dim, metrics=["SSIM"], convention="cmmdl")["SSIM"]
    assert half == pytest.approx(fm.ssim(ir, vi, dim, data_range=float(dim.max() - dim.min())), rel=1e-9)
    assert half != pytest.approx(fm.ssim(ir, vi, dim, data_range=255.0), rel=1e-3)


# ----------------------------------------------------------------------------------------------
# properties on small real crops (fast)


@pytest.fixture(scope="module")
def crop() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ir, vi = tno("07")  # 256 x 256
    ir, vi = ir[40:232, 30:222].astype(np.float64), vi[40:232, 30:222].astype(np.float64)
    return ir, vi, np.round((ir + vi) / 2)


def test_identity_properties(crop: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    a = crop[0]
    assert fm.mse(a, a, a) == 0.0
    assert fm.psnr(a, a, a) == math.inf
    assert fm.ssim_index(a, a) == pytest.approx(1.0, abs=1e-6)
    assert fm.ssim_index(a, a, window="gaussian11", data_range=255.0) == pytest.approx(1.0, abs=1e-12)
    assert fm.ssim(a, a, a) == pytest.approx(2.0, abs=1e-6)  # a two-source sum
    assert fm.ms_ssim_index(a, a) == pytest.approx(1.0, abs=1e-12)
    assert fm.vif_single(a, a) == pytest.approx(1.0, abs=1e-6)
    assert fm.cc(a, a, a) == pytest.approx(1.0, abs=1e-12)
    assert fm.nabf(a, a, a) == 0.0
    for feature in ("none", "dct", "wavelet"):
        assert fm.fmi(a, a, a, feature=feature) == 1.0


def test_source_order_symmetry(crop: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    a, b, f = crop
    for metric in (fm.psnr, fm.mse, fm.mi, fm.scd, fm.vif, fm.qabf, fm.nabf, fm.ssim, fm.cc):
        assert metric(a, b, f) == pytest.approx(metric(b, a, f), rel=1e-12), metric.__name__
    assert fm.fmi(a, b, f) == pytest.approx(fm.fmi(b, a, f), rel=1e-12)


def test_entropy_known_values() -> None:
    assert fm.en(np.full((32, 32), 77, dtype=np.uint8)) == 0.0
    halves = np.zeros((16, 16))
    halves[:, 8:] = 200
    assert fm.en(halves) == pytest.approx(1.0, abs=1e-12)
    every_level = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert fm.en(every_level) == pytest.approx(8.0, abs=1e-12)
    # rounding like an 8-bit file: 99.6 and 100.4 land on the same level
    assert fm.en(np.array([[99.6, 100.4], [100.0, 100.2]])) == 0.0


def test_mutual_information_is_entropy_on_itself_and_label_invariant(
    crop: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> None:
    a, b, f = crop
    assert fm.mutual_information(f, f, base=2.0) == pytest.approx(fm.en(f), rel=1e-12)
    # relabelling gray levels bijectively keeps MI (sklearn semantics: levels are labels)
    assert fm.mi(a, b, 255.0 - f) == pytest.approx(fm.mi(a, b, f), rel=1e-12)
    assert fm.mutual_information(a, np.zeros_like(a)) == 0.0
    assert fm.mi(a, b, f, reduce="mean") == pytest.approx(fm.mi(a, b, f) / 2, rel=1e-12)


def test_offset_and_gain_invariances(crop: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    a, b, f = crop
    shifted = f + 17.0
    assert fm.sd(shifted) == pytest.approx(fm.sd(f), rel=1e-12)
    assert fm.sf(shifted) == pytest.approx(fm.sf(f), rel=1e-12)
    assert fm.ag(shifted) == pytest.approx(fm.ag(f), rel=1e-12)
    assert fm.cc(a, b, 0.5 * f + 3.0) == pytest.approx(fm.cc(a, b, f), rel=1e-12)
    assert fm.sd(2.0 * f) == pytest.approx(2.0 * fm.sd(f), rel=1e-12)
    assert fm.sf(2.0 * f) == pytest.approx(2.0 * fm.sf(f), rel=1e-12)


def test_uint8_fast_paths_match_float(crop: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    f = crop[2]
    u8 = f.astype(np.uint8)
    assert fm.sd(u8) == pytest.approx(fm.sd(f), rel=1e-12)
    assert fm.sf(u8) == pytest.approx(fm.sf(f), rel=1e-12)
    assert fm.frame_metrics(u8) == pytest.approx({"EN": fm.en(f), "SD": fm.sd(f), "SF": fm.sf(f)}, rel=1e-12)


def test_quality_orders_and_ranges(crop: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    a, b, f = crop
    rng = np.random.default_rng(0)
    noisy = np.clip(np.round(f + rng.normal(0.0, 25.0, f.shape)), 0, 255)
    good = fm.evaluate_pair(a, b, f, metrics=fm.ALL)
    bad = fm.evaluate_pair(a, b, noisy, metrics=fm.ALL)
    for name in ("Qabf", "SSIM", "MS-SSIM", "VIF", "CC", "PSNR", "FMI_pixel", "FMI_dct", "FMI_w"):
        assert good[name] > bad[name], name
    for name in ("Nabf", "MSE"):
        assert good[name] < bad[name], name
    for name in ("Qabf", "Nabf", "FMI_pixel", "FMI_dct", "FMI_w"):
        assert 0.0 <= good[name] <= 1.0 and 0.0 <= bad[name] <= 1.0, name


def test_qabf_constants_on_a_perfect_copy(crop: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    # F == A == B: orientation term at A = 1 is 0.9879 / (1 + e^-4.4); strength term ~0.9994
    # (with the evaluator's quirk: equal strengths give g_F, so Q_g = 0.9994 / (1 + e^(-15 (g - 0.5))))
    a = crop[0]
    expected = 0.9994 * 0.9879 / (1.0 + math.exp(-4.4))
    assert fm.qabf(a, a, a) == pytest.approx(expected, abs=5e-4)


def test_scd_sum_versus_mean_and_psnr_conventions(crop: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    a, b, f = crop
    assert fm.scd(a, b, f, reduce="mean") == pytest.approx(fm.scd(a, b, f) / 2, rel=1e-12)
    p255 = fm.psnr(a, b, f, peak=255.0)
    assert fm.psnr(a, b, f, peak="normalised_255") == pytest.approx(p255 + 20 * math.log10(255), rel=1e-12)
    assert fm.psnr(a, b, f) == pytest.approx(p255 + 20 * math.log10(f.max() / 255), rel=1e-12)
    assert fm.ag(f, denominator="h1w1") == pytest.approx(
        fm.ag(f) * f.size / ((f.shape[0] - 1) * (f.shape[1] - 1)), rel=1e-12
    )


def test_evaluate_pair_guards(crop: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    a, b, f = crop
    with pytest.raises(ValueError, match="0-255"):
        fm.evaluate_pair(a / 255, b / 255, f / 255)
    with pytest.raises(ValueError, match="unknown metrics"):
        fm.evaluate_pair(a, b, f, metrics=["NOPE"])
    with pytest.raises(ValueError, match="shapes differ"):
        fm.evaluate_pair(a, b, f[1:])
    with pytest.raises(ValueError, match="unknown convention"):
        fm.evaluate_pair(a, b, f, convention="matlab")
    # rounding like an 8-bit file: sub-level float noise does not change any score
    jitter = f + np.random.default_rng(1).uniform(-0.4, 0.4, f.shape)
    names = ["EN", "MI", "Qabf", "SSIM"]
    assert fm.evaluate_pair(a, b, jitter, metrics=names) == fm.evaluate_pair(a, b, f, metrics=names)
    custom = fm.with_options("cddfuse", ssim_data_range=255.0)
    assert fm.evaluate_pair(a, b, f, metrics=["SSIM"], convention=custom)["SSIM"] == pytest.approx(
        fm.ssim(a, b, f, data_range=255.0), rel=1e-12
    )
