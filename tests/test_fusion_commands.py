"""The pixel-fusion toolkit: `sacmf fuse`, `fusion-metrics`, `bench-fusion`, the daemon stage and its config.

Real images (TNO, RoadScene crops from ../shared/fusion_testdata) and the golden CDDFuse weights; expected
values are computed here along an independent path (the network's own module, numpy colour maths),
never taken from the code under test.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daemon import cli
from daemon import config as config_mod
from daemon.fusion_commands import Progress, bench_table, read_gray255, run_bench
from daemon.fusion_stage import FusionStage, frame_quality, to_unit
from model import fusion, fusion_metrics

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DATA = SHARED / "fusion_testdata"
CDDFUSE_W = SHARED / "golden" / "cddfuse" / "weights.safetensors"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data missing at {DATA}")
needs_golden = pytest.mark.skipif(not CDDFUSE_W.is_file(), reason=f"golden weights missing at {CDDFUSE_W}")

torch.set_num_threads(1)

# (source name, crop rows, crop cols): two gray TNO pairs (one of odd size) and one colour RoadScene pair
CROPS = {
    "01": ("TNO", "01.png", slice(100, 196), slice(200, 328)),
    "07": ("TNO", "07.png", slice(0, 77), slice(0, 101)),
    "FLIR_00211": ("RoadScene", "FLIR_00211.jpg", slice(100, 196), slice(150, 278)),
}
COLOUR = "FLIR_00211"


def _gray(img: np.ndarray) -> np.ndarray:
    return img[..., 0] if img.ndim == 3 else img


def _luma(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _chroma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 (B - Y, R - Y) on the 0-255 scale: what 'colour preserved' means for a changed Y."""
    y = _luma(rgb)
    return np.stack([rgb[..., 2] - y, rgb[..., 0] - y], axis=-1)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Small crops written as lossless PNGs: {'dir': root, name: (ir uint8 (H,W), vi uint8 (H,W) or (H,W,3))}."""
    if not DATA.is_dir():
        pytest.skip(f"shared test data missing at {DATA}")
    root = tmp_path_factory.mktemp("pairs")
    (root / "ir").mkdir()
    (root / "vi").mkdir()
    out: dict[str, object] = {"dir": root}
    for name, (dataset, file, rows, cols) in CROPS.items():
        ir = _gray(np.asarray(Image.open(DATA / dataset / "ir" / file)))[rows, cols]
        vi = np.asarray(Image.open(DATA / dataset / "vi" / file).convert("RGB"))[rows, cols]
        if np.array_equal(vi[..., 0], vi[..., 1]) and np.array_equal(vi[..., 1], vi[..., 2]):
            vi = vi[..., 0]
        Image.fromarray(np.ascontiguousarray(ir)).save(root / "ir" / f"{name}.png")
        Image.fromarray(np.ascontiguousarray(vi)).save(root / "vi" / f"{name}.png")
        out[name] = (ir, vi)
    return out


def _fuse_cli(pairs: dict[str, object], out: Path, *extra: str) -> int:
    root = pairs["dir"]
    return cli.main(["fuse", "--ir", str(root / "ir"), "--vi", str(root / "vi"), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def mean_out(pairs: dict[str, object], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mean")
    assert _fuse_cli(pairs, out, "--method", "mean") == 0
    return out


@pytest.fixture(scope="module")
def cddfuse_model() -> torch.nn.Module:
    if not CDDFUSE_W.is_file():
        pytest.skip("golden CDDFuse weights missing")
    from model.cddfuse import load_CDDFuse

    return load_CDDFuse(CDDFUSE_W)


def _cddfuse_reference(model: torch.nn.Module, ir: np.ndarray, vi_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(raw sigmoid, authors' stretched 0-255) straight from model.cddfuse, bypassing the toolkit."""
    from model.cddfuse import fuse_CDDFuse, stretch

    t_ir = torch.from_numpy(ir.astype(np.float32) / 255)[None, None]
    t_vi = torch.from_numpy(vi_y.astype(np.float32) / 255)[None, None]
    raw = fuse_CDDFuse(model, t_ir, t_vi)
    return raw[0, 0].numpy().astype(np.float64), stretch(raw)[0, 0].numpy().astype(np.float64)


# ------------------------------------------------------------------------------------------------
# fuse


