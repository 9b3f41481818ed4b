"""Which frames of a window the model uses.

Why a module of its own: the ingest process applies :func:`model_view` to every window before it
sends it on, whether or not it also prepares the model's inputs (``[inference] prepare_in``), so the
choice of frame stands apart from the model's preprocessing. Why this frame is the adapter's choice
is explained in :mod:`daemon.adapt`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from ingest.windowing import Frame, Window


def pick_frame(frames: Sequence[Frame], start_ns: int, end_ns: int) -> Frame | None:
    """The frame whose exposure mid-point is nearest the window centre (earliest on ties)."""
    if not frames:
        return None
    centre2 = start_ns + end_ns  # compare doubled times: exact integers, no rounding
    return min(frames, key=lambda f: abs(2 * f.t_ns + f.exp_ns - centre2))


def model_view(window: Window) -> Window:
    """``window`` holding only the frame per camera that :func:`pick_frame` gives the model.

    Why: the ingest process hands every window to the main process, and everything there (the model's
    inputs, detections in Image-A pixels, the PNG sink, the image-fusion stage) uses only those frames.
    A 1 s window at 10 fps carries 20 frames; pickling and unpickling the 18 unused ones cost both
    processes CPU at every window. The model's inputs from the view are identical to the full window's.
    """
    frames = {}
    for role, found in window.frames.items():
        frame = pick_frame(found, window.start_ns, window.end_ns)
        frames[role] = [frame] if frame is not None else []
    return replace(window, frames=frames)
