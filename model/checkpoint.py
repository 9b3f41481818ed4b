"""SA-CMF checkpoint files (format ``sacmf-checkpoint/1``): written by training, read by every consumer.

Why the model package owns the format: training writes it, ``sacmf test``/``evaluate`` and the daemon
read it; one reader means the daemon can never accept a file that evaluation would reject, or the
other way round.

Why a plain dict of tensors and built-in types loaded with ``torch.load(weights_only=True)``: a pickle
of arbitrary objects executes code when loaded, and a checkpoint is exactly the kind of artefact that
gets copied around. The dict carries everything needed to rebuild the network (``config``), the names
outputs are reported with (``class_names``), a human ``version`` and the ``state_dict``. Optional keys:
``training`` (metadata: data, epochs, metrics; any built-in types) and ``resume`` (optimizer, scheduler
and RNG state; only in ``last.pt``, so a run can continue exactly). Readers ignore keys they do not
know, so adding optional keys keeps format version 1.

Why the sha256 of the file bytes: it identifies the exact weights a result came from (the daemon
exports it as ``sacmf_model_info``) and is computed from the bytes actually parsed, so a file swapped
between hashing and loading cannot be misattributed.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from model.sacmf import SACMF, SACMFConfig, build_model

CHECKPOINT_FORMAT = "sacmf-checkpoint/1"
CHECKPOINT_KEYS = ("format", "version", "config", "class_names", "state_dict")
_PLAIN = (str, int, float, bool, type(None), Tensor)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class CheckpointMeta:
    """Everything in a checkpoint besides the weights, plus the identity of the file."""

    path: Path
    sha256: str
    version: str  # as stored; may be "" (consumers fall back to a sha256 prefix)
    config: SACMFConfig
    class_names: tuple[str, ...]
    training: dict[str, Any] = field(default_factory=dict)  # training metadata, {} when absent
    resume: dict[str, Any] | None = None  # optimizer/scheduler/RNG state, only in last.pt

    @property
    def display_version(self) -> str:
        """The version results are labelled with: the stored one, else ``sha256:<12 hex digits>``."""
        return self.version or f"sha256:{self.sha256[:12]}"


def _check_plain(value: object, where: str) -> None:
    """Refuse values ``weights_only`` loading would reject later: fail at save time, not at serve time."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: dict keys must be str or int, got {type(k).__name__}")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, _PLAIN):
        raise TypeError(f"{where}: {type(value).__name__} is not storable (use built-in types and tensors)")


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Write via a temp file in the same directory + fsync + rename.

    A daemon may reload the path at any moment and a training run may be killed mid-write: readers must
    see the old file or the new one, never half of one.
    """
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


def save_checkpoint(
    model: SACMF, path: str | os.PathLike[str], version: str, *, extra: dict[str, Any] | None = None
) -> str:
    """Write ``model`` as a servable checkpoint, atomically; returns the sha256 of the file.

    ``extra`` adds optional top-level keys (``training``, ``resume``); it cannot override the
    required ones. Values must be built-in types and tensors (checked here, so a bad value fails the
    save rather than every later load).
    """
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(CHECKPOINT_KEYS))
    if clash:
        raise ValueError(f"extra must not override required checkpoint keys {clash}")
    _check_plain(extra, "extra")
    cfg = model.config
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "version": str(version),
        "config": {**cfg.to_dict(), "backbone_weights": None},  # the state_dict already holds them
        "class_names": list(cfg.class_names),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        **extra,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def config_from_dict(raw: object, origin: str = "config") -> SACMFConfig:
    """A stored config dict -> SACMFConfig; keys missing from older files take today's defaults."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{origin}: 'config' must be a dict, got {type(raw).__name__}")
    known = {f.name for f in fields(SACMFConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CheckpointError(f"{origin}: config has unknown key {unknown[0]!r} (a newer model version?)")
    kw = dict(raw)
    if "class_names" in kw:
        kw["class_names"] = tuple(kw["class_names"])
    kw["backbone_weights"] = None  # never read another file: the state_dict is complete
    try:
        return SACMFConfig(**kw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{origin}: invalid config: {exc}") from exc


def _check_members(path: Path, data: bytes) -> None:
    """Every member of the file's zip archive must match its CRC-32. torch.load does not check them, so a
    file overwritten in place and read mid-copy (``rsync --inplace``, ``dd conv=notrunc``) loaded as a
    mix of the old and the new weights under the new file's version."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return  # not torch's zip format: torch.load says what it is
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint archive ({type(exc).__name__}: {exc})") from exc
    if bad is not None:
        raise CheckpointError(
            f"{path}: member {bad!r} fails its checksum: the file is damaged or was read while being written "
            "(replace checkpoints atomically: write elsewhere, then mv)"
        )


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """Read and parse a file without building the model: (payload dict, sha256 of the bytes)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint: {exc.strerror or exc}") from exc
    sha = hashlib.sha256(data).hexdigest()
    _check_members(path, data)
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
    return ckpt, sha


def _abbrev(keys: list[str]) -> str:
    return f"{keys[:5]}{'...' if len(keys) > 5 else ''}"


def load_checkpoint(path: str | os.PathLike[str], device: str = "cpu") -> tuple[SACMF, CheckpointMeta]:
    """Read, check and build a checkpoint; the model comes back in eval mode on ``device``.

    Checks: readable torch file, required keys, format, config, class names, version type, state-dict
    keys, shapes and finiteness. Every failure is a :class:`CheckpointError` naming the file. No
    forward pass is run (the daemon's warm-up does that).
    """
    path = Path(path)
    ckpt, sha = read_checkpoint(path)
    cfg = config_from_dict(ckpt["config"], str(path))
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
    try:
        model = build_model(cfg)
    except (RuntimeError, ValueError, ArithmeticError) as exc:  # values each valid alone, not together
        raise CheckpointError(f"{path}: the config does not build a model: {exc}") from exc
    own = model.state_dict()
    lacking = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if lacking or extra:
        raise CheckpointError(
            f"{path}: state_dict does not fit the config: missing {_abbrev(lacking)}, unexpected {_abbrev(extra)}"
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
    training = ckpt.get("training")
    resume = ckpt.get("resume")
    meta = CheckpointMeta(
        path=path,
        sha256=sha,
        version=version,
        config=cfg,
        class_names=cfg.class_names,
        training=training if isinstance(training, dict) else {},
        resume=resume if isinstance(resume, dict) else None,
    )
    return model, meta
