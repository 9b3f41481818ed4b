"""CDDFuse (Zhao et al., CVPR 2023): pixel-level IR/visible image fusion, re-implemented.

Re-implemented from the description in ``shared/reference/fusion.md`` §1 so that the authors' released
checkpoints (MMIF-CDDFuse @ fd8da1f, ``models/CDDFuse_IVF.pth``) load and give the same numbers as their
``net.py`` + ``test_IVF.py``; the golden vectors in ``shared/golden/cddfuse`` pin that down.

Structure (width C=64, 8 heads, no down-sampling, so any H x W >= 2 x 2 works):

    ir, vi (B,1,H,W) -- shared Encoder --> (base, detail, shallow), each (B,C,H,W), once per modality
    base_F   = LiteTransformerBlock(base_ir + base_vi)          # "BaseFuseLayer"
    detail_F = INNBranch(detail_ir + detail_vi), 1 node          # "DetailFuseLayer"
    raw      = sigmoid(Decoder(base_F, detail_F) + vi)          # (B,1,H,W), then stretched per image

Our module/parameter names are cleaner than the authors'; every module that renames a child lists the
authors' name in ``AUTHOR_NAMES`` and ``authors_key_map`` derives the full, explicit key mapping from that.

Speed: the Lite Transformer's 1x1 (64->192) followed by a full 3x3 (192->192) conv, both bias-free, is one
linear map; we run it as a single 3x3 conv 64->192 with the composed weight (about 3x fewer MACs on the
layer that dominates the network's cost). Zero padding commutes with a bias-free 1x1 conv, so the result is
mathematically identical; the stored parameters stay the authors' two convs. Features are kept
channels-last (oneDNN's 1x1 and depth-wise convs are several times faster so), attention never builds
image-sized normalised q/k, and residual sums go into fresh branch outputs. At 640x480 a pair costs about
47 s of CPU time, a third of it the kernel zeroing freshly mmap'd tensors; a process that sets glibc's
``MALLOC_MMAP_MAX_=0`` cuts that to about 28 s at the price of a higher peak RSS (3.2 GB instead of 1.7 GB).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CDDFuse",
    "CDDFuseConfig",
    "CDDFuse_loss",
    "CDDFuse_phase1_loss",
    "CheckpointError",
    "FusionFeatures",
    "LossWeights",
    "authors_key_map",
    "clip_grad_norms",
    "correlation",
    "decomposition_loss",
    "fuse_CDDFuse",
    "fusion_loss",
    "load_CDDFuse",
    "read_checkpoint",
    "sobel_magnitude",
    "spatial_gradient",
    "ssim_loss",
    "stretch",
]


@dataclass(frozen=True)
class CDDFuseConfig:
    """Hyper-parameters of the released model; defaults are what ``train.py``/``test_IVF.py`` build."""

    in_channels: int = 1
    out_channels: int = 1
    dim: int = 64
    num_heads: int = 8
    encoder_blocks: int = 4  # Restormer blocks before the base/detail split
    decoder_blocks: int = 4
    ffn_expansion: float = 2.0  # Restormer GDFN hidden width = dim * 2
    base_mlp_expansion: float = 1.0  # Lite Transformer MLP hidden width = dim * 1
    encoder_inn_nodes: int = 3
    fuse_inn_nodes: int = 1
    inn_expansion: int = 2  # inverted-residual hidden width = (dim / 2) * 2
    layernorm_eps: float = 1e-5
    leaky_slope: float = 0.01  # nn.LeakyReLU() default in the decoder head


# --------------------------------------------------------------------------------------------------------
# Building blocks


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis at every pixel (Restormer's "WithBias" norm).

    The authors flatten to (B, HW, C) and back; a permuted view plus ``F.layer_norm`` is the same maths
    without two explicit copies.
    """

    AUTHOR_NAMES: ClassVar[dict[str, str]] = {"weight": "body.weight", "bias": "body.bias"}

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:  # (B,C,H,W) -> (B,C,H,W)
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


