"""The resident SA-CMF model: checkpoint loading, warm-up, batched inference and validated hot reload.

Why a checkpoint is a plain dict of tensors and built-in types loaded with ``weights_only=True``: a
pickle of arbitrary objects executes code when loaded, and a checkpoint file is exactly the kind of
artefact that gets copied around. The dict carries everything needed to rebuild the network
(``config``), the names the outputs are reported with (``class_names``), a human ``version`` and the
``state_dict``; the sha256 of the file bytes identifies it exactly (``sacmf_model_info``).

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

import hashlib
import io
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import structlog
import torch
from torch import Tensor

from daemon.adapt import pick_frame, windows_to_batch
from ingest.windowing import Frame, Samples, Window
from model.sacmf import SACMF, SACMFConfig, build_model, decode_detections
from sinks.record import Detection, FusionWeights, ResultRecord, TokenStats

log = structlog.get_logger("sacmf.inference")

CHECKPOINT_FORMAT = "sacmf-checkpoint/1"
CHECKPOINT_KEYS = ("format", "version", "config", "class_names", "state_dict")
RELOAD_RESULTS = ("success", "failure")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be served; the message says what is wrong with which file."""


@dataclass(frozen=True)
class LoadedModel:
    """A model in eval mode with the identity of the file it came from."""

    model: SACMF
    config: SACMFConfig
    class_names: tuple[str, ...]
    version: str
    sha256: str
    path: Path


# ---------------------------------------------------------------- checkpoint files


def save_checkpoint(model: SACMF, path: str | os.PathLike[str], version: str) -> str:
    """Write ``model`` as a servable checkpoint, atomically (temp file + rename); returns its sha256.

    Atomic because the daemon may reload the path at any moment: it must see the old file or the new
    one, never half of one.
    """
    cfg = model.config
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": str(version),
        "config": {**cfg.to_dict(), "backbone_weights": None},  # the state_dict already holds them
        "class_names": list(cfg.class_names),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()


