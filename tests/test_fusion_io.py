"""Image I/O for the fusion stage: YCbCr, bit depth, output composition, file pairing, tiling."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model import fusion_io as fio

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "fusion_testdata"
GOLDEN_CMMDL = SHARED / "golden" / "cmmdl"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"shared test data missing at {DATA}")
needs_golden = pytest.mark.skipif(not GOLDEN_CMMDL.is_dir(), reason=f"golden vectors missing at {GOLDEN_CMMDL}")

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# colour


def test_ycbcr_round_trip() -> None:
    rgb = np.random.default_rng(0).random((40, 50, 3))
    ycc = fio.rgb_to_ycbcr(rgb)
    assert np.abs(fio.ycbcr_to_rgb(ycc) - rgb).max() < 1e-12
    assert np.array_equal(ycc[..., 0], fio.luma(rgb))
    assert ycc.min() >= 0.0 and ycc.max() <= 1.0
    # the authors' rounded constants only invert approximately
    approx = fio.ycbcr_to_rgb(fio.rgb_to_ycbcr(rgb, coefficients="authors"), coefficients="authors")
    assert np.abs(approx - rgb).max() < 2e-3
    grays = np.repeat(rgb[..., :1], 3, axis=-1)
    assert np.allclose(fio.rgb_to_ycbcr(grays)[..., 1:], 0.5, atol=1e-12)


@needs_data
def test_luma_is_the_bt601_gray_of_pillow() -> None:
    path = DATA / "RoadScene" / "vi" / "FLIR_00211.jpg"
    rgb = fio.read_image(path)
    assert rgb.ndim == 3 and rgb.dtype == np.uint8
    ours = np.round(fio.luma(rgb.astype(np.float64)))
    pillow = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert np.abs(ours - pillow).max() <= 1
    assert np.mean(ours == pillow) > 0.99


def _saturated_scene() -> tuple[np.ndarray, np.ndarray]:
    """Pure and strong colours side by side, and a fused Y much brighter/darker than the visible Y."""
    colours = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 1, 0], [0.9, 0.2, 0.6], [0.1, 0.6, 0.9], [0.5, 0.5, 0.5]])
    rgb = np.repeat(np.repeat(colours[None], 8, axis=0), 4, axis=1)  # (8, 28, 3)
    y = fio.luma(rgb)
    fused_y = np.where(np.arange(8)[:, None] < 4, y + 0.45, y - 0.45)  # top brighter, bottom darker
    return rgb, np.clip(fused_y, 0.0, 1.0)


def _hue(ycc: np.ndarray) -> np.ndarray:
    return np.arctan2(ycc[..., 2] - 0.5, ycc[..., 1] - 0.5)


def test_chroma_clip_keeps_luma_and_hue() -> None:
    rgb, fused_y = _saturated_scene()
    cbcr = fio.rgb_to_ycbcr(rgb)[..., 1:]
    out = fio.compose_output(fused_y, cbcr, stretch="none", clip="chroma")
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.abs(fio.luma(out) - fused_y).max() < 1e-12  # the fused detail is kept exactly
    back = fio.rgb_to_ycbcr(out)
    coloured = np.hypot(back[..., 1] - 0.5, back[..., 2] - 0.5) > 1e-6
    assert coloured.sum() > 100
    hue_err = np.abs(np.angle(np.exp(1j * (_hue(back) - _hue(fio.rgb_to_ycbcr(rgb))))))
    assert hue_err[coloured].max() < 1e-9
    # per-channel clipping (what the repos do) shifts hue and luma on the same data: the fringes
    naive = fio.compose_output(fused_y, cbcr, stretch="none", clip="channel")
    naive_back = fio.rgb_to_ycbcr(naive)
    naive_err = np.abs(np.angle(np.exp(1j * (_hue(naive_back) - _hue(fio.rgb_to_ycbcr(rgb))))))
    assert naive_err[coloured].max() > 0.05
    assert np.abs(fio.luma(naive) - fused_y).max() > 0.05


def test_quantize_clips_instead_of_wrapping(tmp_path: Path) -> None:
    values = np.array([[1.2, -0.1, 0.5, 0.998, 1.0]])
    assert fio.quantize(values).tolist() == [[255, 0, 128, 254, 255]]
    assert fio.quantize(values, 16).tolist() == [[65535, 0, 32768, 65404, 65535]]
    path = tmp_path / "bright.png"
    fio.write_image(path, np.full((4, 4, 3), 1.01))
    assert fio.read_image(path).min() == 255


def test_minmax_stretch_and_compose_modes() -> None:
    y = np.linspace(0.3, 0.6, 20).reshape(4, 5)
    s = fio.minmax_stretch(y)
    assert s.min() == 0.0 and s.max() == 1.0
    assert np.allclose(s, (y - 0.3) / 0.3)
    assert not fio.minmax_stretch(np.full((3, 3), 0.7)).any()
    assert np.allclose(fio.compose_output(y), s)
    assert np.allclose(fio.compose_output(y, stretch="none"), y)
    rgb = np.random.default_rng(3).random((4, 5, 3))
    cbcr = fio.rgb_to_ycbcr(rgb)[..., 1:]
    joint = fio.compose_output(y, cbcr, stretch="rgb", clip="channel")
    assert joint.min() == 0.0 and joint.max() == 1.0


@needs_golden
@pytest.mark.parametrize("case", ["", "case2_97x131"])
def test_reproduces_cmmdl_saved_colour_image(case: str) -> None:
    folder = GOLDEN_CMMDL / case
    rgb = np.load(folder / "input_vi_rgb.npy")[0].transpose(1, 2, 0)  # (H, W, 3)
    raw = np.load(folder / "output_raw.npy")[0, 0]
    expected = np.load(folder / "output_stretched.npy")[0]  # (H, W, 3), 0-255
    ycc = fio.rgb_to_ycbcr(rgb, coefficients="authors")
    assert np.abs(ycc[..., 0] - np.load(folder / "input_vi.npy")[0, 0]).max() < 1e-6
    out = fio.compose_output(raw, ycc[..., 1:], stretch="rgb", clip="channel", coefficients="authors")
    assert np.abs(out * 255.0 - expected).max() < 5e-2  # the README's tolerance for this output


# ----------------------------------------------------------------------------------------------
# reading and writing, bit depth


@needs_data
def test_read_pair_gray_and_colour() -> None:
    tno = fio.read_pair(DATA / "TNO" / "ir" / "01.png", DATA / "TNO" / "vi" / "01.png")
    raw_ir = np.asarray(Image.open(DATA / "TNO" / "ir" / "01.png"))[..., 0]
    assert tno.vi_cbcr is None and tno.bits == 8  # gray stored as RGB carries no chroma
    assert np.array_equal(tno.ir, (raw_ir / 255.0).astype(np.float32))
    ir_t, vi_t = tno.tensors()
    assert ir_t.shape == vi_t.shape == (1, 1, 576, 768) and ir_t.dtype == torch.float32

    name = "FLIR_04484.jpg"
    road = fio.read_pair(DATA / "RoadScene" / "ir" / name, DATA / "RoadScene" / "vi" / name)
    assert road.vi_cbcr is not None and road.vi_cbcr.shape == (*road.vi_y.shape, 2)
    # fusing nothing (fused Y = visible Y) gives the visible image back
    rebuilt = fio.quantize(fio.compose_output(road.vi_y, road.vi_cbcr, stretch="none"))
    original = fio.read_image(DATA / "RoadScene" / "vi" / name)
    assert np.abs(rebuilt.astype(int) - original).max() <= 1


def test_sixteen_bit_gray_preserved(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    ir16 = rng.integers(0, 65536, (37, 53), dtype=np.uint16)
    ir16[0, :4] = [0, 1, 65534, 65535]
    for suffix in (".png", ".tif"):
        path = tmp_path / f"ir{suffix}"
        fio.write_image(path, ir16)
        back = fio.read_image(path)
        assert back.dtype == np.uint16 and np.array_equal(back, ir16), suffix
    assert np.array_equal(fio.quantize(fio.to_unit(ir16), 16), ir16)

    vi8 = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    fio.write_image(tmp_path / "vi.png", vi8)
    pair = fio.read_pair(tmp_path / "ir.png", tmp_path / "vi.png")
    assert pair.bits == 16
    assert np.allclose(pair.ir, ir16 / 65535.0, atol=1e-7, rtol=0)
    fio.write_image(tmp_path / "fused16.png", pair.ir.astype(np.float64), bits=16)
    assert np.array_equal(fio.read_image(tmp_path / "fused16.png"), ir16)


def _png_rgb16(path: Path, rgb: np.ndarray) -> None:
    """Minimal 48-bit PNG writer (filter 0), only to check how such a file is handled."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + rgb[r].astype(">u2").tobytes() for r in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_sixteen_bit_colour_is_rejected_not_truncated(tmp_path: Path) -> None:
    rgb16 = np.random.default_rng(5).integers(0, 65536, (6, 7, 3), dtype=np.uint16)
    with pytest.raises(ValueError, match="16-bit colour"):
        fio.write_image(tmp_path / "x.png", rgb16)
    _png_rgb16(tmp_path / "c48.png", rgb16)
    with Image.open(tmp_path / "c48.png") as im:  # the file is valid; Pillow would give 8-bit RGB
        assert im.size == (7, 6)
    with pytest.raises(fio.ImageReadError, match="16-bit colour"):
        fio.read_image(tmp_path / "c48.png")
    with pytest.raises(ValueError, match=".png or .tif"):
        fio.write_image(tmp_path / "x.jpg", rgb16[..., 0])
    # pairing lists it with the unreadable files before any work (it was found mid-run, after other pairs)
    for side in ("ir", "vi"):
        (tmp_path / side).mkdir()
        fio.write_image(tmp_path / side / "a.png", np.zeros((6, 7), np.uint8))
    _png_rgb16(tmp_path / "vi" / "b.png", rgb16)
    fio.write_image(tmp_path / "ir" / "b.png", np.zeros((6, 7), np.uint8))
    with pytest.raises(fio.PairingError, match=r"unreadable .*vi/b\.png.*16-bit colour"):
        fio.pair_files(tmp_path / "ir", tmp_path / "vi")