def transposed_attention(qkv: Tensor, num_heads: int, temperature: Tensor, proj: nn.Conv2d) -> Tensor:
    """Channel-by-channel ("transposed") attention followed by its 1x1 output projection.

    Shared by MDTA and the Lite Transformer. Tokens are the channels of a head and the "embedding" is the
    whole image, so each head's attention matrix is only d x d (d = C/heads) and the cost is linear in
    pixels. Per head: softmax(temperature * q_n k_n^T) v with q_n, k_n the rows of q, k L2-normalised over
    pixels (``F.normalize``, eps 1e-12), then ``proj``.

    Computed without image-sized temporaries beyond the output: the scores come from one C x C Gram
    matrix (its diagonal d x d blocks) divided by the row norms, and since attention-then-projection is
    a per-image linear map of v, it is applied as one (C x C) matrix ``W_proj @ blockdiag(attn)``.
    Works on any memory format; channels-last (pixels-major) inputs need no copies.
    """
    b, c3, h, w = qkv.shape
    c = c3 // 3
    d = c // num_heads
    tokens = qkv.permute(0, 2, 3, 1).reshape(b, h * w, c3)  # (B, HW, 3C); a view when channels-last
    q, k, v = tokens.split(c, dim=-1)  # 3 x (B, HW, C)
    gram = q.transpose(1, 2) @ k  # (B, C, C)
    scores = gram.view(b, num_heads, d, num_heads, d).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    q_norm = torch.linalg.vector_norm(q, dim=1).clamp_min(1e-12).view(b, num_heads, d, 1)
    k_norm = torch.linalg.vector_norm(k, dim=1).clamp_min(1e-12).view(b, num_heads, 1, d)
    attn = (scores / (q_norm * k_norm) * temperature).softmax(dim=-1)  # (B, heads, d, d)
    w_proj = proj.weight.view(c, num_heads, d)  # (C_out, heads, d)
    mix = torch.einsum("ohi,bhij->bohj", w_proj, attn).reshape(b, c, c)  # W_proj @ blockdiag(attn)
    out = v @ mix.transpose(1, 2)  # (B, HW, C)
    return out.view(b, h, w, c).permute(0, 3, 1, 2)  # (B,C,H,W), channels-last


class MDTAttention(nn.Module):
    """Restormer's multi-Dconv-head transposed attention: 1x1 then depth-wise 3x3 produce q, k, v."""

    AUTHOR_NAMES: ClassVar[dict[str, str]] = {"qkv_dw": "qkv_dwconv", "proj": "project_out"}

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.qkv_dw = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, groups=dim * 3, bias=False)
        self.proj = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        qkv = self.qkv_dw(self.qkv(x))  # (B,3C,H,W)
        return transposed_attention(qkv, self.num_heads, self.temperature, self.proj)


