"""Tests for the synthetic scene generator, its on-disk layout and the dataset reader.

The last test is the measured complementarity check: simple hand features and a numpy logistic
regression must find the image and sequence cues each insufficient and their combination better.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from model.dataset import DatasetLayoutError, FourModalityDataset, collate_raw
from model.preprocess import PreprocessConfig, preprocess, raw_from_dataset_item
from model.synth import (
    CLASS_NAMES,
    DEBRIS,
    FALSE_ALARM,
    MODALITY_DIRS,
    MOVING_CLASSES,
    NUM_CLASSES,
    ROCKET_BODY,
    SPIN,
    STABLE,
    STAR,
    Scene,
    SynthConfig,
    generate_scene,
    scene_seed,
    scene_stream,
    write_dataset,
)

CFG = SynthConfig()
# bright, uncluttered scenes, so that "the target's flux peak" is well defined in the noisy frame
BRIGHT = SynthConfig(snr_img=(400.0, 400.0), snr_seq=(2000.0, 2000.0), field_stars_mean=0.0, extra_objects_max=0)


def _scenes_per_class(cfg: SynthConfig, per_class: int, seed: int = 0) -> list[Scene]:
    return [
        generate_scene(np.random.SeedSequence([seed, cls, k]), cfg, target_class=cls)
        for cls in range(NUM_CLASSES)
        for k in range(per_class)
    ]


def _assert_scenes_equal(a: Scene, b: Scene) -> None:
    for f in fields(Scene):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if isinstance(va, np.ndarray):
            assert va.dtype == vb.dtype and np.array_equal(va, vb, equal_nan=va.dtype.kind == "f"), f.name
        else:
            assert va == vb, f.name


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ generator


def test_same_seed_same_scene_different_seed_differs() -> None:
    _assert_scenes_equal(generate_scene(7), generate_scene(7))
    _assert_scenes_equal(generate_scene(np.random.default_rng(7)), generate_scene(7))
    a, b = generate_scene(7), generate_scene(8)
    assert not np.array_equal(a.image_a, b.image_a)
    assert not np.array_equal(a.seq_a, b.seq_a)


def test_scene_shapes_and_dtypes_follow_config() -> None:
    cfg = SynthConfig(size=96, seq_len=128, seq_rate_hz=5.0)
    s = generate_scene(3, cfg)
    assert s.image_a.shape == s.image_b.shape == (96, 96) and s.image_a.dtype == np.uint16
    assert s.seq_a.shape == s.seq_b.shape == s.seq_t.shape == (128,)
    assert s.seq_a.dtype == s.seq_b.dtype == s.seq_t.dtype == np.float32
    assert s.seq_t[1] - s.seq_t[0] == pytest.approx(0.2)
    assert s.t_image_b - s.t_image_a == pytest.approx(cfg.frame_gap * cfg.t_exp_s)
    assert s.t_image_a >= 0.0 and s.t_image_b + cfg.t_exp_s <= 128 / 5.0


def test_labels_are_consistent() -> None:
    for s in _scenes_per_class(CFG, 8):
        size = CFG.size
        n = s.boxes.shape[0]
        assert s.boxes_b.shape == (n, 4) and s.object_classes.shape == (n,)
        assert s.object_classes[0] == s.target_class
        assert np.all((s.object_classes >= 0) & (s.object_classes < NUM_CLASSES))
        assert np.isfinite(s.boxes).all()
        for boxes in (s.boxes, s.boxes_b[~np.isnan(s.boxes_b).any(1)]):
            assert np.all(boxes >= 0.0) and np.all(boxes <= size)
            assert np.all(boxes[:, 2] - boxes[:, 0] >= 1.0) and np.all(boxes[:, 3] - boxes[:, 1] >= 1.0)
        assert s.low_snr == (s.snr_img < CFG.low_snr_img or s.snr_seq < CFG.low_snr_seq)
        assert CFG.snr_seq[0] <= s.snr_seq <= CFG.snr_seq[1]
        # the tracked target is centred on its A-to-B track, within the +-3 px jitter
        a_box, b_box = s.boxes[0], s.boxes_b[0]
        track = a_box if np.isnan(b_box).any() else np.concatenate([a_box, b_box]).reshape(2, 4)
        lo, hi = np.min(track[..., :2].reshape(-1, 2), 0), np.max(track[..., 2:].reshape(-1, 2), 0)
        assert np.all(np.abs((lo + hi) / 2 - size / 2) <= 3.0 + 1.0)


def _peak_xy(img: np.ndarray) -> tuple[float, float]:
    sub = img.astype(np.float64) - np.median(img)
    r, c = np.unravel_index(np.argmax(sub), sub.shape)
    return c + 0.5, r + 0.5  # pixel centre in box coordinates


def _inside(box: np.ndarray, xy: tuple[float, float]) -> bool:
    return bool(box[0] <= xy[0] <= box[2] and box[1] <= xy[1] <= box[3])


def test_target_box_contains_its_flux_peak_in_both_frames() -> None:
    for s in _scenes_per_class(BRIGHT, 6, seed=1):
        assert s.boxes.shape[0] == 1  # only the target in this config
        assert _inside(s.boxes[0], _peak_xy(s.image_a)), CLASS_NAMES[s.target_class]
        if not np.isnan(s.boxes_b[0]).any():
            assert _inside(s.boxes_b[0], _peak_xy(s.image_b)), CLASS_NAMES[s.target_class]


def test_class_geometry_in_the_frames() -> None:
    """Stars and hot pixels sit still between A and B, RSOs move, cosmic rays hit A only."""
    for s in _scenes_per_class(BRIGHT, 6, seed=2):
        a, b = s.boxes[0], s.boxes_b[0]
        centre_shift = float(np.hypot(*((a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2)))
        if s.target_class == STAR or s.false_alarm_kind == "hot_pixel":
            assert centre_shift == pytest.approx(0.0, abs=1e-5)
        elif s.false_alarm_kind == "cosmic_ray":
            assert np.isnan(b).all()
            bg = np.median(s.image_b)
            assert s.image_b[int(a[1]) : int(a[3]), int(a[0]) : int(a[2])].max() < bg + 60  # nothing there
        else:
            assert s.target_class in MOVING_CLASSES
            assert centre_shift > CFG.frame_gap * CFG.streak_px[0] * 0.8


def test_false_alarms_are_sharper_than_the_psf() -> None:
    def peak_fraction(s: Scene) -> float:
        sub = s.image_a.astype(np.float64) - np.median(s.image_a)
        r, c = np.unravel_index(np.argmax(sub), sub.shape)
        return float(sub[r, c] / sub[max(r - 3, 0) : r + 4, max(c - 3, 0) : c + 4].sum())

    stars = [peak_fraction(generate_scene(np.random.SeedSequence([3, k]), BRIGHT, STAR)) for k in range(6)]
    hot = [
        s
        for s in (generate_scene(np.random.SeedSequence([4, k]), BRIGHT, FALSE_ALARM) for k in range(12))
        if s.false_alarm_kind == "hot_pixel"
    ]
    assert hot, "expected some hot-pixel false alarms"
    assert min(peak_fraction(s) for s in hot) > 0.9 > 0.3 > max(stars)


def test_light_curves_carry_the_class_physics() -> None:
    cfg = replace(BRIGHT, eclipse_prob=0.0)
    for s in _scenes_per_class(cfg, 4, seed=5):
        a, b = s.seq_a.astype(np.float64), s.seq_b.astype(np.float64)
        if s.target_class == STAR:
            assert abs(b.mean() - 1.0) < 0.01 and b.std() < 0.01  # flat in IR
            assert 0.005 < a.std() < 0.1  # scintillation
        elif s.false_alarm_kind == "cosmic_ray":
            assert np.sum(a > 2.0) == 1 and np.abs(b).max() < 0.01  # one spike, nothing in IR
        elif s.false_alarm_kind == "hot_pixel":
            assert a.std() < 0.01 and b.std() < 0.01
        elif s.target_class == SPIN:
            spec = np.abs(np.fft.rfft(a - a.mean())) ** 2
            k = int(np.argmax(spec[1:])) + 1
            period = len(a) / cfg.seq_rate_hz / k
            assert 1.5 < period < 14.0 and b.std() < a.std()
        elif s.target_class == ROCKET_BODY:
            assert a.max() > 1.5 and b.max() < 1.6  # glints in the visible band only
        if s.target_class in MOVING_CLASSES or s.target_class == STAR:
            assert np.all(b > -0.05)  # IR flux never meaningfully negative at this SNR
    debris = generate_scene(9, cfg, DEBRIS)
    assert debris.seq_a.min() > 0.0


def test_eclipse_switches_off_reflected_light_only() -> None:
    cfg = replace(BRIGHT, eclipse_prob=1.0, stable_glint_prob=0.0)
    s = generate_scene(11, cfg, STABLE)
    assert s.seq_a[-1] < 0.05  # dark by the end: the ramp starts by 0.6 of the 25.6 s window, lasts <= 10 s
    assert abs(float(s.seq_b[-20:].mean()) - 1.0) < 0.1


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        SynthConfig(size=16)
    with pytest.raises(ValueError):
        SynthConfig(class_probs=(1.0, 0.0))
    with pytest.raises(ValueError):
        generate_scene(0, CFG, target_class=6)
    only_rb = SynthConfig(class_probs=(0, 0, 0, 1, 0, 0))
    assert {generate_scene(k, only_rb).target_class for k in range(5)} == {ROCKET_BODY}


def test_stream_is_reproducible_and_independent_of_start() -> None:
    stream = scene_stream(5, CFG)
    first = [next(stream) for _ in range(3)]
    _assert_scenes_equal(first[2], next(scene_stream(5, CFG, start=2)))
    _assert_scenes_equal(first[1], generate_scene(scene_seed(5, 1), CFG))


# ------------------------------------------------------------------------------- layout and reader


def test_write_dataset_is_byte_deterministic(tmp_path: Path) -> None:
    write_dataset(tmp_path / "a", 3, 2, 1, seed=42)
    write_dataset(tmp_path / "b", 3, 2, 1, seed=42)
    write_dataset(tmp_path / "c", 3, 2, 1, seed=43)
    a, b, c = (_tree_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert a["train/Image-A/000000.png"] != c["train/Image-A/000000.png"]
    assert a["train/labels.jsonl"] != c["train/labels.jsonl"]
    expected = {
        f"{split}/{m}/{i:06d}.{'png' if m.startswith('Image') else 'npy'}"
        for split, n in (("train", 3), ("val", 2), ("test", 1))
        for m in MODALITY_DIRS
        for i in range(n)
    }
    assert expected | {"dataset.json", "train/labels.jsonl", "val/labels.jsonl", "test/labels.jsonl"} == a.keys()


def test_round_trip_through_the_layout(tmp_path: Path) -> None:
    write_dataset(tmp_path, 5, 2, 2, seed=9)
    ds = FourModalityDataset(tmp_path, "train")
    assert len(ds) == 5
    for i, scene in enumerate(scene_stream(9, CFG, stream=0)):
        if i == 5:
            break
        item = ds[i]
        assert item["id"] == f"{i:06d}"
        for key in ("image_a", "image_b", "seq_a", "seq_b"):
            ref = getattr(scene, key)
            assert item[key].dtype == ref.dtype and np.array_equal(item[key], ref), key
        assert item["label"] == scene.target_class
        np.testing.assert_allclose(item["boxes"], scene.boxes, atol=1e-3)
        np.testing.assert_allclose(item["boxes_b"], scene.boxes_b, atol=1e-3)  # NaN rows match NaN rows
        assert np.array_equal(item["object_classes"], scene.object_classes)
        assert item["low_snr"] == scene.low_snr and item["snr_seq"] == pytest.approx(scene.snr_seq, abs=1e-4)
    rec = json.loads((tmp_path / "val" / "labels.jsonl").read_text().splitlines()[0])
    assert rec["class_name"] == CLASS_NAMES[rec["class"]]
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["seed"] == 9 and meta["config"]["size"] == CFG.size

    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_raw)))
    assert batch["image_a"].shape == (4, CFG.size, CFG.size) and batch["image_a"].dtype == torch.int32
    assert batch["seq_b"].shape == (4, CFG.seq_len) and batch["label"].shape == (4,)
    assert int(batch["image_a"][1].max()) == int(ds[1]["image_a"].max())
    assert len(batch["boxes"]) == 4


def test_refuses_to_mix_with_an_existing_dataset(tmp_path: Path) -> None:
    write_dataset(tmp_path, 2, 1, 1, seed=1)
    with pytest.raises(FileExistsError):
        write_dataset(tmp_path, 1, 1, 1, seed=2)
    write_dataset(tmp_path, 1, 1, 1, seed=2, overwrite=True)
    assert len(FourModalityDataset(tmp_path, "train")) == 1
    with pytest.raises(ValueError, match="seed must be >= 0"):  # refused before anything is written
        write_dataset(tmp_path / "neg", 1, 1, 1, seed=-1)
    assert not (tmp_path / "neg").exists()


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (lambda d: (d / "Seq-B" / "000001.npy").unlink(), r"Seq-B: no file for 1 labelled id.*000001"),
        (
            lambda d: (d / "Image-A" / "000001.png").rename(d / "Image-A" / "000009.png"),
            r"Image-A: 1 file\(s\) without",
        ),
        (lambda d: (d / "labels.jsonl").unlink(), "missing labels file"),
        (lambda d: np.save(d / "Image-B" / "000000.npy", np.zeros((4, 4))), "two files for id '000000'"),
        (lambda d: (d / "Seq-A" / "notes.csv").write_text("x"), "unexpected file"),
        (
            lambda d: (d / "labels.jsonl").write_text('{"id": "000000", "class": 6}\n'),
            "'class' must be an integer in \\[0, 6\\), got 6",
        ),
        (
            lambda d: (d / "labels.jsonl").write_text('{"id": "a", "class": 1}\n{"id": "a", "class": 2}\n'),
            "duplicate id",
        ),
    ],
)
def test_layout_errors_are_explicit(tmp_path: Path, breakage: Callable[[Path], object], message: str) -> None:
    write_dataset(tmp_path, 3, 0, 0, seed=3)
    breakage(tmp_path / "train")
    with pytest.raises(DatasetLayoutError, match=message):
        FourModalityDataset(tmp_path, "train")


def test_bad_array_shapes_fail_at_load(tmp_path: Path) -> None:
    write_dataset(tmp_path, 2, 0, 0, seed=4)
    np.save(tmp_path / "train" / "Seq-A" / "000001.npy", np.zeros((8, 2), dtype=np.float32))
    ds = FourModalityDataset(tmp_path, "train")
    ds[0]
    with pytest.raises(DatasetLayoutError, match="1-D"):
        ds[1]
    with pytest.raises(DatasetLayoutError, match="missing split"):
        FourModalityDataset(tmp_path, "val_typo")


def test_user_layout_with_text_sequences_and_float_images(tmp_path: Path) -> None:
    split = tmp_path / "train"
    for m in MODALITY_DIRS:
        (split / m).mkdir(parents=True)
    np.save(split / "Image-A" / "x1.npy", np.full((8, 8), 0.5, dtype=np.float32))
    np.save(split / "Image-B" / "x1.npy", np.ones((8, 8), dtype=np.float32))
    np.savetxt(split / "Seq-A" / "x1.txt", np.arange(5.0))
    np.savetxt(split / "Seq-B" / "x1.txt", np.arange(5.0) * 2)
    (split / "labels.jsonl").write_text('{"id": "x1", "class": 4}\n')
    item = FourModalityDataset(tmp_path)[0]
    assert item["label"] == DEBRIS and item["boxes"].shape == (0, 4) and math.isnan(item["snr_img"])
    assert np.array_equal(item["seq_b"], np.arange(5.0, dtype=np.float32) * 2)
    batch = collate_raw([item])
    assert batch["image_a"].dtype == torch.float32 and float(batch["image_a"][0, 0, 0]) == 0.5
    # no "boxes" key: no box labels (skipped by the detection loss and scoring); "boxes": [] is a labelled
    # empty frame, whose detections are false positives (it was taken for unlabelled)
    (split / "labels.jsonl").write_text('{"id": "x1", "class": 4, "boxes": [], "boxes_b": [], "object_classes": []}\n')
    empty = FourModalityDataset(tmp_path)[0]
    assert (item["boxes_known"], empty["boxes_known"]) == (False, True)
    pcfg = PreprocessConfig(frame_size=8, seq_len=5)
    known = [bool(preprocess(raw_from_dataset_item(x), pcfg)["boxes_known"]) for x in (item, empty)]
    assert known == [False, True]
    assert collate_raw([item, empty])["boxes_known"].tolist() == [False, True]


# ---------------------------------------------------------------------- measured complementarity check


def _robust(x: np.ndarray) -> tuple[np.ndarray, float]:
    med = np.median(x)
    return x - med, float(np.median(np.abs(x - med)) * 1.4826 + 1e-9)


def image_features(img_a: np.ndarray, img_b: np.ndarray, box: np.ndarray) -> np.ndarray:
    """Pixel statistics in a 24 px window at the target's Image-A box centre (the box shape is not used)."""
    a, sa = _robust(img_a.astype(np.float64))
    b, sb = _robust(img_b.astype(np.float64))
    cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
    y0, x0 = max(cy - 12, 0), max(cx - 12, 0)
    wa, wb = a[y0 : cy + 12, x0 : cx + 12], b[y0 : cy + 12, x0 : cx + 12]
    ry, rx = max(cy - y0 - 4, 0), max(cx - x0 - 4, 0)
    core = wa[ry : ry + 9, rx : rx + 9]
    py, px = np.unravel_index(np.argmax(core), core.shape)
    py, px = py + ry, px + rx

    def stamp(img: np.ndarray, r: int) -> np.ndarray:
        return img[max(py - r, 0) : py + r + 1, max(px - r, 0) : px + r + 1]

    s3a, s9a, s9b = stamp(wa, 1).sum(), stamp(wa, 4).sum(), stamp(wb, 4).sum()
    m = np.clip(wa, 0, None) * (wa > 2.5 * sa)  # second moments of the significant pixels: elongation
    tot = m.sum() + 1e-9
    yy, xx = np.mgrid[0 : wa.shape[0], 0 : wa.shape[1]]
    my, mx = (m * yy).sum() / tot, (m * xx).sum() / tot
    cyy, cxx = (m * (yy - my) ** 2).sum() / tot, (m * (xx - mx) ** 2).sum() / tot
    cxy = (m * (yy - my) * (xx - mx)).sum() / tot
    disc = math.sqrt(max((cxx + cyy) ** 2 / 4 - (cxx * cyy - cxy**2), 0.0))
    l2 = max((cxx + cyy) / 2 - disc, 1e-3)
    l1 = max((cxx + cyy) / 2 + disc, l2)
    return np.array(
        [
            np.arcsinh(wa[py, px] / sa),
            np.arcsinh(s9a / sa),
            wa[py, px] / (abs(s3a) + sa),  # sharpness
            s3a / (abs(s9a) + 3 * sa),
            math.log(l1),
            math.log(l1 / l2),
            math.log1p((wa > 2.5 * sa).sum()),
            math.log1p((wb > 2.5 * sb).sum()),
            np.arcsinh(s9b / sb),
            np.arcsinh(stamp(wb, 1).max() / sb),
            np.corrcoef(wa.ravel(), wb.ravel())[0, 1],  # A/B persistence
            s9b / (abs(s9a) + 3 * sa),
            np.arcsinh(wb.max() / sb),
        ]
    )


