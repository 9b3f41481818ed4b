"""Ingest window -> model input: the one seam where ``ingest`` and ``model`` meet.

Why here: ``ingest`` and ``model`` must not import each other (each is testable and reusable alone), so
the daemon owns the translation. Training on recorded windows and serving live windows must call the
same functions below (``window_to_raw`` then ``model.preprocess.preprocess`` + ``collate``, bundled in
``windows_to_batch``); otherwise a model would be served inputs built differently from the ones it was
trained on.

Choices, and why:

* **One frame per camera: the one whose exposure mid-point is nearest the window centre**
  (:func:`daemon.window_view.pick_frame`; the ingest process sends only these frames on, see
  :func:`daemon.window_view.model_view`). The model takes one frame per camera, while the radiation
  sequences are resampled over the whole window; the centre frame is the one that best represents the
  span those sequences cover. The latest frame would bias the image towards the window's end (and after
  a flush that may be a frame from a much later time than most samples). Each camera picks its own
  centre frame, which also keeps the A/B pair close in time. Ties go to the earlier frame (the window's
  frame order is deterministic).
* **Multi-channel frames are averaged to one channel**: SA-CMF's image branch is single-channel.
* **Sequences** go through ``ingest.resample.resample`` over ``[start_ns, end_ns)`` to the model's
  sequence length, with its validity mask (bins without a sample stay invalid: gaps look like "no
  data", never like a flat signal). Multi-valued samples are averaged to one value per time.
* **Presence** is the window's presence mask; a role not configured for the group is absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from daemon.window_view import pick_frame
from ingest.resample import resample
from ingest.windowing import IMAGE_ROLES, SEQ_ROLES, Window
from model.preprocess import PreprocessConfig, RawSample, collate, preprocess, preprocess_arrays

if TYPE_CHECKING:  # torch is loaded by the functions that make tensors, not by importing this module
    from torch import Tensor


def _mono(image: np.ndarray) -> np.ndarray:
    """[H, W] as is; [H, W, C] -> mean over C as float64 ([H, W, 1] is just squeezed)."""
    if image.ndim == 2:
        return image
    if image.shape[2] == 1:
        return image[:, :, 0]
    return image.mean(axis=2, dtype=np.float64)  # float32 sums overflow near its limit (1e38 * 3)


def window_to_raw(
    window: Window,
    seq_len: int,
    *,
    method: str = "mean",
    label: int | None = None,
    boxes: np.ndarray | None = None,
    box_classes: np.ndarray | None = None,
) -> RawSample:
    """The model's raw input for one window (optionally with training targets, boxes in Image-A px)."""
    raw: dict[str, np.ndarray | None] = {}
    presence: dict[str, bool] = {}
    for role in IMAGE_ROLES:
        frame = pick_frame(window.frames.get(role, ()), window.start_ns, window.end_ns)
        present = bool(window.presence.get(role, False)) and frame is not None
        raw[role] = _mono(frame.image) if present and frame is not None else None
        presence[role] = present
    for role in SEQ_ROLES:
        present = bool(window.presence.get(role, False)) and role in window.samples
        if present:
            values, valid = resample(window.samples[role], window.start_ns, window.end_ns, seq_len, method=method)
            if values.ndim > 1:  # [n, ...] -> [n]
                # in float64: channels near the float32 limit would sum to inf and drop the modality
                values = values.reshape(seq_len, -1).mean(axis=1, dtype=np.float64).astype(np.float32)
            raw[role], raw[f"{role}_valid"] = values, valid
        else:
            raw[role], raw[f"{role}_valid"] = None, None
        presence[role] = present
    return RawSample(
        **raw,
        presence=presence,
        label=label,
        boxes=boxes,
        box_classes=box_classes,
        meta={"group": window.group, "start_ns": window.start_ns},
    )


def prepare_window(window: Window, cfg: PreprocessConfig, method: str = "mean") -> dict[str, Tensor]:
    """One window's model inputs (uncollated), ready for :func:`collate`."""
    return preprocess(window_to_raw(window, cfg.seq_len, method=method), cfg)


def prepare_window_arrays(window: Window, cfg: PreprocessConfig, method: str = "mean") -> dict[str, np.ndarray]:
    """:func:`prepare_window` as numpy arrays (the same values). The daemon runs this in the ingest
    process by default (``[inference] prepare_in``): arrays are what it sends on, and making them there
    does not load torch (see :mod:`model.preprocess`)."""
    return preprocess_arrays(window_to_raw(window, cfg.seq_len, method=method), cfg)


def windows_to_batch(windows: Sequence[Window], cfg: PreprocessConfig, *, method: str = "mean") -> dict[str, Tensor]:
    """Collated model batch for ``windows`` (in order): what ``SACMF.forward`` takes.

    Keys as :func:`model.preprocess.collate`; ``scale_a`` [B] converts model-frame pixels back to
    Image-A pixels (divide by it).
    """
    if not windows:
        raise ValueError("windows_to_batch needs at least one window")
    return collate([prepare_window(w, cfg, method) for w in windows])
