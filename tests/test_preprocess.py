"""The shared input contract: determinism, invariances, masks honoured, files == streams."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from model.dataset import FourModalityDataset
from model.preprocess import (
    ROLES,
    PreprocessConfig,
    RawSample,
    collate,
    fit_length,
    preprocess,
    raw_from_dataset_item,
    raw_from_scene,
    robust_normalise,
    sky_and_noise,
)
from model.synth import SynthConfig, generate_scene, scene_seed, write_dataset

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CFG = PreprocessConfig(frame_size=64, seq_len=256)


def _noise_frame(rng: np.random.Generator, shape: tuple[int, int], sky: float, sigma: float) -> np.ndarray:
    return rng.normal(sky, sigma, shape)


def test_deterministic_and_typed() -> None:
    scene = generate_scene(11)
    first = preprocess(raw_from_scene(scene), CFG)
    second = preprocess(raw_from_scene(scene), CFG)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert first["image_a"].shape == (1, 64, 64) and first["image_a"].dtype == torch.float32
    assert first["seq_b"].shape == (256,) and first["seq_b_valid"].dtype == torch.bool
    assert first["presence"].tolist() == [True] * 4
    assert int(first["label"]) == scene.target_class
    assert first["boxes"].shape == (scene.boxes.shape[0], 4)
    assert torch.isfinite(first["image_a"]).all() and torch.isfinite(first["seq_a"]).all()


def test_sky_estimate_is_robust_to_sources() -> None:
    rng = np.random.default_rng(0)
    img = _noise_frame(rng, (64, 64), 1000.0, 10.0)
    sky, noise = sky_and_noise(img)
    assert abs(sky - 1000.0) < 1.0 and abs(noise - 10.0) < 0.6
    img[rng.integers(0, 64, 40), rng.integers(0, 64, 40)] += 5e4  # stars and hot pixels
    sky2, noise2 = sky_and_noise(img)
    assert abs(sky2 - sky) < 0.5 and abs(noise2 - noise) < 0.5


def _sky_and_noise_by_definition(img: np.ndarray, clip_sigma: float = 3.0, iters: int = 5) -> tuple[float, float]:
    """The sigma-clipping loop written plainly (np.median of the kept pixels, each round): the oracle
    for the sorted-slice implementation, which must give the same numbers to the bit."""
    data = np.asarray(img, dtype=np.float64)
    data = data[np.isfinite(data)].ravel()
    if data.size == 0:
        return 0.0, 1.0
    keep, sky, noise = data, float(np.median(data)), 0.0
    for _ in range(iters):
        sky = float(np.median(keep))
        noise = 1.4826 * float(np.median(np.abs(keep - sky)))
        if noise <= 0:
            break
        new = data[np.abs(data - sky) <= clip_sigma * noise]
        if new.size == keep.size or new.size < 8:
            break
        keep = new
    if noise <= 0:
        std = float(np.std(data))
        noise = std if std > 0 else 1.0
    return sky, noise


def _frames(rng: np.random.Generator) -> list[np.ndarray]:
    """Frames of every dtype and shape class the daemon sees, odd and even pixel counts, with the
    awkward cases: stars, NaN/inf, a quantised sky (MAD 0), a constant frame, nothing finite."""
    frames = []
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(3, 97, 2))
        stars = rng.integers(0, h * w, 12)
        u16 = rng.poisson(40, (h, w)).astype(np.uint16)
        u16.flat[stars] = rng.integers(1000, 65535, 12)
        f32 = rng.normal(-3.0, 0.7, (h, w)).astype(np.float32)
        f32.flat[stars[:3]] = [np.nan, np.inf, -np.inf]
        frames += [
            u16,
            rng.integers(0, 3, (h, w)).astype(np.uint8),  # most pixels equal: MAD 0, std fallback
            rng.integers(-500, 500, (h, w)).astype(np.int16),
            f32,
            rng.standard_cauchy((h, w)),  # heavy tails: many clipping rounds
            np.full((h, w), 7.0),
        ]
    frames.append(np.full((4, 4), np.nan))
    return frames


def test_sky_estimate_matches_the_plain_definition_to_the_bit() -> None:
    rng = np.random.default_rng(12)
    for img in _frames(rng):
        for clip_sigma, iters in ((3.0, 5), (2.0, 10), (5.0, 1)):
            expected = _sky_and_noise_by_definition(img, clip_sigma, iters)
            assert sky_and_noise(img, clip_sigma, iters) == expected, (img.dtype, img.shape, clip_sigma)


def test_sequence_normalisation_matches_the_plain_definition_to_the_bit() -> None:
    rng = np.random.default_rng(13)
    for n in (1, 2, 7, 256, 257, 1000):
        for rounded in (False, True):  # rounding makes ties around the median, and MAD 0 when most are equal
            values = rng.standard_cauchy(n) * 3.0 + 40.0
            values = np.round(values / 10.0) if rounded else values
            valid = rng.random(n) > 0.2
            valid[0] = True
            v = values[valid]
            med = float(np.median(v))
            mad = float(np.median(np.abs(v - med)))
            scale = max(1.4826 * mad if mad > 0 else float(np.std(v)), CFG.seq_scale_floor * abs(med), 1e-12)
            expected = np.zeros(n)
            expected[valid] = np.arcsinh(np.clip((v - med) / scale, -CFG.seq_clip, CFG.seq_clip))
            assert np.array_equal(robust_normalise(values, valid, CFG), expected), (n, rounded)


def test_image_invariant_to_sky_offset_and_gain() -> None:
    """Output is in noise sigmas, so bias, sky level and gain must not matter."""
    rng = np.random.default_rng(1)
    img = _noise_frame(rng, (64, 64), 300.0, 5.0)
    img[30:33, 30:33] += 400.0
    a = preprocess(RawSample(image_a=img), CFG)["image_a"]
    b = preprocess(RawSample(image_a=3.5 * img + 1234.0), CFG)["image_a"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert float(a.median()) == pytest.approx(0.0, abs=0.02)  # the sky sits at 0 after subtraction
    assert float(a[0, 31, 31]) > 0.3  # an 80-sigma source stands far above it


def test_resize_pads_and_scales_boxes() -> None:
    rng = np.random.default_rng(2)
    img = _noise_frame(rng, (96, 128), 100.0, 3.0)  # H=96, W=128 -> scale 0.5, 48 rows then padding
    img[60:64, 20:24] += 3000.0
    raw = RawSample(image_a=img, boxes=np.array([[20.0, 60.0, 24.0, 64.0]]), box_classes=np.array([2]))
    out = preprocess(raw, CFG)
    assert float(out["scale_a"]) == pytest.approx(0.5)
    torch.testing.assert_close(out["boxes"], torch.tensor([[10.0, 30.0, 12.0, 32.0]]))
    assert torch.equal(out["image_a"][0, 48:], torch.zeros(16, 64))  # padding is sky (0)
    peak = int(out["image_a"][0].argmax())
    assert (peak // 64, peak % 64) in {(30, 10), (30, 11), (31, 10), (31, 11)}


@pytest.mark.parametrize("hw", [(128, 128), (640, 480), (100, 70), (65, 64), (20, 31), (1, 50), (33, 97), (4000, 30)])
def test_the_numpy_resize_is_torch_interpolate(hw: tuple[int, int]) -> None:
    """The contract's resize is written in numpy so that the daemon's ingest process needs no torch; it
    must stay torch's area (shrinking) and bilinear (enlarging) interpolation, which it replaced."""
    import torch.nn.functional as F

    from model.preprocess import _resize

    rng = np.random.default_rng(hw[0] * 7 + hw[1])
    x = rng.normal(0.0, 1.0, hw) * rng.choice([1.0, 1e4], hw)  # sky noise with bright sources
    for size in (64, 48, 7, 100):
        scale = size / max(hw)
        out_hw = (max(1, round(hw[0] * scale)), max(1, round(hw[1] * scale)))
        mode = {"mode": "area"} if scale < 1 else {"mode": "bilinear", "align_corners": False}
        ref = F.interpolate(torch.from_numpy(x)[None, None], size=out_hw, **mode)[0, 0].numpy()
        got = _resize(x, scale)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= 1e-13 * np.abs(x).max(), (hw, size)