@needs_data
def test_fuse_mean_end_to_end(pairs: dict[str, object], mean_out: Path, capsys: pytest.CaptureFixture) -> None:
    for name in CROPS:
        ir, vi = pairs[name]
        out = np.asarray(Image.open(mean_out / f"{name}.png"))
        assert out.shape[:2] == ir.shape and out.dtype == np.uint8
        if name == COLOUR:
            assert out.ndim == 3
            expected_y = (ir.astype(np.float64) + _luma(vi)) / 2
            assert np.abs(_luma(out) - expected_y).max() <= 1.5
            # colour preserved: the visible image's chroma where the new Y leaves room for it
            d = np.abs(_chroma(out) - _chroma(vi))
            assert np.median(d) <= 1.0 and np.mean(d <= 2.0) > 0.9
        else:
            assert out.ndim == 2
            assert np.abs(out.astype(np.float64) - (ir.astype(np.float64) + vi) / 2).max() <= 0.5 + 1e-9


@needs_data
def test_fuse_progress_goes_to_stderr_as_plain_lines(pairs: dict[str, object], tmp_path: Path, capsys) -> None:
    assert _fuse_cli(pairs, tmp_path, "--method", "mean") == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("fuse mean ")]
    assert [ln.split()[2] for ln in lines] == ["1/3", "2/3", "3/3"]
    assert all(ln.split()[4].replace(".", "").isdigit() and ln.split()[5] == "s" for ln in lines)  # time/image
    assert "\r" not in err and "fused 3 pair(s)" in err


@needs_data
@needs_golden
def test_fuse_cddfuse_golden_end_to_end(pairs: dict[str, object], cddfuse_model, tmp_path: Path) -> None:
    assert _fuse_cli(pairs, tmp_path, "--method", "cddfuse", "--ckpt", str(CDDFUSE_W), "--threads", "1") == 0
    for name in CROPS:
        ir, vi = pairs[name]
        out = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(np.float64)
        assert out.shape[:2] == ir.shape
        vi_y = _luma(vi) if vi.ndim == 3 else vi.astype(np.float64)
        _, expected = _cddfuse_reference(cddfuse_model, ir, np.round(vi_y) if vi.ndim == 2 else vi_y)
        if name == COLOUR:
            assert out.ndim == 3 and np.abs(out[..., 0] - out[..., 2]).mean() > 1  # not gray
            assert np.abs(_luma(out) - expected).max() <= 2.0
            d = np.abs(_chroma(out) - _chroma(vi))
            assert np.median(d) <= 1.0 and np.mean(d <= 2.0) > 0.8
        else:
            assert out.ndim == 2 and out.min() == 0 and out.max() == 255  # the authors' per-image stretch
            assert np.abs(out - expected).max() <= 0.5 + 1e-4


@needs_data
@needs_golden
def test_fuse_16_bit_output_and_no_stretch(pairs: dict[str, object], cddfuse_model, tmp_path: Path) -> None:
    root = tmp_path / "one"
    for sub in ("ir", "vi"):
        (root / sub).mkdir(parents=True)
        (root / sub / "01.png").write_bytes((pairs["dir"] / sub / "01.png").read_bytes())
    rc = cli.main(
        ["fuse", "--method", "cddfuse", "--ckpt", str(CDDFUSE_W), "--ir", str(root / "ir"), "--vi", str(root / "vi")]
        + ["--out", str(tmp_path / "out"), "--bits", "16", "--no-stretch"]
    )
    assert rc == 0
    with Image.open(tmp_path / "out" / "01.png") as im:
        assert im.mode.startswith("I;16")
        out = np.asarray(im).astype(np.float64)
    ir, vi = pairs["01"]
    raw, _ = _cddfuse_reference(cddfuse_model, ir, vi)
    assert np.abs(out - raw * 65535).max() <= 1.0  # no stretch: the raw sigmoid at full 16-bit depth
    assert out.max() < 65535 * raw.max() + 2 and out.min() > 0  # i.e. not min-max stretched


@needs_data
def test_fuse_16_bit_input_keeps_16_bits(pairs: dict[str, object], tmp_path: Path) -> None:
    ir, vi = (a.astype(np.uint16) * 257 + 100 for a in pairs["01"])  # 16-bit data, not just 8-bit scaled
    for sub, img in (("ir", ir), ("vi", vi)):
        (tmp_path / sub).mkdir()
        Image.fromarray(img).save(tmp_path / sub / "x.png")
    rc = cli.main(["fuse", "--method", "mean", "--ir", str(tmp_path / "ir"), "--vi", str(tmp_path / "vi")]
                  + ["--out", str(tmp_path / "out")])  # fmt: skip
    assert rc == 0
    out = np.asarray(Image.open(tmp_path / "out" / "x.png"))
    assert out.dtype == np.uint16
    assert np.abs(out.astype(np.float64) - (ir.astype(np.float64) + vi) / 2).max() <= 0.5 + 1e-6


