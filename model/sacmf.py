"""SA-CMF: secondary-attention cross-modal fusion of two camera frames and two light curves.

What differs from the public TensorFlow reference (sacmf.md section 1.2/1.3), and why:

* image tokens are the backbone's *spatial* cells of both cameras, and they go through their own
  Transformer encoder (the reference skipped it; the method describes it), so Image-A/Image-B
  persistence (star vs streak vs cosmic ray) can be compared token by token;
* the sequence branch cuts each light curve into patches (one token per patch and channel) instead of
  splitting one dense vector in two, and masks patches without a valid sample;
* cross-attention runs in both directions (the reference had image -> sequence only);
* the MI step is the batch-level Gumbel-copula estimate of :mod:`model.copula_mi`, held in EMA buffers,
  so in eval mode a sample's output never depends on its batch-mates, and redundancy lowers a weight;
* an absent modality has weight exactly 0 everywhere and the model answers from what is present;
* detection is a CenterNet-style head on the image feature map (per-class centre heatmap, box size and
  sub-cell offset) rather than thresholded contours re-classified with a scene-level sequence.

Shapes: B batch, S frame side, T sequence length, P patch length, N_p = T / P patches per channel,
g token grid side, K_a = 2 g^2 image tokens (camera A then B), K_b = 2 N_p sequence tokens (Seq-A then
Seq-B), D = d_model, H_d = W_d = S / det_stride detection cells.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.backbones import BACKBONES, build_backbone, feature_shape
from model.copula_mi import MutualInfoFusionWeights, apply_presence, redundancy_scores
from model.preprocess import PreprocessConfig
from model.synth import CLASS_NAMES

# x0, y0, x1, y1, class, score, class probabilities at the peak cell (the C heatmaps there, normalised)
Detection = tuple[float, float, float, float, int, float, tuple[float, ...]]


@dataclass(frozen=True, slots=True)
class SACMFConfig:
    """Every hyper-parameter of the network and its loss; the preprocessing contract derives from it."""

    num_classes: int = 6
    class_names: tuple[str, ...] = CLASS_NAMES
    # image branch
    backbone: str = "mobilenet_v3_small"
    backbone_stride: int = 8
    backbone_weights: str | None = None  # local state_dict file, never downloaded
    shared_backbone: bool = True  # False: one backbone per camera (twice the parameters)
    frame_size: int = 64
    token_grid: int = 8  # image tokens per camera: token_grid^2 (adaptive average pooling of the map)
    # sequence branch
    seq_len: int = 256
    patch_len: int = 16
    # transformer
    d_model: int = 64
    heads: int = 4
    img_layers: int = 2
    seq_layers: int = 2
    cross_layers: int = 1
    ffn_mult: int = 2
    dropout: float = 0.1
    # MI-driven fusion (sacmf.md section 2.4/2.5)
    mi_projections: int = 4
    mi_momentum: float = 0.95
    mi_beta: float = 2.0
    mi_kappa: float = 0.1
    mi_reduce: Literal["mean", "max"] = "mean"
    # ablation: True replaces the MI-driven token weights by uniform ones and drops the modality-level
    # redundancy term (the MI EMA is still estimated and reported, but drives nothing; no MI loss)
    uniform_fusion: bool = False
    fusion_alpha: float = 0.3  # initial weight of the cross-attention term (learnable)
    fusion_beta: float = 0.7  # initial weight of the weighted unimodal terms (learnable)
    # detection (CenterNet style)
    det_stride: int = 4
    det_channels: int = 32
    det_sigma_alpha: float = 0.54  # Gaussian sigma = alpha * box side / 6, in cells
    det_min_sigma: float = 0.5  # cells; point-like objects still get a few positive-ish neighbours
    # loss weights: L = cls + lambda_sim * sim + lambda_mi * mi + lambda_det * det + aux_weight * aux
    lambda_sim: float = 0.1
    lambda_mi: float = 0.05
    lambda_det: float = 1.0
    det_size_weight: float = 0.1
    det_offset_weight: float = 1.0
    aux_weight: float = 0.3
    sim_temperature: float = 0.1

    def __post_init__(self) -> None:
        # Checked here because a config also arrives from checkpoint files: a bad value must be a clear
        # error, not a ZeroDivisionError or "negative dimension" from deep inside the network's build.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{f.name} must be an int, got {value!r}")
            number = not isinstance(value, bool) and isinstance(value, int | float)
            if f.type == "float" and not (number and math.isfinite(value)):
                raise ValueError(f"{f.name} must be a finite number, got {value!r}")
        positive = ("num_classes", "backbone_stride", "frame_size", "seq_len", "d_model", "ffn_mult")
        positive += ("mi_projections", "det_stride", "det_channels", "sim_temperature")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("dropout", "mi_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("lambda_sim", "lambda_mi", "lambda_det", "det_size_weight", "det_offset_weight", "aux_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.mi_reduce not in ("mean", "max"):
            raise ValueError(f"mi_reduce must be 'mean' or 'max', got {self.mi_reduce!r}")
        if len(self.class_names) != self.num_classes:
            raise ValueError("class_names must have num_classes entries")
        if self.seq_len % self.patch_len:
            raise ValueError(f"seq_len ({self.seq_len}) must be a multiple of patch_len ({self.patch_len})")
        for name in ("token_grid", "patch_len", "img_layers", "seq_layers", "cross_layers", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")
        if self.frame_size % self.det_stride:
            raise ValueError(f"frame_size {self.frame_size} not a multiple of det_stride {self.det_stride}")

    @property
    def det_size(self) -> int:
        return self.frame_size // self.det_stride

    @property
    def n_patches(self) -> int:
        return self.seq_len // self.patch_len

    def preprocess_config(self, **overrides: object) -> PreprocessConfig:
        """The input contract matching this model (frame size and sequence length must agree)."""
        kwargs: dict[str, Any] = {"frame_size": self.frame_size, "seq_len": self.seq_len, **overrides}
        return PreprocessConfig(**kwargs)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------------
# Attention blocks
# ----------------------------------------------------------------------------------------------------


def _safe_keys(valid: Tensor) -> Tensor:
    """A sample with no valid key attends to all keys (finite garbage the caller gates off) instead of NaN."""
    return valid | ~valid.any(1, keepdim=True)


class Attention(nn.Module):
    """Multi-head attention over keys with a validity mask: x [B, L_q, D], ctx [B, L_k, D], valid [B, L_k]."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: Tensor, ctx: Tensor, valid: Tensor) -> Tensor:
        b, lq, d = x.shape
        lk = ctx.shape[1]
        h = self.heads
        q = self.q(x).view(b, lq, h, d // h).transpose(1, 2)  # [B, h, L_q, D/h]
        k, v = self.kv(ctx).view(b, lk, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x [B, h, L_k, D/h]
        mask = _safe_keys(valid)[:, None, None, :]  # [B, 1, 1, L_k], True = attend
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(b, lq, d))


class Block(nn.Module):
    """Pre-LN Transformer block; self-attention when ``ctx`` is None, cross-attention otherwise.

    ``gate`` [B] bool switches the attention update off per sample (cross-attention to an absent
    modality must add exactly nothing). Returns (output, attention update) so the caller can reuse the
    update as the "cross" term of the fusion.
    """

    def __init__(self, d: int, heads: int, ffn_mult: int, dropout: float, cross: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.norm_ctx = nn.LayerNorm(d) if cross else None
        self.attn = Attention(d, heads, dropout)
        self.norm_ff = nn.LayerNorm(d)
        hidden = ffn_mult * d
        self.ff = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, d))
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, valid: Tensor, ctx: Tensor | None = None, gate: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        h = self.norm(x)
        c = h if ctx is None or self.norm_ctx is None else self.norm_ctx(ctx)
        upd = self.drop(self.attn(h, c, valid))
        if gate is not None:
            upd = torch.where(gate[:, None, None], upd, torch.zeros((), dtype=upd.dtype))
        x = x + upd
        x = x + self.drop(self.ff(self.norm_ff(x)))
        return x, upd