# ----------------------------------------------------------------------------------------------
# pairing folders


def _folder(root: Path, name: str, files: dict[str, tuple[int, int] | bytes]) -> Path:
    folder = root / name
    folder.mkdir()
    for fname, spec in files.items():
        if isinstance(spec, bytes):
            (folder / fname).write_bytes(spec)
        else:
            fio.write_image(folder / fname, np.zeros(spec, dtype=np.uint8))
    return folder


def test_pair_files_pairs_by_stem(tmp_path: Path) -> None:
    ir = _folder(tmp_path, "ir", {"02.png": (8, 9), "01.png": (8, 9), "notes.txt": b"ignored"})
    vi = _folder(tmp_path, "vi", {"01.jpg": (8, 9), "02.png": (8, 9)})
    assert fio.pair_files(ir, vi) == [(ir / "01.png", vi / "01.jpg"), (ir / "02.png", vi / "02.png")]


def test_pair_files_reports_every_problem(tmp_path: Path) -> None:
    ir = _folder(
        tmp_path,
        "ir",
        {"01.png": (8, 9), "02.png": (8, 9), "03.png": (8, 9), "05.png": b"not an image", "06.png": (8, 9)},
    )
    vi = _folder(
        tmp_path, "vi", {"01.png": (8, 9), "02.png": (8, 9), "04.png": (8, 9), "05.png": (8, 9), "06.png": (9, 8)}
    )
    with pytest.raises(fio.PairingError) as info:
        fio.pair_files(ir, vi)
    err = info.value
    assert err.unpaired_ir == [ir / "03.png"]
    assert err.unpaired_vi == [vi / "04.png"]
    assert [p for p, _ in err.unreadable] == [ir / "05.png"]
    assert err.size_mismatch == [(ir / "06.png", vi / "06.png")]
    message = str(err)
    for fragment in ("03.png", "04.png", "05.png", "06.png"):
        assert fragment in message
    assert isinstance(err, ValueError)