@needs_data
def test_tiled_mean_is_exact_at_any_size(pairs: dict[str, object], mean_out: Path, tmp_path: Path) -> None:
    """Pixel-wise fusion has no receptive field: blended tiles equal the one-pass result (to float rounding,
    which can flip a half level when the file is written)."""
    assert _fuse_cli(pairs, tmp_path, "--method", "mean", "--tile", "40", "--overlap", "12") == 0
    for name in CROPS:
        tiled = np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int)
        assert tiled.shape == np.asarray(Image.open(mean_out / f"{name}.png")).shape
        assert np.abs(tiled - np.asarray(Image.open(mean_out / f"{name}.png"))).max() <= 1
    ir, vi = (torch.from_numpy(a.astype(np.float32) / 255)[None, None] for a in pairs["07"])  # 77 x 101
    method = fusion.get_method("mean")
    whole = fusion.fuse_tensors(method, None, ir, vi)
    for tile, overlap in ((40, 12), (33, 0), (64, 31)):
        tiled = fusion.fuse_tensors(method, None, ir, vi, tile=tile, overlap=overlap)
        assert torch.allclose(tiled, whole, rtol=0, atol=1e-6)


@needs_data
@needs_golden
def test_tiled_cddfuse_matches_whole_image_away_from_borders(pairs: dict[str, object], cddfuse_model) -> None:
    """CDDFuse's channel attention uses whole-tile statistics, so tiles cannot be bit-exact (docs/FUSION.md);
    the blended result must still be within a small fraction of the output range of the one-pass result."""
    ir, vi = pairs["01"]
    t_ir = torch.from_numpy(ir.astype(np.float32) / 255)[None, None]
    t_vi = torch.from_numpy(vi.astype(np.float32) / 255)[None, None]
    method = fusion.get_method("cddfuse")
    whole, _ = _cddfuse_reference(cddfuse_model, ir, vi)
    tiled = fusion.fuse_tensors(method, cddfuse_model, t_ir, t_vi, tile=64, overlap=32)[0, 0].numpy()
    assert tiled.shape == whole.shape
    span = whole.max() - whole.min()
    diff = np.abs(tiled - whole)[8:-8, 8:-8]
    assert diff.max() <= 0.03 * span and diff.mean() <= 0.005 * span
    assert np.corrcoef(tiled.ravel(), whole.ravel())[0, 1] > 0.995


@needs_data
@pytest.mark.parametrize("size", [(96, 128), (104, 128), (101, 131)])
def test_tiled_crossfuse_matches_whole_image_away_from_borders(size) -> None:
    """CrossFuse tiles started off its 16-px token grid and were padded where the one-pass forward floors
    and centres: on a 104-row crop one tile row came out up to 74 % of the output range away from the
    one-pass result (64-px tiles, 32 px overlap). Its attention still sees only its tile (docs/FUSION.md)."""
    weights = SHARED / "golden" / "crossfuse" / "weights.safetensors"
    if not weights.is_file():
        pytest.skip(f"golden weights missing at {weights}")
    method, model = fusion.load_method("crossfuse", weights)
    ir, vi = (np.asarray(Image.open(DATA / "TNO" / side / "01.png").convert("L")) for side in ("ir", "vi"))
    h, w = size
    t_ir = torch.from_numpy(ir[200 : 200 + h, 300 : 300 + w].astype(np.float32) / 255)[None, None]
    t_vi = torch.from_numpy(vi[200 : 200 + h, 300 : 300 + w].astype(np.float32) / 255)[None, None]
    whole = fusion.fuse_tensors(method, model, t_ir, t_vi)[0, 0].numpy()
    tiled = fusion.fuse_tensors(method, model, t_ir, t_vi, tile=64, overlap=32)[0, 0].numpy()
    span = whole.max() - whole.min()
    diff = np.abs(tiled - whole)[16:-16, 16:-16]
    assert diff.max() <= 0.03 * span and diff.mean() <= 0.006 * span, (diff.max() / span, diff.mean() / span)


