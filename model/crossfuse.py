"""CrossFuse (Li & Wu, Information Fusion 2024): pixel-level IR/visible fusion with a cross-attention module.

Re-implemented (not copied) from ``shared/reference/fusion.md`` §2, the golden README and a reading of the
reference repo hli1221/CrossFuse @ bb00cb4. The network has three parts:

* two independent, activation-free dense encoders (one per modality) giving a full-resolution *shallow*
  feature (32 ch) and a 1/8-resolution *deep* feature (128 ch);
* the cross-attention module (CAM) that runs on 32x32 tiles of the deep maps: per-modality self-attention
  twice, then two cross-attention directions whose softmax uses *negated* scores ("re-softmax");
* a fusion decoder with BatchNorm convolutions and fixed box-filter skip weights.

Our parameter names are our own; :func:`load_CrossFuse` maps the authors' checkpoint keys onto them explicitly.
Inputs here are gray images in [0, 1] (the authors feed 0-255 and divide by 255 inside the encoder; dividing
before the call is the same float operation, so results are identical).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "CrossFuse",
    "CrossFuseConfig",
    "CrossFuse_autoencoder_loss",
    "CrossFuse_loss",
    "authors_key_map",
    "fuse_CrossFuse",
    "load_CrossFuse",
    "ms_ssim",
    "read_checkpoint",
    "stretch",
    "tile_tokens",
    "untile_tokens",
]

GROUPS = ("auto_ir", "auto_vi", "trans")
# Per-pixel weights divide by (g_ir + g_vi + EPS); the authors use 1e-6 here and in the min-max stretch.
EPS = 1e-6


@dataclass(frozen=True)
class CrossFuseConfig:
    """Hyper-parameters of the released model (the authors' ``test_conv_trans.py`` configs)."""

    shallow_channels: int = 32  # en_out_channels1: stem width = shallow skip width
    growth: int = 64  # en_out_channels: channels each dense layer adds
    dense_layers: int = 3  # num_layers per dense block
    deep_channels: int = 128  # dense_out = part_out: deep feature width
    tile: int = 32  # img_size: CAM tile side on the 1/8 map (= 256 image pixels)
    patch: int = 2  # patch_size: a token is patch x patch deep pixels
    heads: int = 16
    mlp_ratio: float = 4.0
    depth_self: int = 1
    depth_cross: int = 1
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    shallow_ir_gain: float = 0.5  # the decoder adds 0.5 * w_ir * sh_ir + w_vi * sh_vi

    def __post_init__(self) -> None:
        # The authors roll each tile by tile/2 before the second self-attention and roll back after it.
        # With no positional encoding that is a pure token permutation (so a no-op) only if the shift is a
        # whole number of patches; we rely on that and refuse configs where it would not hold.
        if self.tile % self.patch or (self.tile // 2) % self.patch:
            raise ValueError("tile and tile/2 must be multiples of patch")
        if self.embed_dim % self.heads:
            raise ValueError("embed_dim must be divisible by heads")
        if self.deep_channels % 4 or self.deep_channels // 4 != self.shallow_channels:
            # the decoder halves the width twice and then adds the shallow skip
            raise ValueError("deep_channels must be 4 * shallow_channels")

    @property
    def embed_dim(self) -> int:
        return self.deep_channels * self.patch * self.patch  # 512

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)  # 2048


# ----------------------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------------------


def _fill_reflect_border(buf: Tensor) -> Tensor:
    """Given buf (B,C,h+2,w+2) whose interior holds x, write the 1-pixel reflection border in place.

    Reflection (mirror without repeating the edge) is what ``ReflectionPad2d(1)`` does; rows first, then
    full columns, so the corners come out reflected in both directions.
    """
    buf[..., 0, 1:-1] = buf[..., 2, 1:-1]
    buf[..., -1, 1:-1] = buf[..., -3, 1:-1]
    buf[..., 0] = buf[..., 2]
    buf[..., -1] = buf[..., -3]
    return buf


def _reflect_pad1_into(buf: Tensor, x: Tensor) -> None:
    """buf (B,C,h+2,w+2) <- ReflectionPad2d(1)(x) without the temporary F.pad would allocate."""
    buf[..., 1:-1, 1:-1] = x
    _fill_reflect_border(buf)


def _upsample2_reflect_pad1(x: Tensor) -> Tensor:
    """ReflectionPad2d(1)(nearest x2 upsample(x)) written in one pass: (B,C,h,w) -> (B,C,2h+2,2w+2)."""
    b, c, h, w = x.shape
    buf = x.new_empty(b, c, 2 * h + 2, 2 * w + 2)
    inner = buf[..., 1:-1, 1:-1].unflatten(3, (w, 2)).unflatten(2, (h, 2))  # view (B,C,h,2,w,2)
    inner.copy_(x[:, :, :, None, :, None].expand(b, c, h, 2, w, 2))
    return _fill_reflect_border(buf)


def _max_pool2(x: Tensor) -> Tensor:
    """MaxPool2d(2, 2) (odd trailing row/column dropped), as two strided maxima.

    Same values as ``F.max_pool2d``, which on CPU also computes argmax indices and is ~5x slower here.
    """
    h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    rows = torch.maximum(x[..., 0:h:2, :w], x[..., 1:h:2, :w])
    return torch.maximum(rows[..., 0::2], rows[..., 1::2])


class ConvUnit(nn.Module):
    """Reflection-padded convolution, optionally followed by BatchNorm (the authors' ``ConvLayer``).

    Reflection rather than zero padding matters for golden equality at the borders. In eval mode the
    BatchNorm is folded into the conv weights on the fly (same affine map, one memory pass fewer). With
    ``winograd`` set and gradients off, 3x3 convs run through NNPACK's Winograd kernels: exact in real
    arithmetic, about 2x fewer CPU cycles here, float32 rounding ~1e-5 relative instead of ~1e-7.
    """

    def __init__(self, cin: int, cout: int, kernel: int = 3, batch_norm: bool = False) -> None:
        super().__init__()
        self.pad = kernel // 2
        self.conv = nn.Conv2d(cin, cout, kernel)
        self.bn = nn.BatchNorm2d(cout) if batch_norm else None
        self.winograd = False

    def forward(self, x: Tensor) -> Tensor:
        if self.pad:
            x = F.pad(x, (self.pad,) * 4, mode="reflect")
        return self.conv_padded(x)

    def conv_padded(self, x: Tensor) -> Tensor:
        """The unit on an input that is already reflection-padded by ``kernel // 2``."""
        weight, bias = self.conv.weight, self.conv.bias
        if self.bn is not None and self.training:
            return self.bn(F.conv2d(x, weight, bias))
        if self.bn is not None:
            bn = self.bn
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (cout,)
            weight = weight * scale[:, None, None, None]
            bias = (bias - bn.running_mean) * scale + bn.bias
        if self.winograd and _winograd_ok(x, weight):
            return torch._nnpack_spatial_convolution(x.contiguous(), weight, bias, [0, 0], [1, 1])
        return F.conv2d(x, weight, bias)


def _winograd_ok(x: Tensor, weight: Tensor) -> bool:
    # NNPACK has no backward here and gains nothing for a single input channel (the stem).
    return (
        not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.shape[1] > 1
        and weight.shape[-2:] == (3, 3)
        and torch.backends.nnpack.is_available()  # also initialises NNPACK, which the raw op needs
    )


class DenseBlock(nn.Module):
    """Three 3x3 convs, each appending ``growth`` channels, then a 3x3 conv to ``cout`` (no activations)."""

    def __init__(self, cin: int, growth: int, n_layers: int, cout: int) -> None:
        super().__init__()
        self.growth = growth
        self.layers = nn.ModuleList(ConvUnit(cin + i * growth, growth) for i in range(n_layers))
        self.fuse = ConvUnit(cin + n_layers * growth, cout)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            for layer in self.layers:
                x = torch.cat((x, layer(x)), dim=1)  # (B, cin + (i+1)*growth, h, w)
            return self.fuse(x)
        # Inference: padding a channel concatenation = concatenating padded parts, so keep one pre-padded
        # buffer and append each new (padded) part, instead of re-padding and re-concatenating the growing
        # tensor before every conv. Same values, ~4x less copying. (In-place writes: no autograd here.)
        b, c, h, w = x.shape
        buf = x.new_empty(b, c + len(self.layers) * self.growth, h + 2, w + 2)
        _reflect_pad1_into(buf[:, :c], x)
        for layer in self.layers:
            _reflect_pad1_into(buf[:, c : c + self.growth], layer.conv_padded(buf[:, :c]))
            c += self.growth
        return self.fuse.conv_padded(buf)


class Encoder(nn.Module):
    """Per-modality encoder; max-pooling is its only non-linearity (that is how the authors built it)."""

    def __init__(self, cfg: CrossFuseConfig) -> None:
        super().__init__()
        c1, g, n, d = cfg.shallow_channels, cfg.growth, cfg.dense_layers, cfg.deep_channels
        self.stem = ConvUnit(1, c1)
        self.block1 = DenseBlock(c1, g, n, d)
        self.block2 = DenseBlock(d, g, n, d)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x: (B,1,H,W) in [0,1] -> shallow (B,32,H,W), deep (B,128,H//8,W//8) (floor at each pooling)."""
        shallow = self.stem(x)
        y = self.block1(_max_pool2(shallow))  # (B,128,H/2,W/2)
        y = self.block2(_max_pool2(y))  # (B,128,H/4,W/4)
        return shallow, _max_pool2(y)


# ----------------------------------------------------------------------------------------------------------
# Cross-attention module (CAM)
# ----------------------------------------------------------------------------------------------------------


def _reflect_index(n: int, pad: int, device: torch.device) -> Tensor:
    """Indices of a length-n axis reflection-padded by ``pad`` at the end (mirror without edge repeat).

    Equal to ``ReflectionPad`` whenever pad < n (the only case the authors' code accepts); for larger pads the
    mirror pattern simply continues, which lets images smaller than ~136 px through.
    """
    idx = torch.arange(n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = idx % period
    return torch.where(idx >= n, period - idx, idx)


def tile_tokens(x: Tensor, tile: int, patch: int) -> tuple[Tensor, tuple[int, int]]:
    """Deep map -> one token sequence per tile, all tiles of all images stacked on the batch axis.

    The map is reflection-padded at the right/bottom to a multiple of ``tile`` (as the authors do); a token is
    a patch x patch block flattened in (channel, row, col) order, tokens in row-major order inside the tile.
    x: (B,C,h,w) -> tokens (B*nh*nw, (tile/patch)^2, C*patch*patch), grid (nh, nw).
    """
    b, c, h, w = x.shape
    nh, nw = math.ceil(h / tile), math.ceil(w / tile)
    if nh * tile != h:
        x = x.index_select(2, _reflect_index(h, nh * tile - h, x.device))
    if nw * tile != w:
        x = x.index_select(3, _reflect_index(w, nw * tile - w, x.device))
    s = tile // patch
    x = x.reshape(b, c, nh, s, patch, nw, s, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (B, nh, nw, s, s, C, patch, patch)
    return x.reshape(b * nh * nw, s * s, c * patch * patch), (nh, nw)


def untile_tokens(tokens: Tensor, grid: tuple[int, int], size: tuple[int, int], patch: int) -> Tensor:
    """Inverse of :func:`tile_tokens`, cropped back to ``size`` = (h, w): -> (B, C, h, w)."""
    nh, nw = grid
    n, length, dim = tokens.shape
    s = math.isqrt(length)
    c = dim // (patch * patch)
    b = n // (nh * nw)
    x = tokens.reshape(b, nh, nw, s, s, c, patch, patch)
    x = x.permute(0, 5, 1, 3, 6, 2, 4, 7)  # (B, C, nh, s, patch, nw, s, patch)
    x = x.reshape(b, c, nh * s * patch, nw * s * patch)
    return x[:, :, : size[0], : size[1]]


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def _heads(x: Tensor, heads: int) -> Tensor:
    n, length, dim = x.shape
    return x.view(n, length, heads, dim // heads).transpose(1, 2)  # (N, heads, L, head_dim)


def _merge_heads(x: Tensor) -> Tensor:
    n, heads, length, hd = x.shape
    return x.transpose(1, 2).reshape(n, length, heads * hd)


class SelfAttentionBlock(nn.Module):
    """Pre-norm ViT block (softmax(QK^T/sqrt(d))V with a fused qkv projection, then a GELU MLP)."""

    def __init__(self, cfg: CrossFuseConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = MLP(d, cfg.mlp_hidden)

    def forward(self, x: Tensor) -> Tensor:
        n, length, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(n, length, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (N, heads, L, head_dim)
        x = x + self.proj(_merge_heads(F.scaled_dot_product_attention(q, k, v)))
        return x + self.mlp(self.norm2(x))


class CrossAttentionBlock(nn.Module):
    """Cross-attention with the authors' re-softmax: softmax(-QK^T/sqrt(d)) favours *dissimilar* tokens.

    q, k and v inputs share ``norm1``; the residual is the un-normalised value input.
    """

    def __init__(self, cfg: CrossFuseConfig) -> None:
        super().__init__()
        d = cfg.embed_dim
        self.heads = cfg.heads
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.q = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.k = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.v = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.mlp = MLP(d, cfg.mlp_hidden)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """Returns (normalised query, block output); the former is the next block's query (authors' order)."""
        qn = self.norm1(query)
        kn = self.norm1(key)
        vn = kn if value is key else self.norm1(value)
        # Negating q is exact, so SDPA(-q, k, v) computes softmax(-QK^T/sqrt(d))V.
        q = -_heads(self.q(qn), self.heads)
        attn = F.scaled_dot_product_attention(q, _heads(self.k(kn), self.heads), _heads(self.v(vn), self.heads))
        out = value + self.proj(_merge_heads(attn))
        return qn, out + self.mlp(self.norm2(out))


class CrossAttention(nn.Module):
    """One cross-attention direction: ``query`` modality attends to the other; ends with a LayerNorm."""

    def __init__(self, cfg: CrossFuseConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(CrossAttentionBlock(cfg) for _ in range(cfg.depth_cross))
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps)

    def forward(self, query: Tensor, other: Tensor) -> Tensor:
        key = value = other
        for block in self.blocks:
            # The authors feed (normed query, block output, normed block output) to the next block.
            query, key = block(query, key, value)
            value = self.norm(key)
        return value


class CAM(nn.Module):
    """Tile-wise cross-attention module; all tiles of a batch are processed as one batch of sequences.

    The authors' cyclic shift of each tile by tile/2 around the second self-attention is omitted: shifting
    whole patches only permutes the tokens, and attention without positional encoding (plus per-token
    LayerNorm/MLP) is permutation-equivariant, so roll -> attend -> roll back equals attend.
    """

    def __init__(self, cfg: CrossFuseConfig) -> None:
        super().__init__()
        self.cfg = cfg

        def stack(depth: int) -> nn.ModuleList:
            return nn.ModuleList(SelfAttentionBlock(cfg) for _ in range(depth))

        self.self1_ir, self.self1_vi = stack(cfg.depth_self), stack(cfg.depth_self)
        self.self2_ir, self.self2_vi = stack(cfg.depth_self), stack(cfg.depth_self)
        self.cross_ir_query = CrossAttention(cfg)  # IR queries, VI keys/values (authors' cross_atten1)
        self.cross_vi_query = CrossAttention(cfg)  # VI queries, IR keys/values (authors' cross_atten2)

    def self_attend(self, ir: Tensor, vi: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens (N, L, D) per modality through self-attention stage 1 then stage 2."""
        for block in (*self.self1_ir, *self.self2_ir):
            ir = block(ir)
        for block in (*self.self1_vi, *self.self2_vi):
            vi = block(vi)
        return ir, vi

    def cross_attend(self, ir: Tensor, vi: Tensor) -> Tensor:
        return self.cross_ir_query(ir, vi) + self.cross_vi_query(vi, ir)

    def forward(self, ir_deep: Tensor, vi_deep: Tensor) -> Tensor:
        """(B,128,h,w) x2 -> fused deep feature (B,128,h,w)."""
        t, p = self.cfg.tile, self.cfg.patch
        ir, grid = tile_tokens(ir_deep, t, p)  # (B*tiles, 256, 512)
        vi, _ = tile_tokens(vi_deep, t, p)
        ir, vi = self.self_attend(ir, vi)
        return untile_tokens(self.cross_attend(ir, vi), grid, ir_deep.shape[-2:], p)


# ----------------------------------------------------------------------------------------------------------
# Fusion decoder
# ----------------------------------------------------------------------------------------------------------


def _box_all_channels(x: Tensor) -> Tensor:
    """The authors' fixed filter: a 3x3 conv C->C, zero padding, every weight 1/9.

    Every output channel is the same 3x3 box mean of the channel *sum*, so we compute it once:
    (B,C,h,w) -> (B,1,h,w). Same maths, C*9 times fewer multiply-adds.
    """
    return F.avg_pool2d(x.sum(dim=1, keepdim=True), 3, stride=1, padding=1, count_include_pad=True)


def _ratio(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    total = a + b + EPS
    return a / total, b / total


def _pad_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Reflection-pad to ``size``, the odd pixel going to the bottom/right (the authors' shape adjust)."""
    dh, dw = size[0] - x.shape[-2], size[1] - x.shape[-1]
    if dh == 0 and dw == 0:
        return x
    return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="reflect")


def _shallow_skip(x: Tensor, ir_sh: Tensor, vi_sh: Tensor, gain: float) -> Tensor:
    """x + gain * w_ir * ir_sh + w_vi * vi_sh with w = g / (g_ir + g_vi + eps), g = |sh - box(sh)|.

    The weights favour the modality with more local detail (high-pass magnitude). All tensors are
    (B,32,H,W) at full resolution, where the work is memory-bound and on CPU each fresh allocation
    (page faults) costs more than the arithmetic, so inference does it in place with one division.
    """
    g_ir = ir_sh - _box_all_channels(ir_sh)
    g_vi = vi_sh - _box_all_channels(vi_sh)
    if torch.is_grad_enabled():
        g_ir, g_vi = g_ir.abs(), g_vi.abs()
        return x + (gain * g_ir * ir_sh + g_vi * vi_sh) / (g_ir + g_vi + EPS)
    g_ir.abs_()
    g_vi.abs_()
    denominator = torch.add(g_ir, g_vi).add_(EPS)
    numerator = g_ir.mul_(ir_sh).mul_(gain).addcmul_(g_vi, vi_sh)
    return x.addcdiv_(numerator, denominator)


def deep_activity(deep: Tensor) -> Tensor:
    """(B,128,h,w) deep feature -> (B,1,h,w) activity the decoder's deep skip weights by (A or B below)."""
    return _box_all_channels(deep)


@dataclass(frozen=True)
class DeepSkipHealth:
    """How well-conditioned the decoder's fixed deep-skip weights are for a pair of encoders.

    w_ir = A / (A + B + eps) with A, B the box-filtered channel sums of the two deep features. The
    encoders have no activations, so A and B can have either sign; where they differ in sign A + B
    crosses zero and w explodes. Those few pixels then own the per-image min-max stretch and the
    output is flat grey with dipoles. Nothing in the authors' design prevents it; it depends on how
    stage 1 left the encoders, and stage 2 (encoders frozen) cannot repair it.
    """

    opposite_sign: float  # fraction of deep positions where A and B differ in sign
    weight_p999: float  # 99.9th percentile of |w_ir| (well-conditioned: <= 1)
    weight_max: float

    @property
    def ill_conditioned(self) -> bool:
        # Same-sign sums keep every weight in [0, 1]; a weight of 10 needs A + B to cancel to a tenth of A.
        return self.weight_p999 > 10.0

    def describe(self) -> str:
        return (
            f"A and B differ in sign at {100 * self.opposite_sign:.0f} % of positions; "
            f"|w_ir| p99.9 {self.weight_p999:.3g}, max {self.weight_max:.3g}"
        )


def deep_skip_health(encoder_ir: nn.Module, encoder_vi: nn.Module, ir: Tensor, vi: Tensor) -> DeepSkipHealth:
    """Measure :class:`DeepSkipHealth` on a batch of (B,1,H,W) [0, 1] pairs (no gradients)."""
    with torch.no_grad():
        a = deep_activity(encoder_ir(ir)[1])
        b = deep_activity(encoder_vi(vi)[1])
        w = _ratio(a, b)[0].abs().flatten()
        return DeepSkipHealth(
            opposite_sign=float((torch.sign(a) != torch.sign(b)).float().mean()),
            weight_p999=float(torch.quantile(w, 0.999)) if w.numel() <= 16_000_000 else float(w.max()),
            weight_max=float(w.max()),
        )


class FusionDecoder(nn.Module):
    """1/8 -> full resolution with nearest x2 upsampling; conv + BatchNorm units without activations."""

    def __init__(self, cfg: CrossFuseConfig) -> None:
        super().__init__()
        d = cfg.deep_channels
        self.shallow_ir_gain = cfg.shallow_ir_gain
        self.conv1 = ConvUnit(d, d // 2, batch_norm=True)
        self.conv2 = ConvUnit(d // 2, d // 2, batch_norm=True)
        self.conv3 = ConvUnit(d // 2, d // 4, batch_norm=True)
        self.conv4 = ConvUnit(d // 4, d // 4, batch_norm=True)
        self.head = ConvUnit(d // 4, 1, kernel=1, batch_norm=True)

    def forward(self, cam: Tensor, ir_deep: Tensor, vi_deep: Tensor, ir_sh: Tensor, vi_sh: Tensor) -> Tensor:
        # Deep skip: weights from box-filtered *values* (activity), shared by all channels.
        w_ir, w_vi = _ratio(_box_all_channels(ir_deep), _box_all_channels(vi_deep))  # (B,1,h,w)
        x = cam + w_ir * ir_deep + w_vi * vi_deep
        # conv -> nearest x2 -> conv ...; each upsample is fused with the next conv's reflection padding.
        x = self.conv2.conv_padded(_upsample2_reflect_pad1(self.conv1(x)))  # (B,64,2h,2w)
        x = self.conv3.conv_padded(_upsample2_reflect_pad1(x))  # (B,32,4h,4w)
        x = self.conv4.conv_padded(_upsample2_reflect_pad1(x))  # (B,32,8h,8w)
        x = _pad_to(x, ir_sh.shape[-2:])  # (B,32,H,W)
        x = _shallow_skip(x, ir_sh, vi_sh, self.shallow_ir_gain)
        return self.head(x)  # (B,1,H,W), before the min-max stretch


class CrossFuse(nn.Module):
    """Both encoders + CAM + fusion decoder; ``forward`` returns the raw decoder output (no stretch)."""

    def __init__(self, cfg: CrossFuseConfig | None = None, *, winograd: bool = True) -> None:
        super().__init__()
        self.cfg = cfg or CrossFuseConfig()
        self.encoder_ir = Encoder(self.cfg)
        self.encoder_vi = Encoder(self.cfg)
        self.cam = CAM(self.cfg)
        self.decoder = FusionDecoder(self.cfg)
        self.set_winograd(winograd)

    def set_winograd(self, enabled: bool) -> None:
        """Toggle NNPACK Winograd 3x3 convs for no-grad CPU inference (see :class:`ConvUnit`)."""
        for module in self.modules():
            if isinstance(module, ConvUnit):
                module.winograd = enabled

    def forward(self, ir: Tensor, vi: Tensor) -> Tensor:
        """ir, vi: (B,1,H,W) in [0,1] -> raw fused (B,1,H,W)."""
        ir_sh, ir_de = self.encoder_ir(ir)
        vi_sh, vi_de = self.encoder_vi(vi)
        return self.decoder(self.cam(ir_de, vi_de), ir_de, vi_de, ir_sh, vi_sh)


# ----------------------------------------------------------------------------------------------------------
# Inference
# ----------------------------------------------------------------------------------------------------------

MIN_SIDE = 16  # below this the 1/8 map is < 2 px and the decoder's reflection padding is undefined


def fuse_CrossFuse(model: CrossFuse, ir: Tensor, vi: Tensor) -> Tensor:
    """Fuse as the authors' ``test_conv_trans.py`` does, returning the raw decoder output (B,1,H,W).

    Inputs: (B,1,H,W) gray images in [0, 1] (BT.601 luma / 255; for colour VI fuse its Y and re-attach
    Cb/Cr afterwards). The range is checked because the authors' own contract is 0-255 and a 0-255 input
    would silently give a different (wrong) result. Any H, W >= 16 works: CAM tiling, tile padding and the
    decoder's shape adjustment happen inside the model (the authors' code needs >= ~136 px per side; where
    it works the results are the same). The output is on the inputs' device; apply :func:`stretch` for the
    authors' saved 0-255 image.
    """
    if ir.shape != vi.shape or ir.dim() != 4 or ir.shape[1] != 1:
        raise ValueError(f"expected two (B,1,H,W) tensors of equal shape, got {tuple(ir.shape)}, {tuple(vi.shape)}")
    if min(ir.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"CrossFuse needs H, W >= {MIN_SIDE}, got {tuple(ir.shape[-2:])}")
    for name, img in (("ir", ir), ("vi", vi)):
        lo, hi = torch.aminmax(img)
        if lo < 0 or hi > 1:
            raise ValueError(f"{name} must be in [0, 1] (got [{lo:.4g}, {hi:.4g}]); divide 0-255 images by 255")
    param = next(model.parameters())
    with torch.inference_mode():
        raw = model(ir.to(param.device, param.dtype), vi.to(param.device, param.dtype))
    return raw.to(ir.device)


def stretch(raw: Tensor) -> Tensor:
    """Per-image (and per-channel) min-max to 0..255 exactly as the model's returned ``out``.

    (raw - min) / (max - min + 1e-6) * 255; the authors then truncate to uint8 when saving.
    """
    flat = raw.flatten(2)
    lo = flat.amin(dim=2)[..., None, None]
    hi = flat.amax(dim=2)[..., None, None]
    return (raw - lo) / (hi - lo + EPS) * 255


# ----------------------------------------------------------------------------------------------------------
# Checkpoint loading
# ----------------------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint does not match the authors' layout (unknown/missing key, wrong shape, bad constant)."""


_FIXED_BOX_KEYS = ("trans/decoder_fusion.weight.conv_sh.weight", "trans/decoder_fusion.weight.conv_de.weight")


def authors_key_map(cfg: CrossFuseConfig | None = None) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    """The authors' keys (``<group>/<state-dict key>``) of a complete checkpoint.

    Returns (mapped, unused): ``mapped`` sends each key our model uses to our state-dict key; ``unused`` lists
    the keys the released files also hold (stage-1 decoder, Laplacian ``conv_gra``, the cross blocks' unused
    ``qkv``, the self-attention modules' unused final norms, the fixed box filters) with their shapes.
    """
    cfg = cfg or CrossFuseConfig()
    d, c1, e, half, quarter = (
        cfg.deep_channels,
        cfg.shallow_channels,
        cfg.embed_dim,
        cfg.deep_channels // 2,
        cfg.deep_channels // 4,
    )
    mapped: dict[str, str] = {}
    unused: dict[str, tuple[int, ...]] = {}

    def conv(theirs: str, ours: str, bn: bool = False) -> None:
        for p in ("weight", "bias"):
            mapped[f"{theirs}.conv2d.0.{p}"] = f"{ours}.conv.{p}"
        if bn:
            for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                mapped[f"{theirs}.conv2d.1.{p}"] = f"{ours}.bn.{p}"

    def linear(theirs: str, ours: str) -> None:
        for p in ("weight", "bias"):
            mapped[f"{theirs}.{p}"] = f"{ours}.{p}"

    for group, ours in (("auto_ir", "encoder_ir"), ("auto_vi", "encoder_vi")):
        enc = f"{group}/fea_encoder1"
        conv(f"{enc}.conv1", f"{ours}.stem")
        for idx, block in ((0, "block1"), (2, "block2")):  # dense_blocks is [block, pool, block, pool]
            for i in range(cfg.dense_layers):
                conv(f"{enc}.dense_blocks.{idx}.dense_conv{i}", f"{ours}.{block}.layers.{i}")
            conv(f"{enc}.dense_blocks.{idx}.adjust_conv", f"{ours}.{block}.fuse")
        dec = f"{group}/recon_decoder1"  # stage-1 reconstruction decoder: training only
        for name, shape in (
            ("conv1", (half, d, 3, 3)),
            ("conv_block.0", (half, half, 3, 3)),
            ("conv_block.2", (quarter, half, 3, 3)),
            ("conv_last", (1, quarter, 1, 1)),
        ):
            unused[f"{dec}.{name}.conv2d.0.weight"] = shape
            unused[f"{dec}.{name}.conv2d.0.bias"] = shape[:1]

    cam = "trans/cross_atten_block"
    for stage in (1, 2):
        for mod, modality in ((1, "ir"), (2, "vi")):
            theirs = f"{cam}.self_atten_block{stage}.self_atten{mod}"
            for b in range(cfg.depth_self):
                ours = f"cam.self{stage}_{modality}.{b}"
                for t, o in (("norm1", "norm1"), ("attn.qkv", "qkv"), ("attn.proj", "proj"), ("norm2", "norm2")):
                    linear(f"{theirs}.blocks.{b}.{t}", f"{ours}.{o}")
                for fc in ("fc1", "fc2"):
                    linear(f"{theirs}.blocks.{b}.mlp.{fc}", f"{ours}.mlp.{fc}")
            unused[f"{theirs}.norm.weight"] = unused[f"{theirs}.norm.bias"] = (e,)
    for mod, ours_mod in ((1, "cam.cross_ir_query"), (2, "cam.cross_vi_query")):
        theirs = f"{cam}.cross_atten_block.cross_atten{mod}"
        for b in range(cfg.depth_cross):
            pairs = [("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "proj"), ("mlp.fc1", "mlp.fc1")]
            pairs += [("mlp.fc2", "mlp.fc2"), ("attn.q_linear", "q"), ("attn.k_linear", "k"), ("attn.v_linear", "v")]
            for t, o in pairs:
                linear(f"{theirs}.blocks.{b}.{t}", f"{ours_mod}.blocks.{b}.{o}")
            unused[f"{theirs}.blocks.{b}.attn.qkv.weight"] = (3 * e, e)
            unused[f"{theirs}.blocks.{b}.attn.qkv.bias"] = (3 * e,)
        linear(f"{theirs}.norm", f"{ours_mod}.norm")

    dec = "trans/decoder_fusion"
    for theirs, ours in (
        ("conv1", "conv1"),
        ("conv_block.0", "conv2"),
        ("conv_block.2", "conv3"),
        ("conv_block.4", "conv4"),
        ("conv_last", "head"),
    ):
        conv(f"{dec}.{theirs}", f"decoder.{ours}", bn=True)
    unused["trans/conv_gra.weight"] = (c1, c1, 3, 3)
    unused[_FIXED_BOX_KEYS[0]] = (c1, c1, 3, 3)
    unused[_FIXED_BOX_KEYS[1]] = (d, d, 3, 3)
    return mapped, unused


def _tensors(state: Mapping[str, object], origin: str, group: str = "") -> dict[str, Tensor]:
    """Validate a state dict and drop DataParallel's ``module.`` prefix (``<group>/`` is prepended)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{origin}: value of {key!r} is not a tensor")
        out[f"{group}{key.removeprefix('module.')}"] = value
    return out


def _torch_state(path: Path) -> Mapping[str, object]:
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def _grouped(state: Mapping[str, object], origin: str) -> dict[str, Tensor]:
    """Accept ``{group: state_dict}`` or a flat ``{'group/key': tensor}`` dict; strip ``module.`` prefixes."""
    if state and all(k in GROUPS and isinstance(v, Mapping) for k, v in state.items()):
        out: dict[str, Tensor] = {}
        for group, sd in state.items():
            out.update(_tensors(sd, origin, f"{group}/"))  # type: ignore[arg-type]  # checked just above
        return out
    flat: dict[str, object] = {}
    for key, value in state.items():
        group, sep, rest = key.partition("/")
        if not sep or group not in GROUPS:
            raise CheckpointError(
                f"{origin}: key {key!r} has no group prefix (expected one of {', '.join(g + '/' for g in GROUPS)});"
                " a single released .model file holds one group: pass the folder of released files or"
                " a mapping {'auto_ir': path, 'auto_vi': path, 'trans': path}"
            )
        flat[f"{group}/{rest.removeprefix('module.')}"] = value
    return _tensors(flat, origin)


def _released_files(folder: Path) -> dict[str, Path]:
    """Find the authors' three released files under ``folder`` (their repo's ``models/`` layout)."""
    patterns = {"auto_ir": "auto_encoder_epoch_*_ir.model", "auto_vi": "auto_encoder_epoch_*_vi.model"}
    patterns["trans"] = "fusetrans_*.model"
    found: dict[str, Path] = {}
    for group, pattern in patterns.items():
        hits = sorted(folder.rglob(pattern))
        if len(hits) != 1:
            raise CheckpointError(f"{folder}: expected exactly one {pattern} for {group!r}, found {len(hits)}")
        found[group] = hits[0]
    return found


def read_checkpoint(source: str | Path | Mapping[str, object]) -> dict[str, Tensor]:
    """Read any supported layout into one flat dict keyed ``<group>/<authors' state-dict key>``.

    ``source`` may be: a ``.safetensors`` file with grouped keys (the golden layout); a single torch file
    (``.pth``/``.pt``/``.model``) holding grouped keys or ``{group: state_dict}``; a folder holding the
    authors' released ``auto_encoder_epoch_4_{ir,vi}.model`` and ``fusetrans_*.model``; or a mapping
    ``{group: path or state dict}``. ``module.`` prefixes are removed. Torch files load with
    ``weights_only=True`` on the CPU.
    """
    if isinstance(source, Mapping):
        if source and set(source) <= set(GROUPS) and all(isinstance(v, (str, Path)) for v in source.values()):
            out: dict[str, Tensor] = {}
            for group, item in source.items():
                out.update(_tensors(_torch_state(Path(item)), str(item), f"{group}/"))  # type: ignore[arg-type]
            return out
        return _grouped(source, "mapping")
    path = Path(source)
    if path.is_dir():
        return read_checkpoint(_released_files(path))
    if not path.is_file():
        raise FileNotFoundError(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _grouped(load_file(str(path)), str(path))
    return _grouped(_torch_state(path), str(path))


def _check_box_filter(key: str, value: Tensor) -> None:
    """The fixed skip filters must be the 1/9 box: the model computes them analytically."""
    if not torch.allclose(value.float(), torch.full_like(value, 1 / 9, dtype=torch.float32), rtol=0, atol=1e-4):
        raise CheckpointError(f"{key}: expected the fixed 3x3 box filter (all entries 1/9)")


def _convert(ckpt: Mapping[str, Tensor], model: CrossFuse, *, partial: bool, origin: str) -> dict[str, Tensor]:
    """Authors' grouped keys -> our state dict, refusing unknown/missing keys and shape mismatches."""
    mapped, unused = authors_key_map(model.cfg)
    ours = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in ckpt.items():
        if key in mapped:
            target = ours[mapped[key]]
            expected = tuple(target.shape)
        elif key in unused:
            expected = unused[key]
        else:
            raise CheckpointError(f"{origin}: unknown key {key!r}")
        if tuple(value.shape) != expected:
            raise CheckpointError(f"{origin}: {key!r} has shape {tuple(value.shape)}, expected {expected}")
        if key in _FIXED_BOX_KEYS:
            _check_box_filter(key, value)
        if key in mapped:
            out[mapped[key]] = value.to(device="cpu", dtype=target.dtype).contiguous()
    if not partial:
        missing = [k for k in (*mapped, *unused) if k not in ckpt]
        if missing:
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(f"{origin}: missing key(s) {', '.join(map(repr, missing[:5]))}{more}")
    return out


def load_CrossFuse(
    path: str | Path | Mapping[str, object],
    *,
    override: str | Path | Mapping[str, object] | None = None,
    config: CrossFuseConfig | None = None,
    winograd: bool = True,
) -> CrossFuse:
    """Build the model in eval mode from a complete checkpoint (see :func:`read_checkpoint` for layouts).

    ``override`` (same layouts, any subset of keys) is applied on top, e.g. the golden perturbed weights.
    Float tensors are cast to float32 (the golden file stores float16). ``winograd=False`` keeps every
    conv on PyTorch's direct kernels (closest to the authors' numbers, ~2x slower encoders).
    """
    with torch.device("meta"):  # skip the random init of 23 M parameters that are overwritten anyway
        model = CrossFuse(config, winograd=winograd)
    state = _convert(read_checkpoint(path), model, partial=False, origin=str(path))
    if override is not None:
        state.update(_convert(read_checkpoint(override), model, partial=True, origin=str(override)))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------------
# Training losses (§2.3)
# ----------------------------------------------------------------------------------------------------------


def CrossFuse_loss(raw: Tensor, ir: Tensor, vi: Tensor) -> dict[str, Tensor]:
    """Stage-2 (fusion network) loss: total = pix + 10 * grad, on the authors' 0-255 scale.

    raw: model output (B,1,H,W) before the stretch; ir, vi: the model's [0, 1] inputs. As in the authors'
    ``train_module`` the loss sees the min-max stretched output (0-255) and the 0-255 sources:
    - pix: MSE to a hard per-pixel choice of IR where its 11x11 box mean (zero pad) is the larger one
      (w_ir > w_vi after normalising by their sum + 1e-6), else VI;
    - grad: MSE between relu(Lap(F)) and max(relu(Lap(IR)), relu(Lap(VI))), 4-neighbour Laplacian, zero pad.
    The authors' mean and VGG feature terms have weight 0 and are omitted. Returned terms are weighted.
    """
    fused = stretch(raw)
    ir, vi = ir * 255, vi * 255
    w_ir, w_vi = _ratio(*(F.avg_pool2d(x, 11, stride=1, padding=5, count_include_pad=True) for x in (ir, vi)))
    pix = F.mse_loss(fused, torch.where(w_ir > w_vi, ir, vi))

    lap = fused.new_tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)

    def edges(x: Tensor) -> Tensor:
        return F.relu(F.conv2d(x, lap, padding=1))

    grad = 10.0 * F.mse_loss(edges(fused), torch.maximum(edges(ir), edges(vi)))
    return {"pix": pix, "grad": grad, "total": pix + grad}


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _gaussian_window(size: int, sigma: float, like: Tensor) -> Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - size // 2  # their centre, even sizes too
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(like.shape[1], 1, size, size)  # depth-wise (C,1,k,k)


def ms_ssim(x: Tensor, y: Tensor, *, normalize: bool = True) -> Tensor:
    """MS-SSIM as in the ``pytorch_msssim`` copy the authors bundle (a non-standard variant).

    Per scale: SSIM and contrast-structure with an 11x11 Gaussian (sigma 1.5; shrunk to the image size at
    coarse scales), *valid* convolution, means over the whole batch; then 2x2 average pooling; 5 scales.
    The value range L is guessed from ``x``: 255 if max(x) > 128 else 1 (minus -1 if min(x) < -0.5), so
    C1 = (0.01 L)^2, C2 = (0.03 L)^2. ``normalize`` maps every term to (t + 1) / 2. Combination, quirk
    included: prod_i(cs_i^w_i * ssim_5^w_5) over the first four scales (the coarsest-scale SSIM factor
    enters four times), not the textbook prod(cs_i^w_i) * ssim_5^w_5.
    """
    hi = 255.0 if x.max() > 128 else 1.0
    lo = -1.0 if x.min() < -0.5 else 0.0
    c1, c2 = (0.01 * (hi - lo)) ** 2, (0.03 * (hi - lo)) ** 2
    sims, css = [], []
    for level in range(len(MS_SSIM_WEIGHTS)):
        if level:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        win = _gaussian_window(min(11, *x.shape[-2:]), 1.5, x)
        groups = x.shape[1]

        def blur(t: Tensor, win: Tensor = win, groups: int = groups) -> Tensor:
            return F.conv2d(t, win, groups=groups)

        mu_x, mu_y = blur(x), blur(y)
        var_x = blur(x * x) - mu_x**2
        var_y = blur(y * y) - mu_y**2
        cov = blur(x * y) - mu_x * mu_y
        cs_map = (2 * cov + c2) / (var_x + var_y + c2)
        sims.append(((2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * cs_map).mean())
        css.append(cs_map.mean())
    sim, cs = torch.stack(sims), torch.stack(css)
    if normalize:
        sim, cs = (sim + 1) / 2, (cs + 1) / 2
    weights = sim.new_tensor(MS_SSIM_WEIGHTS)
    return torch.prod(cs[:-1] ** weights[:-1] * sim[-1] ** weights[-1])


def CrossFuse_autoencoder_loss(recon: Tensor, image: Tensor) -> dict[str, Tensor]:
    """Stage-1 loss of each modality's auto-encoder: total = MSE + 1e4 * (1 - MS-SSIM), 0-255 scale.

    recon: the reconstruction decoder's output (the authors multiply it by 255); image: the [0, 1] input,
    both (B,1,H,W). Weights are the authors' ``args_auto.w[:2] = [1, 1e4]``. The reconstruction decoder
    itself (``recon_decoder1`` in their checkpoints) is training-only and not implemented here.
    """
    recon, image = recon * 255, image * 255
    pixel = F.mse_loss(recon, image)
    ssim = 1e4 * (1 - ms_ssim(recon, image, normalize=True))
    return {"pixel": pixel, "ssim": ssim, "total": pixel + ssim}
