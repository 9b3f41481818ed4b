r"""CMMDL: cross-modal multi-domain learning for pixel-level IR/visible image fusion.

A re-implementation of the network of Ist-Zhy/CMMDL (``Net/CMMDL_Network.py`` at d47478d) written from the
research note (``shared/reference/fusion.md`` §3) and the golden-vector README, so that the authors'
released checkpoint (``module.``-prefixed ``DataParallel`` keys) loads into it and reproduces their outputs.

Pipeline (every feature map is 64 channels at full resolution, nothing is down-sampled)::

    Y (VI luma) --\                      /-- FDLB (frequency) --\
                   shared SFCA encoder --                        HDFAB --> SFCA decoder --> sigmoid
    IR ----------/                       \-- SDLB (spatial) ----/

The parameter names here are ours; :data:`_RENAMES` translates them to the authors' names and
:func:`load_CMMDL` refuses anything it cannot account for. Layers the authors define but never call
(``q1X1_*``, ``norm_VI``, ``Sobel``, ``Identity``) are not built; their checkpoint tensors are shape-checked
and dropped.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CMMDL",
    "CMMDLConfig",
    "CheckpointError",
    "CMMDL_loss",
    "authors_state_dict",
    "fuse_CMMDL",
    "load_CMMDL",
    "read_checkpoint",
    "rgb_to_ycbcr",
    "stretch",
]


@dataclass(frozen=True)
class CMMDLConfig:
    """Hyper-parameters of ``CMMDL()``; the authors' constructor takes none, so the defaults are the model."""

    dim: int = 64
    heads: int = 8
    encoder_blocks: int = 4
    decoder_blocks: int = 4
    ffn_expansion: int = 2
    coupling_blocks: int = 3  # affine-coupling blocks per SDLB
    coupling_clamp: float = 0.8
    inverted_expansion: int = 2
    freq_leaky_slope: float = 0.1  # FDLB MLPs
    decoder_leaky_slope: float = 0.01  # nn.LeakyReLU() default in the output head
    spatial_attn_kernel: int = 7
    se_reduction: int = 2
    dense_blocks: int = 4  # DSRM
    norm_eps: float = 1e-5
    fft_eps: float = 1e-8  # the authors add it before rfft2 and to the rebuilt spectrum


# --------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of an NCHW map (the ``nn.LayerNorm`` parameter layout).

    Both of the authors' variants (``nn.LayerNorm`` on a transposed view, and their "WithBias" LayerNorm)
    normalise each pixel's C-vector with the population variance. The model runs channels-last, where the
    NHWC view is contiguous, so this is one fused kernel with no transposes.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        nhwc = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return nhwc.permute(0, 3, 1, 2)


def _conv1x1(cin: int, cout: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=bias)


def _depthwise3x3(channels: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)


