"""Image I/O around the single-channel fusion networks (CDDFuse, CrossFuse, CMMDL).

What users of those repositories keep asking for (fusion.md §7): colour output (fuse the Y channel,
re-attach Cb/Cr without colour fringes), the authors' per-image min-max stretch before saving,
16-bit images, pairing two folders of files, and running on images too large for GPU memory
(tiling). The networks themselves take (1, 1, H, W) float tensors in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

FloatArray = npt.NDArray[np.floating]
Coefficients = Literal["bt601", "authors"]
Clip = Literal["chroma", "channel", "none"]

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
"""File name endings ``pair_files`` treats as images (case-insensitive); other files are ignored."""

# BT.601 luma weights (cv2 BGR2GRAY, PIL "L" and the authors' Y all use them)
KR, KG, KB = 0.299, 0.587, 0.114


class ImageReadError(ValueError):
    """An image file that cannot be decoded into an 8/16-bit gray or RGB array."""


# ----------------------------------------------------------------------------------------------
# reading and writing


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) of a PNG, read from IHDR; None for other formats."""
    with path.open("rb") as fh:
        head = fh.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    return head[24], head[25]


_PNG_16_COLOUR = "16-bit colour or gray+alpha PNG is not supported (Pillow would truncate it to 8 bits)"
_TIFF_16_COLOUR = "16-bit colour TIFF is not supported (Pillow would truncate it to 8 bits)"


def _png_unsupported(p: Path) -> bool:
    header = _png_header(p) if p.is_file() else None
    return header is not None and header[0] == 16 and header[1] in (2, 4, 6)


