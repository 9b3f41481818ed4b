"""One table of the pixel-level IR/visible fusion methods, and the one way every tool runs them.

Why a registry: the ``fuse`` command, the benchmark, the training recipes and the daemon stage all need
the same facts about each network (how to load it, argument order, which sizes it accepts, how far a tile
border reaches into the output, which output stretch the authors applied). Spreading those facts over four
call sites is how a tool ends up feeding CMMDL its inputs the wrong way round or tiling CrossFuse on a
grid its pooling cannot reproduce.

Every ``fuse`` function here takes and returns (B,1,H,W) float tensors with inputs in [0, 1] and IR first;
the output is the network's *raw* output (before any per-image stretch), because a stretch must see the
whole image: stretching each tile separately would show its seams.

``mean`` is the trivial baseline F = (IR + Y_VI) / 2 (fusion.md §5.4 scores it on TNO): it needs no
checkpoint and gives every tool a reference point that is exact under tiling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import fusion_io

__all__ = [
    "METHODS",
    "FusionMethod",
    "compose_fused",
    "describe",
    "fuse_tensors",
    "get_method",
    "load_method",
    "method_names",
    "unit_output",
]

Stretch = Literal["y", "rgb", "none"]


@dataclass(frozen=True)
class FusionMethod:
    """What a caller must know to run one fusion network correctly.

    ``raw_range``: ``"unit"`` when the raw output is already an image in [0, 1] (sigmoid, mean); ``"free"``
    when only its min-max stretch is an image (CrossFuse's last layer is conv + BatchNorm, and the authors'
    ``forward`` always stretches). ``stretch`` is what the authors applied before saving: ``"y"`` min-max of
    the fused Y, ``"rgb"`` min-max of the recombined colour image jointly over its channels (CMMDL).
    Tiling: ``multiple`` is the total down-sampling (tiles are padded to it), ``margin`` the pixels dropped at
    each inner tile edge, ``overlap`` the default tile overlap; ``exact_tiles`` says whether tiled output can
    equal the whole-image output (only without image-global operations). ``tile_align`` > 1: tile origins
    on that grid (the period of the network's token grid); ``tile_residue``: tiles keep the image's size
    modulo ``multiple`` instead of being padded, for a network that adapts to any size itself, so that
    each tile sees the whole image's geometry (``fusion_io.tiled``).
    """

    name: str
    needs_checkpoint: bool
    load: Callable[[str | Path], nn.Module] | None
    fuse: Callable[[nn.Module | None, Tensor, Tensor], Tensor]
    raw_range: Literal["unit", "free"]
    stretch: Stretch
    multiple: int
    min_side: int
    margin: int
    overlap: int
    exact_tiles: bool
    global_ops: str
    tile_align: int = 1
    tile_residue: bool = False

    def stretch_fn(self) -> Callable[[Tensor], Tensor] | None:
        """The authors' own per-image Y stretch (0..255), or None for methods without one."""
        if self.name == "cddfuse":
            from model.cddfuse import stretch

            return stretch
        if self.name == "crossfuse":
            from model.crossfuse import stretch as cf_stretch

            return cf_stretch
        return None


# ------------------------------------------------------------------------------------------------
# loaders and fuse functions (imports are local: loading one network must not import the others)


def _load_cddfuse(path: str | Path) -> nn.Module:
    from model.cddfuse import load_CDDFuse

    return load_CDDFuse(path)


def _fuse_cddfuse(model: nn.Module | None, ir: Tensor, vi: Tensor) -> Tensor:
    from model.cddfuse import fuse_CDDFuse

    return fuse_CDDFuse(model, ir, vi)  # type: ignore[arg-type]


def _load_crossfuse(path: str | Path) -> nn.Module:
    from model.crossfuse import load_CrossFuse

    return load_CrossFuse(path)


def _fuse_crossfuse(model: nn.Module | None, ir: Tensor, vi: Tensor) -> Tensor:
    from model.crossfuse import fuse_CrossFuse

    # Interpolation and padding can overshoot [0, 1] by rounding; fuse_CrossFuse refuses that (its check is
    # there to catch 0-255 inputs), so clamp the few ulps away.
    return fuse_CrossFuse(model, ir.clamp(0.0, 1.0), vi.clamp(0.0, 1.0))  # type: ignore[arg-type]


def _load_cmmdl(path: str | Path) -> nn.Module:
    from model.cmmdl import load_CMMDL

    return load_CMMDL(path)


def _fuse_cmmdl(model: nn.Module | None, ir: Tensor, vi: Tensor) -> Tensor:
    from model.cmmdl import fuse_CMMDL

    return fuse_CMMDL(model, ir, vi)  # type: ignore[arg-type]  # takes (ir, vi); calls the net as (vi, ir)


def _fuse_mean(model: nn.Module | None, ir: Tensor, vi: Tensor) -> Tensor:
    return (ir.float() + vi.float()) / 2


METHODS: dict[str, FusionMethod] = {
    "cddfuse": FusionMethod(
        name="cddfuse",
        needs_checkpoint=True,
        load=_load_cddfuse,
        fuse=_fuse_cddfuse,
        raw_range="unit",
        stretch="y",
        multiple=1,
        min_side=2,
        margin=16,
        overlap=64,
        exact_tiles=False,
        global_ops="channel attention uses whole-tile statistics (Gram matrices, L2 norms over pixels)",
    ),
    "crossfuse": FusionMethod(
        name="crossfuse",
        needs_checkpoint=True,
        load=_load_crossfuse,
        fuse=_fuse_crossfuse,
        raw_range="free",
        stretch="y",
        multiple=8,
        min_side=16,
        margin=32,
        overlap=128,
        exact_tiles=False,
        global_ops="cross-attention over 256x256-pixel tiles of the 1/8 feature map",
        # 2x2-patch tokens of the 1/8 map repeat every 16 px; any size is floored to 8 and centred back
        tile_align=16,
        tile_residue=True,
    ),
    "cmmdl": FusionMethod(
        name="cmmdl",
        needs_checkpoint=True,
        load=_load_cmmdl,
        fuse=_fuse_cmmdl,
        raw_range="unit",
        stretch="rgb",
        multiple=1,
        min_side=2,
        margin=16,
        overlap=64,
        exact_tiles=False,
        global_ops="whole-image FFTs (circular convolution, amplitude/phase mixing) and channel attention",
    ),
    "mean": FusionMethod(
        name="mean",
        needs_checkpoint=False,
        load=None,
        fuse=_fuse_mean,
        raw_range="unit",
        stretch="none",
        multiple=1,
        min_side=1,
        margin=0,
        overlap=0,
        exact_tiles=True,
        global_ops="none (pixel-wise)",
    ),
}


def method_names() -> list[str]:
    return list(METHODS)


def get_method(name: str) -> FusionMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown fusion method {name!r}; known: {', '.join(METHODS)}") from None


def load_method(
    name: str, checkpoint: str | Path | None, *, device: str | torch.device = "cpu"
) -> tuple[FusionMethod, nn.Module | None]:
    """(method, model in eval mode on ``device``); ``mean`` returns no model and ignores ``checkpoint``."""
    method = get_method(name)
    if not method.needs_checkpoint:
        return method, None
    if checkpoint is None or str(checkpoint) == "":
        raise ValueError(f"{name} needs a checkpoint (--ckpt FILE or folder)")
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"{name} checkpoint not found: {path}")
    assert method.load is not None
    model = method.load(path).to(device).eval()
    return method, model


