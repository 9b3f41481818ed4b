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

Input scale (why :func:`input_unit`, not always the container's full scale): the networks expect [0, 1]
images with real contrast. 8-bit frames are read /255, exactly as the networks were trained and as the
reference code and the goldens read them. A wider container's depth is unknown: a 14-bit infrared core's
6000..10000 counts in a uint16 are a nearly flat image at /65535, whose contribution to the fused frame
is a few grey levels. So any other frame (uint16, other integers, float) enters by its own finite
min..max, which removes the ADC's depth, gain and pedestal. Not a percentile range: in a deep-space frame
the brightest few pixels are the target, and clipping them would flatten it (a hot pixel compresses the
contrast instead, which is the lesser harm).

Output scale: the fused frame is an image in [0, 1] (the networks' output, stretched as their authors
save it), not a measurement in Image-A's counts, so it is written at the full scale of Image-A's type, as
:func:`to_unit` reads it (uint8 x255, uint16 x65535, other integers their dtype's range, rounded;
a float Image-A gets its own finite min..max back). The model's preprocessing (sky and noise) and the
PNG sink (percentile stretch) do not depend on that scale; the quality gauges score it there.

Loading refuses weights that are not finite or whose warm-up forward (one small synthetic pair through
:meth:`FusionStage.fuse_window_frames`) gives non-finite output (:class:`FusionLoadError`), as the SA-CMF
checkpoint is refused; each fused frame is checked again (:class:`FusionError`, reason ``non_finite``),
because the authors' output stretch would silently turn NaN into a black frame.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "FEEDS",
    "FusionError",
    "FusionLoadError",
    "FusionOutcome",
    "FusionStage",
    "frame_quality",
    "input_unit",
    "to_unit",
    "weights_sha256",
]

FEEDS = ("image_a", "none")
WARMUP_SIDE = 32  # side of the synthetic warm-up pair: every method takes it, in well under a second
FUSED, NOT_FUSED, FAILED = "fused", "not_fused", "failed"  # FusionOutcome.status
STATUSES = (FUSED, NOT_FUSED, FAILED)
FAILURE_REASONS = ("error", "non_finite")  # FusionError.reason


class FusionLoadError(ValueError):
    """The fusion weights could not be loaded, are not finite, or their warm-up output is not finite."""


class FusionError(RuntimeError):
    """Fusing one window failed; ``reason`` is ``"non_finite"`` (NaN/Inf out of the network) or ``"error"``."""

    def __init__(self, message: str, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class FusionOutcome:
    """What the stage did with one window (:meth:`FusionStage.apply`).

    ``status``: ``"fused"`` (``window`` holds the fused Image-A when the feed is ``image_a``),
    ``"not_fused"`` (a camera was missing: ``window`` is the original), ``"failed"`` (``error`` says why;
    ``window`` is the original). The stage's feed decides the rest, here once for the daemon and replay:
    ``served`` is False for a window that must not reach a model trained on fused frames (failed under
    feed ``image_a``); ``identity`` is what its result record names, set when the model gets it fused.
    """

    window: Any
    status: str
    quality: dict[str, float] | None = None
    error: FusionError | None = None
    served: bool = True
    identity: dict[str, str | None] | None = None


def weights_sha256(path: str | Path) -> str:
    """sha256 of a weights file; for a folder (CrossFuse's released files), of every file under it.

    A folder hashes each file's path relative to it and its own sha256, in sorted order, so a renamed,
    added or changed file changes the result.
    """
    p = Path(path)

    def file_hash(f: Path) -> str:
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    if not p.is_dir():
        return file_hash(p)
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
        h.update(f"{f.relative_to(p).as_posix()}\0{file_hash(f)}\n".encode())
    return h.hexdigest()


def to_unit(frame: np.ndarray) -> tuple[npt.NDArray[np.float32], tuple[float, float]]:
    """A frame -> float32 in [0, 1] by the full scale of its type, and the (offset, scale) that maps it back.

    Integer frames use their dtype's full scale (uint8 /255, uint16 /65535); float frames (the deep-space
    cameras' calibrated data) have no fixed scale, so they are min-max normalised over their finite
    pixels; non-finite pixels become 0 (the minimum). This is the scale an *image* of that type is shown
    and scored at (:func:`frame_quality`) and the one a fused frame is written at; a camera frame enters
    the fusion as :func:`input_unit` reads it.
    """
    a = np.asarray(frame)
    scale = _full_scale(a)
    if a.dtype in (np.uint8, np.uint16):  # float32 arithmetic, as the networks' image readers do
        return a.astype(np.float32) / scale[1], scale
    return _unit(a, scale), scale


def input_unit(frame: np.ndarray) -> tuple[npt.NDArray[np.float32], tuple[float, float]]:
    """A camera frame -> float32 in [0, 1] as it enters the fusion, and the (offset, scale) that maps back.

    uint8 by /255 (the networks' training convention); anything else by its own finite min..max over all
    channels (so a colour frame keeps its hue), non-finite pixels at 0; a constant frame maps to 0. See
    the module doc for why.
    """
    a = np.asarray(frame)
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating) or a.dtype == np.bool_):
        raise ValueError(f"expected a numeric frame, got dtype {a.dtype}")
    if a.dtype == np.uint8:
        return to_unit(a)
    scale = _finite_range(a)
    return _unit(a, scale), scale


