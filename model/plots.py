"""PNG figures for training, evaluation and ``sacmf test``.

Why ``matplotlib.figure.Figure`` and never ``pyplot``: pyplot keeps global state and picks a GUI
backend; a bare Figure renders with Agg, is garbage-collected when it goes out of scope and is safe to
use from a daemon or a test. Per-sample pictures (detections, heatmaps, fusion weights) are drawn with
Pillow instead: a test folder can hold thousands of samples, and on this 2-core box a matplotlib figure
costs ~1.5 s against ~20 ms for a Pillow image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from model.preprocess import sky_and_noise
from model.sacmf import Detection

_LOSS_TERMS = ("total", "cls", "sim", "mi", "det", "aux")
_DISPLAY_SIDE = 384  # per-sample pictures are upscaled (nearest) to about this many pixels


def _class_colour(k: int) -> tuple[int, int, int]:
    r, g, b, _ = mpl.colormaps["tab10"](k % 10)
    return int(255 * r), int(255 * g), int(255 * b)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def save_training_curves(history: Sequence[Mapping[str, Any]], out_dir: Path) -> list[Path]:
    """``curves_loss.png`` (each training loss term and the validation loss) and ``curves_val.png``."""
    if not history:
        return []
    epochs = [int(h["epoch"]) for h in history]
    fig = Figure(figsize=(10, 4))
    ax_total, ax_terms = fig.subplots(1, 2)
    ax_total.plot(epochs, [h["train"]["total"] for h in history], "o-", label="train total")
    if all("val" in h and "total" in h["val"] for h in history):
        ax_total.plot(epochs, [h["val"]["total"] for h in history], "s-", label="val total (eval mode)")
    ax_total.set(xlabel="epoch", ylabel="loss", title="total loss")
    ax_total.legend()
    for term in _LOSS_TERMS[1:]:
        ax_terms.plot(epochs, [h["train"].get(term, np.nan) for h in history], "o-", label=term, markersize=3)
    ax_terms.set(xlabel="epoch", title="training loss terms (unweighted)")
    ax_terms.set_yscale("symlog", linthresh=1e-2)
    ax_terms.legend()
    fig.tight_layout()
    paths = [_save(fig, out_dir / "curves_loss.png")]

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for key, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), ("weighted_f1", "weighted F1")):
        if all("val" in h and key in h["val"] for h in history):
            ax.plot(epochs, [h["val"][key] for h in history], "o-", label=f"val {label}")
    ax.set(xlabel="epoch", ylim=(0, 1), title="validation")
    ax.legend()
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "curves_val.png"))
    return paths


# ----------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------


def save_confusion_matrix(cm: np.ndarray, names: Sequence[str], path: Path, title: str = "") -> Path:
    """Counts in each cell, colour by row-normalised rate (so rare classes are readable too)."""
    cm = np.asarray(cm)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "k")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true", title=title or f"confusion matrix (n={int(cm.sum())})")
    fig.colorbar(im, ax=ax, label="row rate")
    fig.tight_layout()
    return _save(fig, path)


def save_reliability(bins: Sequence[Mapping[str, float]], ece: float, path: Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin, bar width = bin, the diagonal is ideal."""
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    for b in bins:
        if b["count"] > 0:
            ax.bar(b["lo"], b["accuracy"], width=b["hi"] - b["lo"], align="edge", edgecolor="k", alpha=0.7)
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"reliability (ECE {ece:.3f})")
    fig.tight_layout()
    return _save(fig, path)


def save_bars(values: Mapping[str, Sequence[float]], names: Sequence[str], path: Path, title: str) -> Path:
    """Grouped bars: one group per class, one bar per series (e.g. precision / recall / F1)."""
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(values))
    x = np.arange(len(names))
    for k, (label, ys) in enumerate(values.items()):
        ax.bar(x + k * width, np.nan_to_num(np.asarray(ys, dtype=float)), width, label=label)
    ax.set_xticks(x + 0.4 - width / 2, names, rotation=25, ha="right")
    ax.set(ylim=(0, 1), title=title)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------
# Per sample (sacmf test)
# ----------------------------------------------------------------------------------------------------


def display_stretch(img: np.ndarray) -> np.ndarray:
    """Raw frame -> uint8 for viewing: noise sigmas above the sky through asinh, like the model's input."""
    x = np.asarray(img, dtype=np.float64)
    sky, noise = sky_and_noise(x)
    z = np.where(np.isfinite(x), (x - sky) / noise, 0.0)
    y = np.arcsinh(np.clip(z, -5.0, 1000.0) / 3.0) / np.arcsinh(1000.0 / 3.0)
    return (255 * np.clip(y * 1.5, 0.0, 1.0)).astype(np.uint8)  # 1.5: faint sources show up on screen