class Encoder(nn.Module):
    """Stack of self-attention blocks with a final LayerNorm (pre-LN needs it)."""

    def __init__(self, d: int, heads: int, layers: int, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, heads, ffn_mult, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(d)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        for block in self.blocks:
            x, _ = block(x, valid)
        return self.norm(x)


def _masked_mean(x: Tensor, valid: Tensor) -> Tensor:
    """[B, L, D] over valid L -> [B, D]; exactly 0 for a sample without valid entries."""
    w = valid.to(x.dtype).unsqueeze(-1)
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


# ----------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------


class SACMF(nn.Module):
    """Window -> target class, detections, fusion weights, MI estimate and per-modality embeddings.

    ``forward(batch)`` takes the output of :func:`model.preprocess.collate` (keys ``image_a``,
    ``image_b`` [B, 1, S, S], ``seq_a``, ``seq_b`` [B, T], ``seq_a_valid``, ``seq_b_valid`` [B, T],
    ``presence`` [B, 4]; other keys are ignored) and returns a dict:

    ``logits`` [B, C]; ``logits_img``/``logits_seq`` [B, C] unimodal auxiliary heads;
    ``det_logits`` [B, C, H_d, W_d], ``det_size`` [B, 2, H_d, W_d] (w, h in cells),
    ``det_offset`` [B, 2, H_d, W_d] (sub-cell centre), ``det_stride`` [];
    ``modality_weights`` [B, 2] (image, sequence; sum 1 over present modalities, 0 when absent);
    ``token_weights_img`` [B, K_a], ``token_weights_seq`` [B, K_b] (0 for absent/invalid tokens);
    ``mi`` [] nats and ``mi_matrix`` [K_a, K_b] from the EMA buffers (a property of the model, not of
    the sample); in training also ``mi_loss`` [] and, when the EMA was updated, ``mi_batch`` [K_a, K_b];
    ``emb_img``/``emb_seq``/``emb_fused`` [B, D]; ``present`` [B, 2] modality presence.
    """

    def __init__(self, config: SACMFConfig) -> None:
        super().__init__()
        self.config = config
        self.class_names = config.class_names
        d, g = config.d_model, config.token_grid
        n_cams = 2
        self.backbone = build_backbone(config.backbone, config.backbone_stride, config.backbone_weights)
        self.backbone_b = (
            None
            if config.shared_backbone
            else build_backbone(config.backbone, config.backbone_stride, config.backbone_weights)
        )
        c_feat, self.feat_h, self.feat_w = feature_shape(self.backbone, config.frame_size)
        self.img_proj = nn.Conv2d(c_feat, d, 1)
        self.img_norm = nn.LayerNorm(d)  # untrained backbones give wild scales (sacmf.md 6.1)
        self.img_pos = nn.Parameter(torch.zeros(1, 1, g * g, d))
        self.cam_emb = nn.Parameter(torch.zeros(1, n_cams, 1, d))
        self.img_encoder = Encoder(d, config.heads, config.img_layers, config.ffn_mult, config.dropout)

        p = config.patch_len
        self.patch_embed = nn.Linear(2 * p, d)  # per patch: P values and P validity flags
        self.seq_pos = nn.Parameter(torch.zeros(1, 1, config.n_patches, d))
        self.chan_emb = nn.Parameter(torch.zeros(1, 2, 1, d))
        self.seq_encoder = Encoder(d, config.heads, config.seq_layers, config.ffn_mult, config.dropout)

        def cross() -> Block:
            return Block(d, config.heads, config.ffn_mult, config.dropout, cross=True)

        self.cross_img = nn.ModuleList(cross() for _ in range(config.cross_layers))
        self.cross_seq = nn.ModuleList(cross() for _ in range(config.cross_layers))

        self.k_a, self.k_b = n_cams * g * g, 2 * config.n_patches
        self.mi = MutualInfoFusionWeights(
            d,
            self.k_a,
            self.k_b,
            n_proj=config.mi_projections,
            momentum=config.mi_momentum,
            beta=config.mi_beta,
            kappa=config.mi_kappa,
            reduce=config.mi_reduce,
        )
        self.gate = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 2))
        self.fusion_alpha = nn.Parameter(torch.tensor(config.fusion_alpha))
        self.fusion_beta = nn.Parameter(torch.tensor(config.fusion_beta))

        c = config.num_classes
        self.head = nn.Sequential(
            nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Dropout(config.dropout), nn.Linear(d, c)
        )
        self.head_img = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, c))
        self.head_seq = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, c))

        dc = config.det_channels
        # 1x1 reduction at backbone resolution first: the 3x3 work then runs on dc channels only
        self.det_reduce = nn.Sequential(
            nn.Conv2d(2 * n_cams * d, dc, 1), nn.GroupNorm(8 if dc % 8 == 0 else 1, dc), nn.ReLU(inplace=True)
        )
        self.det_trunk = nn.Sequential(nn.Conv2d(dc, dc, 3, padding=1), nn.ReLU(inplace=True))
        self.det_heat = nn.Conv2d(dc, c, 1)
        self.det_size = nn.Conv2d(dc, 2, 1)
        self.det_offset = nn.Conv2d(dc, 2, 1)
        self._init_weights()

    def _init_weights(self) -> None:
        for param in (self.img_pos, self.cam_emb, self.seq_pos, self.chan_emb):
            nn.init.trunc_normal_(param, std=0.02)
        nn.init.zeros_(self.gate[-1].weight)  # start from equal modality weights
        nn.init.zeros_(self.gate[-1].bias)
        nn.init.constant_(self.det_heat.bias, -math.log((1 - 0.1) / 0.1))  # CenterNet prior p = 0.1

    # --- branches -------------------------------------------------------------------------------------

    def _check(self, batch: dict[str, Tensor]) -> int:
        cfg = self.config
        b = batch["image_a"].shape[0]
        expect = {
            "image_a": (b, 1, cfg.frame_size, cfg.frame_size),
            "image_b": (b, 1, cfg.frame_size, cfg.frame_size),
            "seq_a": (b, cfg.seq_len),
            "seq_b": (b, cfg.seq_len),
            "seq_a_valid": (b, cfg.seq_len),
            "seq_b_valid": (b, cfg.seq_len),
            "presence": (b, 4),
        }
        for key, shape in expect.items():
            if key not in batch:
                raise KeyError(f"batch lacks {key!r} (build it with model.preprocess.preprocess + collate)")
            if tuple(batch[key].shape) != shape:
                raise ValueError(
                    f"{key} has shape {tuple(batch[key].shape)}, expected {shape}; preprocess with "
                    f"config.preprocess_config() (frame_size={cfg.frame_size}, seq_len={cfg.seq_len})"
                )
        return b

    def _image_branch(self, batch: dict[str, Tensor], b: int) -> tuple[Tensor, Tensor, Tensor]:
        """-> tokens [B, K_a, D], token validity [B, K_a], projected feature maps [B, 2, D, h, w]."""
        g, d = self.config.token_grid, self.config.d_model
        cams = batch["presence"][:, :2]  # [B, 2]
        frames = torch.stack([batch["image_a"], batch["image_b"]], 1)  # [B, 2, 1, S, S]
        zero = torch.zeros((), dtype=frames.dtype)
        # an absent camera's tensor may hold anything (even NaN): it must not reach BatchNorm statistics
        frames = torch.where(cams[:, :, None, None, None], frames, zero)
        if self.backbone_b is None:
            feat = self.backbone(frames.flatten(0, 1))  # [2B, C, h, w]
        else:
            feat = torch.stack([self.backbone(frames[:, 0]), self.backbone_b(frames[:, 1])], 1).flatten(0, 1)
        feat = self.img_proj(feat)  # [2B, D, h, w]
        feat = torch.where(cams[:, :, None, None, None], feat.view(b, 2, d, *feat.shape[-2:]), zero)
        tok = F.adaptive_avg_pool2d(feat.flatten(0, 1), g)  # [2B, D, g, g]
        tok = tok.view(b, 2, d, g * g).transpose(2, 3)  # [B, 2, g^2, D]
        tok = self.img_norm(tok) + self.img_pos + self.cam_emb
        valid = cams.repeat_interleave(g * g, dim=1)  # [B, K_a]
        return tok.reshape(b, self.k_a, d), valid, feat

    def _seq_branch(self, batch: dict[str, Tensor], b: int) -> tuple[Tensor, Tensor]:
        """-> tokens [B, K_b, D], token validity [B, K_b] (a patch with no valid sample is masked)."""
        cfg = self.config
        present = batch["presence"][:, 2:]  # [B, 2]
        valid = torch.stack([batch["seq_a_valid"], batch["seq_b_valid"]], 1)  # [B, 2, T]
        valid = valid & present[:, :, None]
        x = torch.stack([batch["seq_a"], batch["seq_b"]], 1)
        x = torch.where(valid, x, torch.zeros((), dtype=x.dtype))  # invalid values never reach the network
        xp = x.view(b, 2, cfg.n_patches, cfg.patch_len)  # [B, 2, N_p, P]
        vp = valid.view(b, 2, cfg.n_patches, cfg.patch_len)
        tok = self.patch_embed(torch.cat([xp, vp.to(x.dtype)], -1))  # [B, 2, N_p, D]
        tok = tok + self.seq_pos + self.chan_emb
        return tok.reshape(b, self.k_b, cfg.d_model), vp.any(-1).reshape(b, self.k_b)

    def _detect(self, feat: Tensor, z_img: Tensor, b: int) -> dict[str, Tensor]:
        """Backbone maps of both cameras + their fused tokens (for context) -> CenterNet maps."""
        cfg = self.config
        g, d, hd = cfg.token_grid, cfg.d_model, cfg.det_size
        fmap = feat.reshape(b, 2 * d, *feat.shape[-2:])  # [B, 2D, h, w]
        ctx = z_img.view(b, 2, g, g, d).permute(0, 1, 4, 2, 3).reshape(b, 2 * d, g, g)
        if ctx.shape[-2:] != fmap.shape[-2:]:
            ctx = F.interpolate(ctx, size=fmap.shape[-2:], mode="nearest")  # [B, 2D, h, w]
        y = self.det_reduce(torch.cat([fmap, ctx], 1))  # [B, dc, h, w]
        if y.shape[-2:] != (hd, hd):
            y = F.interpolate(y, size=(hd, hd), mode="bilinear", align_corners=False)  # [B, dc, H_d, W_d]
        y = self.det_trunk(y)
        return {
            "det_logits": self.det_heat(y),
            "det_size": self.det_size(y),
            "det_offset": self.det_offset(y),
            "det_stride": torch.tensor(float(cfg.det_stride)),
        }

    # --- forward --------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        b = self._check(batch)
        tok_img, valid_img, feat = self._image_branch(batch, b)
        tok_seq, valid_seq = self._seq_branch(batch, b)
        present = torch.stack([valid_img.any(1), valid_seq.any(1)], 1)  # [B, 2] image, sequence

        z_img = self.img_encoder(tok_img, valid_img)  # [B, K_a, D]
        z_seq = self.seq_encoder(tok_seq, valid_seq)  # [B, K_b, D]
        upd_img = upd_seq = z_img.new_zeros(())
        for block_img, block_seq in zip(self.cross_img, self.cross_seq, strict=True):
            new_img, upd_img = block_img(z_img, valid_seq, ctx=z_seq, gate=present[:, 1])
            new_seq, upd_seq = block_seq(z_seq, valid_img, ctx=z_img, gate=present[:, 0])
            z_img, z_seq = new_img, new_seq
        both = present.all(1, keepdim=True).to(z_img.dtype)  # [B, 1]
        cross = 0.5 * (_masked_mean(upd_img, valid_img) + _masked_mean(upd_seq, valid_seq)) * both  # [B, D]

        # invalid tokens are exactly 0 (what the fusion passes on for them) and left out of the MI estimate
        z_img = z_img * valid_img.unsqueeze(-1).to(z_img.dtype)
        z_seq = z_seq * valid_seq.unsqueeze(-1).to(z_seq.dtype)
        uniform = self.config.uniform_fusion
        mi_out = self.mi(z_img, z_seq, present, False if uniform else None, valid_img, valid_seq)
        if uniform:  # ablation: every token weight 1 (0 when absent), no redundancy term below
            ones_a = torch.ones(self.k_a, dtype=z_img.dtype, device=z_img.device)
            ones_b = torch.ones(self.k_b, dtype=z_seq.dtype, device=z_seq.device)
            w_a, w_b = apply_presence(ones_a, ones_b, present)
            mi_out.weights_a, mi_out.weights_b = w_a, w_b
            mi_out.tokens_a = z_img * w_a.unsqueeze(-1)
            mi_out.tokens_b = z_seq * w_b.unsqueeze(-1)
        w_img = mi_out.weights_a * valid_img.to(z_img.dtype)  # [B, K_a]
        w_seq = mi_out.weights_b * valid_seq.to(z_seq.dtype)  # [B, K_b]
        emb_img = _masked_mean(mi_out.tokens_a, valid_img)  # [B, D], 0 when absent
        emb_seq = _masked_mean(mi_out.tokens_b, valid_seq)

        # modality level: a learned per-sample relevance (the gate) minus each modality's redundancy. With
        # mi_reduce "mean" both redundancies are M.mean() / I_max, the same number, so the term cancels in
        # the softmax and the gate alone decides: symmetric pairwise MI cannot say which modality to trust
        # more (sacmf.md 2.5). "max" (each token's strongest partner) gives asymmetric scores.
        r, s = redundancy_scores(mi_out.mi, self.config.mi_reduce)
        red = torch.stack([r.mean(), s.mean()]).to(z_img.dtype) * (0.0 if uniform else 1.0)  # [2]
        logit = self.gate(torch.cat([emb_img, emb_seq], 1)) - self.config.mi_beta * red  # [B, 2]
        logit = torch.where(present, logit, torch.full((), -1e4, dtype=logit.dtype))
        omega = torch.softmax(logit, 1) * present.to(logit.dtype)  # absent -> exactly 0
        unimodal = 2.0 * (omega[:, :1] * emb_img + omega[:, 1:] * emb_seq)
        fused = self.fusion_alpha * cross + self.fusion_beta * unimodal  # [B, D]

        out: dict[str, Tensor] = {
            "logits": self.head(fused),
            "logits_img": self.head_img(emb_img),
            "logits_seq": self.head_seq(emb_seq),
            "modality_weights": omega,
            "token_weights_img": w_img,
            "token_weights_seq": w_seq,
            "mi_matrix": mi_out.mi,
            "mi": mi_out.mi.mean(),
            "emb_img": emb_img,
            "emb_seq": emb_seq,
            "emb_fused": fused,
            "present": present,
        }
        if mi_out.mi_loss is not None:
            out["mi_loss"] = mi_out.mi_loss
        if mi_out.mi_batch is not None:
            out["mi_batch"] = mi_out.mi_batch
        out.update(self._detect(feat, z_img, b))
        return out