def _finite_range(a: np.ndarray) -> tuple[float, float]:
    """(lowest, span) of the finite pixels: span 1 for a flat frame, (0, 1) when no pixel is finite."""
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = float(finite.min()), float(finite.max())
    return lo, (hi - lo if hi > lo else 1.0)


def _full_scale(a: np.ndarray) -> tuple[float, float]:
    """The (offset, scale) :func:`to_unit` maps ``a`` with: an integer type's range, else the finite range."""
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        return float(info.min), float(info.max) - float(info.min)
    return _finite_range(a)


def _unit(a: np.ndarray, scale: tuple[float, float]) -> npt.NDArray[np.float32]:
    """(a - offset) / scale as float32, computed in float64; non-finite pixels become 0 (the offset)."""
    lo, span = scale
    x = a.astype(np.float64)
    return ((np.where(np.isfinite(x), x, lo) - lo) / span).astype(np.float32)


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


def _warmup_pair(side: int = WARMUP_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic synthetic (visible, infrared) uint16 pair with structure: a lit gradient with a
    periodic texture, and a warm blob on a cool background."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    vi = 1000.0 + 2000.0 * xx + 500.0 * np.sin(12.0 * xx) * np.cos(9.0 * yy)
    ir = 6000.0 + 3000.0 * np.exp(-((xx - 0.6) ** 2 + (yy - 0.4) ** 2) * 30.0)
    return vi.astype(np.uint16), ir.astype(np.uint16)


class FusionStage:
    """One fusion method, loaded once, applied to the visible/infrared frames of a window.

    ``method``: ``"mean"``, ``"cddfuse"``, ``"crossfuse"`` or ``"cmmdl"`` (see ``model.fusion``);
    ``ckpt`` is needed by the networks. ``tile`` > 0 bounds memory by fusing tiles (``overlap`` None: the
    method's default). ``stretch`` None keeps the authors' per-frame stretch for the networks. ``feed``
    says what :meth:`process` hands on: ``"image_a"`` the fused windows, ``"none"`` the original ones.

    Construction validates like the SA-CMF checkpoint load: weights that do not load, are not finite, or
    give non-finite output on a synthetic warm-up pair raise :class:`FusionLoadError`. ``sha256`` names
    the weights (None for ``mean``); it is computed before and after the load, and a file replaced in
    between is refused, so it always names the bytes that were loaded.
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

        if feed not in FEEDS:
            raise ValueError(f"feed must be one of {FEEDS}, got {feed!r}")
        self.feed = feed
        self.method = fusion.get_method(method)  # an unknown name is a ValueError, not a load failure
        self.checkpoint = None if ckpt is None or str(ckpt) == "" else Path(ckpt)
        self.sha256: str | None = None
        try:
            if self.method.needs_checkpoint and self.checkpoint is not None and self.checkpoint.exists():
                self.sha256 = weights_sha256(self.checkpoint)
            self.method, self.model = fusion.load_method(method, ckpt, device=device)
            if self.sha256 is not None and weights_sha256(self.checkpoint) != self.sha256:  # type: ignore[arg-type]
                raise FusionLoadError("the file changed while it was being loaded; load it again")
        except FusionLoadError as exc:
            raise FusionLoadError(f"{method} weights {ckpt}: {exc}") from None
        except Exception as exc:  # any unreadable, foreign or damaged file: one error type for the caller
            # the first sentence: torch's unpickling errors go on with advice (weights_only=False) not to take
            first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0][:300]
            raise FusionLoadError(f"{method} weights {ckpt}: {type(exc).__name__}: {first}") from exc
        try:  # a bad tile or overlap: refused at start, not window by window
            fusion.tile_overlap(self.method, tile, overlap)
        except ValueError as exc:
            raise FusionLoadError(f"{self.method.name} tile {tile} / overlap {overlap}: {exc}") from None
        self.tile = tile
        self.overlap = overlap
        self.device = device
        self.stretch = (self.method.stretch != "none") if stretch is None else stretch
        self._validate(str(ckpt))

    def _validate(self, origin: str) -> None:
        """Finite weights, then one warm-up pair through the whole stage with a finite result."""
        import torch

        if self.model is not None:
            tensors = [*self.model.named_parameters(), *self.model.named_buffers()]
            for name, t in tensors:
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise FusionLoadError(f"{self.method.name} weights {origin}: tensor {name} is not finite")
        vi, ir = _warmup_pair()
        try:
            self.fuse_window_frames(vi, ir)
        except Exception as exc:
            raise FusionLoadError(f"{self.method.name} weights {origin}: warm-up failed: {exc}") from exc

    @property
    def identity(self) -> dict[str, str | None]:
        """{"method", "sha256"}: what a result record says about the fusion of its window."""
        return {"method": self.method.name, "sha256": self.sha256}

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

        Each frame enters as :func:`input_unit` reads it; the fused frame, an image in
        [0, 1], is written at the full scale of Image-A's type (:func:`to_unit`). Image-B is resized to
        Image-A's size if they differ. A colour Image-A keeps its colour (the fused Y gets A's Cb/Cr back);
        a gray one gives a gray frame. Raises :class:`FusionError` (reason ``non_finite``) when the
        network's output is not finite.
        """
        import torch

        from model import fusion

        a = np.asarray(frame_a)
        unit_a, _ = input_unit(a)
        unit_b, _ = input_unit(np.asarray(frame_b))
        y_a, cbcr = _gray(unit_a)
        y_b, _ = _gray(unit_b)
        y_b = _resize(np.asarray(y_b, dtype=np.float32), y_a.shape)
        ir = torch.from_numpy(np.ascontiguousarray(y_b, dtype=np.float32))[None, None]
        vi = torch.from_numpy(np.ascontiguousarray(y_a, dtype=np.float32))[None, None]
        with torch.inference_mode():
            raw = fusion.fuse_tensors(
                self.method, self.model, ir, vi, tile=self.tile, overlap=self.overlap, device=self.device
            )
        raw = raw.cpu()
        if not bool(torch.isfinite(raw).all()):  # before the stretch, which would turn NaN into black
            bad = int((~torch.isfinite(raw)).sum())
            raise FusionError(f"{self.method.name} produced {bad} non-finite pixel(s)", "non_finite")
        y = fusion.unit_output(self.method, raw, stretch=self.stretch)[0, 0].numpy()
        fused = fusion.compose_fused(self.method, y, cbcr, stretch=self.stretch)  # (H, W) or (H, W, 3)
        if not np.isfinite(fused).all():
            raise FusionError(f"{self.method.name}: the composed fused frame is not finite", "non_finite")
        if a.ndim == 3 and a.shape[2] == 1:
            fused = fused[..., None]
        elif a.ndim == 3 and a.shape[2] not in (1, 3):
            fused = np.repeat(fused[..., None], a.shape[2], axis=2)
        return _from_unit(fused, a, _full_scale(a))  # written at the full scale of Image-A's type

    @staticmethod
    def frame_quality(fused: np.ndarray) -> dict[str, float]:
        """{"EN", "SD", "SF"} of a fused frame (``fusion_metrics.frame_metrics``, 0-255 scale)."""
        return frame_quality(fused)

    def fuse_window(self, window: Any) -> tuple[Any, dict[str, float] | None]:
        """(window with its Image-A frame replaced by the fused frame, quality) for one ingest window.

        The frames fused are the ones ``daemon.adapt`` would feed the model (nearest the window centre),
        and the fused frame keeps Image-A's timing, so the adapter picks it exactly as it would have picked
        the original. A window lacking either camera is returned unchanged with quality None. Raises on
        failure (:meth:`apply` does not).
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
        try:
            quality: dict[str, float] | None = self.frame_quality(fused)
        except Exception:  # a gauge must never cost the window it describes: the fusion itself worked
            quality = None
        return dataclasses.replace(window, frames=frames), quality

    def apply(self, window: Any) -> FusionOutcome:
        """One window through the stage, never raising: the daemon fuses window by window, so a window
        whose fusion fails costs only itself (the caller counts, logs and fails it).

        ``outcome.window`` is what the model gets under this stage's feed: the fused window for
        ``"image_a"``, the original for ``"none"`` (fused for its quality only) and whenever the status is
        not ``"fused"``.
        """
        fed = self.feed == "image_a"
        try:
            fused, quality = self.fuse_window(window)
        except FusionError as exc:
            return FusionOutcome(window, FAILED, error=exc, served=not fed)
        except Exception as exc:  # a frame the stage cannot take, an out-of-memory, a bug: this window only
            error = FusionError(f"{type(exc).__name__}: {exc}")
            return FusionOutcome(window, FAILED, error=error, served=not fed)
        if quality is None:
            return FusionOutcome(window, NOT_FUSED)
        if fed:
            return FusionOutcome(fused, FUSED, quality, identity=self.identity)
        return FusionOutcome(window, FUSED, quality)

    def process(
        self, windows: Sequence[Any], on_quality: Callable[[str, dict[str, float]], None] | None = None
    ) -> list[Any]:
        """Fuse each window, report its quality per group, return what the model gets; raises on the first
        failure (for batch tools such as a training path; the daemon uses :meth:`apply` per window)."""
        out = []
        for window in windows:
            fused, quality = self.fuse_window(window)
            if quality is not None and on_quality is not None:
                on_quality(window.group, quality)
            out.append(fused if self.feed == "image_a" else window)
        return out