def test_pair_files_flags_ambiguous_names(tmp_path: Path) -> None:
    ir = _folder(tmp_path, "ir", {"01.png": (4, 4), "01.jpg": (4, 4)})
    vi = _folder(tmp_path, "vi", {"01.png": (4, 4)})
    with pytest.raises(fio.PairingError, match="share the name stem"):
        fio.pair_files(ir, vi)


# ----------------------------------------------------------------------------------------------
# tiled inference


def _conv_net() -> torch.nn.Module:
    torch.manual_seed(0)
    # two 3x3 convs with zero padding: receptive radius 2
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 1, 3, padding=1)
    ).eval()


def _inputs(h: int = 150, w: int = 190) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(1, 1, h, w, generator=g), torch.rand(1, 1, h, w, generator=g)


def test_tiled_equals_whole_image_for_a_conv_net() -> None:
    net = _conv_net()
    seen: list[tuple[int, int]] = []

    def fn(ir: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(ir.shape[-2:]))
        return net(torch.cat([ir, vi], dim=1))

    ir, vi = _inputs()
    with torch.no_grad():
        whole = fn(ir, vi)
    seen.clear()
    out = fio.tiled(fn, ir, vi, tile=64, overlap=16)  # margin 4 >= radius 2
    assert out.shape == whole.shape
    assert torch.allclose(out, whole, atol=1e-5, rtol=0)
    assert len(seen) == 12 and max(max(s) for s in seen) <= 64  # bounded tiles, 3 x 4 grid


