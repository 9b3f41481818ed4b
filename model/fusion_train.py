"""Training recipes of the three fusion networks, as their authors ran them, on patches of image pairs.

Why recipes and not one generic loop: each paper's numbers come from a specific schedule, and the
details are where re-trainings go wrong (fusion.md §7.4-7.5: a user's retrained CDDFuse scored a few
per cent off; batch 8 vs 16; which phase trains what). Each recipe below restates its authors' code
(fusion.md §1.3-1.4, §2.3-2.4, §3.3-3.4); deviations are listed in ``RECIPES`` and docs/FUSION.md:

* **CDDFuse**: Phase I (first 40 of 120 epochs) trains encoder + decoder to reconstruct both modalities;
  Phase II trains everything on the fusion loss + 2 x decomposition loss. Four Adam optimisers (lr 1e-4),
  StepLR x0.5 every 20 epochs (the fusion layers' schedulers only step in Phase II), lr floor 1e-6,
  gradient-norm clip 0.01 per module, batch 8.
* **CrossFuse**: stage 1 trains each modality's auto-encoder (encoder + reconstruction decoder,
  MSE + 1e4 (1 - MS-SSIM)), batch 2, Adam lr 1e-4; stage 2 freezes the encoders and trains the
  cross-attention module and fusion decoder (pixel + 10 x Laplacian loss), batch 8, Adam lr 1e-3. Both
  stages use Adam weight decay 0.9 (as written in the authors' code) and lr x0.1 from the stage's third
  epoch on. Deviation: the authors resize whole KAIST images to 256x256; here patches are cut (256 px by
  default), like the other two recipes.
* **CMMDL**: one stage, 100 epochs, L_int + 5 L_grad, Adam lr 1e-4, StepLR x0.5 every 20 epochs, floor
  1e-6, no clipping, batch 8 (the authors' 4 per GPU x 2 GPUs). Deviations: the authors' loss also takes a
  per-patch mask from their HDF5 whose content is undocumented; we have none, which is the loss's
  ``mask=None`` case. And their DDP had no SyncBatchNorm, so each GPU's BatchNorm layers normalised over
  its own 4 samples; one batch of 8 here normalises over 8 (measured on one batch of 64-px patches: the
  gradient differs from the average of two halves' by 44 %, cosine 0.90). Training converges either way;
  ``--batch-size 4`` gets the authors' BatchNorm statistics at half their samples per update.

The recon decoder CrossFuse's stage 1 needs is not in ``model/crossfuse.py`` (inference never runs it), so
:class:`ReconDecoder` is defined here, with the authors' checkpoint names.

Patches: the authors' CDDFuse/CMMDL data step cuts 128x128 patches with stride 200 from each image pair
(VI as BT.601 Y) and drops a patch when either modality is low-contrast ((p90 - p10) / p90 < 0.1).
``stride = 0`` draws random crops instead, new ones every epoch.

Checkpoints: the authors' layouts, so ``load_CDDFuse`` / ``load_CrossFuse`` / ``load_CMMDL`` (and
``sacmf fuse``) read them back: written to ``<out>/models/`` after every epoch (only the latest set is
kept, because the CrossFuse loader insists on exactly one file per part). Resuming uses
``<out>/train_state.pt`` (model, optimisers, schedulers, epoch and batch position, RNG), written after
every epoch and whenever training stops early, so a resumed run continues the exact same sequence of
batches.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import fusion_io

__all__ = [
    "RECIPES",
    "PatchSet",
    "Recipe",
    "ReconDecoder",
    "StepInfo",
    "TrainOptions",
    "TrainResult",
    "Trainer",
    "extract_patches",
    "is_low_contrast",
    "load_patches",
    "make_trainer",
    "train",
]

STATE_FILE = "train_state.pt"
STATE_FORMAT = "sacmf-fusion-train/1"
MODELS_DIR = "models"
LOG_FILE = "train_log.csv"


# ------------------------------------------------------------------------------------------------
# recipes


@dataclass(frozen=True)
class Recipe:
    """One network's training schedule; field defaults are overridden per method in ``RECIPES``.

    ``stage1_epochs`` is CDDFuse's Phase I / CrossFuse's auto-encoder stage (0: single stage). When the
    user changes ``epochs`` the stage split keeps the authors' proportion (40/120, 4/36).
    """

    method: str
    epochs: int
    batch_size: int
    lr: float
    patch: int = 128
    stride: int = 200
    min_contrast: float | None = 0.1
    stage1_epochs: int = 0
    stage1_batch_size: int = 0
    stage1_lr: float = 0.0
    weight_decay: float = 0.0
    step_epochs: int = 20  # StepLR period; 0 = the CrossFuse rule (x0.1 from the stage's 3rd epoch)
    gamma: float = 0.5
    lr_floor: float = 1e-6
    clip_grad: float | None = None
    crops_per_image: int = 6  # random crops per image and epoch when stride == 0 (ours: the authors use grids)
    deep_sign_weight: float = 0.0  # CrossFuse stage 1, ours (0 = the authors' loss): see CrossFuseTrainer
    seed: int = 42
    notes: str = ""

    def split(self, epochs: int) -> int:
        """Stage-1 epochs for a run of ``epochs`` in total, in the authors' proportion (at least 1 each)."""
        if not self.stage1_epochs:
            return 0
        if epochs < 2:
            raise ValueError(f"{self.method} has two stages and needs >= 2 epochs, got {epochs}")
        share = round(epochs * self.stage1_epochs / self.epochs)
        return min(max(share, 1), epochs - 1)