class LiteAttention(nn.Module):
    """The Lite Transformer's attention: as MDTA but the 3x3 q/k/v conv is a full (not depth-wise) conv."""

    AUTHOR_NAMES: ClassVar[dict[str, str]] = {"qkv_in": "qkv1", "qkv_conv": "qkv2"}

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv_in = nn.Conv2d(dim, dim * 3, 1, bias=False)
        self.qkv_conv = nn.Conv2d(dim * 3, dim * 3, 3, padding=1, bias=False)
        self.proj = nn.Conv2d(dim, dim, 1, bias=False)

    def composed_qkv_weight(self) -> Tensor:
        """The single 3x3 conv weight (3C, C, 3, 3) equal to ``qkv_conv(qkv_in(.))``.

        Composed in float64 so the only rounding left is that of the conv itself.
        """
        w_in = self.qkv_in.weight[:, :, 0, 0].double()  # (3C, C)
        w = torch.einsum("omyx,mi->oiyx", self.qkv_conv.weight.double(), w_in)
        return w.to(self.qkv_conv.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        qkv = F.conv2d(x, self.composed_qkv_weight(), padding=1)  # (B,3C,H,W)
        return transposed_attention(qkv, self.num_heads, self.scale, self.proj)


class GatedConvFFN(nn.Module):
    """Gated feed-forward: 1x1 to 2*hidden, grouped 3x3, GELU(a) * b, 1x1 back.

    Restormer's GDFN uses a depth-wise 3x3 (``groups = 2*hidden``); the Lite Transformer's MLP uses
    ``groups = hidden`` (two channels per group). Same module, different grouping.
    """

    AUTHOR_NAMES: ClassVar[dict[str, str]] = {"proj_in": "project_in", "dw": "dwconv", "proj_out": "project_out"}

    def __init__(self, dim: int, hidden: int, groups: int) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(dim, hidden * 2, 1, bias=False)
        self.dw = nn.Conv2d(hidden * 2, hidden * 2, 3, padding=1, groups=groups, bias=False)
        self.proj_out = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.dw(self.proj_in(x)).chunk(2, dim=1)  # 2 x (B,hidden,H,W)
        return self.proj_out(F.gelu(a).mul_(b))


class RestormerBlock(nn.Module):
    """Pre-norm residual MDTA + GDFN block (Restormer's ``TransformerBlock``)."""

    AUTHOR_NAMES: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg: CDDFuseConfig) -> None:
        super().__init__()
        hidden = int(cfg.dim * cfg.ffn_expansion)
        self.norm1 = ChannelLayerNorm(cfg.dim, cfg.layernorm_eps)
        self.attn = MDTAttention(cfg.dim, cfg.num_heads)
        self.norm2 = ChannelLayerNorm(cfg.dim, cfg.layernorm_eps)
        self.ffn = GatedConvFFN(cfg.dim, hidden, groups=hidden * 2)

    def forward(self, x: Tensor) -> Tensor:
        # Residual sums are accumulated into the branch output (a fresh tensor no backward formula needs),
        # which saves an image-sized allocation per add; on CPU those page faults are a real cost.
        x = self.attn(self.norm1(x)).add_(x)
        return self.ffn(self.norm2(x)).add_(x)


class LiteTransformerBlock(nn.Module):
    """The base (low-frequency) branch, ``BaseFeatureExtraction``: pre-norm Lite attention + gated MLP."""

    AUTHOR_NAMES: ClassVar[dict[str, str]] = {}

    def __init__(self, cfg: CDDFuseConfig) -> None:
        super().__init__()
        hidden = int(cfg.dim * cfg.base_mlp_expansion)
        self.norm1 = ChannelLayerNorm(cfg.dim, cfg.layernorm_eps)
        self.attn = LiteAttention(cfg.dim, cfg.num_heads)
        self.norm2 = ChannelLayerNorm(cfg.dim, cfg.layernorm_eps)
        self.mlp = GatedConvFFN(cfg.dim, hidden, groups=hidden)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(self.norm1(x)).add_(x)  # in-place into the fresh branch output, see RestormerBlock
        return self.mlp(self.norm2(x)).add_(x)