def build_model(cfg: SACMFConfig | None = None) -> SACMF:
    """The SA-CMF network for ``cfg`` (defaults when None)."""
    return SACMF(cfg or SACMFConfig())


# ----------------------------------------------------------------------------------------------------
# Detection decoding
# ----------------------------------------------------------------------------------------------------


@torch.no_grad()
def decode_detections(
    out: dict[str, Tensor],
    k: int = 50,
    threshold: float = 0.3,
    scale: Tensor | None = None,
) -> list[list[Detection]]:
    """CenterNet decoding: local maxima (3x3) of the class heatmaps, top ``k`` above ``threshold``.

    Boxes are (x0, y0, x1, y1, class, score, class_probs) in model-frame pixels; pass the batch's
    ``scale_a`` [B] to get Image-A raw pixels instead (the preprocessing scaled by it and padded
    bottom/right only). ``class_probs`` [C] is the per-class heatmap at the detection's cell normalised to
    sum 1: the heatmaps are independent sigmoids, so this is how sure the head is of the class *given*
    an object there, which is what a consumer ranking alternative labels needs.
    """
    heat = torch.sigmoid(out["det_logits"])  # [B, C, H, W]
    stride = float(out["det_stride"])
    b, c, h, w = heat.shape
    peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat).to(heat.dtype)
    k = min(k, c * h * w)
    scores, idx = peaks.view(b, -1).topk(k, dim=1)  # [B, k], descending
    # Gather everything for the B*k candidates at once and leave tensors before the Python loop: this
    # runs on the serving path once per batch, where per-element tensor indexing cost more than the model.
    cell = idx % (h * w)
    ys, xs = cell // w, cell % w  # [B, k]
    bi = torch.arange(b).unsqueeze(1)  # [B, 1]
    off = out["det_offset"][bi, :, ys, xs].double().numpy()  # [B, k, 2]
    wh = out["det_size"][bi, :, ys, xs].double().numpy()  # [B, k, 2]
    cell_heat = heat[bi, :, ys, xs].double().numpy()  # [B, k, C]
    probs = cell_heat / cell_heat.sum(axis=2, keepdims=True)
    cx = (xs.double().numpy() + off[..., 0]) * stride
    cy = (ys.double().numpy() + off[..., 1]) * stride
    bw, bh = wh[..., 0] * stride, wh[..., 1] * stride
    div = np.ones(b) if scale is None else scale.double().reshape(b).numpy()
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=2) / div[:, None, None]  # [B, k, 4]
    score_np = scores.double().numpy()
    cls_l = (idx // (h * w)).tolist()
    results: list[list[Detection]] = []
    for i in range(b):
        n = int(np.count_nonzero(score_np[i] >= threshold))  # scores are sorted: the first n pass
        results.append(
            [(*boxes[i, j].tolist(), cls_l[i][j], float(score_np[i, j]), tuple(probs[i, j].tolist())) for j in range(n)]
        )
    return results