RECIPES: dict[str, Recipe] = {
    "cddfuse": Recipe(
        method="cddfuse",
        epochs=120,
        batch_size=8,
        lr=1e-4,
        stage1_epochs=40,
        clip_grad=0.01,
        notes="MMIF-CDDFuse train.py; batch 8 as in the code (paper: 16, issue #55)",
    ),
    "crossfuse": Recipe(
        method="crossfuse",
        epochs=36,
        batch_size=8,
        lr=1e-3,
        patch=256,
        min_contrast=None,
        stage1_epochs=4,
        stage1_batch_size=2,
        stage1_lr=1e-4,
        weight_decay=0.9,
        step_epochs=0,
        gamma=0.1,
        lr_floor=0.0,
        notes="hli1221/CrossFuse train_autoencoder.py + train_conv_trans.py; 256 px crops instead of resizing",
    ),
    "cmmdl": Recipe(
        method="cmmdl",
        epochs=100,
        batch_size=8,
        lr=1e-4,
        notes="Ist-Zhy/CMMDL CMMDL_train.py; batch 8 = 4 per GPU x 2 GPUs (BatchNorm over 8, theirs over 4); no masks",
    ),
}


@dataclass(frozen=True)
class TrainOptions:
    """What a user may change; None keeps the recipe's value."""

    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    patch: int | None = None
    stride: int | None = None
    min_contrast: float | None | str = "recipe"  # "recipe": the recipe's rule; None: keep every patch
    crops_per_image: int | None = None  # random crops per image and epoch when stride == 0 (None: 6)
    deep_sign_weight: float | None = None  # CrossFuse only: stage-1 penalty on negative deep channel sums
    max_minutes: float | None = None
    max_steps: int | None = None  # total optimiser steps of the run (counting those before a resume)
    seed: int | None = None
    device: str = "cpu"
    resume: bool = False
    overwrite: bool = False  # start afresh in an --out that holds an earlier run (its state, log and checkpoints go)
    init: str | None = None  # start from these weights (any layout the loaders read) instead of random
    # False: every stage keeps its base lr for the whole run. The authors' decay milestones are in epochs of
    # *their* data (CrossFuse: after 40,000 stage-1 and 5,000 stage-2 steps; CDDFuse, CMMDL: after 20
    # epochs of MSRS patches); on a small set the same epoch count arrives after a few dozen steps and the
    # lr drops 10x before anything is learnt. Without decay a short run follows the authors' own first steps.
    lr_decay: bool = True

    def __post_init__(self) -> None:
        """Nonsense values are refused here, by name, before any data is read or step taken."""
        for name in ("epochs", "batch_size", "patch", "crops_per_image", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
        for name in ("lr", "max_minutes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.stride is not None and self.stride < 0:
            raise ValueError(f"--stride must be >= 0 (0: random crops), got {self.stride}")

    def apply(self, recipe: Recipe) -> Recipe:
        changes: dict[str, Any] = {}
        for name in ("epochs", "batch_size", "lr", "patch", "stride", "crops_per_image", "deep_sign_weight", "seed"):
            value = getattr(self, name)
            if value is not None:
                changes[name] = value
        if self.min_contrast != "recipe":
            changes["min_contrast"] = self.min_contrast
        if self.batch_size is not None and recipe.stage1_batch_size:
            changes["stage1_batch_size"] = self.batch_size
        if self.lr is not None and recipe.stage1_lr:
            changes["stage1_lr"] = self.lr
        if self.epochs is not None and recipe.stage1_epochs:
            changes["stage1_epochs"] = recipe.split(self.epochs)
        if not self.lr_decay:
            changes["gamma"] = 1.0
        return replace(recipe, **changes)


# ------------------------------------------------------------------------------------------------
# patches


def is_low_contrast(img: np.ndarray, threshold: float) -> bool:
    """The authors' patch filter: (p90 - p10) / p90 < threshold (a black patch counts as low contrast)."""
    p10, p90 = np.percentile(img, (10, 90))
    return bool(p90 <= 0 or (p90 - p10) / p90 < threshold)


def _grid(length: int, patch: int, stride: int) -> list[int]:
    return list(range(0, length - patch + 1, stride))


def extract_patches(
    ir: np.ndarray,
    vi: np.ndarray,
    patch: int,
    stride: int,
    *,
    min_contrast: float | None = 0.1,
    rng: np.random.Generator | None = None,
    crops: int = 6,
) -> tuple[np.ndarray, np.ndarray]:
    """(ir, vi) patches (n, patch, patch) from one registered pair of (H, W) arrays in [0, 1].

    ``stride`` > 0: the authors' grid (top-left origins 0, stride, ... while the patch fits); ``stride`` 0:
    ``crops`` random crops drawn with ``rng``. Low-contrast patches are dropped when ``min_contrast`` is set.
    Images smaller than the patch give no patches.
    """
    h, w = ir.shape
    if ir.shape != vi.shape:
        raise ValueError(f"pair sizes differ: {ir.shape} vs {vi.shape}")
    if h < patch or w < patch:
        return np.empty((0, patch, patch), np.float32), np.empty((0, patch, patch), np.float32)
    if stride > 0:
        origins = [(y, x) for y in _grid(h, patch, stride) for x in _grid(w, patch, stride)]
    else:
        if rng is None:
            raise ValueError("random crops (stride 0) need an rng")
        origins = list(zip(rng.integers(0, h - patch + 1, crops), rng.integers(0, w - patch + 1, crops), strict=True))
    out_ir, out_vi = [], []
    for y, x in origins:
        a, b = ir[y : y + patch, x : x + patch], vi[y : y + patch, x : x + patch]
        if min_contrast is not None and (is_low_contrast(a, min_contrast) or is_low_contrast(b, min_contrast)):
            continue
        out_ir.append(a)
        out_vi.append(b)
    if not out_ir:
        return np.empty((0, patch, patch), np.float32), np.empty((0, patch, patch), np.float32)
    return np.stack(out_ir).astype(np.float32), np.stack(out_vi).astype(np.float32)


@dataclass
class PatchSet:
    """Training pairs in memory: the images (16-bit quantised, exact for 8/16-bit sources) and patches.

    Grid patches are cut once; random crops are re-drawn per epoch from a generator seeded by
    (seed, epoch), so a resumed run sees the same crops as an uninterrupted one.
    """

    images: list[tuple[np.ndarray, np.ndarray]]  # (ir, vi_y) uint16 (H, W)
    names: list[str]
    patch: int
    stride: int
    min_contrast: float | None
    crops: int = 6
    _grid: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def epoch(self, epoch: int, seed: int) -> tuple[Tensor, Tensor]:
        """(ir, vi) float32 tensors (N, 1, P, P) in [0, 1] for this epoch."""
        if self.stride > 0 and self._grid is not None:
            return self._grid
        rng = np.random.default_rng([seed, epoch])
        irs, vis = [], []
        for ir16, vi16 in self.images:
            a, b = extract_patches(
                ir16.astype(np.float32) / 65535,
                vi16.astype(np.float32) / 65535,
                self.patch,
                self.stride,
                min_contrast=self.min_contrast,
                rng=rng,
                crops=self.crops,
            )
            irs.append(a)
            vis.append(b)
        ir = torch.from_numpy(np.concatenate(irs))[:, None]
        vi = torch.from_numpy(np.concatenate(vis))[:, None]
        if ir.shape[0] == 0:
            raise ValueError(
                f"no training patches: images smaller than {self.patch} px or all patches low-contrast"
                " (lower --patch, or --min-contrast 0)"
            )
        if self.stride > 0:
            self._grid = (ir, vi)
        return ir, vi


def load_patches(
    ir_dir: str | Path,
    vi_dir: str | Path,
    *,
    patch: int,
    stride: int,
    min_contrast: float | None,
    crops: int = 6,
) -> PatchSet:
    """Pair two folders by name (``fusion_io.pair_files``) and keep IR and visible Y as 16-bit arrays."""
    images, names = [], []
    for ir_path, vi_path in fusion_io.pair_files(ir_dir, vi_dir):
        pair = fusion_io.read_pair(ir_path, vi_path)
        images.append((_q16(pair.ir), _q16(pair.vi_y)))
        names.append(ir_path.stem)
    return PatchSet(images, names, patch, stride, min_contrast, crops)


def _q16(x: np.ndarray) -> np.ndarray:
    return np.round(np.clip(x, 0.0, 1.0) * 65535).astype(np.uint16)


# ------------------------------------------------------------------------------------------------
# trainers


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Evaluate a loss in training mode without moving BatchNorm running statistics (momentum 0)."""
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum, tracked in saved:
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _floor_lr(optimizer: torch.optim.Optimizer, floor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = max(group["lr"], floor)


class Trainer:
    """One network's recipe: which modules train in which stage, the loss, optimisers and checkpoints.

    ``step`` runs one optimiser step on a batch and returns the loss terms as floats; ``losses`` evaluates
    them without an update (training mode, BatchNorm statistics untouched); ``end_epoch`` steps the
    schedulers; ``state_dict``/``load_state_dict`` are for resuming; ``save_release`` writes the authors'
    checkpoint layout.
    """

    recipe: Recipe
    device: torch.device

    def stage(self, epoch: int) -> int:
        """1 or 2 for two-stage recipes (CDDFuse's phases, CrossFuse's stages); always 1 for CMMDL."""
        return 1 if epoch < self.recipe.stage1_epochs or not self.recipe.stage1_epochs else 2

    def batch_size(self, epoch: int) -> int:
        if self.stage(epoch) == 1 and self.recipe.stage1_batch_size:
            return self.recipe.stage1_batch_size
        return self.recipe.batch_size

    def step(self, ir: Tensor, vi: Tensor, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def losses(self, ir: Tensor, vi: Tensor, epoch: int) -> dict[str, float]:
        raise NotImplementedError

    def end_epoch(self, epoch: int) -> None:
        raise NotImplementedError

    def lr(self, epoch: int) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def save_release(self, folder: Path, epoch: int) -> list[Path]:
        raise NotImplementedError

    def stage_report(self, ir: Tensor, vi: Tensor, epoch: int) -> str | None:
        """A warning about the state a stage starts from (checked on its first batch), or None."""
        return None


def _floats(terms: dict[str, Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in terms.items()}


# ---------------------------------------------------------------- CDDFuse


class CDDFuseTrainer(Trainer):
    """Phase I: encoder + decoder reconstruct both inputs; Phase II: all four modules fuse."""

    def __init__(self, recipe: Recipe, device: torch.device, init: str | None = None) -> None:
        from model.cddfuse import CDDFuse, load_CDDFuse

        self.recipe, self.device = recipe, device
        self.model = (load_CDDFuse(init) if init else CDDFuse()).to(device).train()
        parts = (self.model.encoder, self.model.decoder, self.model.base_fuse, self.model.detail_fuse)
        self.optimizers = [
            torch.optim.Adam(p.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay) for p in parts
        ]
        self.schedulers = [
            torch.optim.lr_scheduler.StepLR(o, step_size=recipe.step_epochs, gamma=recipe.gamma)
            for o in self.optimizers
        ]

    def _terms(self, ir: Tensor, vi: Tensor, epoch: int) -> dict[str, Tensor]:
        from model.cddfuse import CDDFuse_loss, CDDFuse_phase1_loss

        fn = CDDFuse_phase1_loss if self.stage(epoch) == 1 else CDDFuse_loss
        return fn(self.model, ir.to(self.device), vi.to(self.device))

    def step(self, ir: Tensor, vi: Tensor, epoch: int) -> dict[str, float]:
        from model.cddfuse import clip_grad_norms

        for o in self.optimizers:
            o.zero_grad(set_to_none=True)
        terms = self._terms(ir, vi, epoch)
        terms["total"].backward()
        if self.recipe.clip_grad is not None:
            clip_grad_norms(self.model, self.recipe.clip_grad)
        active = self.optimizers[:2] if self.stage(epoch) == 1 else self.optimizers
        for o in active:
            o.step()
        return _floats(terms)

    def losses(self, ir: Tensor, vi: Tensor, epoch: int) -> dict[str, float]:
        with torch.no_grad():
            return _floats(self._terms(ir, vi, epoch))

    def end_epoch(self, epoch: int) -> None:
        # train.py: encoder/decoder schedulers step every epoch, the fusion layers' only in Phase II
        active = self.schedulers[:2] if self.stage(epoch) == 1 else self.schedulers
        for s in active:
            s.step()
        for o in self.optimizers:
            _floor_lr(o, self.recipe.lr_floor)

    def lr(self, epoch: int) -> float:
        return float(self.optimizers[0].param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        for o, s in zip(self.optimizers, state["optimizers"], strict=True):
            o.load_state_dict(s)
        for sch, s in zip(self.schedulers, state["schedulers"], strict=True):
            sch.load_state_dict(s)

    def save_release(self, folder: Path, epoch: int) -> list[Path]:
        """``{DIDF_Encoder, DIDF_Decoder, BaseFuseLayer, DetailFuseLayer}`` of ``module.``-prefixed dicts."""
        from model.cddfuse import authors_key_map

        state = self.model.state_dict()
        groups: dict[str, dict[str, Tensor]] = {}
        for ours, theirs in authors_key_map(self.model).items():
            group, key = theirs.split("/", 1)
            groups.setdefault(group, {})[f"module.{key}"] = state[ours].detach().cpu().clone()
        path = folder / f"CDDFuse_epoch_{epoch}.pth"
        _atomic_save(groups, path)
        return [path]


# ---------------------------------------------------------------- CrossFuse


class ReconDecoder(nn.Module):
    """CrossFuse's stage-1 reconstruction decoder (``Decoder_rec``), training only.

    From the 1/8-resolution deep feature (128 ch): 3x3 conv 128->64, nearest x2, 3x3 64->64, x2,
    3x3 64->32, x2, reflection-pad to the shallow feature's size, add the shallow feature (32 ch), 1x1
    conv 32->1. Every conv is reflection-padded with a bias; no BatchNorm, no activation (like the
    encoder). The output is in the input's [0, 1] units (the authors multiply it by 255 for the loss).
    Attribute and index names give the authors' checkpoint keys: ``conv1``, ``conv_block.0``,
    ``conv_block.2``, ``conv_last`` (odd indices of their ``conv_block`` are the upsamplings).
    """

    def __init__(self, deep: int = 128, out: int = 1) -> None:
        super().__init__()
        half, quarter = deep // 2, deep // 4
        self.conv1 = nn.Conv2d(deep, half, 3)
        self.conv_block = nn.ModuleDict({"0": nn.Conv2d(half, half, 3), "2": nn.Conv2d(half, quarter, 3)})
        self.conv_last = nn.Conv2d(quarter, out, 1)

    @staticmethod
    def _conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
        pad = conv.kernel_size[0] // 2
        return conv(F.pad(x, (pad,) * 4, mode="reflect") if pad else x)

    def forward(self, shallow: Tensor, deep: Tensor) -> Tensor:
        """shallow (B,32,H,W), deep (B,128,H/8,W/8) -> reconstruction (B,1,H,W)."""
        x = F.interpolate(self._conv(self.conv1, deep), scale_factor=2.0, mode="nearest")
        x = F.interpolate(self._conv(self.conv_block["0"], x), scale_factor=2.0, mode="nearest")
        x = F.interpolate(self._conv(self.conv_block["2"], x), scale_factor=2.0, mode="nearest")
        dh, dw = shallow.shape[-2] - x.shape[-2], shallow.shape[-1] - x.shape[-1]
        if dh or dw:  # the authors' eval-time shape adjust: odd pixel to the bottom/right
            x = F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), mode="reflect")
        return self._conv(self.conv_last, x + shallow)

    def authors_state(self) -> dict[str, Tensor]:
        """State dict under the authors' ``recon_decoder1.*`` names (``conv2d.0`` wraps each conv)."""
        out: dict[str, Tensor] = {}
        for name, conv in (
            ("conv1", self.conv1),
            ("conv_block.0", self.conv_block["0"]),
            ("conv_block.2", self.conv_block["2"]),
            ("conv_last", self.conv_last),
        ):
            out[f"recon_decoder1.{name}.conv2d.0.weight"] = conv.weight.detach().cpu().clone()
            out[f"recon_decoder1.{name}.conv2d.0.bias"] = conv.bias.detach().cpu().clone()
        return out

    def load_authors_state(self, state: dict[str, Tensor]) -> None:
        ours = {}
        for key, value in state.items():
            name = key.removeprefix("recon_decoder1.").replace(".conv2d.0.", ".")
            ours[name] = value
        self.load_state_dict(ours, strict=True)


class CrossFuseTrainer(Trainer):
    """Stage 1: both auto-encoders (separate optimisers); stage 2: CAM + fusion decoder, encoders frozen."""

    def __init__(self, recipe: Recipe, device: torch.device, init: str | None = None) -> None:
        from model.crossfuse import CrossFuse, load_CrossFuse, read_checkpoint

        self.recipe, self.device = recipe, device
        if init:
            self.model = load_CrossFuse(init, winograd=False).requires_grad_(True)
        else:
            self.model = CrossFuse(winograd=False)
        self.model.to(device)
        self.recon = nn.ModuleDict({"ir": ReconDecoder(), "vi": ReconDecoder()}).to(device)
        if init:
            flat = read_checkpoint(init)
            for m in ("ir", "vi"):
                prefix = f"auto_{m}/"
                part = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix + "recon_decoder1.")}
                if part:
                    self.recon[m].load_authors_state(part)
        wd = recipe.weight_decay
        self.ae_optimizers = {
            m: torch.optim.Adam(
                [*getattr(self.model, f"encoder_{m}").parameters(), *self.recon[m].parameters()],
                lr=recipe.stage1_lr,
                weight_decay=wd,
            )
            for m in ("ir", "vi")
        }
        fusion_params = [*self.model.cam.parameters(), *self.model.decoder.parameters()]
        self.fusion_optimizer = torch.optim.Adam(fusion_params, lr=recipe.lr, weight_decay=wd)
        self._set_lr(0)

    def _stage_epoch(self, epoch: int) -> int:
        return epoch if self.stage(epoch) == 1 else epoch - self.recipe.stage1_epochs

    def _set_lr(self, epoch: int) -> None:
        """``tools/utils.adjust_learning_rate``: base lr for a stage's first two epochs, then x0.1."""
        factor = self.recipe.gamma if self._stage_epoch(epoch) >= 2 else 1.0
        if self.stage(epoch) == 1:
            for o in self.ae_optimizers.values():
                for g in o.param_groups:
                    g["lr"] = self.recipe.stage1_lr * factor
        else:
            for g in self.fusion_optimizer.param_groups:
                g["lr"] = self.recipe.lr * factor

    def lr(self, epoch: int) -> float:
        o = self.ae_optimizers["ir"] if self.stage(epoch) == 1 else self.fusion_optimizer
        return float(o.param_groups[0]["lr"])

    def _modes(self, epoch: int) -> None:
        if self.stage(epoch) == 1:
            self.model.train()
            self.recon.train()
        else:  # the authors keep the auto-encoders in eval mode and run them without gradients
            self.model.encoder_ir.eval()
            self.model.encoder_vi.eval()
            self.model.cam.train()
            self.model.decoder.train()

    def _terms(self, ir: Tensor, vi: Tensor, epoch: int) -> dict[str, Tensor]:
        from model.crossfuse import CrossFuse_autoencoder_loss, CrossFuse_loss, deep_activity

        ir, vi = ir.to(self.device), vi.to(self.device)
        self._modes(epoch)
        if self.stage(epoch) == 1:
            out: dict[str, Tensor] = {}
            for m, img in (("ir", ir), ("vi", vi)):
                shallow, deep = getattr(self.model, f"encoder_{m}")(img)
                terms = CrossFuse_autoencoder_loss(self.recon[m](shallow, deep), img)
                if self.recipe.deep_sign_weight:
                    terms["sign"] = self.recipe.deep_sign_weight * F.relu(-deep_activity(deep)).mean()
                    terms["total"] = terms["total"] + terms["sign"]
                out.update({f"{m}_{k}": v for k, v in terms.items()})
            out["total"] = out["ir_total"] + out["vi_total"]  # independent parameters: same as two runs
            return out
        with torch.no_grad():
            ir_sh, ir_de = self.model.encoder_ir(ir)
            vi_sh, vi_de = self.model.encoder_vi(vi)
        raw = self.model.decoder(self.model.cam(ir_de, vi_de), ir_de, vi_de, ir_sh, vi_sh)
        return CrossFuse_loss(raw, ir, vi)

    def step(self, ir: Tensor, vi: Tensor, epoch: int) -> dict[str, float]:
        self._set_lr(epoch)
        optimizers = list(self.ae_optimizers.values()) if self.stage(epoch) == 1 else [self.fusion_optimizer]
        for o in optimizers:
            o.zero_grad(set_to_none=True)
        terms = self._terms(ir, vi, epoch)
        terms["total"].backward()
        for o in optimizers:
            o.step()
        return _floats(terms)

    def losses(self, ir: Tensor, vi: Tensor, epoch: int) -> dict[str, float]:
        with torch.no_grad(), frozen_batchnorm_stats(self.model):
            return _floats(self._terms(ir, vi, epoch))

    def end_epoch(self, epoch: int) -> None:
        self._set_lr(epoch + 1)

    def stage_report(self, ir: Tensor, vi: Tensor, epoch: int) -> str | None:
        from model.crossfuse import deep_skip_health

        if self.stage(epoch) != 2:
            return None
        health = deep_skip_health(self.model.encoder_ir, self.model.encoder_vi, ir.to(self.device), vi.to(self.device))
        if not health.ill_conditioned:
            return None
        return (
            f"CrossFuse stage 2 starts from encoders with ill-conditioned deep-skip weights ({health.describe()}): "
            "the fused output will be flat grey with a few extreme pixels, and stage 2 cannot repair it because "
            "the encoders are frozen. Retrain stage 1 with --deep-sign-weight 1000 (ours) or another --seed "
            "(see docs/FUSION.md, CrossFuse training)."
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "recon": self.recon.state_dict(),
            "ae_optimizers": {m: o.state_dict() for m, o in self.ae_optimizers.items()},
            "fusion_optimizer": self.fusion_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.recon.load_state_dict(state["recon"])
        for m, o in self.ae_optimizers.items():
            o.load_state_dict(state["ae_optimizers"][m])
        self.fusion_optimizer.load_state_dict(state["fusion_optimizer"])

    def save_release(self, folder: Path, epoch: int) -> list[Path]:
        """The authors' three files: two ``Auto_Encoder_single`` and one ``Trans_FuseNet`` state dict.

        Tensors the authors' modules hold but never use (the Laplacian ``conv_gra``, the cross blocks'
        ``qkv``, the self-attention modules' final norms) are written with neutral values so the files
        have the full layout; the fixed box filters get their constant 1/9.
        """
        from model.crossfuse import authors_key_map

        mapped, unused = authors_key_map(self.model.cfg)
        state = self.model.state_dict()
        files: dict[str, dict[str, Tensor]] = {"auto_ir": {}, "auto_vi": {}, "trans": {}}
        for theirs, ours in mapped.items():
            group, key = theirs.split("/", 1)
            files[group][key] = state[ours].detach().cpu().clone()
        for theirs, shape in unused.items():
            group, key = theirs.split("/", 1)
            if "recon_decoder1." in key:
                continue
            if key.endswith("weight.conv_sh.weight") or key.endswith("weight.conv_de.weight"):
                value = torch.full(shape, 1 / 9)
            elif ".norm." in key and key.endswith(".weight"):
                value = torch.ones(shape)
            else:
                value = torch.zeros(shape)
            files[group][key] = value
        for m in ("ir", "vi"):
            files[f"auto_{m}"].update(self.recon[m].authors_state())
        stage1_done = min(epoch, self.recipe.stage1_epochs)
        written = []
        for m in ("ir", "vi"):
            path = folder / f"auto_encoder_epoch_{stage1_done}_{m}.model"
            _atomic_save(files[f"auto_{m}"], path)
            written.append(path)
        if epoch > self.recipe.stage1_epochs:  # the fusion net exists only once stage 2 has trained it
            path = folder / f"fusetrans_epoch_{epoch - self.recipe.stage1_epochs}.model"
            _atomic_save(files["trans"], path)
            written.append(path)
        return written


# ---------------------------------------------------------------- CMMDL


class CMMDLTrainer(Trainer):
    """One stage: the whole network on L_int + 5 L_grad."""

    def __init__(self, recipe: Recipe, device: torch.device, init: str | None = None) -> None:
        from model.cmmdl import CMMDL, load_CMMDL

        self.recipe, self.device = recipe, device
        model = load_CMMDL(init) if init else CMMDL()
        self.model = model.to(device=device, memory_format=torch.contiguous_format).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.StepLR(
            self.optimizer, step_size=recipe.step_epochs, gamma=recipe.gamma
        )

    def _terms(self, ir: Tensor, vi: Tensor, epoch: int) -> dict[str, Tensor]:
        from model.cmmdl import CMMDL_loss

        ir, vi = ir.to(self.device), vi.to(self.device)
        self.model.train()
        return CMMDL_loss(vi, ir, self.model(vi, ir))

    def step(self, ir: Tensor, vi: Tensor, epoch: int) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        terms = self._terms(ir, vi, epoch)
        terms["total"].backward()
        self.optimizer.step()
        return _floats(terms)

    def losses(self, ir: Tensor, vi: Tensor, epoch: int) -> dict[str, float]:
        with torch.no_grad(), frozen_batchnorm_stats(self.model):
            return _floats(self._terms(ir, vi, epoch))

    def end_epoch(self, epoch: int) -> None:
        self.scheduler.step()
        _floor_lr(self.optimizer, self.recipe.lr_floor)

    def lr(self, epoch: int) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_release(self, folder: Path, epoch: int) -> list[Path]:
        """A ``DataParallel``-style state dict (``module.`` + the authors' key names), like their .pth."""
        from model.cmmdl import authors_state_dict

        sd = {f"module.{k}": v.detach().cpu().clone() for k, v in authors_state_dict(self.model).items()}
        path = folder / f"CMMDL_model_epoch_{epoch}.pth"
        _atomic_save(sd, path)
        return [path]


_TRAINERS: dict[str, type[Trainer]] = {
    "cddfuse": CDDFuseTrainer,
    "crossfuse": CrossFuseTrainer,
    "cmmdl": CMMDLTrainer,
}


def make_trainer(
    method: str, options: TrainOptions | None = None, *, recipe: Recipe | None = None
) -> tuple[Trainer, Recipe]:
    """The trainer of ``method`` with the user's options applied to the authors' recipe."""
    if method not in RECIPES:
        raise ValueError(f"no training recipe for {method!r}; known: {', '.join(RECIPES)}")
    opts = options or TrainOptions()
    rec = recipe or opts.apply(RECIPES[method])
    if rec.deep_sign_weight and method != "crossfuse":
        raise ValueError(f"--deep-sign-weight is a CrossFuse stage-1 term; {method} has no such encoders")
    torch.manual_seed(rec.seed)  # the authors seed before building (CMMDL: 42); makes the init reproducible
    trainer = _TRAINERS[method](rec, torch.device(opts.device), opts.init)  # type: ignore[call-arg]
    return trainer, rec


# ------------------------------------------------------------------------------------------------
# the loop


@dataclass(frozen=True)
class StepInfo:
    """Reported after every optimiser step (for progress bars and logs)."""

    epoch: int  # 0-based
    epochs: int
    stage: int
    batch: int  # 1-based within the epoch
    batches: int
    global_step: int
    losses: dict[str, float]
    lr: float
    seconds: float  # this step's wall time
    note: str | None = None  # a trainer's warning about the stage this step started (first step of a stage)


@dataclass(frozen=True)
class TrainResult:
    epochs_done: int  # completed epochs
    global_step: int
    stopped_early: bool  # by --max-minutes / --max-steps / ``stop``: resume to continue
    checkpoints: list[Path]
    state_file: Path
    last_losses: dict[str, float]
    notes: list[str] = field(default_factory=list)  # trainers' warnings (``StepInfo.note``), in order
    interrupted: bool = False  # stopped because ``stop()`` said so (a signal), not by a budget


def _atomic_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _release(trainer: Trainer, out: Path, epoch: int) -> list[Path]:
    """Write the authors' checkpoint files for ``epoch`` completed epochs; keep only the latest set."""
    folder = out / MODELS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    old = set(folder.iterdir())
    written = trainer.save_release(folder, epoch)
    for p in old - set(written):
        if p.is_file() and p.suffix in (".pth", ".model"):
            p.unlink()
    return written


def _check_resume_options(opts: TrainOptions, saved: Recipe, state_path: Path) -> None:
    """A resumed run continues the saved recipe; an option that would change it is refused, not ignored
    (a silently ignored --epochs or --crops-per-image would make the user believe in a run that is not)."""
    changed = opts.apply(saved)
    diffs = [
        f"{name}={getattr(changed, name)!r} (the run has {getattr(saved, name)!r})"
        for name in saved.__dataclass_fields__
        if getattr(changed, name) != getattr(saved, name)
    ]
    if diffs:
        raise ValueError(
            f"--resume continues the run saved in {state_path} with its own settings; these options would "
            f"change it: {', '.join(diffs)}. Drop them, or start a new run in another --out folder."
        )


def _save_state(
    path: Path, recipe: Recipe, trainer: Trainer, epoch: int, batch: int, step: int, mid_step: bool = False
) -> None:
    _atomic_save(
        {
            "format": STATE_FORMAT,
            "recipe": asdict(recipe),
            "epoch": epoch,  # the epoch to continue
            "batch": batch,  # batches of that epoch already done
            "global_step": step,
            # stopped inside a step: some of its optimisers may have stepped, so the resumed run repeats
            # that batch on weights it partly updated (said on resume; reading an older file never says it)
            "mid_step": mid_step,
            "trainer": trainer.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
        path,
    )


def train(
    method: str,
    ir_dir: str | Path,
    vi_dir: str | Path,
    out_dir: str | Path,
    options: TrainOptions | None = None,
    *,
    on_step: Callable[[StepInfo], None] | None = None,
    patches: PatchSet | None = None,
    stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Run (or resume) ``method``'s recipe on the pairs of ``ir_dir``/``vi_dir``; files go to ``out_dir``.

    Stops early (state saved, ``stopped_early``) after ``max_minutes`` of wall time or ``max_steps`` total
    steps, or when ``stop()`` turns true (checked between steps: how the CLI honours SIGTERM and Ctrl-C,
    so the saved state, the step count and the log always agree). A KeyboardInterrupt raised inside a step
    is re-raised after saving the position of the last finished step with the weights as they are (some
    of that step's optimisers may have stepped): the state says so, and a resume notes it. ``train_log.csv``
    gets one row per step. ``patches`` may be passed in to skip reading the folders again.
    """
    opts = options or TrainOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / STATE_FILE
    saved: dict[str, Any] | None = None
    recipe: Recipe | None = None
    if opts.resume and opts.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: choose one")
    earlier = [p.name for p in (state_path, out / LOG_FILE) if p.exists()]
    if earlier and not opts.resume and not opts.overwrite:  # a rerun without --resume wiped the earlier run
        raise FileExistsError(
            f"{out} holds an earlier run ({', '.join(earlier)}): continue it with --resume, replace it with "
            "--overwrite, or choose another --out"
        )
    if opts.resume:
        if not state_path.is_file():
            raise FileNotFoundError(f"--resume: no {STATE_FILE} in {out}")
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
            raise ValueError(f"{state_path}: not a {STATE_FORMAT} training state")
        recipe = Recipe(**saved["recipe"])
        if recipe.method != method:
            raise ValueError(f"{state_path} is a {recipe.method} run, not {method}")
        _check_resume_options(opts, recipe, state_path)
    trainer, recipe = make_trainer(method, opts, recipe=recipe)
    from model.fusion import METHODS

    if recipe.patch < METHODS[method].min_side:  # smaller ones cannot pass through the network
        raise ValueError(f"--patch must be at least {METHODS[method].min_side} px for {method}, got {recipe.patch}")
    epoch, start_batch, step = 0, 0, 0
    if saved is not None:
        trainer.load_state_dict(saved["trainer"])
        torch.set_rng_state(saved["torch_rng"])
        epoch, start_batch, step = int(saved["epoch"]), int(saved["batch"]), int(saved["global_step"])
    data = patches or load_patches(
        ir_dir,
        vi_dir,
        patch=recipe.patch,
        stride=recipe.stride,
        min_contrast=recipe.min_contrast,
        crops=recipe.crops_per_image,
    )
    started = time.monotonic()
    budget_s = math.inf if opts.max_minutes is None else opts.max_minutes * 60
    max_steps = math.inf if opts.max_steps is None else opts.max_steps
    checkpoints: list[Path] = []
    last: dict[str, float] = {}
    notes: list[str] = []
    resumed_note = None  # goes out with the first step (StepInfo.note), as trainers' warnings do
    if saved is not None and saved.get("mid_step"):
        resumed_note = (
            f"the run was stopped inside step {step + 1} (a second Ctrl-C/SIGTERM): that batch is run again on "
            "weights it may have partly updated, so this run can differ from an uninterrupted one by about one "
            "step's update"
        )
        notes.append(resumed_note)
    reported_stage: int | None = None
    log_path = out / LOG_FILE
    new_log = not log_path.exists() or not opts.resume
    with log_path.open("w" if new_log else "a", newline="") as log_file:
        log = csv.writer(log_file)
        if new_log:
            log.writerow(["global_step", "epoch", "stage", "batch", "lr", "seconds", "losses"])
        resume_at = (epoch, start_batch)  # the next batch to run: where an interrupted run continues
        in_step = False
        try:
            while epoch < recipe.epochs:
                ir_all, vi_all = data.epoch(epoch, recipe.seed)
                bs = min(trainer.batch_size(epoch), ir_all.shape[0])
                order = torch.randperm(
                    ir_all.shape[0], generator=torch.Generator().manual_seed(recipe.seed * 100003 + epoch)
                )
                batches = ir_all.shape[0] // bs  # drop the ragged tail (BatchNorm cannot train on one sample)
                for b in range(start_batch, batches):
                    asked = stop is not None and stop()
                    if asked or step >= max_steps or time.monotonic() - started >= budget_s:
                        _save_state(state_path, recipe, trainer, epoch, b, step, mid_step=resumed_note is not None)
                        return TrainResult(epoch, step, True, checkpoints, state_path, last, notes, asked)
                    idx = order[b * bs : (b + 1) * bs]
                    note = None
                    if trainer.stage(epoch) != reported_stage:
                        reported_stage = trainer.stage(epoch)
                        note = trainer.stage_report(ir_all[idx], vi_all[idx], epoch)
                        if note:
                            notes.append(note)
                    if resumed_note is not None:
                        note, resumed_note = resumed_note if note is None else f"{resumed_note}; {note}", None
                    t0 = time.perf_counter()
                    in_step = True
                    last = trainer.step(ir_all[idx], vi_all[idx], epoch)
                    in_step = False
                    if not all(math.isfinite(v) for v in last.values()):
                        raise FloatingPointError(f"non-finite loss at step {step + 1}: {last}")
                    step += 1
                    resume_at = (epoch, b + 1)
                    info = StepInfo(
                        epoch,
                        recipe.epochs,
                        trainer.stage(epoch),
                        b + 1,
                        batches,
                        step,
                        last,
                        trainer.lr(epoch),
                        time.perf_counter() - t0,
                        note,
                    )
                    log.writerow(
                        [step, epoch, info.stage, b + 1, f"{info.lr:.3g}", f"{info.seconds:.3f}"]
                        + [";".join(f"{k}={v:.6g}" for k, v in last.items())]
                    )
                    log_file.flush()  # a run of hours is watched (tail -f) and may be killed: rows must be on disk
                    if on_step is not None:
                        on_step(info)
                trainer.end_epoch(epoch)
                epoch += 1
                start_batch = 0
                resume_at = (epoch, 0)
                checkpoints = _release(trainer, out, epoch)
                _save_state(state_path, recipe, trainer, epoch, 0, step, mid_step=resumed_note is not None)
        except KeyboardInterrupt:  # a second Ctrl-C/SIGTERM in the CLI: wherever it lands
            _save_state(state_path, recipe, trainer, *resume_at, step, mid_step=in_step or resumed_note is not None)
            raise
    if not checkpoints:  # resumed a finished run: report the files it already wrote
        folder = out / MODELS_DIR
        checkpoints = sorted(p for p in folder.glob("*") if p.suffix in (".pth", ".model")) if folder.is_dir() else []
    return TrainResult(epoch, step, False, checkpoints, state_path, last, notes)