@needs_data
def test_unpaired_and_unreadable_files_are_all_listed(pairs: dict[str, object], tmp_path: Path, capsys) -> None:
    for sub in ("ir", "vi"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "01.png").write_bytes((pairs["dir"] / sub / "01.png").read_bytes())
    (tmp_path / "ir" / "only_ir.png").write_bytes((pairs["dir"] / "ir" / "07.png").read_bytes())
    (tmp_path / "vi" / "only_vi.png").write_bytes((pairs["dir"] / "vi" / "07.png").read_bytes())
    (tmp_path / "ir" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "vi" / "broken.png").write_bytes((pairs["dir"] / "vi" / "07.png").read_bytes())
    out = tmp_path / "out"
    rc = cli.main(["fuse", "--method", "mean", "--ir", str(tmp_path / "ir"), "--vi", str(tmp_path / "vi")]
                  + ["--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert "only_ir.png" in err and "only_vi.png" in err and "broken.png" in err and "unreadable" in err
    assert not out.exists() or not any(out.iterdir())  # nothing fused before the folders pair up


def test_network_without_checkpoint_is_a_clear_error(pairs: dict[str, object], tmp_path: Path, capsys) -> None:
    _one_pair(pairs, tmp_path)
    rc = cli.main(["fuse", "--method", "cmmdl", "--ir", str(tmp_path / "ir"), "--vi", str(tmp_path / "vi")]
                  + ["--out", str(tmp_path / "o")])  # fmt: skip
    assert rc == 2 and "needs a checkpoint" in capsys.readouterr().err


def _one_pair(pairs: dict[str, object], root: Path, name: str = "07") -> None:
    for sub in ("ir", "vi"):
        (root / sub).mkdir(exist_ok=True)
        (root / sub / f"{name}.png").write_bytes((pairs["dir"] / sub / f"{name}.png").read_bytes())


def _fuse(root: Path, *extra: str, method: str = "mean") -> int:
    return cli.main(["fuse", "--method", method, "--ir", str(root / "ir"), "--vi", str(root / "vi"), *extra])


@needs_golden
def test_tile_options_are_checked_before_any_work_and_a_small_tile_gets_a_fitting_overlap(
    pairs, tmp_path: Path, capsys
) -> None:
    """--tile 8 with CrossFuse (under its 16-px grid) failed image by image after the weights had loaded,
    exit 1; plain --tile 64 failed every image, its default overlap (64) not being under the tile."""
    _one_pair(pairs, tmp_path)
    crossfuse = str(SHARED / "golden" / "crossfuse" / "weights.safetensors")
    assert _fuse(tmp_path, "--ckpt", crossfuse, "--tile", "8", "--out", str(tmp_path / "a"), method="crossfuse") == 2
    assert "crossfuse: tile must be >= 16 px" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert (
        _fuse(tmp_path, "--ckpt", str(CDDFUSE_W), "--tile", "32", "--out", str(tmp_path / "b"), method="cddfuse") == 0
    )
    assert (tmp_path / "b" / "07.png").is_file()  # 77 x 101 in 32-px tiles, overlap 16 (the default 64, capped)
    assert _fuse(tmp_path, "--tile", "32", "--overlap", "32", "--out", str(tmp_path / "c")) == 2
    assert "mean: overlap must be in [0, 31] for tile 32, got 32" in capsys.readouterr().err


def test_fuse_refuses_an_out_folder_that_would_overwrite_its_inputs(pairs, tmp_path: Path, capsys) -> None:
    _one_pair(pairs, tmp_path)
    before = (tmp_path / "ir" / "07.png").read_bytes()
    assert _fuse(tmp_path, "--out", str(tmp_path / "ir")) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert (tmp_path / "ir" / "07.png").read_bytes() == before


def test_fuse_errors_for_empty_folders_a_bad_checkpoint_and_an_out_that_is_a_file(pairs, tmp_path: Path, capsys):
    for sub in ("ir", "vi"):
        (tmp_path / "empty" / sub).mkdir(parents=True)
    assert _fuse(tmp_path / "empty", "--out", str(tmp_path / "o")) == 2
    assert "no image pairs" in capsys.readouterr().err
    _one_pair(pairs, tmp_path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    assert _fuse(tmp_path, "--ckpt", str(garbage), "--out", str(tmp_path / "o"), method="cddfuse") == 2
    err = capsys.readouterr().err
    assert "cannot load cddfuse from" in err and "Traceback" not in err
    (tmp_path / "a_file").write_text("x")
    assert _fuse(tmp_path, "--out", str(tmp_path / "a_file")) == 2
    assert "error:" in capsys.readouterr().err


@needs_data
def test_crossfuse_fuses_images_smaller_than_its_minimum_side(tmp_path: Path) -> None:
    weights = SHARED / "golden" / "crossfuse" / "weights.safetensors"
    rng = np.random.default_rng(5)
    for sub in ("ir", "vi"):
        (tmp_path / sub).mkdir()
        Image.fromarray(rng.integers(0, 255, (5, 7), dtype=np.uint8)).save(tmp_path / sub / "tiny.png")
    assert _fuse(tmp_path, "--ckpt", str(weights), "--out", str(tmp_path / "o"), method="crossfuse") == 0
    assert Image.open(tmp_path / "o" / "tiny.png").size == (7, 5)


def test_sixteen_bit_gray_alpha_png_is_refused_not_truncated(tmp_path: Path) -> None:
    from model import fusion_io

    path = tmp_path / "la16.png"
    _png_la16(path, 4, 5)
    with pytest.raises(fusion_io.ImageReadError, match="16-bit colour or gray\\+alpha PNG"):
        fusion_io.read_image(path)


def _png_la16(path: Path, h: int, w: int) -> None:
    """A 16-bit gray+alpha PNG (colour type 4), written by hand: Pillow cannot write one."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + struct.pack(">HH", 4660, 65535) * w for _ in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 4, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    )


def test_fusion_metrics_says_which_metric_is_undefined_and_averages_the_rest(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(9)
    for sub in ("ir", "vi", "fused"):
        (tmp_path / sub).mkdir()
    for name, ir in (("flat", np.zeros((40, 48), np.uint8)), ("busy", rng.integers(0, 255, (40, 48), dtype=np.uint8))):
        Image.fromarray(ir).save(tmp_path / "ir" / f"{name}.png")
        Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(tmp_path / "vi" / f"{name}.png")
        Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(tmp_path / "fused" / f"{name}.png")
    args = ["--ir", str(tmp_path / "ir"), "--vi", str(tmp_path / "vi"), "--fused", str(tmp_path / "fused")]
    assert cli.main(["fusion-metrics", *args, "--metrics", "SCD,EN", "--out", str(tmp_path / "m")]) == 0
    assert "SCD is undefined for flat" in capsys.readouterr().err
    rows = {
        line.split(",")[0]: line.split(",")[1:] for line in (tmp_path / "m" / "metrics.csv").read_text().splitlines()
    }
    assert rows["flat"][0] == "nan" and rows["mean"][0] == rows["busy"][0]  # SCD: the mean of the defined one


def _metrics_of_random_triplets(tmp_path: Path, shapes: dict[str, tuple[int, int]], metrics: str, seed: int):
    """`sacmf fusion-metrics` on random IR/visible/fused images of these shapes: (exit status, CSV rows by name)."""
    rng = np.random.default_rng(seed)
    for sub in ("ir", "vi", "fused"):
        (tmp_path / sub).mkdir()
    for name, shape in shapes.items():
        for sub in ("ir", "vi", "fused"):
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(tmp_path / sub / f"{name}.png")
    args = ["--ir", str(tmp_path / "ir"), "--vi", str(tmp_path / "vi"), "--fused", str(tmp_path / "fused")]
    status = cli.main(["fusion-metrics", *args, "--metrics", metrics, "--out", str(tmp_path / "m")])
    lines = (tmp_path / "m" / "metrics.csv").read_text().splitlines()
    return status, {line.split(",")[0]: line.split(",")[1:] for line in lines}


def test_an_image_too_small_for_a_metric_gets_nan_there_not_an_aborted_run(tmp_path: Path, capsys) -> None:
    """VIF needs 41 px per side: one 32x200 strip among larger pairs ended the whole run with an error
    naming neither the image nor the metric, and nothing was written."""
    status, rows = _metrics_of_random_triplets(tmp_path, {"strip": (32, 200), "big": (64, 64)}, "VIF,EN", 3)
    assert status == 0 and "VIF is undefined for strip" in capsys.readouterr().err
    assert rows["strip"][0] == "nan" and rows["strip"][1] != "nan" and rows["mean"][0] == rows["big"][0]


def test_a_one_pixel_line_gets_nan_for_the_metrics_it_cannot_have(tmp_path: Path, capsys) -> None:
    """AG (np.gradient), FMI (its 3x3 window) and SF on a 1-px-high image raised plain errors (or divided by
    zero) and aborted the whole folder with a message naming neither; now each is nan for that image."""
    names = "AG,SF,FMI_pixel,FMI_dct,EN"
    status, rows = _metrics_of_random_triplets(tmp_path, {"line": (1, 40), "big": (24, 24)}, names, 4)
    err = capsys.readouterr().err
    assert status == 0 and "RuntimeWarning" not in err
    assert all(f"{m} is undefined for line" in err for m in names.split(",")[:4])
    assert rows["line"][:4] == ["nan"] * 4 and rows["line"][4] != "nan" and rows["mean"][:4] == rows["big"][:4]


def test_fusion_metrics_scores_a_dark_16_bit_image(tmp_path: Path) -> None:
    """A 16-bit IR whose values stay under 256 is on the 0-1 scale once read as 0-255: still valid data."""
    rng = np.random.default_rng(2)
    for sub in ("ir", "vi", "fused"):
        (tmp_path / sub).mkdir()
    Image.fromarray(rng.integers(0, 255, (40, 48)).astype(np.uint16)).save(tmp_path / "ir" / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(tmp_path / "vi" / "a.png")
    Image.fromarray(rng.integers(0, 255, (40, 48), dtype=np.uint8)).save(tmp_path / "fused" / "a.png")
    args = ["--ir", str(tmp_path / "ir"), "--vi", str(tmp_path / "vi"), "--fused", str(tmp_path / "fused")]
    assert cli.main(["fusion-metrics", *args, "--metrics", "EN,SD", "--out", str(tmp_path / "m")]) == 0


def test_fuse_train_refuses_nonsense_options(pairs, tmp_path: Path, capsys) -> None:
    _one_pair(pairs, tmp_path)
    base = ["fuse-train", "--method", "cddfuse", "--ir", str(tmp_path / "ir"), "--vi", str(tmp_path / "vi")]
    for option, value, message in (
        ("--batch-size", "0", "--batch-size must be >= 1"),
        ("--patch", "1", "--patch must be at least"),
    ):
        assert cli.main([*base, "--out", str(tmp_path / f"t{value}"), option, value]) == 2
        assert message in capsys.readouterr().err


def test_progress_redraws_on_a_terminal() -> None:
    buf = io.StringIO()
    p = Progress(3, "fuse", stream=buf, tty=True)
    for i in range(1, 4):
        p.update(i, f"img{i} 0.10 s")
    p.close("done")
    text = buf.getvalue()
    assert text.count("\r") == 3 and text.count("\n") == 2 and "3/3 img3" in text and "[" in text


# ------------------------------------------------------------------------------------------------
# fusion-metrics


@needs_data
def test_fusion_metrics_csv_and_markdown_match_evaluate_pair(pairs, mean_out: Path, tmp_path: Path, capsys) -> None:
    root = pairs["dir"]
    names = ["EN", "SD", "SF", "MI", "Qabf", "SSIM"]
    rc = cli.main(
        ["fusion-metrics", "--ir", str(root / "ir"), "--vi", str(root / "vi"), "--fused", str(mean_out)]
        + ["--out", str(tmp_path), "--metrics", ",".join(names)]
    )
    assert rc == 0
    rows = [ln.split(",") for ln in (tmp_path / "metrics.csv").read_text().splitlines()]
    assert rows[0] == ["image", *names]
    assert [r[0] for r in rows[1:]] == ["01", "07", "FLIR_00211", "mean"]
    got = {r[0]: [float(v) for v in r[1:]] for r in rows[1:]}
    for name in CROPS:
        ir, vi = pairs[name]
        fused = np.asarray(Image.open(mean_out / f"{name}.png"))
        f = _luma(fused) if fused.ndim == 3 else fused.astype(np.float64)
        v = _luma(vi) if vi.ndim == 3 else vi.astype(np.float64)
        expected = fusion_metrics.evaluate_pair(ir.astype(np.float64), v, f, metrics=names)
        assert got[name] == pytest.approx([expected[m] for m in names], rel=1e-9, abs=1e-12)
    assert got["mean"] == pytest.approx(np.mean([got[n] for n in CROPS], axis=0).tolist(), rel=1e-12)
    md = (tmp_path / "metrics.md").read_text()
    assert "| image | EN | SD | SF | MI | Qabf | SSIM |" in md and "| **mean** |" in md and "`cddfuse`" in md
    assert md in capsys.readouterr().out


@needs_data
def test_read_gray255_scales_16_bit_and_takes_luma(tmp_path: Path) -> None:
    rgb = np.asarray(Image.open(DATA / "RoadScene" / "vi" / "FLIR_00211.jpg").convert("RGB"))[:40, :50]
    Image.fromarray(rgb).save(tmp_path / "c.png")
    assert np.allclose(read_gray255(tmp_path / "c.png"), _luma(rgb))
    g16 = (np.arange(40 * 50).reshape(40, 50) * 13).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g.png")
    assert np.allclose(read_gray255(tmp_path / "g.png"), g16 * 255.0 / 65535)


# ------------------------------------------------------------------------------------------------
# bench-fusion


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench-fusion", "--repeats", "0"], "--repeats: must be >= 1"),
        (["bench-fusion", "--timeout", "-1"], "--timeout: must be a finite number > 0"),
        (["bench-fusion", "--tile", "-5"], "--tile: must be >= 0"),
        (["bench-fusion", "--methods", "cddfuse,cdfuse"], "unknown method(s) ['cdfuse']"),
        (["bench-fusion-stage", "--repeats", "0"], "--repeats: must be >= 1"),
        (["bench-fusion-stage", "--methods", "bogus"], "unknown method(s) ['bogus']"),
    ],
)
def test_bench_fusion_options_are_checked_before_any_work(argv: list[str], message: str, capsys) -> None:
    """--repeats 0 or an unknown method crashed after loading the model; a negative timeout or tile ran."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bench_fusion_runs_each_configuration_in_its_own_process() -> None:
    rows = run_bench(["mean"], 48, 64, repeats=2, tile=0, threads=1, malloc_variant=True, timeout_s=300)
    assert [(r.method, r.mode, r.malloc) for r in rows] == [("mean", "whole", False), ("mean", "whole", True)]
    for r in rows:
        assert r.result is not None, r.error
        res = r.result
        assert res["size"] == "64x48" and res["tile"] == 0 and res["input"] in ("TNO 10", "synthetic")
        assert len(res["runs_s"]) == 2 and res["median_s"] > 0
        assert res["peak_rss_mb"] >= res["rss_after_load_mb"] > 10  # a real process with torch loaded
        assert bool(res["malloc_env"]) == r.malloc  # the allocator variant really reached the child
    table = bench_table(rows)
    assert table.count("\n| mean | whole |") == 2 and "MMAP_MAX=0" in table


# ------------------------------------------------------------------------------------------------
# the daemon stage


@needs_data
def test_stage_mean_fuses_on_image_a_grid_and_resizes_image_b(pairs: dict[str, object]) -> None:
    ir, vi = pairs["01"]
    stage = FusionStage("mean")
    same = stage.fuse_window_frames(vi, ir)
    assert same.shape == vi.shape and same.dtype == np.uint8
    assert np.abs(same.astype(np.float64) - (vi.astype(np.float64) + ir) / 2).max() <= 0.5 + 1e-6
    small_b = np.asarray(Image.fromarray(ir).resize((64, 48), Image.BILINEAR))  # a lower-resolution IR camera
    fused = stage.fuse_window_frames(vi, small_b)
    assert fused.shape == vi.shape and fused.dtype == np.uint8
    assert np.corrcoef(fused.ravel().astype(float), same.ravel().astype(float))[0, 1] > 0.95
    q = stage.frame_quality(fused)
    assert set(q) == {"EN", "SD", "SF"}
    assert q["EN"] == pytest.approx(fusion_metrics.en(fused)) and q["SD"] == pytest.approx(fusion_metrics.sd(fused))
    assert q["SF"] == pytest.approx(fusion_metrics.sf(fused))


@needs_data
@needs_golden
def test_stage_cddfuse_keeps_colour_and_16_bit_frames(pairs: dict[str, object], cddfuse_model) -> None:
    stage = FusionStage("cddfuse", CDDFUSE_W)
    ir, vi = pairs[COLOUR]
    fused = stage.fuse_window_frames(vi, ir)
    assert fused.shape == vi.shape and fused.dtype == np.uint8
    _, expected = _cddfuse_reference(cddfuse_model, ir, _luma(vi))
    assert np.abs(_luma(fused) - expected).max() <= 2.0
    ir16, vi16 = (a.astype(np.uint16) * 257 for a in pairs["07"])
    fused16 = stage.fuse_window_frames(vi16, ir16)
    assert fused16.dtype == np.uint16 and fused16.shape == vi16.shape and fused16.max() == 65535  # stretched
    assert frame_quality(fused16) == pytest.approx(fusion_metrics.frame_metrics(fused16 / 257.0))


def test_stage_float_frames_round_trip_their_scale() -> None:
    rng = np.random.default_rng(1)
    a = (rng.random((20, 30)) * 5000 - 40).astype(np.float32)
    a[3, 4] = np.nan
    unit, (lo, span) = to_unit(a)
    assert unit.dtype == np.float32 and np.nanmin(unit) == 0.0 and unit.max() == pytest.approx(1.0)
    assert lo == pytest.approx(np.nanmin(a)) and span == pytest.approx(np.nanmax(a) - np.nanmin(a))
    fused = FusionStage("mean").fuse_window_frames(a, a)
    assert fused.dtype == np.float32
    finite = np.isfinite(a)
    assert np.allclose(fused[finite], a[finite], rtol=1e-5, atol=1e-2)  # mean of a frame with itself


def test_stage_replaces_image_a_of_a_window_and_keeps_image_b() -> None:
    from ingest.windowing import Frame, Samples, Window

    rng = np.random.default_rng(2)
    # exposure mid-points 50, 450 and 950 ns: the second is nearest the window centre (500)
    frames_a = [
        Frame("cam_vis", i, t, 100, rng.integers(0, 255, (24, 32), dtype=np.uint8)) for i, t in enumerate((0, 400, 900))
    ]
    frames_b = [Frame("cam_ir", 0, 450, 100, rng.integers(0, 255, (12, 16), dtype=np.uint8))]
    window = Window(
        "g1", 0, 1000, {"image_a": frames_a, "image_b": frames_b}, {"seq_a": Samples.empty()},
        {"image_a": True, "image_b": True, "seq_a": False}, "complete", "watermark",
    )  # fmt: skip
    out, quality = FusionStage("mean").fuse_window(window)
    (fused_frame,) = out.frames["image_a"]
    assert fused_frame.t_ns == 400 and fused_frame.seq == 1  # the frame nearest the centre, as adapt picks
    assert fused_frame.image.shape == (24, 32) and fused_frame.meta == {"fusion": "mean"}
    assert out.frames["image_b"] is window.frames["image_b"] and window.frames["image_a"] is frames_a
    assert quality == pytest.approx(frame_quality(fused_frame.image))
    lonely = Window("g1", 0, 1000, {"image_a": frames_a, "image_b": []}, {}, {"image_a": True, "image_b": False},
                    "complete", "watermark")  # fmt: skip
    assert FusionStage("mean").fuse_window(lonely) == (lonely, None)

    seen: list[tuple[str, dict[str, float]]] = []
    fed = FusionStage("mean").process([window, lonely], lambda group, q: seen.append((group, q)))
    assert fed[0].frames["image_a"][0].meta == {"fusion": "mean"} and fed[1] is lonely
    assert seen == [("g1", quality)]  # only the window that had both cameras
    kept = FusionStage("mean", feed="none").process([window], lambda group, q: seen.append((group, q)))
    assert kept[0] is window and len(seen) == 2  # quality gauges only; the model sees the raw frames


def test_a_one_pixel_high_camera_frame_is_fused_and_served_its_undefined_sf_nan() -> None:
    """A 1xN frame fused fine, but SF divided by zero in the gauge and the whole window failed."""
    from ingest.windowing import Frame, Window

    rng = np.random.default_rng(5)
    for shape in ((1, 64), (64, 1)):
        frames = {role: [Frame(f"cam_{role}", 0, 450, 100, rng.integers(0, 255, shape, dtype=np.uint8))]
                  for role in ("image_a", "image_b")}  # fmt: skip
        window = Window("g1", 0, 1000, frames, {}, {"image_a": True, "image_b": True}, "complete", "watermark")
        outcome = FusionStage("mean").apply(window)
        assert outcome.status == "fused" and outcome.served and outcome.error is None, (shape, outcome.error)
        assert outcome.window.frames["image_a"][0].image.shape == shape
        assert np.isnan(outcome.quality["SF"]) and np.isfinite(outcome.quality["EN"])


def test_image_fusion_config_and_metrics_gauge() -> None:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    raw = tomllib.loads((root / "config.toml").read_text())
    assert config_mod.parse(raw).image_fusion.method == "none"
    assert FusionStage.from_settings(config_mod.parse(raw).image_fusion) is None
    raw["image_fusion"] = {"method": "cddfuse"}
    with pytest.raises(config_mod.ConfigError, match="image_fusion.checkpoint"):
        config_mod.parse(raw)
    raw["image_fusion"] = {"method": "mean", "tile": 64, "overlap": 64}
    with pytest.raises(config_mod.ConfigError, match="image_fusion.overlap"):
        config_mod.parse(raw)
    raw["image_fusion"] = {"method": "mean", "tile": 64, "overlap": 16, "feed": "none"}
    settings = config_mod.parse(raw).image_fusion
    stage = FusionStage.from_settings(settings)
    assert stage is not None and stage.method.name == "mean" and (stage.tile, stage.overlap) == (64, 16)
    assert stage.feed == "none"

    from daemon.metrics import DaemonMetrics

    metrics = DaemonMetrics()
    metrics.observe_fusion_quality("g1", {"EN": 6.5, "SD": 30.25, "SF": 7.0})
    body = metrics.exposition()[0].decode()
    assert 'sacmf_image_fusion_quality{group="g1",metric="SD"} 30.25' in body