def seq_features(seq_a: np.ndarray, seq_b: np.ndarray) -> np.ndarray:
    """Moments, white-noise level vs excess variance, periodogram peak and harmonic, autocorrelation."""
    out: list[float] = []
    n = seq_a.size
    idx = np.arange(n)
    for s in (seq_a.astype(np.float64), seq_b.astype(np.float64)):
        noise = np.std(np.diff(s)) / math.sqrt(2) + 1e-9
        med, std = np.median(s), s.std() + 1e-9
        z = (s - s.mean()) / std
        power = np.abs(np.fft.rfft((s - np.polyval(np.polyfit(idx, s, 1), idx)) * np.hanning(n))) ** 2
        power[0] = 0.0
        p = power / (power.sum() + 1e-12)
        k = int(np.argmax(power[1:])) + 1
        smooth = np.convolve(s, np.ones(15) / 15, mode="valid")
        out += [
            s.mean(),
            math.log(std),
            math.log(noise),
            (z**3).mean(),
            math.log((z**4).mean()),
            math.log(k),
            p[k],
            math.log(p[min(2 * k, p.size - 1)] / (p[k] + 1e-12) + 1e-6),
            -(p * np.log(p + 1e-12)).sum(),
            *(np.corrcoef(s[:-lag], s[lag:])[0, 1] for lag in (1, 3, 10, 30)),
            smooth.min() - med,
            smooth.max() - med,
            math.log1p(max(std**2 - noise**2, 0.0) / noise**2),
            np.arcsinh((s.max() - med) / noise),
            math.log1p(((s - med) > 4 * noise).sum()),
        ]
    out.append(np.corrcoef(seq_a, seq_b)[0, 1])
    return np.nan_to_num(np.asarray(out))