# ------------------------------------------------------------------------------------------------
# running a method on tensors and composing the saved image


def pad_min_side(x: Tensor, min_side: int) -> Tensor:
    """Pad bottom/right up to ``min_side`` (reflect, replicate where reflection is impossible)."""
    h, w = x.shape[-2:]
    ph, pw = max(0, min_side - h), max(0, min_side - w)
    if ph == 0 and pw == 0:
        return x
    if ph < h and pw < w:
        return F.pad(x, (0, pw, 0, ph), mode="reflect")
    return F.pad(x, (0, pw, 0, ph), mode="replicate")


def fuse_tensors(
    method: FusionMethod,
    model: nn.Module | None,
    ir: Tensor,
    vi: Tensor,
    *,
    tile: int = 0,
    overlap: int | None = None,
    device: str | torch.device | None = None,
) -> Tensor:
    """Raw fused output (B,1,H,W) float32 for inputs (B,1,H,W) in [0, 1], any H x W.

    ``tile`` > 0 runs overlapping ``tile`` x ``tile`` tiles (``fusion_io.tiled``) so memory is bounded by
    the tile, not the image; ``overlap`` defaults to the method's. Images (and tiles) smaller than the
    method's minimum side are padded and cropped back.
    """
    if ir.shape != vi.shape or ir.ndim != 4 or ir.shape[1] != 1:
        raise ValueError(f"ir and vi must both be (B,1,H,W), got {tuple(ir.shape)} and {tuple(vi.shape)}")
    h, w = ir.shape[-2:]

    def run(a: Tensor, b: Tensor) -> Tensor:
        th, tw = a.shape[-2:]
        a, b = pad_min_side(a, method.min_side), pad_min_side(b, method.min_side)
        out = method.fuse(model, a, b)
        return out[..., :th, :tw].float()

    ov = tile_overlap(method, tile, overlap)
    if tile <= 0 or (tile >= h and tile >= w):
        return run(ir, vi).to(ir.device)
    margin = min(method.margin, ov // 2)
    return fusion_io.tiled(
        run, ir, vi, tile=tile, overlap=ov, multiple=method.multiple, margin=margin, device=device,
        align=method.tile_align, residue=method.tile_residue,
    )  # fmt: skip


def tile_overlap(method: FusionMethod, tile: int, overlap: int | None) -> int:
    """The overlap to tile with (``overlap``, or the method's default capped at half the tile), after
    checking both; raises ValueError naming the option. Callers check before any work (a bad value
    used to fail every image of a folder, one by one, after the weights had loaded)."""
    if tile < 0:
        raise ValueError(f"tile must be >= 0 (0: the whole image in one pass), got {tile}")
    least = max(method.min_side, method.tile_align if method.tile_residue else 1)
    if 0 < tile < least:
        raise ValueError(f"{method.name}: tile must be >= {least} px, got {tile}")
    # CrossFuse: tiles shrink to a multiple of 8 and step on its 16-px grid, so the overlap must leave a step
    most = tile - tile % method.multiple - method.tile_align if method.tile_residue else tile - 1
    if overlap is None:
        return max(0, min(method.overlap, tile // 2, most))
    if tile and not 0 <= overlap <= most:
        raise ValueError(f"{method.name}: overlap must be in [0, {most}] for tile {tile}, got {overlap}")
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, got {overlap}")
    return overlap


def unit_output(method: FusionMethod, raw: Tensor, *, stretch: bool) -> Tensor:
    """Raw output -> fused Y in [0, 1], (B,1,H,W); the authors' Y stretch when ``stretch`` (or required)."""
    if method.raw_range == "free" or (stretch and method.stretch == "y"):
        fn = method.stretch_fn()
        if fn is not None:
            return fn(raw) / 255.0
        return torch.from_numpy(np.stack([fusion_io.minmax_stretch(r[0].numpy()) for r in raw]))[:, None].float()
    if stretch and method.stretch == "none":  # a stretch asked for on the baseline: plain min-max of Y
        return torch.from_numpy(np.stack([fusion_io.minmax_stretch(r[0].numpy()) for r in raw]))[:, None].float()
    return raw.clamp(0.0, 1.0)  # "rgb" methods stretch after recombination (compose_fused)


def compose_fused(
    method: FusionMethod,
    fused_y: npt.ArrayLike,
    cbcr: npt.ArrayLike | None,
    *,
    stretch: bool,
) -> npt.NDArray[np.float64]:
    """Fused Y (H, W) in [0, 1] (from :func:`unit_output`) + the visible chroma -> the image to save.

    Colour is recombined with BT.601 and chroma-preserving clipping (``fusion_io.ycbcr_to_rgb``), never by
    clipping R, G, B separately: that changes the hue of saturated pixels and shows as colour fringes along
    edges, the complaint in CDDFuse issue #12. CMMDL's authors stretch the recombined RGB jointly; that is
    kept when ``stretch`` is on.
    """
    mode: Stretch = "rgb" if (stretch and method.stretch == "rgb") else "none"
    return fusion_io.compose_output(np.asarray(fused_y, dtype=np.float64), cbcr, stretch=mode, clip="chroma")


def describe(method: FusionMethod) -> dict[str, Any]:
    """A plain dict of the method's facts (for ``--help`` texts and benchmark reports)."""
    return {
        "name": method.name,
        "needs_checkpoint": method.needs_checkpoint,
        "stretch": method.stretch,
        "multiple": method.multiple,
        "min_side": method.min_side,
        "overlap": method.overlap,
        "margin": method.margin,
        "exact_tiles": method.exact_tiles,
        "global_ops": method.global_ops,
    }
