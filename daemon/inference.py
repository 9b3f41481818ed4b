"""The resident SA-CMF model: checkpoint loading, warm-up, batched inference and validated hot reload.

The checkpoint format (``sacmf-checkpoint/1``: a plain dict of tensors and built-in types, loaded with
``weights_only=True``, identified by the sha256 of its bytes) belongs to :mod:`model.checkpoint`, which
training writes with; ``save_checkpoint`` and ``CheckpointError`` are re-exported here for the daemon's
callers.

Why warm up: the first forward passes pay one-off costs (allocator growth, kernel selection, lazy
initialisation); without a warm-up the first real windows after start or reload would miss their
latency objective. Warm-up runs one synthetic window batch per batch size up to ``max_batch_size``
through the whole path (adapter, preprocessing, model, decoding), so it also proves that path works
before the daemon says it is ready.

Why reload is "validate beside, then swap between batches": a bad file (truncated copy, wrong
architecture, NaN weights) must never take the service down. The new model is loaded and warmed while
the old one keeps serving; only a model that passed is swapped in, under the same lock that ``run``
holds for a whole batch, so no batch ever mixes models and every record names the model that made it.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
import torch
from torch import Tensor

from daemon.adapt import pick_frame, prepare_window, windows_to_batch
from ingest.windowing import Frame, Samples, Window
from model.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_KEYS, CheckpointError, save_checkpoint
from model.checkpoint import load_checkpoint as _load_checkpoint
from model.infer import ALL_MODALITIES, restrict, tidy_box, trained_modalities
from model.preprocess import ROLES, PreprocessConfig, collate
from model.sacmf import SACMF, SACMFConfig, decode_detections
from sinks.record import Detection, FusionWeights, ResultRecord, TokenStats

log = structlog.get_logger("sacmf.inference")

RELOAD_RESULTS = ("success", "failure")
__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_KEYS",
    "CheckpointError",
    "InferenceRunner",
    "LoadedModel",
    "ReloadOutcome",
    "load_checkpoint",
    "save_checkpoint",
    "synthetic_window",
]


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with the identity of the file it came from."""

    model: SACMF
    config: SACMFConfig
    class_names: tuple[str, ...]
    version: str
    sha256: str
    path: Path
    # what the checkpoint was trained on (``sacmf train --modalities``): the model is fed only these,
    # as ``sacmf evaluate`` and ``sacmf test`` feed it, whatever else a window holds
    modalities: tuple[str, ...] = ALL_MODALITIES


# ---------------------------------------------------------------- checkpoint files


def load_checkpoint(path: str | os.PathLike[str], device: str = "cpu") -> LoadedModel:
    """Read, check and build a checkpoint (:func:`model.checkpoint.load_checkpoint`); no forward pass."""
    model, meta = _load_checkpoint(path, device)
    return LoadedModel(
        model, meta.config, meta.class_names, meta.display_version, meta.sha256, meta.path, trained_modalities(meta)
    )


# ---------------------------------------------------------------- warm-up input