def _config_from(raw: object, path: Path) -> SACMFConfig:
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: 'config' must be a dict, got {type(raw).__name__}")
    known = {f.name for f in fields(SACMFConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CheckpointError(f"{path}: config has unknown key {unknown[0]!r} (a newer model version?)")
    kw = dict(raw)
    if "class_names" in kw:
        kw["class_names"] = tuple(kw["class_names"])
    kw["backbone_weights"] = None  # never read another file: the state_dict is complete
    try:
        return SACMFConfig(**kw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid config: {exc}") from exc


def load_checkpoint(path: str | os.PathLike[str], device: str = "cpu") -> LoadedModel:
    """Read, check and build a checkpoint (keys, config, state-dict keys and shapes); no forward pass."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc.strerror or exc}") from exc
    sha = hashlib.sha256(data).hexdigest()  # of the bytes actually loaded: no window for a swap
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, disallowed pickle content, ...
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: a checkpoint is a dict, got {type(ckpt).__name__}")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing} (needs {list(CHECKPOINT_KEYS)})")
    if ckpt["format"] != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: format {ckpt['format']!r} is not {CHECKPOINT_FORMAT!r}")
    cfg = _config_from(ckpt["config"], path)
    names = ckpt["class_names"]
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: class_names must be a list of str")
    if tuple(names) != cfg.class_names:
        raise CheckpointError(f"{path}: class_names {list(names)} differ from config {list(cfg.class_names)}")
    version = ckpt["version"]
    if not isinstance(version, str):
        raise CheckpointError(f"{path}: version must be a str, got {type(version).__name__}")
    state = ckpt["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: state_dict must map names to tensors")
    model = build_model(cfg)
    own = model.state_dict()
    lacking = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if lacking or extra:
        raise CheckpointError(
            f"{path}: state_dict does not fit the config: missing {lacking[:5]}{'...' if len(lacking) > 5 else ''}, "
            f"unexpected {extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in own.items() if state[k].shape != v.shape]
    if wrong:
        raise CheckpointError(f"{path}: state_dict shapes do not fit the config: {'; '.join(wrong[:5])}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{path}: non-finite values in {bad[:5]}")
    model.load_state_dict(state, strict=True)
    try:
        model = model.to(torch.device(device)).eval()
    except (RuntimeError, AssertionError) as exc:
        raise CheckpointError(f"{path}: cannot move the model to device {device!r}: {exc}") from exc
    return LoadedModel(model, cfg, cfg.class_names, version or f"sha256:{sha[:12]}", sha, path)


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


def _token_stats(weights: Tensor) -> TokenStats | None:
    """Summary of the weights of valid tokens (the model sets invalid and absent tokens to exactly 0)."""
    w = weights[weights > 0].double()
    if w.numel() == 0:
        return None
    lo, hi = float(w.min()), float(w.max())
    mean = min(max(float(w.mean()), lo), hi)  # float rounding must not break min <= mean <= max
    return TokenStats(mean, lo, hi, int(w.numel()))


def _clip_box(box: Sequence[float], width: int, height: int) -> list[float]:
    """Order and clip to the Image-A frame; a negative predicted size becomes an empty box."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw, hh = max(0.0, (x1 - x0) / 2), max(0.0, (y1 - y0) / 2)
    return [
        min(max(cx - hw, 0.0), float(width)),
        min(max(cy - hh, 0.0), float(height)),
        min(max(cx + hw, 0.0), float(width)),
        min(max(cy + hh, 0.0), float(height)),
    ]


def _probs(p: Tensor) -> list[float]:
    return [min(max(float(v), 0.0), 1.0) for v in p.double()]


# ---------------------------------------------------------------- runner


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
            records = self._infer(loaded, windows[:n], part)
            if len(records) != n:
                raise CheckpointError(f"{loaded.path}: warm-up produced {len(records)} records for {n} windows")

    # ------------------------------------------------------------------ inference
    def run(self, windows: Sequence[Window]) -> list[ResultRecord]:
        """Result records for ``windows`` (same order), all from one model. Raises on failure."""
        if not windows:
            return []
        with self._lock:
            loaded = self.current
            batch = windows_to_batch(windows, loaded.config.preprocess_config(), method=self.resample_method)
            return self._infer(loaded, windows, batch)

    def _infer(self, loaded: LoadedModel, windows: Sequence[Window], batch: dict[str, Tensor]) -> list[ResultRecord]:
        dev = torch.device(self.device)
        inputs = {k: v.to(dev) for k, v in batch.items()}
        with torch.inference_mode():
            out = loaded.model(inputs)
            out = {k: v.detach().to("cpu") for k, v in out.items()}
        logits = out["logits"]  # [B, C]
        if not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("model produced non-finite logits")
        probs = torch.softmax(logits.double(), dim=1)
        dets = decode_detections(out, k=self.det_max_detections, threshold=self.det_threshold, scale=batch["scale_a"])
        heat = torch.sigmoid(out["det_logits"])  # [B, C, H_d, W_d]
        mi = float(out["mi"])
        mi_nats = max(0.0, mi) if math.isfinite(mi) else None
        names = list(loaded.class_names)
        records = []
        now = self.clock()
        for i, w in enumerate(windows):
            detections = []
            frame = _image_a(w)
            if frame is not None and bool(batch["presence"][i, 0]):
                height, width = frame.image.shape[:2]
                for x0, y0, x1, y1, cls, score in dets[i]:
                    cell = (heat[i, cls] - score).abs().flatten().argmin()  # the peak this detection came from
                    cp = heat[i].flatten(1)[:, cell]
                    detections.append(
                        Detection(_clip_box((x0, y0, x1, y1), width, height), names[cls], score, _probs(cp / cp.sum()))
                    )
            tokens = {}
            for modality, key in (("image", "token_weights_img"), ("sequence", "token_weights_seq")):
                stats = _token_stats(out[key][i])
                if stats is not None:
                    tokens[modality] = stats
            omega = out["modality_weights"][i].double()
            records.append(
                ResultRecord(
                    group=w.group,
                    start_ns=w.start_ns,
                    end_ns=w.end_ns,
                    presence=dict(w.presence),
                    class_names=names,
                    target_probs=_probs(probs[i]),
                    fusion=FusionWeights(float(omega[0]), float(omega[1]), tokens),
                    detections=detections,
                    mi_nats=mi_nats,
                    latency_s=(now - w.end_ns) / 1e9,
                    model_version=loaded.version,
                    revision=w.revision,
                    flushed=w.completeness == "flushed",
                )
            )
        return records


def _image_a(window: Window) -> Frame | None:
    """The Image-A frame the adapter fed the model: detections are in its pixel coordinates."""
    return pick_frame(window.frames.get("image_a", ()), window.start_ns, window.end_ns)