class InvertedResidual(nn.Module):
    """MobileNetV2-style bottleneck without BN or skip: 1x1, ReLU6, reflect-padded dw 3x3, ReLU6, 1x1."""

    AUTHOR_NAMES: ClassVar[dict[str, str]] = {
        "expand": "bottleneckBlock.0",
        "depthwise": "bottleneckBlock.3",
        "project": "bottleneckBlock.5",
    }

    def __init__(self, channels: int, expansion: int) -> None:
        super().__init__()
        hidden = channels * expansion
        self.expand = nn.Conv2d(channels, hidden, 1, bias=False)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, padding_mode="reflect", groups=hidden, bias=False)
        self.project = nn.Conv2d(hidden, channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(F.relu6(self.depthwise(F.relu6(self.expand(x), inplace=True)), inplace=True))


class INNNode(nn.Module):
    """One affine-coupling step of the detail branch (``DetailNode``).

    A 1x1 conv first mixes the two halves (the authors call it a shuffle), then
    z2 += phi(z1); z1 = z1 * exp(rho(z2)) + eta(z2). Invertible by construction, which is the point of the
    paper's detail branch: no high-frequency information is thrown away.
    """

    AUTHOR_NAMES: ClassVar[dict[str, str]] = {
        "mix": "shffleconv",
        "phi": "theta_phi",
        "rho": "theta_rho",
        "eta": "theta_eta",
    }

    def __init__(self, dim: int, expansion: int) -> None:
        super().__init__()
        half = dim // 2
        self.phi = InvertedResidual(half, expansion)
        self.rho = InvertedResidual(half, expansion)
        self.eta = InvertedResidual(half, expansion)
        self.mix = nn.Conv2d(dim, dim, 1, bias=True)

    def forward(self, z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor]:
        z1, z2 = self.mix(torch.cat((z1, z2), dim=1)).chunk(2, dim=1)  # 2 x (B,C/2,H,W)
        z2 = self.phi(z1).add_(z2)  # z2 + phi(z1), accumulated into the fresh conv output
        z1 = (z1 * self.rho(z2).exp_()).add_(self.eta(z2))
        return z1, z2


class INNBranch(nn.Module):
    """The detail (high-frequency) branch, ``DetailFeatureExtraction``: a chain of INN nodes on C/2 halves."""

    AUTHOR_NAMES: ClassVar[dict[str, str]] = {"nodes": "net"}

    def __init__(self, dim: int, num_nodes: int, expansion: int) -> None:
        super().__init__()
        self.nodes = nn.ModuleList(INNNode(dim, expansion) for _ in range(num_nodes))

    def forward(self, x: Tensor) -> Tensor:
        z1, z2 = x.chunk(2, dim=1)
        for node in self.nodes:
            z1, z2 = node(z1, z2)
        return torch.cat((z1, z2), dim=1)


class Encoder(nn.Module):
    """Shared encoder (``Restormer_Encoder``), applied to IR and VI with the same weights."""

    AUTHOR_NAMES: ClassVar[dict[str, str]] = {
        "patch_embed": "patch_embed.proj",
        "blocks": "encoder_level1",
        "base": "baseFeature",
        "detail": "detailFeature",
    }

    def __init__(self, cfg: CDDFuseConfig) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.dim, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(*(RestormerBlock(cfg) for _ in range(cfg.encoder_blocks)))
        self.base = LiteTransformerBlock(cfg)
        self.detail = INNBranch(cfg.dim, cfg.encoder_inn_nodes, cfg.inn_expansion)

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B,1,H,W) -> base, detail, shallow features, each (B,C,H,W)."""
        # Channels-last (pixels-major) from here on: oneDNN's 1x1 and depth-wise convs are several times
        # faster in that layout and the attention reads q/k/v without copies. A 1-channel input is
        # ambiguous about its layout, so the conversion is made explicitly on the first feature map.
        x = self.patch_embed(image).contiguous(memory_format=torch.channels_last)
        shallow = self.blocks(x)
        return self.base(shallow), self.detail(shallow), shallow


class Decoder(nn.Module):
    """``Restormer_Decoder``: concat -> 1x1 -> Restormer blocks -> conv head, + residual image, sigmoid."""

    AUTHOR_NAMES: ClassVar[dict[str, str]] = {
        "reduce": "reduce_channel",
        "blocks": "encoder_level2",
        "head_conv1": "output.0",
        "head_conv2": "output.2",
    }

    def __init__(self, cfg: CDDFuseConfig) -> None:
        super().__init__()
        self.leaky_slope = cfg.leaky_slope
        self.reduce = nn.Conv2d(cfg.dim * 2, cfg.dim, 1, bias=False)
        self.blocks = nn.Sequential(*(RestormerBlock(cfg) for _ in range(cfg.decoder_blocks)))
        self.head_conv1 = nn.Conv2d(cfg.dim, cfg.dim // 2, 3, padding=1, bias=False)
        self.head_conv2 = nn.Conv2d(cfg.dim // 2, cfg.out_channels, 3, padding=1, bias=False)

    def forward(self, residual: Tensor | None, base: Tensor, detail: Tensor) -> Tensor:
        """Features (B,C,H,W) x 2 -> image (B,1,H,W) in (0,1).

        The network only learns a correction to ``residual`` (VI at fusion time, the reconstructed
        modality itself in Phase I); ``None`` mirrors the authors' option to decode without it.
        """
        x = self.blocks(self.reduce(torch.cat((base, detail), dim=1)))
        x = self.head_conv2(F.leaky_relu(self.head_conv1(x), self.leaky_slope))
        if residual is not None:
            x = x + residual
        return torch.sigmoid(x)


@dataclass
class FusionFeatures:
    """Everything the training losses need from one fusion forward pass."""

    fused: Tensor  # (B,1,H,W) sigmoid output
    base_vi: Tensor  # (B,C,H,W)
    detail_vi: Tensor
    base_ir: Tensor
    detail_ir: Tensor


class CDDFuse(nn.Module):
    """The whole test-time network: shared encoder, the two fusion layers and the decoder."""

    AUTHOR_NAMES: ClassVar[dict[str, str]] = {
        "encoder": "DIDF_Encoder",
        "decoder": "DIDF_Decoder",
        "base_fuse": "BaseFuseLayer",
        "detail_fuse": "DetailFuseLayer",
    }

    def __init__(self, cfg: CDDFuseConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or CDDFuseConfig()
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.base_fuse = LiteTransformerBlock(cfg)
        self.detail_fuse = INNBranch(cfg.dim, cfg.fuse_inn_nodes, cfg.inn_expansion)

    def forward_features(self, ir: Tensor, vi: Tensor) -> FusionFeatures:
        """Fusion forward keeping the per-modality features (needed by the decomposition loss)."""
        base_vi, detail_vi, _ = self.encoder(vi)
        base_ir, detail_ir, _ = self.encoder(ir)
        base = self.base_fuse(base_vi + base_ir)
        detail = self.detail_fuse(detail_vi + detail_ir)
        fused = self.decoder(vi, base, detail)
        return FusionFeatures(fused, base_vi, detail_vi, base_ir, detail_ir)

    def forward(self, ir: Tensor, vi: Tensor) -> Tensor:
        """(B,1,H,W) x 2 in [0,1] -> raw fused image (B,1,H,W), before the per-image stretch."""
        base_vi, detail_vi, _ = self.encoder(vi)
        base_ir, detail_ir, _ = self.encoder(ir)
        base = self.base_fuse(base_vi + base_ir)
        del base_vi, base_ir  # peak memory at 640x480 is a handful of (B,64,H,W) maps; free early
        detail = self.detail_fuse(detail_vi + detail_ir)
        del detail_vi, detail_ir
        return self.decoder(vi, base, detail)


# --------------------------------------------------------------------------------------------------------
# Checkpoints


class CheckpointError(ValueError):
    """A checkpoint does not fit the architecture; the message names the offending key(s)."""


def _authors_name(module: nn.Module, name: str) -> str:
    return getattr(type(module), "AUTHOR_NAMES", {}).get(name, name)


def authors_key_map(model: CDDFuse) -> dict[str, str]:
    """Our state-dict key -> the authors' ``<group>/<key>`` with the ``module.`` prefix removed.

    e.g. ``encoder.blocks.0.norm1.weight`` -> ``DIDF_Encoder/encoder_level1.0.norm1.body.weight``.
    Built by walking the module tree and renaming each path component via its parent's
    ``AUTHOR_NAMES``, so the mapping stays next to the module that introduces a name.
    """
    mapping: dict[str, str] = {}
    for key in model.state_dict():
        *path, leaf = key.split(".")
        module: nn.Module = model
        parts: list[str] = []
        for name in path:
            parts.append(_authors_name(module, name))
            module = module.get_submodule(name)
        parts.append(_authors_name(module, leaf))
        group, *rest = parts
        mapping[key] = f"{group}/{'.'.join(rest)}"
    return mapping


_GROUPS = tuple(CDDFuse.AUTHOR_NAMES.values())


def _canonical(key: str) -> str:
    """``Group/module.x.y`` or ``Group/x.y`` -> ``Group/x.y`` (DataParallel prefix is optional)."""
    group, sep, rest = key.partition("/")
    if not sep:
        raise CheckpointError(f"checkpoint key {key!r} has no '<group>/' prefix (groups: {', '.join(_GROUPS)})")
    return f"{group}/{rest.removeprefix('module.')}"


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint into one flat ``{"<group>/<key>": tensor}`` dict, ``module.`` prefixes removed.

    Accepts the golden ``.safetensors`` layout (keys already ``<group>/<key>``) and the authors'
    ``torch.save`` layout (a dict of four state dicts, written by ``train.py``), whatever the extension
    (``.pth``, ``.model``, ...). ``weights_only=True`` because a checkpoint is data, not code.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        flat = load_file(str(path), device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: expected a dict of state dicts, got {type(obj).__name__}")
        flat = {}
        for group, value in obj.items():
            if isinstance(value, Tensor):  # already flat "<group>/<key>"
                flat[str(group)] = value
            elif isinstance(value, Mapping):
                for key, tensor in value.items():
                    flat[f"{group}/{key}"] = tensor
            else:
                raise CheckpointError(f"{path}: entry {group!r} is neither a state dict nor a tensor")
    out: dict[str, Tensor] = {}
    for key, tensor in flat.items():
        name = _canonical(key)
        if name in out:
            raise CheckpointError(f"{path}: key {key!r} appears both with and without the 'module.' prefix")
        out[name] = tensor
    return out


def _as_flat(source: str | Path | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(source, Mapping):
        return {_canonical(k): v for k, v in source.items()}
    return read_checkpoint(source)


def load_CDDFuse(
    path: str | Path | Mapping[str, Tensor],
    *,
    override: str | Path | Mapping[str, Tensor] | None = None,
    cfg: CDDFuseConfig | None = None,
    device: str | torch.device = "cpu",
) -> CDDFuse:
    """Build CDDFuse and load the authors' (or golden) weights, strictly, in eval mode.

    ``override`` holds a subset of keys that replace those of ``path`` (the golden ``perturbed`` variant);
    its keys must exist in the base checkpoint. Unknown keys, missing keys and shape mismatches raise
    :class:`CheckpointError` naming them, because a silently half-loaded fusion net still produces a
    plausible-looking image.
    """
    model = CDDFuse(cfg)
    tensors = _as_flat(path)
    if override is not None:
        extra = _as_flat(override)
        unknown = sorted(set(extra) - set(tensors))
        if unknown:
            raise CheckpointError(f"override key(s) not in the base checkpoint: {', '.join(unknown)}")
        tensors.update(extra)

    mapping = authors_key_map(model)  # ours -> authors'
    expected = set(mapping.values())
    unknown = sorted(set(tensors) - expected)
    missing = sorted(expected - set(tensors))
    if unknown:
        raise CheckpointError(f"unknown checkpoint key(s): {', '.join(unknown)}")
    if missing:
        raise CheckpointError(f"checkpoint is missing key(s): {', '.join(missing)}")

    ours = model.state_dict()
    state: dict[str, Tensor] = {}
    for our_key, their_key in mapping.items():
        tensor = tensors[their_key]
        if tensor.shape != ours[our_key].shape:
            raise CheckpointError(
                f"shape mismatch for {their_key!r}: checkpoint {tuple(tensor.shape)}, "
                f"model {tuple(ours[our_key].shape)}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{their_key!r} has non-float dtype {tensor.dtype}")
        state[our_key] = tensor.to(torch.float32)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------------
# Inference


def fuse_CDDFuse(model: CDDFuse, ir: Tensor, vi: Tensor) -> Tensor:
    """Fuse IR and VI exactly as ``test_IVF.py`` does, returning the raw sigmoid output.

    Inputs: float tensors (B,1,H,W) in [0,1] (gray, BT.601 luma / 255 as the authors read them; for a
    colour VI fuse its Y channel and re-attach Cb/Cr afterwards). The network is fully convolutional with
    no down-sampling, so no padding or cropping is needed at any size (H, W >= 2 for the reflect pad).
    Output: (B,1,H,W) float32 on the inputs' device; apply :func:`stretch` for the authors' saved image.
    """
    if ir.shape != vi.shape or ir.ndim != 4 or ir.shape[1] != model.cfg.in_channels:
        raise ValueError(f"expected ir and vi of equal shape (B,1,H,W), got {tuple(ir.shape)} and {tuple(vi.shape)}")
    if min(ir.shape[-2:]) < 2:
        raise ValueError(f"images must be at least 2x2 (reflection padding), got {tuple(ir.shape[-2:])}")
    param = next(model.parameters())
    with torch.inference_mode():
        ir_t = ir.to(device=param.device, dtype=param.dtype)
        vi_t = vi.to(device=param.device, dtype=param.dtype)
        raw = model(ir_t, vi_t)
    return raw.to(ir.device)


def stretch(raw: Tensor) -> Tensor:
    """Per-image min-max stretch to 0..255 as ``test_IVF.py`` writes its results (float, not rounded).

    The authors stretch the whole (batch-1) tensor: ``(y - min) / (max - min) * 255``; we do that per
    batch element. A constant image (max == min, NaN for the authors) maps to zeros instead.
    """
    flat = raw.flatten(1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    unit = torch.where(span > 0, (flat - lo) / torch.where(span > 0, span, 1), torch.zeros_like(flat))
    return (unit * 255).reshape(raw.shape)


# --------------------------------------------------------------------------------------------------------
# Training losses (train.py + utils/loss.py; kornia 0.2.0 for SSIM and the spatial gradient)


def correlation(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation per (sample, channel) over pixels, clamped to [-1,1], averaged (``cc``)."""
    eps = torch.finfo(torch.float32).eps
    a = a.flatten(2) - a.flatten(2).mean(dim=-1, keepdim=True)  # (B,C,HW)
    b = b.flatten(2) - b.flatten(2).mean(dim=-1, keepdim=True)
    cc = (a * b).sum(-1) / (eps + a.pow(2).sum(-1).sqrt() * b.pow(2).sum(-1).sqrt())
    return cc.clamp(-1.0, 1.0).mean()