def synthetic_window(cfg: SACMFConfig, seed: int = 0, group: str = "warmup") -> Window:
    """A plausible all-modalities window (noisy sky with a source; noisy light curves) for warm-up.

    Built as an ingest Window so warm-up runs the exact serving path, adapter included.
    """
    rng = np.random.default_rng(seed)
    side = 2 * cfg.frame_size
    yy, xx = np.mgrid[0:side, 0:side]
    size_ns, n = 1_000_000_000, 4 * cfg.seq_len
    frames: dict[str, list[Frame]] = {}
    for i, role in enumerate(("image_a", "image_b")):
        sky = rng.normal(100.0 + 200.0 * i, 5.0, (side, side))
        src = 2000.0 * np.exp(-((xx - side / 3) ** 2 + (yy - side / 2) ** 2) / 4.0)
        img = np.clip(sky + src, 0, 65535).astype(np.uint16)
        frames[role] = [Frame(f"warm_{role}", 0, size_ns // 2, 1_000_000, img)]
    dt = size_ns // n
    samples = {
        role: Samples(None, (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32), dt, t0=0)
        for role in ("seq_a", "seq_b")
    }
    presence = dict.fromkeys(("image_a", "image_b", "seq_a", "seq_b"), True)
    return Window(group, 0, size_ns, frames, samples, presence, "full", "watermark")


# ---------------------------------------------------------------- decoding


def _token_stats(weights: np.ndarray) -> list[TokenStats | None]:
    """Per window, a summary of the weights of valid tokens (the model sets invalid and absent tokens
    to exactly 0); ``weights`` is [B, N] float64. None for a window with no valid token."""
    valid = weights > 0
    n = valid.sum(axis=1)
    lo = np.where(valid, weights, np.inf).min(axis=1)
    hi = np.where(valid, weights, -np.inf).max(axis=1)
    mean = np.where(valid, weights, 0.0).sum(axis=1) / np.maximum(n, 1)
    mean = np.minimum(np.maximum(mean, lo), hi)  # float rounding must not break min <= mean <= max
    return [
        TokenStats(float(m), float(a), float(z), int(c)) if c else None
        for m, a, z, c in zip(mean.tolist(), lo.tolist(), hi.tolist(), n.tolist(), strict=True)
    ]


def _probs(p: Sequence[float]) -> list[float]:
    return [min(max(v, 0.0), 1.0) for v in p]


# ---------------------------------------------------------------- runner


@dataclass(frozen=True)
class PreparedBatch:
    """Model inputs and the model whose preprocessing made them."""

    loaded: LoadedModel
    batch: dict[str, Tensor]


@dataclass(frozen=True)
class ForwardedBatch:
    """A batch's model outputs (on the CPU) with the model and inputs that made them."""

    loaded: LoadedModel
    batch: dict[str, Tensor]
    out: dict[str, Tensor]


@dataclass(frozen=True)
class ReloadOutcome:
    ok: bool
    version: str
    sha256: str
    error: str = ""


class InferenceRunner:
    """Holds the served model; ``run`` turns windows into result records; ``reload`` swaps checkpoints.

    Thread model: one inference thread calls ``run``; any thread may call ``reload`` (serialised among
    themselves); the swap waits for the batch in flight.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike[str],
        *,
        device: str = "cpu",
        max_batch_size: int = 8,
        det_threshold: float = 0.3,
        det_max_detections: int = 50,
        resample_method: str = "mean",
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self.checkpoint = Path(checkpoint)
        self.device = device
        self.max_batch_size = max_batch_size
        self.det_threshold = det_threshold
        self.det_max_detections = det_max_detections
        self.resample_method = resample_method
        self.clock = clock
        self._current: LoadedModel | None = None
        self._lock = threading.Lock()  # held for a whole batch and for the swap
        self._reload_lock = threading.Lock()
        self.reloads = dict.fromkeys(RELOAD_RESULTS, 0)
        self.warm = False

    # ------------------------------------------------------------------ identity
    @property
    def current(self) -> LoadedModel:
        if self._current is None:
            raise RuntimeError("no model loaded; call load() first")
        return self._current

    @property
    def model_version(self) -> str:
        return self.current.version

    @property
    def model_sha256(self) -> str:
        return self.current.sha256

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.current.class_names

    # ------------------------------------------------------------------ lifecycle
    def load(self) -> LoadedModel:
        """Initial load and warm-up; raises CheckpointError (the daemon must not start without a model)."""
        loaded = self._load_validated(self.checkpoint)
        with self._lock:
            self._current = loaded
            self.warm = True
        log.info("model_loaded", version=loaded.version, sha256=loaded.sha256, path=str(loaded.path))
        return loaded

    def reload(self) -> ReloadOutcome:
        """Load the configured path again; swap only if it validates. Never raises for a bad file."""
        with self._reload_lock:
            try:
                loaded = self._load_validated(self.checkpoint)
            except Exception as exc:  # any failure keeps the old model serving
                self.reloads["failure"] += 1
                old = self._current
                log.error("model_reload_failed", path=str(self.checkpoint), error=str(exc)[:500])
                return ReloadOutcome(False, old.version if old else "", old.sha256 if old else "", str(exc))
            with self._lock:  # waits for the batch in flight: the swap happens between batches
                previous, self._current = self._current, loaded
                self.warm = True
            self.reloads["success"] += 1
            log.info(
                "model_reloaded",
                version=loaded.version,
                sha256=loaded.sha256,
                previous=previous.version if previous else None,
            )
            return ReloadOutcome(True, loaded.version, loaded.sha256)

    def _load_validated(self, path: Path) -> LoadedModel:
        loaded = load_checkpoint(path, self.device)
        self._warm_up(loaded)
        return loaded

    def _warm_up(self, loaded: LoadedModel) -> None:
        """One forward per batch size 1..max_batch_size through the whole path; outputs must be finite."""
        windows = [synthetic_window(loaded.config, seed=i) for i in range(self.max_batch_size)]
        batch = windows_to_batch(windows, loaded.config.preprocess_config(), method=self.resample_method)
        for n in range(1, self.max_batch_size + 1):
            part = {k: v[:n] for k, v in batch.items()}
            try:
                records = self._infer(loaded, windows[:n], part)
            except Exception as exc:  # weights that load but cannot serve (non-finite outputs): refused alike
                raise CheckpointError(
                    f"{loaded.path}: warm-up forward at batch size {n} failed: {type(exc).__name__}: {exc}"
                ) from exc
            if len(records) != n:
                raise CheckpointError(f"{loaded.path}: warm-up produced {len(records)} records for {n} windows")

    # ------------------------------------------------------------------ inference
    def run(self, windows: Sequence[Window]) -> list[ResultRecord]:
        """Result records for ``windows`` (same order), all from one model. Raises on failure."""
        if not windows:
            return []
        return self.run_prepared(windows, self.prepare(windows))

    @property
    def preprocess_key(self) -> tuple[PreprocessConfig, str]:
        """What a window's prepared inputs depend on: inputs made under another key must be made again."""
        return self.current.config.preprocess_config(), self.resample_method

    def prepare(
        self, windows: Sequence[Window], ready: Sequence[dict[str, Tensor] | None] | None = None
    ) -> PreparedBatch:
        """The model inputs for ``windows``, made with the current model's preprocessing.

        Split from :meth:`run_prepared` so that the daemon can prepare the next batch on another thread
        while this one is in the model. ``ready[i]``, when given, is window i's inputs already made by
        :func:`daemon.adapt.prepare_window` under :attr:`preprocess_key` (the caller checks the key),
        as tensors or as numpy arrays (how they arrive from the ingest process): only the missing ones
        are made here.
        """
        loaded = self.current
        cfg = loaded.config.preprocess_config()
        if ready is None:
            ready = [None] * len(windows)
        inputs = [
            _as_tensors(r) if r is not None else prepare_window(w, cfg, self.resample_method)
            for w, r in zip(windows, ready, strict=True)
        ]
        return PreparedBatch(loaded, collate(inputs))

    def run_prepared(self, windows: Sequence[Window], prepared: PreparedBatch) -> list[ResultRecord]:
        """Records for a batch from :meth:`prepare`; prepared again if a reload swapped the model since."""
        return self.records(windows, self.forward(windows, prepared))

    def forward(self, windows: Sequence[Window], prepared: PreparedBatch) -> ForwardedBatch:
        """The model pass alone, under the swap lock (a reload waits for it); :meth:`records` finishes.

        Split so that the daemon can decode one batch's outputs into records on another thread while
        the next batch is in the model."""
        with self._lock:
            loaded = self.current
            batch = prepared.batch
            if prepared.loaded is not loaded and (
                prepared.loaded.config.preprocess_config() != loaded.config.preprocess_config()
            ):
                batch = windows_to_batch(windows, loaded.config.preprocess_config(), method=self.resample_method)
            return self._forward(loaded, batch)

    def _infer(self, loaded: LoadedModel, windows: Sequence[Window], batch: dict[str, Tensor]) -> list[ResultRecord]:
        return self.records(windows, self._forward(loaded, batch))

    def _forward(self, loaded: LoadedModel, batch: dict[str, Tensor]) -> ForwardedBatch:
        on_cpu = torch.device(self.device).type == "cpu"  # then the copies below are a dozen no-op calls per batch
        fed = batch if loaded.modalities == ALL_MODALITIES else restrict(batch, loaded.modalities)
        inputs = fed if on_cpu else {k: v.to(self.device) for k, v in fed.items()}
        with torch.inference_mode():
            out = loaded.model(inputs)
            if not on_cpu:
                out = {k: v.to("cpu") for k, v in out.items()}
        return ForwardedBatch(loaded, batch, out)

    def records(self, windows: Sequence[Window], fwd: ForwardedBatch) -> list[ResultRecord]:
        """Result records (same order as ``windows``) from a :meth:`forward`; raises on non-finite logits."""
        loaded, batch, out = fwd.loaded, fwd.batch, fwd.out
        logits = out["logits"]  # [B, C]
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("model produced non-finite logits")
        probs = torch.softmax(logits.double(), dim=1).numpy().tolist()  # [B][C]
        dets = decode_detections(out, k=self.det_max_detections, threshold=self.det_threshold, scale=batch["scale_a"])
        mi = float(out["mi"])
        mi_nats = max(0.0, mi) if math.isfinite(mi) else None
        names = list(loaded.class_names)
        tokens = {
            modality: _token_stats(out[key].double().numpy())
            for modality, key in (("image", "token_weights_img"), ("sequence", "token_weights_seq"))
        }
        omega = out["modality_weights"].double().numpy().tolist()  # [B][2]
        # the preprocessing's mask: an all-NaN frame or a series with no finite sample is absent, as the model saw it
        usable = batch["presence"].tolist()  # [B][4] in ROLES order
        image_a_fed = "image" in loaded.modalities  # a sequence-only model's detection head was never trained
        records = []
        now = self.clock()
        for i, w in enumerate(windows):
            detections = []
            frame = _image_a(w)
            if frame is not None and image_a_fed and usable[i][0]:
                height, width = frame.image.shape[:2]
                for x0, y0, x1, y1, cls, score, class_probs in dets[i]:
                    box = tidy_box((x0, y0, x1, y1), width, height)
                    detections.append(Detection(box, names[cls], score, _probs(class_probs)))
            window_tokens = {m: stats[i] for m, stats in tokens.items() if stats[i] is not None}
            records.append(
                ResultRecord(
                    group=w.group,
                    start_ns=w.start_ns,
                    end_ns=w.end_ns,
                    presence={role: bool(usable[i][ROLES.index(role)]) for role in w.presence},
                    class_names=names,
                    target_probs=_probs(probs[i]),
                    fusion=FusionWeights(omega[i][0], omega[i][1], window_tokens),
                    detections=detections,
                    mi_nats=mi_nats,
                    latency_s=(now - w.end_ns) / 1e9,
                    model_version=loaded.version,
                    revision=w.revision,
                    flushed=w.completeness == "flushed",
                )
            )
        return records


def _as_tensors(inputs: dict) -> dict[str, Tensor]:
    """Prepared inputs as tensors; arrays received on the pipe are read-only views, so those are copied."""
    return {
        k: torch.from_numpy(v if v.flags.writeable else v.copy()) if isinstance(v, np.ndarray) else v
        for k, v in inputs.items()
    }


def _image_a(window: Window) -> Frame | None:
    """The Image-A frame the adapter fed the model: detections are in its pixel coordinates."""
    return pick_frame(window.frames.get("image_a", ()), window.start_ns, window.end_ns)
