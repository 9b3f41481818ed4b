"""``sacmf train``: SA-CMF training with validation, checkpoints, exact resume and training curves.

Design choices, and why:

* **Preprocess once, then index tensors.** The synthetic splits are small and the shared preprocessing
  is the expensive part on CPU, so both splits are preprocessed and collated up front
  (:func:`model.infer.prepare_split`); an epoch is then only forward/backward passes.
* **Missing-modality augmentation through the presence mask.** With probability ``drop_prob`` a sample
  loses a whole modality (both cameras or both light curves) or one input (Image-B, Seq-A or Seq-B).
  Image-A alone is never dropped while Image-B stays, because the box labels are in Image-A pixels.
  The network sees exactly what the daemon produces when a sensor is silent, so it learns to answer
  from what is present (the robustness score of ``sacmf evaluate`` measures it).
* **Single-modality baselines and the MI ablation are switches, not forks.** ``modalities`` marks the
  other modality absent everywhere (training, validation, and, through the checkpoint, evaluation);
  ``--no-mi`` sets ``SACMFConfig.uniform_fusion`` and ``lambda_mi = 0``.
* **Exact resume.** ``last.pt`` holds the weights, AdamW and scheduler state, the epoch, the global
  torch RNG (dropout) and the data generator (shuffling, augmentation), plus the history; a resumed run
  reproduces an uninterrupted one bit for bit (same threads and machine). The options that change the
  trajectory are fingerprinted and a resume with different ones is refused. ``--epochs`` may be
  raised on resume; the cosine schedule then stretches from that point on.
* **Best by validation macro-F1**, because the classes are balanced only on average and accuracy hides a
  collapsed class; without a validation split, the lowest training loss.
* **Time budget** (``max_minutes``): a new epoch starts only if the mean epoch time still fits, so a run
  ends on an epoch boundary with consistent checkpoints and can be resumed.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
from torch import Tensor

from model.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from model.evaluate import classification_scores, confusion_matrix, expected_calibration_error, jsonable
from model.infer import ALL_MODALITIES, PreparedSplit, parse_modalities, prepare_split, restrict, take
from model.losses import sacmf_loss
from model.preprocess import ROLES
from model.sacmf import SACMF, SACMFConfig, build_model

# (roles dropped together, relative probability) for the missing-modality augmentation
DROP_OPTIONS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("image_a", "image_b"), 0.3),
    (("seq_a", "seq_b"), 0.3),
    (("image_b",), 0.2),
    (("seq_a",), 0.1),
    (("seq_b",), 0.1),
)
LOSS_TERMS = ("total", "cls", "sim", "mi", "det", "det_heatmap", "det_size", "det_offset", "aux")


@dataclass
class TrainOptions:
    """Everything a training run depends on; the CLI fills it from ``sacmf train`` flags."""

    data_root: Path
    out: Path
    val_root: Path | None = None
    model: SACMFConfig = field(default_factory=SACMFConfig)
    batch_size: int = 8
    epochs: int = 100
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 100  # linear warm-up, then cosine to min_lr_ratio * lr
    min_lr_ratio: float = 0.05
    grad_clip: float = 5.0
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"  # "cuda" trains on a GPU when one exists; results match the CPU run only statistically
    modalities: tuple[str, ...] = ALL_MODALITIES
    drop_prob: float = 0.3
    max_minutes: float | None = None
    stop_after_epochs: int | None = None  # end this invocation after so many epochs (resume later)
    resume: bool = False
    overwrite: bool = False  # a fresh run may replace the checkpoints of an earlier run in ``out``
    version: str = ""
    eval_batch_size: int = 64
    progress: bool | None = None  # True: live bar with \r; False: one line per epoch; None: bar on a TTY
    plots: bool = True

    def __post_init__(self) -> None:
        self.data_root, self.out = Path(self.data_root), Path(self.out)
        self.val_root = None if self.val_root is None else Path(self.val_root)
        self.modalities = parse_modalities(self.modalities)
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (BatchNorm and the batch-level MI need pairs)")
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        for name in ("lr", "weight_decay", "min_lr_ratio", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise ValueError(f"max_minutes must be a finite number > 0, got {self.max_minutes!r}")
        for name in ("stop_after_epochs", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.eval_batch_size < 1 or self.warmup_steps < 0:
            raise ValueError("eval_batch_size must be >= 1 and warmup_steps >= 0")
        if self.resume and self.overwrite:
            raise ValueError("resume continues the run in out; overwrite replaces it: choose one")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError("drop_prob must be in [0, 1)")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: no CUDA device is available here (use --device cpu)")

    def fingerprint(self) -> dict[str, Any]:
        """The options that change the training trajectory: a resume must not change any of them."""
        return {
            "model": {**self.model.to_dict(), "class_names": list(self.model.class_names)},
            "data_root": str(self.data_root.resolve()),
            "val_root": None if self.val_root is None else str(self.val_root.resolve()),
            "batch_size": self.batch_size,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "warmup_steps": self.warmup_steps,
            "min_lr_ratio": self.min_lr_ratio,
            "grad_clip": self.grad_clip,
            "seed": self.seed,
            "modalities": list(self.modalities),
            "drop_prob": self.drop_prob,
        }


@dataclass
class TrainResult:
    """Where the run left its files and how it ended."""

    out: Path
    last_path: Path
    best_path: Path
    best_epoch: int
    best_score: float  # validation macro-F1 (or minus the training loss without validation)
    epochs_done: int
    history: list[dict[str, Any]]
    stop_reason: str  # "epochs", "max_minutes" or "stop_after_epochs"


# ----------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------


def lr_factor(warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Step -> learning-rate multiplier: linear warm-up, then cosine from 1 to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))

    return factor


def augment_presence(presence: Tensor, gen: torch.Generator, drop_prob: float) -> Tensor:
    """Randomly mark inputs absent (see the module doc); a sample always keeps at least one input.

    presence [B, 4] bool in :data:`model.preprocess.ROLES` order -> a new [B, 4] mask.
    """
    b = presence.shape[0]
    roll = torch.rand(b, generator=gen)  # always drawn, so the generator advances identically
    weights = torch.tensor([w for _, w in DROP_OPTIONS])
    choice = torch.multinomial(weights, b, replacement=True, generator=gen)
    out = presence.clone()
    for i in torch.nonzero(roll < drop_prob).flatten().tolist():
        roles = DROP_OPTIONS[int(choice[i])][0]
        candidate = out[i].clone()
        for role in roles:
            candidate[ROLES.index(role)] = False
        if candidate.any():
            out[i] = candidate
    return out


class ProgressBar:
    """Live progress on a TTY (one ``\\r``-rewritten line), else one line per epoch; no dependency."""

    def __init__(self, stream: TextIO, live: bool | None = None) -> None:
        self.stream = stream
        self.live = stream.isatty() if live is None else live
        self._last = 0.0

    @staticmethod
    def clock(seconds: float) -> str:
        seconds = max(0, int(seconds))
        h, rem = divmod(seconds, 3600)
        return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"

    def update(self, text: str, fraction: float, force: bool = False) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        width = 20
        filled = int(width * min(1.0, max(0.0, fraction)))
        self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K")
        self.stream.flush()

    def line(self, text: str) -> None:
        self.stream.write(("\r" if self.live else "") + text + ("\x1b[K" if self.live else "") + "\n")
        self.stream.flush()


def _loss_text(means: dict[str, float]) -> str:
    return " ".join(f"{k} {means[k]:.3f}" for k in ("total", "cls", "sim", "mi", "det", "aux") if k in means)


def _to(batch: dict[str, Tensor], device: str) -> dict[str, Tensor]:
    return batch if device == "cpu" else {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def validate(
    model: SACMF, tensors: dict[str, Tensor], cfg: SACMFConfig, batch_size: int, device: str = "cpu"
) -> dict[str, Any]:
    """Eval-mode loss terms (the MI term is 0 in eval mode) and classification scores on a split."""
    was_training = model.training
    model.eval()
    n = int(tensors["label"].shape[0])
    sums: dict[str, float] = {}
    logits, omega = [], []
    try:
        for lo in range(0, n, batch_size):
            batch = _to(take(tensors, slice(lo, lo + batch_size)), device)
            out = model(batch)
            losses = sacmf_loss(out, batch, cfg)
            for k in LOSS_TERMS:
                sums[k] = sums.get(k, 0.0) + float(losses[k]) * batch["label"].shape[0]
            logits.append(out["logits"].cpu())
            omega.append(out["modality_weights"].cpu())
    finally:
        model.train(was_training)
    probs = torch.softmax(torch.cat(logits).double(), 1).numpy()
    y = tensors["label"].numpy()
    scores = classification_scores(confusion_matrix(y, probs.argmax(1), cfg.num_classes))
    return {
        **{k: v / n for k, v in sums.items()},
        "accuracy": scores["accuracy"],
        "macro_f1": scores["macro_f1"],
        "weighted_f1": scores["weighted_f1"],
        "ece": expected_calibration_error(probs, y)["ece"],
        "image_weight": float(torch.cat(omega)[:, 0].double().mean()),
    }


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


def _prepare(root: Path, cfg: SACMFConfig, name: str, bar: ProgressBar) -> PreparedSplit:
    t0 = time.monotonic()
    split = prepare_split(root, cfg, lambda i, n: bar.update(f"preprocessing {name}: {i}/{n}", i / n))
    bar.line(f"{name}: {len(split)} samples from {root} preprocessed in {time.monotonic() - t0:.1f} s")
    return split


def _training_meta(opts: TrainOptions, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "modalities": list(opts.modalities),
        "data_root": str(opts.data_root),
        "val_root": None if opts.val_root is None else str(opts.val_root),
        "seed": opts.seed,
        "batch_size": opts.batch_size,
        "lr": opts.lr,
        "epochs": opts.epochs,
        "drop_prob": opts.drop_prob,
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


def _write_metrics(opts: TrainOptions, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    doc = {
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items() if k != "model"},
        "model_config": opts.model.to_dict(),
        "summary": summary,
        "epochs": history,
    }
    atomic_write(opts.out / "metrics.json", (json.dumps(jsonable(doc), indent=2) + "\n").encode())


@dataclass
class _Loop:
    """The moving parts of a run, bundled so one epoch is one function call."""

    opts: TrainOptions
    model: SACMF
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    gen: torch.Generator
    train_x: dict[str, Tensor]
    n_steps: int
    bar: ProgressBar
    deadline: float | None  # time.monotonic() value, or None without a time budget
    epoch_times: list[float]  # seconds per epoch of this invocation (ETA and the time budget use them)


def _train_epoch(loop: _Loop, epoch: int) -> dict[str, float]:
    """One pass over the shuffled training set; returns the sample-weighted mean of every loss term."""
    opts, model, cfg = loop.opts, loop.model, loop.opts.model
    t_epoch = time.monotonic()
    model.train()
    n = int(loop.train_x["label"].shape[0])
    perm = torch.randperm(n, generator=loop.gen)
    sums = dict.fromkeys((*LOSS_TERMS, "mi_nats"), 0.0)
    seen = 0
    for step in range(loop.n_steps):
        idx = perm[step * opts.batch_size : (step + 1) * opts.batch_size]
        batch = take(loop.train_x, idx)
        batch["presence"] = augment_presence(batch["presence"], loop.gen, opts.drop_prob)
        batch = _to(batch, opts.device)
        out = model(batch)
        losses = sacmf_loss(out, batch, cfg)
        if not bool(torch.isfinite(losses["total"])):
            bad = {k: float(v) for k, v in losses.items()}
            raise FloatingPointError(f"non-finite loss at epoch {epoch + 1} step {step + 1}: {bad}")
        loop.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        if opts.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip)
        loop.optimizer.step()
        loop.scheduler.step()
        k = int(idx.shape[0])
        seen += k
        for term in LOSS_TERMS:
            sums[term] += float(losses[term].detach()) * k
        sums["mi_nats"] += float(out["mi"]) * k
        # ETA: this epoch from its own pace, later epochs from the finished ones (capped by the budget)
        elapsed = time.monotonic() - t_epoch
        left = elapsed / (step + 1) * (loop.n_steps - step - 1)
        per_epoch = float(np.mean(loop.epoch_times)) if loop.epoch_times else elapsed / (step + 1) * loop.n_steps
        total_left = left + per_epoch * (opts.epochs - epoch - 1)
        if loop.deadline is not None:
            total_left = min(total_left, max(0.0, loop.deadline - time.monotonic()))
        means = {t: sums[t] / seen for t in LOSS_TERMS}
        loop.bar.update(
            f"epoch {epoch + 1}/{opts.epochs} {step + 1}/{loop.n_steps} {_loss_text(means)} "
            f"| epoch ETA {loop.bar.clock(left)} total ETA {loop.bar.clock(total_left)}",
            (step + 1) / loop.n_steps,
        )
    return {t: v / seen for t, v in sums.items()}


def train(opts: TrainOptions, stream: TextIO = sys.stderr) -> TrainResult:
    """Run (or resume) training as configured; writes ``last.pt``, ``best.pt``, ``metrics.json``, curves."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    bar = ProgressBar(stream, opts.progress)
    t_start = time.monotonic()
    cfg = opts.model
    if opts.out.exists() and not opts.out.is_dir():
        raise ValueError(f"--out {opts.out} is a file, not a folder")
    last_path, best_path = opts.out / "last.pt", opts.out / "best.pt"
    earlier = [p for p in (last_path, best_path, opts.out / "metrics.json") if p.exists()]
    if earlier and not opts.resume and not opts.overwrite:  # a new run would leave a mix of two runs
        raise ValueError(
            f"{opts.out} holds an earlier run ({', '.join(p.name for p in earlier)}): "
            "--resume continues it, --overwrite replaces it"
        )
    opts.out.mkdir(parents=True, exist_ok=True)

    train_set = _prepare(opts.data_root, cfg, "train", bar)
    val_set = _prepare(opts.val_root, cfg, "val", bar) if opts.val_root else None
    train_x = restrict(train_set.tensors, opts.modalities)
    val_x = restrict(val_set.tensors, opts.modalities) if val_set is not None else None
    n = len(train_set)
    # a last batch of one sample would give BatchNorm and the batch MI nothing to work with
    n_steps = n // opts.batch_size + (1 if n % opts.batch_size >= 2 else 0)
    if n_steps == 0:
        raise ValueError(f"{opts.data_root}: {n} samples is fewer than one batch")
    if not opts.resume:  # --overwrite, once the data is known to be usable
        for p in earlier:
            p.unlink()

    fingerprint = opts.fingerprint()
    gen = torch.Generator().manual_seed(opts.seed)
    history: list[dict[str, Any]] = []
    best_epoch, best_score, start_epoch = 0, -math.inf, 0
    resume: dict[str, Any] | None = None
    if opts.resume:
        if not last_path.is_file():
            raise FileNotFoundError(f"cannot resume: {last_path} does not exist")
        model, meta = load_checkpoint(last_path)
        resume = meta.resume
        if resume is None:
            raise ValueError(f"cannot resume: {last_path} holds no training state")
        stored = resume.get("fingerprint", {})
        diff = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        if diff:
            details = "; ".join(f"{k}: checkpoint {stored.get(k)!r}, now {fingerprint.get(k)!r}" for k in diff[:3])
            raise ValueError(f"cannot resume {last_path}: options differ ({details})")
        model.to(opts.device).train()
        start_epoch = int(resume["epoch"])
        history = list(resume["history"])
        best_epoch, best_score = int(resume["best_epoch"]), float(resume["best_score"])
    else:
        torch.manual_seed(opts.seed)
        model = build_model(cfg).to(opts.device).train()

    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    factor = lr_factor(opts.warmup_steps, opts.epochs * n_steps, opts.min_lr_ratio)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        gen.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        bar.line(f"resumed from {last_path} after epoch {start_epoch} (best epoch {best_epoch})")

    deadline = None if opts.max_minutes is None else t_start + 60.0 * opts.max_minutes
    epoch_times: list[float] = []
    stop_reason = "epochs"
    loop = _Loop(opts, model, optimizer, scheduler, gen, train_x, n_steps, bar, deadline, epoch_times)
    for epoch in range(start_epoch, opts.epochs):
        if opts.stop_after_epochs is not None and epoch - start_epoch >= opts.stop_after_epochs:
            stop_reason = "stop_after_epochs"
            break
        if deadline is not None and epoch_times and time.monotonic() + np.mean(epoch_times) > deadline:
            stop_reason = "max_minutes"
            break
        t_epoch = time.monotonic()
        train_means = _train_epoch(loop, epoch)
        val = validate(model, val_x, cfg, opts.eval_batch_size, opts.device) if val_x is not None else None
        score = val["macro_f1"] if val is not None else -train_means["total"]
        epoch_time = time.monotonic() - t_epoch
        epoch_times.append(epoch_time)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "lr": float(optimizer.param_groups[0]["lr"]),
            "time_s": epoch_time,
            "train": train_means,
        }
        if val is not None:
            record["val"] = val
        history.append(record)
        improved = score > best_score
        if improved:
            best_epoch, best_score = epoch + 1, float(score)
        version = opts.version or f"sacmf-{cfg.backbone}-{'+'.join(opts.modalities)}-e{epoch + 1}"
        meta = _training_meta(
            opts,
            {"epoch": epoch + 1, "val": val, "train": train_means, "best_epoch": best_epoch, "best_score": best_score},
        )
        if improved:
            save_checkpoint(model, best_path, version, extra={"training": jsonable(meta)})
        state = {
            "epoch": epoch + 1,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": jsonable(history),
            "best_epoch": best_epoch,
            "best_score": best_score,
            "fingerprint": fingerprint,
        }
        save_checkpoint(model, last_path, version, extra={"training": jsonable(meta), "resume": state})
        summary = {"best_epoch": best_epoch, "best_score": best_score, "epochs_done": epoch + 1}
        _write_metrics(opts, history, summary)
        if opts.plots:
            from model.plots import save_training_curves

            save_training_curves(history, opts.out)
        val_text = (
            f" | val acc {val['accuracy']:.3f} macro-F1 {val['macro_f1']:.3f} loss {val['total']:.3f}"
            if val is not None
            else ""
        )
        bar.line(
            f"epoch {epoch + 1}/{opts.epochs} {epoch_time:.1f} s | train {_loss_text(train_means)} "
            f"mi_nats {train_means['mi_nats']:.3f}{val_text}{' *' if improved else ''}"
        )

    epochs_done = history[-1]["epoch"] if history else 0
    summary = {"best_epoch": best_epoch, "best_score": best_score, "epochs_done": epochs_done, "stop": stop_reason}
    if history:
        _write_metrics(opts, history, summary)
    bar.line(
        f"done ({stop_reason}) after {epochs_done} epoch(s) in {time.monotonic() - t_start:.0f} s; "
        f"best epoch {best_epoch} score {best_score:.4f}; {best_path}"
    )
    return TrainResult(opts.out, last_path, best_path, best_epoch, best_score, epochs_done, history, stop_reason)