def test_tiled_pads_tiles_to_a_multiple() -> None:
    net = _conv_net()

    def fn(ir: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        assert ir.shape[-2] % 8 == 0 and ir.shape[-1] % 8 == 0
        return net(torch.cat([ir, vi], dim=1))

    ir, vi = _inputs(101, 133)
    with torch.no_grad():
        whole = net(torch.cat([ir, vi], dim=1))
    out = fio.tiled(fn, ir, vi, tile=60, overlap=16, multiple=8)
    diff = (out - whole).abs()[0, 0]
    assert diff[2:-2, 2:-2].max() < 1e-5  # equal away from the image border
    assert diff.max() > 1e-3  # reflect padding at the image border differs from zero padding there
    small = fio.tiled(fn, ir[..., :21, :30], vi[..., :21, :30], tile=64, overlap=16, multiple=8)
    assert small.shape == (1, 1, 21, 30)


@pytest.mark.parametrize("length", [64, 96, 100, 104, 131, 250, 481])
def test_aligned_residue_tiles_keep_the_whole_images_grid(length: int) -> None:
    """CrossFuse's token grid repeats every 16 px and it floors any size to 8 and centres the result:
    tiles starting off that grid, or padded where the whole image is floored, computed another image
    (up to 74 % of the output range apart from the one-pass result)."""
    spans = fio._spans(length, 64, 32, 8, 16, True)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(s % 16 == 0 and (e - s) % 8 == length % 8 for s, e in spans)
    assert all(b[0] < a[1] for a, b in zip(spans, spans[1:], strict=False))  # overlapping: all covered
    assert all(e - s >= min(length, 64 - 64 % 8) for s, e in spans)


def test_residue_tiles_blend_without_holes_and_overlaps_that_leave_no_step_are_refused() -> None:
    """Residue tiles shrink to a multiple of 8 and step on the 16-px grid: with the margin taken from the
    nominal overlap, seams that overlapped less got weight 0 from both tiles (NaN pixels: 784 of a
    100x100 image at tile 72 / overlap 64, 960 of 64x64 at tile 24)."""
    from model import fusion

    cf = fusion.get_method("crossfuse")
    for tile, overlap in ((24, None), (72, 56), (40, 16), (16, None), (100, 0)):
        ov = fusion.tile_overlap(cf, tile, overlap)
        for h, w in ((64, 64), (100, 100), (101, 131)):
            x = torch.rand(1, 1, h, w, generator=torch.Generator().manual_seed(tile))
            out = fio.tiled(lambda a, b: a.clone(), x, x, tile=tile, overlap=ov, multiple=8,
                            margin=min(cf.margin, ov // 2), align=16, residue=True)  # fmt: skip
            assert torch.equal(out.isfinite(), torch.ones_like(out, dtype=torch.bool)), (tile, overlap, h, w)
            assert torch.allclose(out, x, atol=1e-6)  # an identity network blends back to its input
    with pytest.raises(ValueError, match="crossfuse: overlap must be in \\[0, 56\\] for tile 72"):
        fusion.tile_overlap(cf, 72, 64)


def test_tiled_blends_networks_with_global_operations() -> None:
    # output = input + tile mean: a global op, so tiles disagree; blending must avoid hard seams
    def fn(ir: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        return ir + 10.0 * vi.mean()

    ir, vi = _inputs(40, 200)
    vi = vi * torch.linspace(0.0, 2.0, 200)  # tile means differ strongly along x
    overlap, margin = 32, 8
    out = fio.tiled(fn, ir, vi, tile=64, overlap=overlap, margin=margin)
    offset = (out - ir)[0, 0]
    assert torch.allclose(offset, offset[:1].expand_as(offset), atol=1e-5)  # constant down columns
    jumps = offset[0].diff().abs()
    spread = float(offset.max() - offset.min())
    assert spread > 1.0
    assert float(jumps.max()) <= spread / (overlap - 2 * margin) + 1e-5  # a ramp, not a step


def test_tiled_rejects_bad_arguments() -> None:
    ir, vi = _inputs(20, 20)
    with pytest.raises(ValueError, match="same size"):
        fio.tiled(lambda a, b: a, ir, vi[..., :10])
    with pytest.raises(ValueError, match="overlap"):
        fio.tiled(lambda a, b: a, ir, vi, tile=16, overlap=16)
    with pytest.raises(ValueError, match="matching its input tile"):
        fio.tiled(lambda a, b: a[..., ::2, ::2], ir, vi, tile=16, overlap=4)