def _fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """Multinomial logistic regression (L2, momentum gradient descent) on robust-scaled features."""
    med = np.median(x_train, 0)
    scale = np.median(np.abs(x_train - med), 0) * 1.4826 + 1e-6

    def prep(x: np.ndarray) -> np.ndarray:
        z = np.clip((x - med) / scale, -6, 6)
        return np.concatenate([z, z**2 / 4, np.tanh(z)], 1)  # cheap non-linearity

    xt, xe = prep(x_train), prep(x_test)
    onehot = np.eye(NUM_CLASSES)[y_train]
    w, b = np.zeros((xt.shape[1], NUM_CLASSES)), np.zeros(NUM_CLASSES)
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    for _ in range(1500):
        logits = xt @ w + b
        prob = np.exp(logits - logits.max(1, keepdims=True))
        grad = (prob / prob.sum(1, keepdims=True) - onehot) / len(xt)
        vw = 0.9 * vw - 0.5 * (xt.T @ grad + 1e-2 * w)
        vb = 0.9 * vb - 0.5 * grad.sum(0)
        w, b = w + vw, b + vb
    return np.argmax(xe @ w + b, 1)


def macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    scores = []
    for c in range(NUM_CLASSES):
        tp = np.sum((pred == c) & (y == c))
        scores.append(2 * tp / max(2 * tp + np.sum((pred == c) & (y != c)) + np.sum((pred != c) & (y == c)), 1))
    return float(np.mean(scores))