def test_preprocessing_runs_without_torch() -> None:
    """The daemon's ingest process prepares every window with the numpy contract and must never load
    torch (about 470 MB resident): checked in a fresh interpreter, for frames with and without a resize."""
    script = """
import sys
import numpy as np
from model.preprocess import PreprocessConfig, RawSample, preprocess_arrays
rng = np.random.default_rng(0)
for shape in ((64, 64), (48, 80), (20, 20)):
    raw = RawSample(image_a=rng.integers(0, 4000, shape, dtype=np.uint16), seq_a=rng.normal(5, 1, 700))
    out = preprocess_arrays(raw, PreprocessConfig(frame_size=64, seq_len=256))
    assert out["image_a"].shape == (1, 64, 64)
print("torch" in sys.modules)
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_upscaling_small_frames() -> None:
    rng = np.random.default_rng(3)
    img = _noise_frame(rng, (32, 32), 100.0, 3.0)
    out = preprocess(RawSample(image_a=img), CFG)
    assert float(out["scale_a"]) == 2.0
    assert out["image_a"].shape == (1, 64, 64)
    assert float(out["image_a"][0, 60:].abs().max()) > 0  # no padding: the frame fills 64 px


def test_uint8_and_non_finite_pixels() -> None:
    rng = np.random.default_rng(4)
    img = rng.integers(10, 40, (64, 64)).astype(np.uint8)
    out_u8 = preprocess(RawSample(image_a=img), CFG)["image_a"]
    flt = img.astype(np.float32)
    flt[5, 5] = np.nan
    flt[6, 6] = np.inf
    out_f = preprocess(RawSample(image_a=flt), CFG)["image_a"]
    assert torch.isfinite(out_f).all()
    assert float(out_f[0, 5, 5]) == 0.0  # a dead pixel reads as sky, not as a source
    mask = torch.ones(64, 64, dtype=torch.bool)
    mask[5, 5] = mask[6, 6] = False
    torch.testing.assert_close(out_u8[0][mask], out_f[0][mask], atol=1e-6, rtol=0)


def test_absent_modalities_are_zero_and_flagged() -> None:
    rng = np.random.default_rng(5)
    raw = RawSample(image_a=_noise_frame(rng, (64, 64), 10, 1), seq_b=rng.normal(1, 0.1, 256))
    out = preprocess(raw, CFG)
    assert out["presence"].tolist() == [True, False, False, True]
    assert torch.equal(out["image_b"], torch.zeros(1, 64, 64))
    assert torch.equal(out["seq_a"], torch.zeros(256)) and not out["seq_a_valid"].any()
    assert out["seq_b_valid"].all()
    assert not bool(out["boxes_known"]) and out["boxes"].shape == (0, 4)


def test_presence_overrides_and_errors() -> None:
    rng = np.random.default_rng(6)
    img = _noise_frame(rng, (64, 64), 10, 1)
    out = preprocess(RawSample(image_a=img, image_b=img, presence={"image_b": False}), CFG)
    assert out["presence"].tolist() == [True, False, False, False]
    assert torch.equal(out["image_b"], torch.zeros(1, 64, 64))
    with pytest.raises(ValueError, match="present but no data"):
        RawSample(image_a=img, presence={"seq_a": True})
    with pytest.raises(ValueError, match="2-D"):
        RawSample(image_a=np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="shape of seq_a"):
        RawSample(seq_a=np.zeros(10), seq_a_valid=np.ones(9, dtype=bool))
    with pytest.raises(ValueError, match="unknown presence"):
        RawSample(presence={"camera": True})


def test_validity_mask_honoured_and_normalised_on_valid_only() -> None:
    rng = np.random.default_rng(7)
    seq = rng.normal(5.0, 0.5, 256)
    valid = rng.random(256) > 0.3
    base = preprocess(RawSample(seq_a=seq, seq_a_valid=valid), CFG)
    poisoned = seq.copy()
    poisoned[~valid] = rng.choice([1e9, -1e9, np.nan, np.inf], size=int((~valid).sum()))
    out = preprocess(RawSample(seq_a=poisoned, seq_a_valid=valid), CFG)
    assert torch.equal(out["seq_a"], base["seq_a"]) and torch.equal(out["seq_a_valid"], base["seq_a_valid"])
    assert torch.equal(out["seq_a_valid"], torch.from_numpy(valid))
    assert torch.equal(out["seq_a"][~torch.from_numpy(valid)], torch.zeros(int((~valid).sum())))
    # independent reference: robust z-score over the valid samples, then asinh
    v = seq[valid]
    med = np.median(v)
    scale = 1.4826 * np.median(np.abs(v - med))
    expected = np.arcsinh((v - med) / scale)
    np.testing.assert_allclose(out["seq_a"][torch.from_numpy(valid)].numpy(), expected, atol=1e-5)


def test_non_finite_samples_become_invalid() -> None:
    seq = np.ones(256)
    seq[10] = np.nan
    seq[20] = -np.inf
    out = preprocess(RawSample(seq_a=seq), CFG)
    assert not out["seq_a_valid"][10] and not out["seq_a_valid"][20]
    assert int(out["seq_a_valid"].sum()) == 254
    assert float(out["seq_a"].abs().max()) == 0.0  # flat series: every valid sample is at the median


def test_longer_series_are_binned_without_inventing_values() -> None:
    values = np.arange(8, dtype=np.float64)
    valid = np.array([True, True, True, False, False, False, True, True])
    out, ok = fit_length(values, valid, 4, "bin")
    np.testing.assert_array_equal(ok, [True, True, False, True])
    np.testing.assert_allclose(out, [0.5, 2.0, 0.0, 6.5])
    out, ok = fit_length(values, valid, 4, "crop")  # newest samples at the native rate
    np.testing.assert_array_equal(ok, [False, False, True, True])
    np.testing.assert_allclose(out, [0.0, 0.0, 6.0, 7.0])


def test_shorter_series_are_padded_invalid() -> None:
    rng = np.random.default_rng(8)
    out = preprocess(RawSample(seq_b=rng.normal(1, 0.1, 100)), CFG)
    assert out["seq_b_valid"][:100].all() and not out["seq_b_valid"][100:].any()
    assert torch.equal(out["seq_b"][100:], torch.zeros(156))


def test_a_count_series_that_mostly_reads_zero_keeps_its_bursts_apart() -> None:
    """MAD 0: the scale falls back to the standard deviation instead of the floor, so one count and a
    500-count burst do not both clip to the same value."""
    counts = np.zeros(256)
    counts[40], counts[90], counts[91] = 1.0, 500.0, 3.0
    out = preprocess(RawSample(seq_a=counts), CFG)["seq_a"]
    assert 0.0 < out[40] < out[91] < out[90] < np.arcsinh(CFG.seq_clip) and out[0] == 0.0  # not clipped


def test_bins_that_overflow_become_invalid_not_nan() -> None:
    seq = np.full(1000, 1.0)
    seq[:8] = 1.7e308  # a bin of four of these sums to inf
    out = preprocess(RawSample(seq_a=seq), CFG)
    assert torch.isfinite(out["seq_a"]).all()
    assert not out["seq_a_valid"][:2].any() and out["seq_a_valid"][2:].all()


def test_a_frame_with_no_finite_pixel_counts_as_absent() -> None:
    dead = np.full((48, 64), np.nan, np.float32)
    out = preprocess(RawSample(image_a=dead, image_b=np.ones((48, 64), np.float32)), CFG)
    assert out["presence"].tolist() == [False, True, False, False]
    assert torch.equal(out["image_a"], torch.zeros(1, 64, 64))
    as_lists = preprocess(RawSample(image_a=[[1.0, 2.0], [3.0, np.nan]]), CFG)  # any array-like, as before
    assert as_lists["presence"].tolist() == [True, False, False, False]


def test_series_without_valid_samples_counts_as_absent() -> None:
    out = preprocess(RawSample(seq_a=np.ones(256), seq_a_valid=np.zeros(256, dtype=bool)), CFG)
    assert out["presence"].tolist() == [False, False, False, False]
    assert torch.equal(out["seq_a"], torch.zeros(256))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 600),
    seed=st.integers(0, 2**31 - 1),
    p_valid=st.floats(0.0, 1.0),
)
def test_sequence_contract_properties(n: int, seed: int, p_valid: float) -> None:
    rng = np.random.default_rng(seed)
    seq = rng.normal(0.0, 1.0, n) * rng.uniform(0.01, 100)
    valid = rng.random(n) < p_valid
    out = preprocess(RawSample(seq_a=seq, seq_a_valid=valid), CFG)
    x, ok = out["seq_a"], out["seq_a_valid"]
    assert x.shape == (256,) and ok.shape == (256,)
    assert torch.isfinite(x).all()
    assert torch.equal(x[~ok], torch.zeros(int((~ok).sum())))
    if n <= 256:  # no binning: exactly the valid samples survive, in place
        assert int(ok.sum()) == int(valid.sum())
    assert bool(out["presence"][2]) == bool(ok.any())
    assert float(x.abs().max()) <= float(np.arcsinh(CFG.seq_clip)) + 1e-5


def test_collate_pads_boxes() -> None:
    samples = [preprocess(raw_from_scene(generate_scene(s)), CFG) for s in (1, 2, 3)]
    batch = collate(samples)
    n = [s["boxes"].shape[0] for s in samples]
    assert batch["boxes"].shape == (3, max(n), 4)
    assert batch["box_valid"].sum(1).tolist() == n
    assert batch["image_a"].shape == (3, 1, 64, 64) and batch["presence"].shape == (3, len(ROLES))
    for i, s in enumerate(samples):
        assert torch.equal(batch["boxes"][i, : n[i]], s["boxes"])
        assert torch.equal(batch["seq_a"][i], s["seq_a"])
    with pytest.raises(ValueError):
        collate([])


def test_scene_and_written_files_give_identical_tensors(tmp_path: Path) -> None:
    """The stream path (Scene in memory) and the file path (PNG/npy + labels) must not drift apart."""
    synth = SynthConfig()
    write_dataset(tmp_path, n_train=4, n_val=0, n_test=0, seed=21, cfg=synth)
    dataset = FourModalityDataset(tmp_path, "train")
    assert len(dataset) == 4
    for i in range(len(dataset)):
        from_files = preprocess(raw_from_dataset_item(dataset[i]), CFG)
        from_scene = preprocess(raw_from_scene(generate_scene(scene_seed(21, i, 0), synth)), CFG)
        assert from_files.keys() == from_scene.keys()
        for key in from_files:
            if key == "boxes":  # labels.jsonl stores boxes rounded to 1e-3 px
                torch.testing.assert_close(from_files[key], from_scene[key], atol=1e-3, rtol=0)
            else:
                assert torch.equal(from_files[key], from_scene[key]), key


@pytest.mark.skipif(not (SHARED / "fusion_testdata" / "TNO").is_dir(), reason="shared test data not present")
def test_real_ir_visible_pair() -> None:
    """Real 8-bit IR/visible frames (not star fields) still come out finite, bounded and in place."""
    tno = SHARED / "fusion_testdata" / "TNO"
    ir = np.asarray(Image.open(tno / "ir" / "01.png").convert("L"))
    vi = np.asarray(Image.open(tno / "vi" / "01.png").convert("L"))
    out = preprocess(RawSample(image_a=vi, image_b=ir), CFG)
    for key in ("image_a", "image_b"):
        x = out[key]
        assert torch.isfinite(x).all()
        assert float(x.min()) >= -0.3 and float(x.max()) <= 1.0
        assert float(x.std()) > 0.01  # structure survives the stretch
    assert float(out["scale_a"]) == pytest.approx(64 / max(vi.shape))