def _upscale(gray: np.ndarray) -> tuple[Image.Image, float]:
    k = max(1, _DISPLAY_SIDE // max(gray.shape))
    img = Image.fromarray(gray).convert("RGB")
    return img.resize((img.width * k, img.height * k), Image.Resampling.NEAREST), float(k)


def save_detections(
    frame: np.ndarray, detections: Sequence[Detection], names: Sequence[str], path: Path, title: str = ""
) -> Path:
    """Image-A with one box and "class score" label per detection (boxes in the frame's pixels)."""
    img, k = _upscale(display_stretch(frame))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=12)
    for x0, y0, x1, y1, cls, score, _ in detections:
        colour = _class_colour(cls)
        box = [x0 * k, y0 * k, max(x1, x0) * k, max(y1, y0) * k]
        draw.rectangle(box, outline=colour, width=2)
        draw.text((box[0], max(0.0, box[1] - 14)), f"{names[cls]} {score:.2f}", fill=colour, font=font)
    if title:
        draw.text((4, 4), title, fill=(255, 255, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_heatmap(frame: Tensor, heat: Tensor, names: Sequence[str], path: Path) -> Path:
    """Model-frame Image-A beside the detection heatmap (max over classes, coloured by the top class)."""
    gray = (255 * frame.clamp(0, 1).numpy()).astype(np.uint8)  # [S, S] preprocessed, in about [0, 1]
    peak, cls = heat.max(0)  # [H_d, W_d]
    size = gray.shape[0]
    colours = torch.tensor([_class_colour(c) for c in range(heat.shape[0])], dtype=torch.float32)  # [C, 3]
    rgb = (colours[cls] * peak.unsqueeze(-1)).clamp(0, 255).to(torch.uint8).numpy()  # [H_d, W_d, 3]
    heat_img = Image.fromarray(rgb).resize((size, size), Image.Resampling.NEAREST)
    left, k = _upscale(gray)
    right = heat_img.resize(left.size, Image.Resampling.NEAREST)
    canvas = Image.new("RGB", (left.width * 2 + 8, left.height + 18 * (1 + len(names) // 3)), (0, 0, 0))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width + 8, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=12)
    draw.text((4, 4), "Image-A (model input)", fill=(255, 255, 0), font=font)
    draw.text((left.width + 12, 4), f"heatmap, max {float(peak.max()):.2f}", fill=(255, 255, 0), font=font)
    for c, name in enumerate(names):  # legend
        x = 4 + (c % 3) * (canvas.width // 3)
        y = left.height + 3 + 18 * (c // 3)
        draw.text((x, y), name, fill=_class_colour(c), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _viridis(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """[...] floats -> [..., 3] uint8 through the viridis colour map over [lo, hi]."""
    t = np.clip((values - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    return (255 * mpl.colormaps["viridis"](t)[..., :3]).astype(np.uint8)


def save_fusion_weights(
    omega: Tensor,
    w_img: Tensor,
    w_seq: Tensor,
    token_grid: int,
    n_patches: int,
    path: Path,
    title: str = "",
) -> Path:
    """Modality weights (image vs sequence bars), image token weights per camera grid, sequence patch bars.

    Token colours and bar heights use the data's own range (printed): the weights sit near 1 and their
    structure is the point. Absent tokens have weight exactly 0.
    """
    font = ImageFont.load_default(size=12)
    panel_h, top, gap = 200, 24, 20
    grid_px = 150
    seq_w = max(240, 12 * n_patches)
    width = 140 + 2 * (grid_px + gap) + seq_w + 2 * gap
    canvas = Image.new("RGB", (width, panel_h + top + 40), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 4), title, fill=(0, 0, 0), font=font)
    base = top + panel_h
    # modality weights, 0..1
    for k, (name, colour) in enumerate((("image", (31, 119, 180)), ("sequence", (255, 127, 14)))):
        v = float(omega[k])
        x0 = 20 + 60 * k
        draw.rectangle([x0, base - v * (panel_h - 20), x0 + 40, base], fill=colour)
        draw.text((x0, base + 4), name, fill=(0, 0, 0), font=font)
        draw.text((x0, base - v * (panel_h - 20) - 14), f"{v:.2f}", fill=(0, 0, 0), font=font)
    draw.text((20, top), "modality weight", fill=(0, 0, 0), font=font)
    # image tokens per camera
    grid = w_img.reshape(2, token_grid, token_grid).double().numpy()
    lo, hi = float(grid.min()), float(grid.max())
    for cam, name in enumerate(("Image-A", "Image-B")):
        x0 = 140 + cam * (grid_px + gap)
        tile = Image.fromarray(_viridis(grid[cam], lo, hi)).resize((grid_px, grid_px), Image.Resampling.NEAREST)
        canvas.paste(tile, (x0, top + 20))
        draw.text((x0, top), f"{name} tokens", fill=(0, 0, 0), font=font)
    draw.text((140, top + 26 + grid_px), f"colour range {lo:.3f} .. {hi:.3f}", fill=(0, 0, 0), font=font)
    # sequence tokens: Seq-A and Seq-B bars per patch
    seq = w_seq.reshape(2, n_patches).double().numpy()
    x_left = 140 + 2 * (grid_px + gap) + gap
    s_hi = max(float(seq.max()), 1e-12)
    step = seq_w / n_patches
    colours = ((31, 119, 180), (255, 127, 14))
    for ch in range(2):
        for j in range(n_patches):
            h = seq[ch, j] / s_hi * (panel_h - 40)
            x0 = x_left + j * step + ch * step / 2
            draw.rectangle([x0, base - h, x0 + step / 2 - 1, base], fill=colours[ch])
    draw.line([x_left, base, x_left + seq_w, base], fill=(0, 0, 0))
    draw.text((x_left, top), f"sequence tokens (max {s_hi:.3f})", fill=(0, 0, 0), font=font)
    draw.text((x_left, base + 4), f"patches 0..{n_patches - 1}; Seq-A blue, Seq-B orange", fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