def decomposition_loss(base_vi: Tensor, base_ir: Tensor, detail_vi: Tensor, detail_ir: Tensor) -> Tensor:
    """cc(D_VI, D_IR)^2 / (1.01 + cc(B_VI, B_IR)): details uncorrelated, bases correlated."""
    return correlation(detail_vi, detail_ir) ** 2 / (1.01 + correlation(base_vi, base_ir))


def _gaussian_window(size: int, sigma: float, like: Tensor) -> Tensor:
    x = torch.arange(size, dtype=like.dtype, device=like.device) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)  # (size, size), sums to 1


def _filter_reflect(x: Tensor, kernel: Tensor) -> Tensor:
    """Per-channel 2-D correlation with reflect padding to the same size (kornia ``filter2D``)."""
    c = x.shape[1]
    kh, kw = kernel.shape[-2:]
    x = F.pad(x, ((kw - 1) // 2, kw // 2, (kh - 1) // 2, kh // 2), mode="reflect")
    return F.conv2d(x, kernel.expand(c, 1, kh, kw), groups=c)


def ssim_loss(a: Tensor, b: Tensor, window: int = 11, max_val: float = 1.0) -> Tensor:
    """kornia 0.2.0 ``losses.SSIM(11, reduction='mean')``: mean of clamp(1 - SSIM map, 0, 1) / 2.

    Gaussian window sigma 1.5, reflect padding, C1 = (0.01 L)^2, C2 = (0.03 L)^2.
    """
    kernel = _gaussian_window(window, 1.5, a)
    c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
    mu_a, mu_b = _filter_reflect(a, kernel), _filter_reflect(b, kernel)
    var_a = _filter_reflect(a * a, kernel) - mu_a**2
    var_b = _filter_reflect(b * b, kernel) - mu_b**2
    cov = _filter_reflect(a * b, kernel) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ((1 - ssim_map).clamp(0, 1) / 2).mean()


def spatial_gradient(x: Tensor) -> Tensor:
    """kornia ``filters.SpatialGradient()``: Sobel x and y, normalised by 8, replicate padding.

    (B,C,H,W) -> (B,C,2,H,W).
    """
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
    kernels = torch.stack((sobel, sobel.T)) / 8  # (2,3,3)
    b, c, h, w = x.shape
    padded = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    return F.conv2d(padded, kernels.unsqueeze(1)).reshape(b, c, 2, h, w)


def sobel_magnitude(x: Tensor) -> Tensor:
    """|Sobel_x| + |Sobel_y|, unnormalised, zero padding (``utils/loss.py`` ``Sobelxy``). (B,1,H,W)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
    ky = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]], dtype=x.dtype, device=x.device)
    gx = F.conv2d(x, kx.view(1, 1, 3, 3), padding=1)
    gy = F.conv2d(x, ky.view(1, 1, 3, 3), padding=1)
    return gx.abs() + gy.abs()


def fusion_loss(vi: Tensor, ir: Tensor, fused: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``Fusionloss``: L1 to the pixel-wise max intensity + 10 * L1 to the max Sobel magnitude.

    Returns (total, intensity, gradient). Only the first channel of ``vi`` (its Y) is used.
    """
    y = vi[:, :1]
    intensity = F.l1_loss(fused, torch.maximum(y, ir))
    gradient = F.l1_loss(sobel_magnitude(fused), torch.maximum(sobel_magnitude(y), sobel_magnitude(ir)))
    return intensity + 10 * gradient, intensity, gradient


@dataclass(frozen=True)
class LossWeights:
    """``train.py``'s coefficients (paper: alpha1 = 1, alpha2 = alpha4 = 2)."""

    rec_vi: float = 1.0
    rec_ir: float = 1.0
    decomp: float = 2.0
    grad: float = 5.0  # Phase I "tv" term on kornia spatial gradients
    ssim_in_rec: float = 5.0  # L_rec = 5 * SSIM loss + MSE


def _reconstruction(x: Tensor, x_hat: Tensor, w: LossWeights) -> Tensor:
    return w.ssim_in_rec * ssim_loss(x, x_hat) + F.mse_loss(x, x_hat)


def CDDFuse_phase1_loss(
    model: CDDFuse, ir: Tensor, vi: Tensor, weights: LossWeights | None = None
) -> dict[str, Tensor]:
    """Phase I (epochs 0-39, encoder + decoder): reconstruct each modality from its own features.

    Each reconstruction uses its own input as the decoder residual, as ``train.py`` does.
    L = rec(VI) + rec(IR) + 2 * decomp + 5 * L1(grad VI, grad VI_hat).
    """
    w = weights or LossWeights()
    base_vi, detail_vi, _ = model.encoder(vi)
    base_ir, detail_ir, _ = model.encoder(ir)
    vi_hat = model.decoder(vi, base_vi, detail_vi)
    ir_hat = model.decoder(ir, base_ir, detail_ir)
    terms = {
        "rec_vi": _reconstruction(vi, vi_hat, w),
        "rec_ir": _reconstruction(ir, ir_hat, w),
        "decomp": decomposition_loss(base_vi, base_ir, detail_vi, detail_ir),
        "grad": F.l1_loss(spatial_gradient(vi), spatial_gradient(vi_hat)),
    }
    terms["total"] = (
        w.rec_vi * terms["rec_vi"] + w.rec_ir * terms["rec_ir"] + w.decomp * terms["decomp"] + w.grad * terms["grad"]
    )
    return terms


def CDDFuse_loss(model: CDDFuse, ir: Tensor, vi: Tensor, weights: LossWeights | None = None) -> dict[str, Tensor]:
    """Phase II (epochs 40-119, everything trained): L = fusion loss + 2 * decomp.

    The authors also compute SSIM/MSE of the fused image against each source in Phase II but never add
    them to the loss (issue #27); they are left out here.
    """
    w = weights or LossWeights()
    feats = model.forward_features(ir, vi)
    total_fusion, intensity, gradient = fusion_loss(vi, ir, feats.fused)
    decomp = decomposition_loss(feats.base_vi, feats.base_ir, feats.detail_vi, feats.detail_ir)
    return {
        "intensity": intensity,
        "gradient": gradient,
        "fusion": total_fusion,
        "decomp": decomp,
        "total": total_fusion + w.decomp * decomp,
    }


def clip_grad_norms(model: CDDFuse, max_norm: float = 0.01) -> None:
    """The authors clip each of their four modules' gradient norm separately (to 0.01)."""
    for part in (model.encoder, model.decoder, model.base_fuse, model.detail_fuse):
        nn.utils.clip_grad_norm_(part.parameters(), max_norm=max_norm, norm_type=2)
