"""Optional pixel-level IR/visible fusion inside the daemon: one fused frame per window, plus its quality.

Where the fused frame goes, and why: SA-CMF's image branch takes two cameras, Image-A (visible) and
Image-B (infrared). The fused frame **replaces Image-A and Image-B stays**:

* the fused frame is built on Image-A's pixel grid (Image-B is resized to it when the cameras differ), so
  detection boxes, which the daemon reports in Image-A pixels, keep their meaning;
* keeping the raw infrared frame leaves the model its unprocessed thermal evidence; a fusion network's
  output is a visually pleasing blend, not a radiometric measurement.

A served SA-CMF model must have been trained on windows that went through the same stage (training and
serving share ``daemon.adapt``; apply :meth:`FusionStage.fuse_window` before it in both), otherwise it
sees inputs unlike its training data. ``feed = "none"`` runs the stage for its quality gauges only.

Cost (fusion.md §8, measured here in ``bench-fusion``): the networks take seconds (CrossFuse) to about a
minute (CDDFuse, CMMDL) per 640x480 pair on a CPU, so in a live daemon they need a GPU, small frames or
the ``mean`` baseline; tiling bounds memory, not time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["FEEDS", "FusionStage", "frame_quality", "to_unit"]

FEEDS = ("image_a", "none")


def to_unit(frame: np.ndarray) -> tuple[npt.NDArray[np.float32], tuple[float, float]]:
    """A camera frame -> float32 in [0, 1] and the (offset, scale) that maps it back.

    Integer frames use their full scale (uint8 /255, uint16 /65535), as the fusion networks were trained
    on files read that way. Float frames (the deep-space cameras' calibrated data) have no fixed scale, so
    they are min-max normalised over their finite pixels; non-finite pixels become 0 (the minimum).
    """
    a = np.asarray(frame)
    if a.dtype == np.uint8:
        return (a.astype(np.float32) / 255.0), (0.0, 255.0)
    if a.dtype == np.uint16:
        return (a.astype(np.float32) / 65535.0), (0.0, 65535.0)
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        lo, hi = float(info.min), float(info.max)
    else:
        finite = np.isfinite(a)
        if not finite.any():
            return np.zeros(a.shape, np.float32), (0.0, 1.0)
        lo, hi = float(a[finite].min()), float(a[finite].max())
        a = np.where(finite, a, lo)
    span = hi - lo if hi > lo else 1.0
    return ((a.astype(np.float64) - lo) / span).astype(np.float32), (lo, span)


def _from_unit(x: np.ndarray, like: np.ndarray, scale: tuple[float, float]) -> np.ndarray:
    """Inverse of :func:`to_unit` into ``like``'s dtype (integers are rounded and clipped)."""
    lo, span = scale
    y = np.asarray(x, dtype=np.float64) * span + lo
    if np.issubdtype(like.dtype, np.integer):
        info = np.iinfo(like.dtype)
        return np.clip(np.round(y), info.min, info.max).astype(like.dtype)
    return y.astype(like.dtype if np.issubdtype(like.dtype, np.floating) else np.float32)


def _gray(unit: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(Y, CbCr or None) of a unit-range frame (H, W), (H, W, 1) or (H, W, 3)."""
    from model import fusion_io

    if unit.ndim == 2:
        return unit, None
    if unit.ndim == 3 and unit.shape[2] == 1:
        return unit[..., 0], None
    if unit.ndim == 3 and unit.shape[2] == 3:
        ycc = fusion_io.rgb_to_ycbcr(unit)
        return ycc[..., 0].astype(np.float32), ycc[..., 1:].astype(np.float32)
    if unit.ndim == 3:  # other channel counts: their mean, as daemon.adapt does for the model
        return unit.mean(axis=2, dtype=np.float32), None
    raise ValueError(f"expected a 2-D frame or (H, W, C), got shape {unit.shape}")


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a (H, W) float image (antialiased when shrinking, so noise does not alias)."""
    import torch
    import torch.nn.functional as F

    if img.shape == size:
        return img
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None, None]
    shrink = size[0] < img.shape[0] or size[1] < img.shape[1]
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    return out[0, 0].clamp(0.0, 1.0).numpy()


def frame_quality(fused: np.ndarray) -> dict[str, float]:
    """EN, SD and SF of a fused frame on the 0-255 scale the metrics are defined on (fusion.md §5.3).

    Colour frames are scored on their BT.601 luma; the scale follows the frame's type like
    :func:`to_unit` (a float frame is min-max stretched, as its fused image would be saved).
    """
    from model import fusion_metrics

    unit, _ = to_unit(fused)
    y, _ = _gray(unit)
    return fusion_metrics.frame_metrics(np.asarray(y, dtype=np.float64) * 255.0)


class FusionStage:
    """One fusion method, loaded once, applied to the visible/infrared frames of a window.

    ``method``: ``"mean"``, ``"cddfuse"``, ``"crossfuse"`` or ``"cmmdl"`` (see ``model.fusion``);
    ``ckpt`` is needed by the networks. ``tile`` > 0 bounds memory by fusing tiles (``overlap`` None: the
    method's default). ``stretch`` None keeps the authors' per-frame stretch for the networks. ``feed``
    says what :meth:`process` hands on: ``"image_a"`` the fused windows, ``"none"`` the original ones.
    """

    def __init__(
        self,
        method: str,
        ckpt: str | Path | None = None,
        *,
        tile: int = 0,
        overlap: int | None = None,
        device: str = "cpu",
        stretch: bool | None = None,
        feed: str = "image_a",
    ) -> None:
        from model import fusion

        self.method, self.model = fusion.load_method(method, ckpt, device=device)
        self.tile = tile
        self.overlap = overlap
        self.device = device
        self.stretch = (self.method.stretch != "none") if stretch is None else stretch
        if feed not in FEEDS:
            raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
        self.feed = feed

    @classmethod
    def from_settings(cls, settings: Any) -> FusionStage | None:
        """From ``daemon.config.ImageFusionSettings``; None when the stage is off (``method = "none"``)."""
        if settings.method == "none":
            return None
        overlap = None if settings.overlap < 0 else settings.overlap
        return cls(
            settings.method,
            settings.checkpoint or None,
            tile=settings.tile,
            overlap=overlap,
            device=settings.device,
            feed=settings.feed,
        )

    def fuse_window_frames(self, frame_a: np.ndarray, frame_b: np.ndarray) -> np.ndarray:
        """Image-A (visible) + Image-B (infrared) -> one fused frame with Image-A's size, layout and dtype.

        Image-B is resized to Image-A's size if they differ. A colour Image-A keeps its colour (the
        fused Y gets A's Cb/Cr back); a gray one gives a gray frame.
        """
        import torch

        from model import fusion

        a = np.asarray(frame_a)
        unit_a, scale_a = to_unit(a)
        unit_b, _ = to_unit(np.asarray(frame_b))
        y_a, cbcr = _gray(unit_a)
        y_b, _ = _gray(unit_b)
        y_b = _resize(np.asarray(y_b, dtype=np.float32), y_a.shape)
        ir = torch.from_numpy(np.ascontiguousarray(y_b, dtype=np.float32))[None, None]
        vi = torch.from_numpy(np.ascontiguousarray(y_a, dtype=np.float32))[None, None]
        with torch.inference_mode():
            raw = fusion.fuse_tensors(
                self.method, self.model, ir, vi, tile=self.tile, overlap=self.overlap, device=self.device
            )
        y = fusion.unit_output(self.method, raw.cpu(), stretch=self.stretch)[0, 0].numpy()
        fused = fusion.compose_fused(self.method, y, cbcr, stretch=self.stretch)  # (H, W) or (H, W, 3)
        if a.ndim == 3 and a.shape[2] == 1:
            fused = fused[..., None]
        elif a.ndim == 3 and a.shape[2] not in (1, 3):
            fused = np.repeat(fused[..., None], a.shape[2], axis=2)
        return _from_unit(fused, a, scale_a)

    @staticmethod
    def frame_quality(fused: np.ndarray) -> dict[str, float]:
        """{"EN", "SD", "SF"} of a fused frame (``fusion_metrics.frame_metrics``, 0-255 scale)."""
        return frame_quality(fused)

    def fuse_window(self, window: Any) -> tuple[Any, dict[str, float] | None]:
        """(window with its Image-A frame replaced by the fused frame, quality) for one ingest window.

        The frames fused are the ones ``daemon.adapt`` would feed the model (nearest the window centre),
        and the fused frame keeps Image-A's timing, so the adapter picks it exactly as it would have picked
        the original. A window lacking either camera is returned unchanged with quality None.
        """
        from daemon.adapt import pick_frame

        present = window.presence
        if not (present.get("image_a") and present.get("image_b")):
            return window, None
        fa = pick_frame(window.frames.get("image_a", ()), window.start_ns, window.end_ns)
        fb = pick_frame(window.frames.get("image_b", ()), window.start_ns, window.end_ns)
        if fa is None or fb is None:
            return window, None
        fused = self.fuse_window_frames(fa.image, fb.image)
        meta = dict(fa.meta or {})
        meta["fusion"] = self.method.name
        frame = dataclasses.replace(fa, image=fused, meta=meta)
        frames = dict(window.frames)
        frames["image_a"] = [frame]
        return dataclasses.replace(window, frames=frames), self.frame_quality(fused)

    def process(
        self, windows: Sequence[Any], on_quality: Callable[[str, dict[str, float]], None] | None = None
    ) -> list[Any]:
        """The daemon's hook: fuse each window, report its quality per group, return what the model gets.

        Wiring it into ``Service._infer`` is one line before ``self.runner.run(windows)``:
        ``windows = self.fusion.process(windows, self.metrics.observe_fusion_quality)``.
        """
        out = []
        for window in windows:
            fused, quality = self.fuse_window(window)
            if quality is not None and on_quality is not None:
                on_quality(window.group, quality)
            out.append(fused if self.feed == "image_a" else window)
        return out