def _tiff_unsupported(im: Image.Image) -> bool:
    bits = im.tag_v2.get(258) if hasattr(im, "tag_v2") else None  # TIFF BitsPerSample
    return (
        bits is not None
        and max(bits if isinstance(bits, tuple) else (bits,)) > 8
        and im.mode in ("RGB", "RGBA", "LA", "CMYK")
    )


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image to uint8/uint16, shape (H, W) for gray or (H, W, 3) for colour.

    Bit depth is preserved (16-bit gray PNG/TIFF stay uint16) because IR cameras deliver 14-16 bit
    data and dividing by the wrong maximum silently darkens it. EXIF orientation is applied, as
    OpenCV's reader (used by the authors) does. Alpha is dropped. Pillow has no 16-bit RGB mode
    and would truncate such PNGs to 8 bits, so they are rejected instead of degraded silently.
    """
    p = Path(path)
    if _png_unsupported(p):
        raise ImageReadError(f"{p}: {_PNG_16_COLOUR}")
    try:
        with Image.open(p) as im:
            if _tiff_unsupported(im):
                raise ImageReadError(f"{p}: {_TIFF_16_COLOUR}")
            im = ImageOps.exif_transpose(im)
            mode = im.mode
            if mode in ("1", "L", "LA", "La"):
                return np.asarray(im.convert("L"), dtype=np.uint8)
            if mode.startswith("I;16"):
                return np.asarray(im, dtype=np.uint16).copy()
            if mode == "I":
                arr = np.asarray(im)
                if arr.size and (arr.min() < 0 or arr.max() > 65535):
                    raise ImageReadError(f"{p}: 32-bit integer image outside 0..65535")
                return arr.astype(np.uint16)
            if mode == "F":
                raise ImageReadError(f"{p}: 32-bit float images are not supported; store 8- or 16-bit")
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"{p}: cannot read image ({exc})") from exc


def max_value(img: np.ndarray) -> int:
    """Full-scale value of an integer image: 255 for uint8, 65535 for uint16."""
    if img.dtype == np.uint8:
        return 255
    if img.dtype == np.uint16:
        return 65535
    raise TypeError(f"expected uint8 or uint16, got {img.dtype}")


def to_unit(img: np.ndarray) -> npt.NDArray[np.float64]:
    """Integer image -> float64 in [0, 1], dividing by the full scale of its own bit depth."""
    return img.astype(np.float64) / max_value(img)


def quantize(img: FloatArray, bits: Literal[8, 16] = 8) -> np.ndarray:
    """[0, 1] floats -> uint8/uint16 by clipping then rounding.

    Clipping first avoids the wrap-around of a bare ``astype`` (bright pixels turning black, one
    cause of the fringes users report); rounding instead of truncation avoids a half-level bias.
    """
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    full = 255 if bits == 8 else 65535
    dtype = np.uint8 if bits == 8 else np.uint16
    return np.round(np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0) * full).astype(dtype)


def write_image(path: str | Path, img: np.ndarray, *, bits: Literal[8, 16] = 8) -> None:
    """Save a gray (H, W) or RGB (H, W, 3) image.

    Float input is taken as [0, 1] and quantised to ``bits``; uint8/uint16 input is written as is.
    16-bit output is gray PNG/TIFF only (Pillow cannot encode 16-bit colour or 16-bit JPEG).
    """
    p = Path(path)
    arr = np.asarray(img)
    if np.issubdtype(arr.dtype, np.floating):
        arr = quantize(arr, bits)
    if arr.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"cannot write dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] != 3 or arr.ndim not in (2, 3):
        raise ValueError(f"expected (H, W) or (H, W, 3), got {arr.shape}")
    if arr.dtype == np.uint16:
        if arr.ndim == 3:
            raise ValueError("16-bit colour output is not supported by Pillow; write 8-bit or gray")
        if p.suffix.lower() not in (".png", ".tif", ".tiff"):
            raise ValueError(f"16-bit output needs .png or .tif, not {p.suffix!r}")
    Image.fromarray(np.ascontiguousarray(arr)).save(p)


# ----------------------------------------------------------------------------------------------
# colour: BT.601 YCbCr, full range, values in [0, 1] with chroma centred on 0.5


def _check_rgb(rgb: FloatArray) -> FloatArray:
    a = np.asarray(rgb, dtype=np.float64)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3), got {a.shape}")
    return a


def luma(rgb: FloatArray) -> npt.NDArray[np.float64]:
    """BT.601 Y = 0.299 R + 0.587 G + 0.114 B (the gray the networks were trained on)."""
    a = _check_rgb(rgb)
    return KR * a[..., 0] + KG * a[..., 1] + KB * a[..., 2]


def rgb_to_ycbcr(rgb: FloatArray, *, coefficients: Coefficients = "bt601") -> npt.NDArray[np.float64]:
    """RGB in [0, 1] -> (H, W, 3) stacked Y, Cb, Cr in [0, 1] (full-range BT.601, as JPEG/cv2).

    ``"bt601"`` uses the exact scale factors 1/1.772 and 1/1.402, so ``ycbcr_to_rgb`` inverts it
    to rounding error. ``"authors"`` uses CMMDL's rounded 0.564 / 0.713 and clamps to [0, 1], to
    reproduce their saved images exactly.
    """
    a = _check_rgb(rgb)
    y = luma(a)
    if coefficients == "bt601":
        cb = (a[..., 2] - y) / (2.0 * (1.0 - KB)) + 0.5
        cr = (a[..., 0] - y) / (2.0 * (1.0 - KR)) + 0.5
        return np.stack([y, cb, cr], axis=-1)
    if coefficients == "authors":
        cb = (a[..., 2] - y) * 0.564 + 0.5
        cr = (a[..., 0] - y) * 0.713 + 0.5
        return np.clip(np.stack([y, cb, cr], axis=-1), 0.0, 1.0)
    raise ValueError(f"unknown coefficients {coefficients!r}")


def _chroma_to_rgb_offsets(cb: FloatArray, cr: FloatArray, coefficients: Coefficients) -> FloatArray:
    """(H, W, 3) amounts added to Y to get R, G, B; linear in (Cb - 0.5, Cr - 0.5)."""
    u = cb - 0.5
    v = cr - 0.5
    if coefficients == "bt601":
        r = 2.0 * (1.0 - KR) * v
        b = 2.0 * (1.0 - KB) * u
        g = -(KR * r + KB * b) / KG  # keeps KR R + KG G + KB B == Y exactly
    elif coefficients == "authors":
        r = 1.403 * v
        g = -0.714 * v - 0.344 * u
        b = 1.773 * u
    else:
        raise ValueError(f"unknown coefficients {coefficients!r}")
    return np.stack([r, g, b], axis=-1)


def ycbcr_to_rgb(
    ycbcr: FloatArray, *, coefficients: Coefficients = "bt601", clip: Clip = "chroma"
) -> npt.NDArray[np.float64]:
    """(H, W, 3) Y, Cb, Cr -> RGB in [0, 1].

    A fused Y is usually brighter or darker than the visible Y its Cb/Cr came from, so the
    recombined pixel can leave the RGB cube. ``clip="channel"`` clips R, G, B independently (what
    the repos do): saturated pixels change hue, which shows as colour fringes along strong edges.
    ``clip="chroma"`` (default) keeps Y and the hue and scales the chroma down just enough for the
    pixel to fit (the largest k <= 1 with Y + k * offset inside [0, 1] for all channels).
    """
    a = np.asarray(ycbcr, dtype=np.float64)
    if a.ndim != 3 or a.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3), got {a.shape}")
    offsets = _chroma_to_rgb_offsets(a[..., 1], a[..., 2], coefficients)
    if clip == "none":
        return a[..., :1] + offsets
    if clip == "channel":
        return np.clip(a[..., :1] + offsets, 0.0, 1.0)
    if clip != "chroma":
        raise ValueError(f"unknown clip {clip!r}")
    y = np.clip(a[..., :1], 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        room = np.where(offsets > 0, (1.0 - y) / offsets, np.where(offsets < 0, y / -offsets, np.inf))
    k = np.clip(np.min(room, axis=-1, keepdims=True), 0.0, 1.0)
    return np.clip(y + k * offsets, 0.0, 1.0)  # the final clip only removes rounding error


def minmax_stretch(x: FloatArray) -> npt.NDArray[np.float64]:
    """Per-image (x - min) / (max - min), jointly over all channels; constant images -> 0.

    All three repositories stretch each fused image like this before saving; it changes EN, SD,
    SF and AG, so it must be reproduced when comparing with their numbers (fusion.md §5.3).
    """
    a = np.asarray(x, dtype=np.float64)
    lo, hi = float(a.min()), float(a.max())
    if hi == lo:
        return np.zeros_like(a)
    return (a - lo) / (hi - lo)


def compose_output(
    fused_y: FloatArray,
    cbcr: FloatArray | None = None,
    *,
    stretch: Literal["y", "rgb", "none"] = "y",
    clip: Clip = "chroma",
    coefficients: Coefficients = "bt601",
) -> npt.NDArray[np.float64]:
    """Turn the network's fused Y (H, W) into the image to save, gray or colour, in [0, 1].

    ``cbcr`` (H, W, 2) from the visible image makes a colour result. ``stretch="y"`` min-max
    stretches the fused Y first (CDDFuse, CrossFuse); ``"rgb"`` stretches the recombined RGB
    jointly over its three channels (CMMDL); for gray output both mean the same.
    CMMDL's saved images are ``compose_output(y, cbcr, stretch="rgb", clip="channel",
    coefficients="authors")``.
    """
    y = np.asarray(fused_y, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"fused_y must be (H, W), got {y.shape}")
    if stretch == "y":
        y = minmax_stretch(y)
    elif stretch not in ("rgb", "none"):
        raise ValueError(f"unknown stretch {stretch!r}")
    if cbcr is None:
        out = y if stretch != "rgb" else minmax_stretch(y)
        return np.clip(out, 0.0, 1.0)
    c = np.asarray(cbcr, dtype=np.float64)
    if c.shape != (*y.shape, 2):
        raise ValueError(f"cbcr must be {(*y.shape, 2)}, got {c.shape}")
    rgb = ycbcr_to_rgb(np.concatenate([y[..., None], c], axis=-1), coefficients=coefficients, clip=clip)
    return minmax_stretch(rgb) if stretch == "rgb" else rgb


# ----------------------------------------------------------------------------------------------
# pairs of files


@dataclass(frozen=True)
class ImagePair:
    """One registered IR/visible pair, ready for a single-channel fusion network."""

    ir: npt.NDArray[np.float32]  # (H, W) in [0, 1]
    vi_y: npt.NDArray[np.float32]  # (H, W) in [0, 1]: the visible luma the network fuses
    vi_cbcr: npt.NDArray[np.float32] | None  # (H, W, 2) visible chroma, None for gray visible
    bits: int  # 8 or 16: the larger source bit depth, a sensible default for the output
    ir_path: Path | None = None
    vi_path: Path | None = None

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """(ir, vi_y) as (1, 1, H, W) float32 tensors, the networks' input layout."""
        return (
            torch.from_numpy(np.ascontiguousarray(self.ir))[None, None].to(device),
            torch.from_numpy(np.ascontiguousarray(self.vi_y))[None, None].to(device),
        )