class SFCA(nn.Module):
    """Spatial-frequency cascaded attention (the authors' ``MDAttention_TT``).

    Spatial stage: Restormer channel attention (per head, an (C/h x C/h) map from L2-normalised q, k over
    all pixels). Frequency stage, fed by the spatial result: a whole-image circular convolution of the
    fourth projection x1 with a kernel predicted from the spatial result, then LayerNorm, gating and a
    projection. The circular convolution is why the network sees the whole image and is not tiled.
    """

    def __init__(self, cfg: CMMDLConfig) -> None:
        super().__init__()
        c = cfg.dim
        self.heads = cfg.heads
        self.temperature = nn.Parameter(torch.ones(1, cfg.heads, 1, 1))
        self.qkvx = _conv1x1(c, 4 * c, bias=False)
        self.qkvx_dw = _depthwise3x3(4 * c)
        self.proj = _conv1x1(c, c, bias=False)
        self.kv = _conv1x1(c, 2 * c, bias=False)
        self.kv_dw = _depthwise3x3(2 * c)
        self.freq_norm = ChannelLayerNorm(c, cfg.norm_eps)
        self.freq_proj = _conv1x1(c, c, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        heads, d = self.heads, c // self.heads
        t = self.qkvx_dw(self.qkvx(x))  # (B,4C,H,W), channels-last
        tokens = t.permute(0, 2, 3, 1).reshape(b, h * w, 4 * c)  # (B,N,4C) view
        qk, v = tokens[..., : 2 * c], tokens[..., 2 * c : 3 * c]  # (B,N,2C), (B,N,C) views

        # Channel attention. One Gram matrix of [q k] gives q.k and the squared norms of both, so
        # normalising afterwards equals the authors' L2-normalise-then-multiply without two extra passes.
        gram = qk.transpose(1, 2) @ qk  # (B,2C,2C)
        norms = gram.diagonal(dim1=1, dim2=2).sqrt().clamp_min(1e-12)  # F.normalize's eps
        qn, kn = norms[:, :c].view(b, heads, d, 1), norms[:, c:].view(b, heads, 1, d)
        qk_heads = gram[:, :c, c:].reshape(b, heads, d, heads, d).diagonal(dim1=1, dim2=3)  # (B,d,d,h)
        logits = qk_heads.permute(0, 3, 1, 2) / (qn * kn) * self.temperature  # (B,h,d,d)
        attn = torch.softmax(logits, dim=-1)
        # Apply all heads and the output projection as one (C x C) matrix per image: block-diagonal
        # attention, then project_out (same maths as per-head attn @ v followed by the 1x1 conv).
        mix = attn.new_zeros(b, c, c)
        mix.view(b, heads, d, heads, d).diagonal(dim1=1, dim2=3).copy_(attn.permute(0, 2, 3, 1))
        mix = self.proj.weight.view(c, c) @ mix  # (B,C,C)
        s = (v @ mix.transpose(1, 2)).view(b, h, w, c).permute(0, 3, 1, 2)  # (B,C,H,W) channels-last

        x1 = t[:, 3 * c :]
        kf, vf = self.kv_dw(self.kv(s)).chunk(2, dim=1)
        f = torch.fft.irfft2(torch.fft.rfft2(x1) * torch.fft.rfft2(kf), s=(h, w))  # circular conv, (B,C,H,W)
        f = self.freq_norm(f) * vf
        return self.freq_proj(f) + s


class GDFN(nn.Module):
    """Gated depth-wise feed-forward (Restormer), bias-free: GELU(a) * b on a doubled hidden width."""

    def __init__(self, cfg: CMMDLConfig) -> None:
        super().__init__()
        hidden = cfg.dim * cfg.ffn_expansion
        self.proj_in = _conv1x1(cfg.dim, 2 * hidden, bias=False)
        self.dw = _depthwise3x3(2 * hidden)
        self.proj_out = _conv1x1(hidden, cfg.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a, g = self.dw(self.proj_in(x)).chunk(2, dim=1)  # 2 x (B,hidden,H,W)
        return self.proj_out(F.gelu(a).mul_(g))  # in place: one 128-channel map fewer to allocate


class SFCABlock(nn.Module):
    """Pre-norm transformer block: x + SFCA(LN(x)), then x + GDFN(LN(x))."""

    def __init__(self, cfg: CMMDLConfig) -> None:
        super().__init__()
        self.norm1 = ChannelLayerNorm(cfg.dim, cfg.norm_eps)
        self.attn = SFCA(cfg)
        self.norm2 = ChannelLayerNorm(cfg.dim, cfg.norm_eps)
        self.ffn = GDFN(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class Encoder(nn.Module):
    """Shared by both modalities (one set of weights): 3x3 embedding then SFCA blocks."""

    def __init__(self, cfg: CMMDLConfig) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, cfg.dim, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(*[SFCABlock(cfg) for _ in range(cfg.encoder_blocks)])

    def forward(self, x: Tensor) -> Tensor:  # (B,1,H,W) -> (B,C,H,W)
        # Channels-last from here on: oneDNN's 1x1 and depth-wise convs are 2-3x faster on it, and the
        # per-pixel LayerNorms become contiguous. (A 1-channel input cannot select the format by itself.)
        return self.blocks(self.embed(x).contiguous(memory_format=torch.channels_last))


def _mlp1x1(cin: int, cout: int, slope: float) -> nn.Sequential:
    return nn.Sequential(_conv1x1(cin, cout, True), nn.LeakyReLU(slope), _conv1x1(cout, cout, True))


class FDLB(nn.Module):
    """Frequency-domain learning block (``FrequencyDomain_T``).

    Amplitude and phase of each modality's spectrum are remapped by 1x1 MLPs; a shared phase is predicted
    from both phases. Each modality is rebuilt with its own amplitude twice (shared phase, own phase) and
    the two magnitudes of the inverse transforms are summed. The phase MLPs act on raw ``angle`` values
    (not 2*pi-periodic), which is what makes this block sensitive to FFT back-end rounding: at odd H or W
    the DC bins' imaginary parts come out as rounding noise instead of +-0, so a negative DC bin gets +pi or
    -pi by chance and the fused output moves by up to ~3e-4 between any two implementations (the authors'
    own op order does so between 1 and 2 threads). At even sizes those bins are exactly real and stable.
    """

    def __init__(self, cfg: CMMDLConfig) -> None:
        super().__init__()
        c, slope = cfg.dim, cfg.freq_leaky_slope
        self.eps = cfg.fft_eps
        self.pre_vi = _conv1x1(c, c, True)
        self.pre_ir = _conv1x1(c, c, True)
        self.amp_vi = _mlp1x1(c, c, slope)
        self.amp_ir = _mlp1x1(c, c, slope)
        self.pha_vi = _mlp1x1(c, c, slope)
        self.pha_ir = _mlp1x1(c, c, slope)
        self.pha_shared = _mlp1x1(2 * c, c, slope)
        self.post_vi = nn.Conv2d(c, c, 3, padding=1)
        self.post_ir = nn.Conv2d(c, c, 3, padding=1)

    def _rebuild(self, amp: Tensor, phase: Tensor, size: tuple[int, int]) -> Tensor:
        # The authors add eps to the real and imaginary parts, then eps again to the complex number.
        spec = torch.complex(amp * torch.cos(phase) + self.eps, amp * torch.sin(phase) + self.eps) + self.eps
        return torch.fft.irfft2(spec, s=size).abs()

    def forward(self, vi: Tensor, ir: Tensor) -> tuple[Tensor, Tensor]:
        size = (vi.shape[-2], vi.shape[-1])
        spec_vi = torch.fft.rfft2(self.pre_vi(vi) + self.eps)  # (B,C,H,W//2+1) complex
        spec_ir = torch.fft.rfft2(self.pre_ir(ir) + self.eps)
        pha_vi, pha_ir = torch.angle(spec_vi), torch.angle(spec_ir)
        amp_vi, amp_ir = self.amp_vi(spec_vi.abs()), self.amp_ir(spec_ir.abs())
        del spec_vi, spec_ir
        shared = self.pha_shared(torch.cat([pha_vi, pha_ir], dim=1))
        pha_vi, pha_ir = self.pha_vi(pha_vi), self.pha_ir(pha_ir)
        out_vi = self._rebuild(amp_vi, shared, size) + self._rebuild(amp_vi, pha_vi, size)
        out_ir = self._rebuild(amp_ir, shared, size) + self._rebuild(amp_ir, pha_ir, size)
        return self.post_vi(out_vi), self.post_ir(out_ir)


class InvertedResidual(nn.Module):
    """MobileNetV2-style block with identity skip (the authors' ``GradientConvolutionalBlock``).

    The depth-wise conv is unpadded; a reflection pad after the first ReLU6 keeps the size.
    """

    def __init__(self, channels: int, expansion: int) -> None:
        super().__init__()
        hidden = channels * expansion
        self.expand = _conv1x1(channels, hidden, bias=False)
        self.dw = nn.Conv2d(hidden, hidden, 3, groups=hidden, bias=False)
        self.project = _conv1x1(hidden, channels, bias=False)
        for conv in (self.expand, self.dw, self.project):
            # The authors' init (xavier-normal x 0.1) keeps each coupling close to the identity at start.
            nn.init.xavier_normal_(conv.weight)
            conv.weight.data.mul_(0.1)

    def forward(self, x: Tensor) -> Tensor:
        y = F.pad(F.relu6(self.expand(x)), (1, 1, 1, 1), mode="reflect")
        return self.project(F.relu6(self.dw(y))) + x


class AffineCoupling(nn.Module):
    """Invertible affine coupling on a channel half-split (``InvBlock``).

    y1 = z1 + phi(z1); y2 = z2 * exp(clamp * (2 sigmoid(rho(y1)) - 1)) + eta(y1). Note phi itself has an
    identity skip, so y1 = 2 z1 + branch, as in the authors' code.
    """

    def __init__(self, cfg: CMMDLConfig) -> None:
        super().__init__()
        self.split = cfg.dim // 2
        self.clamp = cfg.coupling_clamp
        self.phi = InvertedResidual(self.split, cfg.inverted_expansion)
        self.rho = InvertedResidual(self.split, cfg.inverted_expansion)
        self.eta = InvertedResidual(self.split, cfg.inverted_expansion)

    def forward(self, x: Tensor) -> Tensor:
        z1, z2 = x[:, : self.split], x[:, self.split :]
        y1 = z1 + self.phi(z1)
        log_scale = self.clamp * (torch.sigmoid(self.rho(y1)) * 2 - 1)
        y2 = z2 * torch.exp(log_scale) + self.eta(y1)
        return torch.cat([y1, y2], dim=1)


class SDLB(nn.Module):
    """Spatial-domain learning block (``SpatialDomain``): a stack of affine couplings, one per modality."""

    def __init__(self, cfg: CMMDLConfig) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[AffineCoupling(cfg) for _ in range(cfg.coupling_blocks)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(x)


class ConvBNReLU6(nn.Module):
    """1x1 conv (no bias) + BatchNorm + ReLU6, used to merge cross-domain pairs."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = _conv1x1(cin, cout, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu6(self.bn(self.conv(x)))


class DenseLayer(nn.Module):
    """3x3 conv -> BN -> BN -> ReLU. The BatchNorm really is applied twice in the authors' DSRM."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn2(self.bn1(self.conv(x))))


class DSRM(nn.Module):
    """Densely connected 3x3 blocks; each sees the input and all earlier outputs. Returns the last output."""

    def __init__(self, cfg: CMMDLConfig) -> None:
        super().__init__()
        c = cfg.dim
        self.layers = nn.ModuleList([DenseLayer((i + 1) * c, c) for i in range(cfg.dense_blocks)])

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, dim=1) if len(feats) > 1 else x))
        return feats[-1]


class SqueezeExcite(nn.Module):
    """SE channel attention with BatchNorms: GAP -> 1x1 -> BN -> ReLU -> 1x1 -> BN -> sigmoid."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        mid = channels // reduction
        self.fc1 = _conv1x1(channels, mid, bias=True)
        self.bn1 = nn.BatchNorm2d(mid)
        self.fc2 = _conv1x1(mid, channels, bias=True)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:  # (B,C,H,W) -> (B,C,1,1) weights
        z = F.relu(self.bn1(self.fc1(x.mean(dim=(2, 3), keepdim=True))))
        return torch.sigmoid(self.bn2(self.fc2(z)))


class HDFAB(nn.Module):
    """Hybrid-domain feature aggregation (``SFD_Fusion``).

    Pairs each modality's frequency features with the other modality's spatial features, applies a CBAM
    spatial attention (as a residual re-weighting), then sums SE-weighted halves with a dense branch.
    """

    def __init__(self, cfg: CMMDLConfig) -> None:
        super().__init__()
        c = cfg.dim
        self.merge_freq_vi = ConvBNReLU6(2 * c, c)  # cat[freq_VI, spat_IR]
        self.merge_spat_vi = ConvBNReLU6(2 * c, c)  # cat[spat_VI, freq_IR]
        self.merge_dense = ConvBNReLU6(2 * c, c)
        k = cfg.spatial_attn_kernel
        self.spatial_attn = nn.Conv2d(2, 1, k, padding=k // 2, bias=False)
        self.dense = DSRM(cfg)
        self.se1 = SqueezeExcite(c, cfg.se_reduction)
        self.se2 = SqueezeExcite(c, cfg.se_reduction)

    def forward(self, freq_vi: Tensor, freq_ir: Tensor, spat_vi: Tensor, spat_ir: Tensor) -> Tensor:
        c = freq_vi.shape[1]
        a = self.merge_freq_vi(torch.cat([freq_vi, spat_ir], dim=1))
        b = self.merge_spat_vi(torch.cat([spat_vi, freq_ir], dim=1))
        x = torch.cat([a, b], dim=1)  # (B,2C,H,W)
        stats = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)  # (B,2,H,W)
        x = torch.sigmoid(self.spatial_attn(stats)) * x + x
        x3 = self.dense(self.merge_dense(x))
        x1, x2 = x[:, :c], x[:, c:]
        return x1 * self.se1(x1) + x2 * self.se2(x2) + x3


class MDLB(nn.Module):
    """Multi-domain learning block: frequency and spatial branches per modality, aggregated by HDFAB."""

    def __init__(self, cfg: CMMDLConfig) -> None:
        super().__init__()
        self.fdlb = FDLB(cfg)
        self.sdlb_vi = SDLB(cfg)
        self.sdlb_ir = SDLB(cfg)
        self.hdfab = HDFAB(cfg)

    def forward(self, vi: Tensor, ir: Tensor, trace: dict[str, Tensor] | None = None) -> Tensor:
        freq_vi, freq_ir = self.fdlb(vi, ir)
        spat_vi = self.sdlb_vi(vi)
        spat_ir = self.sdlb_ir(ir)
        out = self.hdfab(freq_vi, freq_ir, spat_vi, spat_ir)
        if trace is not None:
            trace.update(fdlb_vi=freq_vi, fdlb_ir=freq_ir, sdlb_vi=spat_vi, sdlb_ir=spat_ir, mdlb_out=out)
        return out


class Decoder(nn.Module):
    """SFCA blocks, then 3x3 64->32, LeakyReLU, 3x3 32->1, sigmoid. No image residual (unlike CDDFuse)."""

    def __init__(self, cfg: CMMDLConfig) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[SFCABlock(cfg) for _ in range(cfg.decoder_blocks)])
        self.head1 = nn.Conv2d(cfg.dim, cfg.dim // 2, 3, padding=1, bias=False)
        self.head2 = nn.Conv2d(cfg.dim // 2, 1, 3, padding=1, bias=False)
        self.slope = cfg.decoder_leaky_slope

    def forward(self, x: Tensor) -> Tensor:  # (B,C,H,W) -> (B,1,H,W) in (0,1)
        x = F.leaky_relu(self.head1(self.blocks(x)), self.slope)
        return torch.sigmoid(self.head2(x))


class CMMDL(nn.Module):
    """The full network. ``forward(vi, ir)`` keeps the authors' argument order: visible (Y) first."""

    def __init__(self, cfg: CMMDLConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or CMMDLConfig()
        self.encoder = Encoder(self.cfg)
        self.mdlb = MDLB(self.cfg)
        self.decoder = Decoder(self.cfg)

    def forward(self, vi: Tensor, ir: Tensor, trace: dict[str, Tensor] | None = None) -> Tensor:
        """(B,1,H,W) Y and IR in [0,1] -> (B,1,H,W) fused Y in (0,1); fills ``trace`` with intermediates."""
        enc_vi, enc_ir = self.encoder(vi), self.encoder(ir)  # shared weights, (B,C,H,W) each
        if trace is not None:
            trace.update(enc_vi=enc_vi, enc_ir=enc_ir)
        fused = self.mdlb(enc_vi, enc_ir, trace)
        del enc_vi, enc_ir
        return self.decoder(fused)


# --------------------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------------------


class CheckpointError(ValueError):
    """A checkpoint does not match the CMMDL layout; the message names the offending key."""


# Our parameter name -> the authors' name (``CMMDL_Network.py``), applied in order with re.sub.
_RENAMES: tuple[tuple[str, str | Callable[[re.Match[str]], str]], ...] = (
    (r"^encoder\.embed\.", "share_Encoder.patch_embed.proj."),
    (r"^encoder\.blocks\.", "share_Encoder.share_encoder."),
    (r"^decoder\.blocks\.", "share_Decoder.share_decoder."),
    (r"^decoder\.head1\.", "share_Decoder.output.0."),
    (r"^decoder\.head2\.", "share_Decoder.output.2."),
    (r"\.attn\.qkvx\.", ".attn.qkv."),
    (r"\.attn\.qkvx_dw\.", ".attn.qkv_conv."),
    (r"\.attn\.proj\.", ".attn.project_out."),
    (r"\.attn\.kv_dw\.", ".attn.kv_conv."),
    (r"\.attn\.freq_norm\.", ".attn.norm_IR.body."),
    (r"\.attn\.freq_proj\.", ".attn.project_out_f."),
    (r"\.ffn\.proj_in\.", ".ffn.project_in."),
    (r"\.ffn\.dw\.", ".ffn.dwconv."),
    (r"\.ffn\.proj_out\.", ".ffn.project_out."),
    (r"^mdlb\.fdlb\.pre_vi\.", "MDLB.FDomain.pre1."),
    (r"^mdlb\.fdlb\.pre_ir\.", "MDLB.FDomain.pre2."),
    (r"^mdlb\.fdlb\.pha_shared\.", "MDLB.FDomain.pha_fuse."),
    (r"^mdlb\.fdlb\.(amp|pha|post)_vi\.", r"MDLB.FDomain.\1_VIS."),
    (r"^mdlb\.fdlb\.(amp|pha|post)_ir\.", r"MDLB.FDomain.\1_IR."),
    (r"^mdlb\.sdlb_vi\.blocks\.", "MDLB.SDomain_VIS.GCBInv."),
    (r"^mdlb\.sdlb_ir\.blocks\.", "MDLB.SDomain_IR.GCBInv."),
    (r"\.(phi|rho|eta)\.expand\.", r".theta_\1.Conv_1."),
    (r"\.(phi|rho|eta)\.dw\.", r".theta_\1.Conv_2."),
    (r"\.(phi|rho|eta)\.project\.", r".theta_\1.Conv_3."),
    (r"^mdlb\.hdfab\.merge_freq_vi\.", "MDLB.FSI.pre1."),
    (r"^mdlb\.hdfab\.merge_spat_vi\.", "MDLB.FSI.pre2."),
    (r"^mdlb\.hdfab\.merge_dense\.", "MDLB.FSI.pre3."),
    (r"^(MDLB\.FSI\.pre\d)\.bn\.", r"\1.bnop."),
    (r"^mdlb\.hdfab\.spatial_attn\.", "MDLB.FSI.SA.conv1."),
    (r"^mdlb\.hdfab\.dense\.layers\.(\d)\.conv\.", lambda m: f"MDLB.FSI.DSRM.block{int(m[1]) + 1}.0.conv."),
    (r"^mdlb\.hdfab\.dense\.layers\.(\d)\.bn1\.", lambda m: f"MDLB.FSI.DSRM.block{int(m[1]) + 1}.0.bn."),
    (r"^mdlb\.hdfab\.dense\.layers\.(\d)\.bn2\.", lambda m: f"MDLB.FSI.DSRM.block{int(m[1]) + 1}.1."),
    (r"^mdlb\.hdfab\.se(\d)\.fc1\.", r"MDLB.FSI.CA_\1.1."),
    (r"^mdlb\.hdfab\.se(\d)\.bn1\.", r"MDLB.FSI.CA_\1.2."),
    (r"^mdlb\.hdfab\.se(\d)\.fc2\.", r"MDLB.FSI.CA_\1.4."),
    (r"^mdlb\.hdfab\.se(\d)\.bn2\.", r"MDLB.FSI.CA_\1.5."),
)

_DP_PREFIX = "module."  # added by nn.DataParallel / DDP around the authors' model


def _authors_name(ours: str) -> str:
    name = ours
    for pattern, repl in _RENAMES:
        name = re.sub(pattern, repl, name)
    return name


def _unused_tensors(model: CMMDL) -> dict[str, tuple[int, ...]]:
    """Authors' tensors that their forward never reads (see the golden README), with their shapes."""
    cfg = model.cfg
    c, half = cfg.dim, cfg.dim // 2
    out: dict[str, tuple[int, ...]] = {}
    stacks = [("share_Encoder.share_encoder", cfg.encoder_blocks), ("share_Decoder.share_decoder", cfg.decoder_blocks)]
    for stack, n in stacks:
        for i in range(n):
            p = f"{stack}.{i}.attn."
            out[p + "q1X1_1.weight"] = (c, c, 1, 1)
            out[p + "q1X1_2.weight"] = (c, c, 1, 1)
            out[p + "norm_VI.body.weight"] = (c,)
            out[p + "norm_VI.body.bias"] = (c,)
    for side in ("VIS", "IR"):
        for i in range(cfg.coupling_blocks):
            for fn in ("phi", "rho", "eta"):
                p = f"MDLB.SDomain_{side}.GCBInv.{i}.theta_{fn}."
                out[p + "Identity.weight"] = (half, half, 1, 1)
                out[p + "Sobel.convx.weight"] = (half, 1, 3, 3)
                out[p + "Sobel.convy.weight"] = (half, 1, 3, 3)
    return out


def authors_state_dict(model: CMMDL) -> dict[str, Tensor]:
    """Our state dict under the authors' key names (without ``module.``); the inverse of the loader's map."""
    return {_authors_name(k): v for k, v in model.state_dict().items()}


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read a flat name->tensor mapping from ``.safetensors`` or a ``torch.save`` file (``.pth``/``.model``).

    ``weights_only=True`` because checkpoints come from outside; the authors' file was saved on CUDA, hence
    ``map_location='cpu'``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors, got {type(obj).__name__}")
    return dict(obj)


def _strip_prefix(sd: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    prefixed = [k.startswith(_DP_PREFIX) for k in sd]
    if any(prefixed) and not all(prefixed):
        bad = next(k for k, p in zip(sd, prefixed, strict=True) if not p)
        raise CheckpointError(f"{source}: key {bad!r} lacks the {_DP_PREFIX!r} prefix the other keys have")
    return {k.removeprefix(_DP_PREFIX): v for k, v in sd.items()}


def _check_and_map(model: CMMDL, sd: Mapping[str, Tensor], source: str, *, partial: bool) -> dict[str, Tensor]:
    """Translate authors' keys to ours; refuse unknown keys, shape mismatches and (unless partial) gaps."""
    theirs_to_ours = {_authors_name(k): k for k in model.state_dict()}
    own = model.state_dict()
    unused = _unused_tensors(model)
    mapped: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key in unused:
            expected = unused[key]
        elif key in theirs_to_ours:
            expected = tuple(own[theirs_to_ours[key]].shape)
        else:
            raise CheckpointError(f"{source}: unknown key {key!r} (not part of the CMMDL layout)")
        if tuple(value.shape) != expected:
            raise CheckpointError(f"{source}: key {key!r} has shape {tuple(value.shape)}, expected {expected}")
        if key in theirs_to_ours:
            mapped[theirs_to_ours[key]] = value
    if not partial:
        # num_batches_tracked only matters for training; PyTorch itself tolerates its absence.
        missing = [
            k for k in theirs_to_ours if theirs_to_ours[k] not in mapped and not k.endswith("num_batches_tracked")
        ]
        if missing:
            raise CheckpointError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    return mapped


def load_CMMDL(
    path: str | Path,
    *,
    override: str | Path | Mapping[str, Tensor] | None = None,
    device: str | torch.device = "cpu",
) -> CMMDL:
    """Build CMMDL in eval mode from the authors' checkpoint layout (``.pth``/``.model``/``.safetensors``).

    ``override`` (a file or mapping in the same layout, e.g. ``perturbed/weights_override.safetensors``)
    replaces a subset of tensors after the main file is checked, so partial files are allowed there only.
    """
    model = CMMDL()
    state = _check_and_map(model, _strip_prefix(read_checkpoint(path), str(path)), str(path), partial=False)
    if override is not None:
        src = str(override) if not isinstance(override, Mapping) else "override"
        extra = read_checkpoint(override) if not isinstance(override, Mapping) else dict(override)
        state.update(_check_and_map(model, _strip_prefix(extra, src), src, partial=True))
    own = model.state_dict()
    for key in own:
        state.setdefault(key, own[key])  # only num_batches_tracked can be absent here
    model.load_state_dict(state, strict=True)
    return model.to(device=device, memory_format=torch.channels_last).eval()


# --------------------------------------------------------------------------------------------------------
# Inference recipe (CMMDL_test.py)
# --------------------------------------------------------------------------------------------------------


def rgb_to_ycbcr(rgb: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B,3,H,W) RGB in [0,1] -> Y, Cb, Cr (B,1,H,W) with the authors' constants and clamps.

    Written in the same operation order as ``CMMDL_test.RGB2YCrCb`` so Y is bit-identical to theirs.
    """
    r, g, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cr = ((r - y) * 0.713 + 0.5).clamp(0.0, 1.0)
    cb = ((b - y) * 0.564 + 0.5).clamp(0.0, 1.0)
    return y.clamp(0.0, 1.0), cb, cr


def fuse_CMMDL(model: CMMDL, ir: Tensor, vi: Tensor) -> Tensor:
    """Fuse IR (B,1,H,W) with VI, either Y (B,1,H,W) or RGB (B,3,H,W), all float in [0,1].

    Returns the raw sigmoid output (B,1,H,W). The authors run the whole image in one pass (no padding,
    cropping or tiling); any H x W works because the FFTs are full-image and nothing is down-sampled.
    """
    if ir.ndim != 4 or ir.shape[1] != 1:
        raise ValueError(f"ir must be (B,1,H,W), got {tuple(ir.shape)}")
    if vi.ndim != 4 or vi.shape[1] not in (1, 3) or vi.shape[-2:] != ir.shape[-2:]:
        raise ValueError(f"vi must be (B,1|3,H,W) matching ir, got {tuple(vi.shape)}")
    p = next(model.parameters())
    ir = ir.to(device=p.device, dtype=torch.float32)
    vi = vi.to(device=p.device, dtype=torch.float32)
    y = rgb_to_ycbcr(vi)[0] if vi.shape[1] == 3 else vi
    model.eval()
    with torch.inference_mode():
        return model(y, ir)


def stretch(raw: Tensor, vi_rgb: Tensor | None = None) -> Tensor:
    """The authors' saved image before ``uint8``: (B,H,W,3) float32 in [0,255].

    The fused Y is recombined with the visible image's Cb/Cr (``YCbCr2RGB``), clamped to [0,1], and then
    min-max stretched jointly over all three channels of each image. A gray VI (``vi_rgb=None``) has
    Cb = Cr = 0.5, i.e. R = G = B = Y. The authors stretch the whole batch array at once; they always run
    batch 1, so per image is the same thing. A constant image maps to zeros instead of NaN.
    """
    y = raw.float()
    if vi_rgb is None:
        cb = cr = torch.full_like(y, 0.5)
    else:
        _, cb, cr = rgb_to_ycbcr(vi_rgb.float().to(y.device))
    dr, db = cr - 0.5, cb - 0.5
    rgb = torch.cat([y + 1.403 * dr, y - 0.714 * dr - 0.344 * db, y + 1.773 * db], dim=1).clamp(0.0, 1.0)
    rgb = rgb.permute(0, 2, 3, 1)  # (B,H,W,3)
    lo = rgb.amin(dim=(1, 2, 3), keepdim=True)
    span = rgb.amax(dim=(1, 2, 3), keepdim=True) - lo
    return torch.where(span > 0, (rgb - lo) / span.clamp_min(torch.finfo(torch.float32).tiny), 0.0) * 255.0


# --------------------------------------------------------------------------------------------------------
# Training loss (LossFunsion.py)
# --------------------------------------------------------------------------------------------------------


INT_WEIGHT = 1.0  # LossFunsion.fusion_loss: 1 * L_int
GRAD_WEIGHT = 5.0  # ... + 5 * L_Grad
LOCAL_WINDOW = 9  # local MSE window and Gaussian variance window
LOCAL_SIGMA = 1.5


def _sobel_magnitude(x: Tensor) -> Tensor:
    """|Sobel_x| + |Sobel_y| with zero padding (cross-correlation, as F.conv2d), per channel."""
    kernels = torch.tensor(
        [
            [[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]],
            [[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]],
        ],
        dtype=x.dtype,
        device=x.device,
    ).unsqueeze(1)  # (2,1,3,3): x and y kernels
    c = x.shape[1]
    g = F.conv2d(x, kernels.repeat(c, 1, 1, 1), padding=1, groups=c)  # (B,2C,H,W)
    return g.abs().view(x.shape[0], c, 2, *x.shape[-2:]).sum(dim=2)


def _local_mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean squared difference in a 9x9 window; zero padding counts, so borders divide by 81 too."""
    return F.avg_pool2d((a - b).square(), LOCAL_WINDOW, stride=1, padding=LOCAL_WINDOW // 2, count_include_pad=True)


def _local_variance(x: Tensor) -> Tensor:
    """Gaussian-weighted local variance E[x^2] - E[x]^2 (9x9, sigma 1.5, zero padding)."""
    r = torch.arange(LOCAL_WINDOW, dtype=x.dtype, device=x.device) - LOCAL_WINDOW // 2
    g = torch.exp(-(r**2) / (2 * LOCAL_SIGMA**2))
    g = g / g.sum()
    window = (g[:, None] * g[None, :]).expand(x.shape[1], 1, LOCAL_WINDOW, LOCAL_WINDOW)
    pad, groups = LOCAL_WINDOW // 2, x.shape[1]
    mu = F.conv2d(x, window, padding=pad, groups=groups)
    return F.conv2d(x * x, window, padding=pad, groups=groups) - mu.square()


def CMMDL_loss(vi: Tensor, ir: Tensor, fused: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
    """The authors' training objective: total = 1 * L_int + 5 * L_grad (``LossFunsion.fusion_loss``).

    L_int makes each pixel follow, in local MSE, whichever source has more local structure (Gaussian local
    variance), but IR wherever the training mask is positive; the mask is a per-patch map stored in the
    authors' training HDF5 (its content is undocumented; ``None`` means all zeros). L_grad (L1 to the
    pixel-wise max of the sources' Sobel magnitudes) keeps the sharper edge of either source. Returned
    terms are unweighted (the authors' function returns L_grad already multiplied by 5); ``total`` is
    weighted. All inputs (B,1,H,W) in [0,1], ``vi`` being the Y channel.
    """
    ir_wins = _local_variance(ir) - _local_variance(vi) > 0
    if mask is not None:
        ir_wins = ir_wins.float() + mask > 0  # the authors' "map1 + mask > 0"
    take_ir = ir_wins.to(fused.dtype)
    l_int = (take_ir * _local_mse(ir, fused) + (1 - take_ir) * _local_mse(vi, fused)).mean()
    target = torch.maximum(_sobel_magnitude(vi), _sobel_magnitude(ir))
    l_grad = F.l1_loss(_sobel_magnitude(fused), target)
    return {"int": l_int, "grad": l_grad, "total": INT_WEIGHT * l_int + GRAD_WEIGHT * l_grad}