def complementarity_f1(n: int, seed: int, cfg: SynthConfig = CFG) -> dict[str, float]:
    """Macro-F1 of image-only, sequence-only and both feature sets (2/3 train, 1/3 test, balanced)."""
    img, seq, y = [], [], []
    for k in range(n):
        s = generate_scene(scene_seed(seed, k), cfg, target_class=k % NUM_CLASSES)
        img.append(image_features(s.image_a, s.image_b, s.boxes[0]))
        seq.append(seq_features(s.seq_a, s.seq_b))
        y.append(s.target_class)
    x_img, x_seq, labels = np.nan_to_num(np.asarray(img)), np.asarray(seq), np.asarray(y)
    cut = 2 * n // 3
    result = {}
    for name, x in (("image", x_img), ("sequence", x_seq), ("both", np.concatenate([x_img, x_seq], 1))):
        result[name] = macro_f1(labels[cut:], _fit_predict(x[:cut], labels[:cut], x[cut:]))
    return result


@pytest.mark.slow
def test_image_and_sequence_cues_are_complementary() -> None:
    f1 = complementarity_f1(n=900, seed=123)
    # design aims (sacmf.md 5.3): image-only weak, sequence-only good, both clearly better than either
    assert 0.3 < f1["image"] < 0.6
    assert f1["image"] + 0.1 < f1["sequence"] < 0.9
    assert f1["both"] > f1["sequence"] + 0.05