def _is_gray(img: np.ndarray) -> bool:
    """True for 2-D images and for gray stored as three identical channels (TNO's PNGs)."""
    return img.ndim == 2 or bool(np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2]))


def _split_luma(
    img: np.ndarray, coefficients: Coefficients
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
    """(Y, CbCr or None) in [0, 1]; gray input keeps its exact values and has no chroma."""
    unit = to_unit(img)
    if _is_gray(img):
        return (unit if unit.ndim == 2 else unit[..., 0]).astype(np.float32), None
    ycc = rgb_to_ycbcr(unit, coefficients=coefficients)
    return ycc[..., 0].astype(np.float32), ycc[..., 1:].astype(np.float32)


def read_pair(ir_path: str | Path, vi_path: str | Path, *, coefficients: Coefficients = "bt601") -> ImagePair:
    """Read an IR/visible pair: IR becomes gray (luma if stored as colour), VI is split into Y and CbCr."""
    ir_img = read_image(ir_path)
    vi_img = read_image(vi_path)
    if ir_img.shape[:2] != vi_img.shape[:2]:
        raise ValueError(f"size mismatch: {ir_path} {ir_img.shape[:2]} vs {vi_path} {vi_img.shape[:2]}")
    ir, _ = _split_luma(ir_img, coefficients)  # a colour-mapped IR keeps only its luma
    vi_y, vi_cbcr = _split_luma(vi_img, coefficients)
    bits = 16 if np.uint16 in (ir_img.dtype, vi_img.dtype) else 8
    return ImagePair(ir, vi_y, vi_cbcr, bits, Path(ir_path), Path(vi_path))


@dataclass(eq=False)
class PairingError(ValueError):
    """Two folders that do not pair up one-to-one; every problem is listed, not just the first."""

    unpaired_ir: list[Path] = field(default_factory=list)
    unpaired_vi: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    size_mismatch: list[tuple[Path, Path]] = field(default_factory=list)
    ambiguous: list[Path] = field(default_factory=list)
    empty: tuple[Path, Path] | None = None  # both folders read fine but hold no image pair

    def __str__(self) -> str:
        if self.empty is not None:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            return f"no image pairs in {self.empty[0]} and {self.empty[1]} (images with the same name stem; {suffixes})"
        lines = ["IR/visible folders do not pair up:"]
        lines += [f"  no visible file for IR {p}" for p in self.unpaired_ir]
        lines += [f"  no IR file for visible {p}" for p in self.unpaired_vi]
        lines += [f"  unreadable {p}: {why}" for p, why in self.unreadable]
        lines += [f"  different sizes: {a} vs {b}" for a, b in self.size_mismatch]
        lines += [f"  several files share the name stem of {p}" for p in self.ambiguous]
        return "\n".join(lines)


def _images_by_stem(folder: Path, err: PairingError) -> dict[str, Path]:
    if not folder.is_dir():
        raise NotADirectoryError(folder)
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if p.stem in found:
            err.ambiguous.append(p)
            continue
        found[p.stem] = p
    return found


def _image_size(p: Path, err: PairingError) -> tuple[int, int] | None:
    """Size from the header after Pillow's integrity check; records unreadable files."""
    try:
        if _png_unsupported(p):  # listed up front with the other unreadable files, not found mid-run
            raise ImageReadError(_PNG_16_COLOUR)
        with Image.open(p) as im:
            im.verify()  # must come right after open; checks chunk CRCs / structure
        with Image.open(p) as im:
            if _tiff_unsupported(im):
                raise ImageReadError(_TIFF_16_COLOUR)
            width, height = im.size
            if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap the axes
                width, height = height, width
        return width, height
    except Exception as exc:  # Pillow raises many types for broken files
        err.unreadable.append((p, f"{type(exc).__name__}: {exc}"))
        return None


def pair_files(ir_dir: str | Path, vi_dir: str | Path, *, check_sizes: bool = True) -> list[tuple[Path, Path]]:
    """Pair images of two folders by file name stem (``ir/01.png`` with ``vi/01.jpg``), sorted.

    Raises ``PairingError`` listing every unpaired, unreadable (header/integrity check; a truncated
    JPEG can still fail later when decoded), ambiguous or (with ``check_sizes``) differently sized
    file, so a dataset can be fixed in one pass instead of one crash at a time.
    """
    err = PairingError()
    ir = _images_by_stem(Path(ir_dir), err)
    vi = _images_by_stem(Path(vi_dir), err)
    err.unpaired_ir = [ir[s] for s in sorted(ir.keys() - vi.keys())]
    err.unpaired_vi = [vi[s] for s in sorted(vi.keys() - ir.keys())]
    pairs = [(ir[s], vi[s]) for s in sorted(ir.keys() & vi.keys())]
    for a, b in pairs:
        sa, sb = _image_size(a, err), _image_size(b, err)
        if check_sizes and sa is not None and sb is not None and sa != sb:
            err.size_mismatch.append((a, b))
    if err.unpaired_ir or err.unpaired_vi or err.unreadable or err.size_mismatch or err.ambiguous:
        raise err
    if not pairs:
        raise PairingError(empty=(Path(ir_dir), Path(vi_dir)))
    return pairs


# ----------------------------------------------------------------------------------------------
# tiled inference

FuseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _starts(length: int, tile: int, step: int) -> list[int]:
    """Tile origins covering [0, length); the last tile is aligned to the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, step))
    return [*starts, length - tile]


def _spans(length: int, tile: int, step: int, multiple: int, align: int, residue: bool) -> list[tuple[int, int]]:
    """[start, end) of the tiles along one axis.

    Plain (``align`` 1, no ``residue``): ``tile``-long tiles every ``step``, the last one ending at the end.
    Otherwise every start is a multiple of ``align`` (a network whose token grid repeats every ``align``
    px sees the whole image's grid in every tile) and, with ``residue``, every tile's length is congruent
    to the image's modulo ``multiple``, so a network that floors its down-sampling and centres the
    result (CrossFuse) shifts each tile's deep path exactly as it shifts the whole image's.
    """
    if align <= 1 and not residue:
        return [(s, min(length, s + tile)) for s in _starts(length, tile, step)]
    base = tile - tile % multiple if residue else tile
    extent = base + length % multiple if residue else tile
    if length <= extent:
        return [(0, length)]
    step -= tile - base  # the overlap stays at least what was asked for: tiles shrank to a multiple
    step = max(align, step - step % align)
    spans = [(s, s + extent) for s in range(0, length - extent, step)]
    last = (length - extent) - (length - extent) % align  # the end tile grows (by < align) to start aligned
    while spans and spans[-1][0] >= last:
        spans.pop()
    return [*spans, (last, length)]


def _ramp(size: int, lead: bool, trail: bool, margin: int, ramp: int) -> torch.Tensor:
    """1-D blend weight of one tile: 0 for ``margin`` px at an inner edge, linear ramp, then 1.

    The margin discards the outputs that saw the tile border (exact for networks whose receptive
    radius is <= margin); the ramp hides seams of networks with image-global operations.
    Edges on the image border keep full weight.
    """
    d = torch.arange(size, dtype=torch.float32)
    w = torch.ones(size)
    rise = ((d - margin + 0.5) / ramp).clamp(0.0, 1.0) if ramp > 0 else (d >= margin).float()
    if lead:
        w = torch.minimum(w, rise)
    if trail:
        w = torch.minimum(w, rise.flip(0))
    return w


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Reflect-pad bottom/right up to a multiple (repeating if the pad exceeds the tile)."""
    h, w = x.shape[-2:]
    need_h, need_w = (-h) % multiple, (-w) % multiple
    while need_h or need_w:
        ph = min(need_h, x.shape[-2] - 1)
        pw = min(need_w, x.shape[-1] - 1)
        if ph == 0 and pw == 0:  # 1-pixel tile: reflection impossible, replicate instead
            return F.pad(x, (0, need_w, 0, need_h), mode="replicate")
        x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        need_h -= ph
        need_w -= pw
    return x


def tiled(
    fn: FuseFn,
    ir: torch.Tensor,
    vi: torch.Tensor,
    *,
    tile: int = 512,
    overlap: int = 64,
    multiple: int = 1,
    margin: int | None = None,
    device: torch.device | str | None = None,
    align: int = 1,
    residue: bool = False,
) -> torch.Tensor:
    """Run ``fn(ir_tile, vi_tile) -> fused_tile`` on overlapping tiles and blend the results.

    Bounds GPU memory by the tile size instead of the image size (CDDFuse issue #53: OOM on a 6 GB
    GPU). ``ir``/``vi``: (N, C, H, W), same size; the result has ``fn``'s channel count and the input
    size, on the inputs' device; tiles run on ``device`` (default: the inputs' device) under
    ``torch.no_grad``. Each tile is reflect-padded at its bottom/right to a multiple of
    ``multiple`` (for networks that down-sample) and cropped back. Blending ignores ``margin``
    (default overlap // 4) pixels at every inner tile edge and ramps linearly over the rest of the
    overlap, so for a network whose receptive radius is <= margin the result equals the
    whole-image result, except within that radius of the image border when padding was needed.
    ``align`` > 1 puts every tile origin on that grid; ``residue`` keeps each tile's length congruent to
    the image's modulo ``multiple`` instead of padding it (:func:`_spans`: for networks that handle any
    size themselves, whose whole-image geometry the tiles must reproduce). Wrap argument order as
    needed, e.g. ``lambda ir, vi: cmmdl(vi, ir)``.
    """
    if ir.shape != vi.shape or ir.ndim != 4:
        raise ValueError(f"ir and vi must both be (N, C, H, W) of the same size, got {ir.shape} and {vi.shape}")
    if tile < 1 or not 0 <= overlap < tile or multiple < 1:
        raise ValueError(f"need tile >= 1, 0 <= overlap < tile, multiple >= 1 (got {tile}, {overlap}, {multiple})")
    if align < 1 or (residue and (align % multiple or tile - tile % multiple < align)):
        raise ValueError(f"need align >= 1, a multiple of {multiple} with residue, and a tile of at least {align}")
    m = overlap // 4 if margin is None else margin
    if not 0 <= 2 * m <= overlap:
        raise ValueError(f"margin must be within [0, overlap / 2], got {m}")
    ramp = overlap - 2 * m
    out_device = ir.device
    run_device = torch.device(device) if device is not None else out_device
    h, w = ir.shape[-2:]
    step = tile - overlap
    rows = _spans(h, tile, step, multiple, align, residue)
    cols = _spans(w, tile, step, multiple, align, residue)
    # every seam must overlap by at least both margins, or pixels there get weight 0 from both tiles
    seams = [a[1] - b[0] for spans in (rows, cols) for a, b in zip(spans, spans[1:], strict=False)]
    if seams and 2 * m > min(seams):
        m = max(0, min(seams)) // 2
        ramp = max(0, min(seams) - 2 * m)
    pad = 1 if residue else multiple  # residue tiles go in as they are: the network handles their size
    acc: torch.Tensor | None = None
    weight = torch.zeros(1, 1, h, w, device=out_device)
    with torch.no_grad():
        for r0, r1 in rows:
            wr = _ramp(r1 - r0, r0 > 0, r1 < h, m, ramp)
            for c0, c1 in cols:
                wc = _ramp(c1 - c0, c0 > 0, c1 < w, m, ramp)
                ti = _pad_to_multiple(ir[..., r0:r1, c0:c1].to(run_device), pad)
                tv = _pad_to_multiple(vi[..., r0:r1, c0:c1].to(run_device), pad)
                out = fn(ti, tv)
                if out.ndim != 4 or out.shape[0] != ir.shape[0] or out.shape[-2:] != ti.shape[-2:]:
                    raise ValueError(f"fn must return (N, C, h, w) matching its input tile, got {tuple(out.shape)}")
                out = out[..., : r1 - r0, : c1 - c0].to(out_device, torch.float32)
                if acc is None:
                    acc = torch.zeros(ir.shape[0], out.shape[1], h, w, device=out_device)
                blend = (wr[:, None] * wc[None, :]).to(out_device)
                acc[..., r0:r1, c0:c1] += out * blend
                weight[..., r0:r1, c0:c1] += blend
    assert acc is not None  # at least one tile always runs
    return acc / weight  # every pixel has weight 1 from the tile whose interior covers it
