"""Batch inference over files: prepared splits, the model run, and the engine of ``sacmf test``.

Why prepare whole splits up front: the synthetic sets are small (a 64 px sample is ~50 KB as tensors),
and the shared preprocessing (:func:`model.preprocess.preprocess`) costs far more than a forward pass of
the small backbones, so training, validation and evaluation preprocess every sample exactly once and
then only index tensors. Everything goes through the same ``preprocess`` + ``collate`` as the daemon,
so the model sees identical inputs offline and live.

Why modalities are restricted through the presence mask (never by editing the data): an absent input
is exactly what the network handles natively (weight 0, no attention, no statistics), so single-modality
baselines, missing-modality augmentation and robustness tests all exercise the serving code path.

``sacmf test`` takes dual folders (Image-A + Seq-A; the B folders are found beside them or given), so
it runs on any directory of files without labels; missing B folders or files are absent inputs.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from model.checkpoint import CheckpointError, CheckpointMeta, atomic_write, load_checkpoint
from model.dataset import (
    IMAGE_EXTS,
    SEQ_EXTS,
    FourModalityDataset,
    _load_image,
    _load_seq,
    index_folder,
    read_labels,
)
from model.preprocess import IMAGE_ROLES, ROLES, RawSample, collate, preprocess, raw_from_dataset_item
from model.sacmf import SACMF, Detection, SACMFConfig, decode_detections
from model.synth import LABELS_FILE

MODALITIES: dict[str, tuple[str, ...]] = {"image": ("image_a", "image_b"), "sequence": ("seq_a", "seq_b")}
ALL_MODALITIES: tuple[str, ...] = ("image", "sequence")
Progress = Callable[[int, int], None]  # (done, total)


def parse_modalities(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Parse "image,sequence" or ["image"] into the canonical ordered tuple; unknown names are an error."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = sorted(set(items) - set(MODALITIES))
    if unknown or not items:
        raise ValueError(f"modalities must be a non-empty subset of {list(MODALITIES)}, got {spec!r}")
    return tuple(m for m in ALL_MODALITIES if m in items)


def restrict(batch: dict[str, Tensor], modalities: Sequence[str]) -> dict[str, Tensor]:
    """A shallow copy of ``batch`` whose presence mask keeps only the roles of ``modalities``."""
    keep = torch.tensor([any(role in MODALITIES[m] for m in modalities) for role in ROLES])  # [4]
    out = dict(batch)
    out["presence"] = batch["presence"] & keep
    return out


def take(tensors: dict[str, Tensor], idx: Tensor | slice) -> dict[str, Tensor]:
    """Rows ``idx`` of every tensor of a collated batch (all keys are batch-major)."""
    return {k: v[idx] for k, v in tensors.items()}


# ----------------------------------------------------------------------------------------------------
# Prepared inputs
# ----------------------------------------------------------------------------------------------------


@dataclass
class PreparedSplit:
    """A whole labelled split, preprocessed and collated once (keys as :func:`model.preprocess.collate`)."""

    root: Path
    ids: list[str]
    tensors: dict[str, Tensor]
    snr_img: np.ndarray  # [N] float, NaN when not labelled
    snr_seq: np.ndarray  # [N]
    low_snr: np.ndarray  # [N] bool

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labels(self) -> Tensor:
        return self.tensors["label"]


def split_location(root: str | os.PathLike[str]) -> tuple[Path, str]:
    """``./data/train`` -> (``./data``, ``"train"``): the dataset reader takes root and split apart."""
    path = Path(root)
    return path.parent, path.name


def prepare_split(root: str | os.PathLike[str], cfg: SACMFConfig, progress: Progress | None = None) -> PreparedSplit:
    """Read, preprocess and collate every sample of the split directory ``root`` (labels.jsonl layout)."""
    parent, name = split_location(root)
    ds = FourModalityDataset(parent, name)
    if len(ds) == 0:
        raise ValueError(f"{ds.split_dir}: no labelled samples")
    pcfg = cfg.preprocess_config()
    samples, ids, snr_img, snr_seq, low = [], [], [], [], []
    for i in range(len(ds)):
        item = ds[i]
        samples.append(preprocess(raw_from_dataset_item(item), pcfg))
        ids.append(item["id"])
        snr_img.append(item["snr_img"])
        snr_seq.append(item["snr_seq"])
        low.append(item["low_snr"])
        if progress is not None:
            progress(i + 1, len(ds))
    return PreparedSplit(
        root=Path(root),
        ids=ids,
        tensors=collate(samples),
        snr_img=np.asarray(snr_img, dtype=np.float64),
        snr_seq=np.asarray(snr_seq, dtype=np.float64),
        low_snr=np.asarray(low, dtype=bool),
    )


def sibling_b_dir(a_dir: Path) -> Path | None:
    """``.../Image-A`` -> ``.../Image-B`` (a trailing A becomes B); None if the name does not end in A."""
    name = a_dir.name
    if not name or name[-1] not in "Aa":
        return None
    return a_dir.with_name(name[:-1] + ("B" if name[-1] == "A" else "b"))


def _index(directory: Path | None, exts: Sequence[str], role: str) -> dict[str, Path]:
    """Id -> file of one input folder (none given: no file), by the training reader's rules."""
    return {} if directory is None else index_folder(directory, exts, role)


@dataclass
class FolderInputs:
    """Unlabelled samples from dual folders: ids, raw samples (for drawing) and their collated tensors."""

    ids: list[str]
    raws: list[RawSample]
    tensors: dict[str, Tensor]
    dirs: dict[str, Path | None]  # role -> folder used (None: absent for every sample)
    files: dict[str, dict[str, Path]] = field(default_factory=dict)  # role -> id -> file read


def resolve_dirs(
    image_dir: Path | None,
    seq_dir: Path | None,
    image_b_dir: Path | None = None,
    seq_b_dir: Path | None = None,
) -> dict[str, Path | None]:
    """Role -> folder. Explicit B folders must exist; implicit ones are used only when they do."""
    if image_dir is None and seq_dir is None:
        raise ValueError("give at least one of the Image-A and Seq-A folders")
    dirs: dict[str, Path | None] = {"image_a": image_dir, "seq_a": seq_dir, "image_b": None, "seq_b": None}
    for a_role, b_role, explicit in (("image_a", "image_b", image_b_dir), ("seq_a", "seq_b", seq_b_dir)):
        if explicit is not None:
            dirs[b_role] = explicit
        elif dirs[a_role] is not None:
            guess = sibling_b_dir(Path(dirs[a_role]))  # type: ignore[arg-type]
            dirs[b_role] = guess if guess is not None and guess.is_dir() else None
    for role, d in dirs.items():
        if d is not None and not Path(d).is_dir():
            raise FileNotFoundError(f"{role} folder {d} does not exist")
    return {k: None if v is None else Path(v) for k, v in dirs.items()}


def prepare_folders(dirs: dict[str, Path | None], cfg: SACMFConfig) -> FolderInputs:
    """Every id found in any folder; a role whose folder or file is missing is absent for that id."""
    index = {role: _index(dirs.get(role), IMAGE_EXTS if role in IMAGE_ROLES else SEQ_EXTS, role) for role in ROLES}
    ids = sorted(set().union(*(set(v) for v in index.values())))
    if not ids:
        raise ValueError(f"no input files in {[str(d) for d in dirs.values() if d is not None]}")
    pcfg = cfg.preprocess_config()
    raws, samples = [], []
    for sid in ids:
        data: dict[str, np.ndarray | None] = {}
        for role in ROLES:
            path = index[role].get(sid)
            # the readers refuse unreadable and empty files with an error naming them
            data[role] = None if path is None else (_load_image(path) if role in IMAGE_ROLES else _load_seq(path))
        raw = RawSample(**data, meta={"id": sid})
        raws.append(raw)
        samples.append(preprocess(raw, pcfg))
    return FolderInputs(ids, raws, collate(samples), dirs, index)


# ----------------------------------------------------------------------------------------------------
# Running the model
# ----------------------------------------------------------------------------------------------------


@dataclass
class Predictions:
    """Model outputs for N samples, in input order (D embedding width, C classes)."""

    logits: Tensor  # [N, C]
    probs: Tensor  # [N, C] softmax, float64
    emb_img: Tensor  # [N, D]
    emb_seq: Tensor  # [N, D]
    present: Tensor  # [N, 2] bool, image / sequence as the model saw them
    modality_weights: Tensor  # [N, 2]
    token_weights_img: Tensor  # [N, K_a]
    token_weights_seq: Tensor  # [N, K_b]
    detections: list[list[Detection]]  # per sample; model-frame px, or raw Image-A px when scaled
    mi_nats: float
    heatmaps: Tensor | None = None  # [N, C, H_d, W_d] sigmoid heatmaps when requested

    @property
    def pred(self) -> Tensor:
        return self.probs.argmax(1)


def check_batching(batch_size: int, det_threshold: float) -> None:
    """Refuse a batch size or detection threshold that would give a wrong answer instead of an error.

    Why up front: ``batch_size < 1`` runs no batch at all and ends in a ``KeyError`` far from the cause,
    and a threshold outside [0, 1] (or NaN) silently reports every candidate, or none, as a detection.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch size must be an integer >= 1, got {batch_size!r}")
    if (
        isinstance(det_threshold, bool)
        or not isinstance(det_threshold, numbers.Real)
        or not (math.isfinite(det_threshold) and 0.0 <= det_threshold <= 1.0)
    ):
        raise ValueError(f"detection threshold must be a number in [0, 1], got {det_threshold!r}")


@torch.inference_mode()
def predict(
    model: SACMF,
    tensors: dict[str, Tensor],
    *,
    batch_size: int = 64,
    det_threshold: float = 0.3,
    det_k: int = 50,
    raw_pixels: bool = False,
    keep_heatmaps: bool = False,
) -> Predictions:
    """Eval-mode forward over all rows in batches (outputs do not depend on batching in eval mode).

    ``raw_pixels`` decodes boxes in Image-A pixels (divides by ``scale_a``) instead of model pixels.
    """
    check_batching(batch_size, det_threshold)
    was_training = model.training
    model.eval()
    n = int(tensors["label"].shape[0]) if "label" in tensors else int(tensors["image_a"].shape[0])
    parts: dict[str, list[Tensor]] = {}
    dets: list[list[Detection]] = []
    mi = float("nan")
    keys = (
        "logits",
        "emb_img",
        "emb_seq",
        "present",
        "modality_weights",
        "token_weights_img",
        "token_weights_seq",
    )
    try:
        for lo in range(0, n, batch_size):
            batch = take(tensors, slice(lo, lo + batch_size))
            out = model(batch)
            for key in keys:
                parts.setdefault(key, []).append(out[key].detach().cpu())
            if keep_heatmaps:
                parts.setdefault("heat", []).append(torch.sigmoid(out["det_logits"]).cpu())
            scale = batch["scale_a"] if raw_pixels else None
            dets += decode_detections(out, k=det_k, threshold=det_threshold, scale=scale)
            mi = float(out["mi"])
    finally:
        model.train(was_training)
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return Predictions(
        logits=cat["logits"],
        probs=torch.softmax(cat["logits"].double(), 1),
        emb_img=cat["emb_img"],
        emb_seq=cat["emb_seq"],
        present=cat["present"],
        modality_weights=cat["modality_weights"],
        token_weights_img=cat["token_weights_img"],
        token_weights_seq=cat["token_weights_seq"],
        detections=dets,
        mi_nats=mi,
        heatmaps=cat.get("heat"),
    )


def trained_modalities(meta: CheckpointMeta) -> tuple[str, ...]:
    """The modalities a checkpoint was trained on (recorded by ``sacmf train``; both when unknown)."""
    mods = meta.training.get("modalities")
    if not mods:
        return ALL_MODALITIES
    try:
        return parse_modalities(mods)
    except (AttributeError, TypeError, ValueError) as exc:  # a damaged file: guessing "both" hides it
        raise CheckpointError(
            f"{meta.path}: training.modalities {mods!r} is not a list of modalities ({exc})"
        ) from None


# ----------------------------------------------------------------------------------------------------
# sacmf test
# ----------------------------------------------------------------------------------------------------


def _labels_beside(dirs: dict[str, Path | None], names: Sequence[str]) -> dict[str, int]:
    """Ground truth from a ``labels.jsonl`` in the parent of the given folders, when there is one,
    checked line by line against the checkpoint's classes (:func:`model.dataset.read_labels`)."""
    for d in dirs.values():
        path = None if d is None else d.parent / LABELS_FILE
        if path is not None and path.is_file():
            return {rec["id"]: rec["class"] for rec in read_labels(path, len(names))}
    return {}


def _rounded(w: Tensor) -> list[float]:
    return [round(float(v), 5) for v in w]


def tidy_box(box: Sequence[float], width: int, height: int) -> list[float]:
    """Order and clip a decoded box to the frame; a negative predicted size becomes an empty box.

    The size head is unconstrained, so an untrained or confused model can predict x1 < x0; reporting
    that as a box would break every consumer's ``x0 <= x1`` assumption (the daemon does the same).
    """
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw, hh = max(0.0, (x1 - x0) / 2), max(0.0, (y1 - y0) / 2)
    return [
        min(max(cx - hw, 0.0), float(width)),
        min(max(cy - hh, 0.0), float(height)),
        min(max(cx + hw, 0.0), float(width)),
        min(max(cy + hh, 0.0), float(height)),
    ]


def sample_record(
    sid: str,
    i: int,
    preds: Predictions,
    presence: Tensor,
    names: Sequence[str],
    meta: CheckpointMeta,
    frame_hw: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The JSON result of one sample (detections in Image-A pixels, clipped to ``frame_hw`` = (H, W))."""
    probs = preds.probs[i]
    k = int(probs.argmax())
    dets = []
    if bool(presence[0]) and frame_hw is not None:
        for x0, y0, x1, y1, cls, score, cprobs in preds.detections[i]:
            dets.append(
                {
                    "box": [round(v, 3) for v in tidy_box((x0, y0, x1, y1), frame_hw[1], frame_hw[0])],
                    "class": names[cls],
                    "class_index": cls,
                    "score": round(score, 5),
                    "class_probs": [round(p, 5) for p in cprobs],
                }
            )
    return {
        "id": sid,
        "presence": {role: bool(presence[j]) for j, role in enumerate(ROLES)},
        "class": names[k],
        "class_index": k,
        "confidence": round(float(probs[k]), 6),
        "class_probs": {name: round(float(p), 6) for name, p in zip(names, probs, strict=True)},
        "fusion": {
            "image": round(float(preds.modality_weights[i, 0]), 6),
            "sequence": round(float(preds.modality_weights[i, 1]), 6),
            "tokens_image": _rounded(preds.token_weights_img[i]),
            "tokens_sequence": _rounded(preds.token_weights_seq[i]),
        },
        "mi_nats": None if not np.isfinite(preds.mi_nats) else round(max(0.0, preds.mi_nats), 6),
        "detections": dets,
        "model_version": meta.display_version,
        "model_sha256": meta.sha256,
    }


RESULTS_FILE = "results.jsonl"
SKIPPED_FILE = "skipped.jsonl"
VIS_DIRS = ("detections", "heatmaps", "fusion_weights")


def check_out_dir(out: Path) -> None:
    """Refuse an ``out`` that cannot become a folder (it, or its nearest existing parent, is a file)
    before minutes of work, not after (``sacmf test`` and ``sacmf evaluate``)."""
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"output folder {out}: {parent} exists and is not a folder")
            return


def _check_out(out: Path) -> None:
    """Refuse an output location that cannot hold the folder layout, before any work is done."""
    check_out_dir(out)
    for sub in ("json", *VIS_DIRS):
        if (out / sub).exists() and not (out / sub).is_dir():
            raise ValueError(f"output folder {out}: {out / sub} exists and is not a folder")
    for name in (RESULTS_FILE, SKIPPED_FILE):
        if (out / name).exists() and not (out / name).is_file():
            raise ValueError(f"output folder {out}: {out / name} exists and is not a file")


def _is_plain_id(sid: object) -> bool:
    """Ids read back from an old results file name files to delete, so they must not name a path."""
    return isinstance(sid, str) and sid not in ("", ".", "..") and Path(sid).name == sid


def _our_record(path: Path) -> bool:
    """Whether ``json/<id>.json`` is a record ``sacmf test`` wrote (so it may be replaced or removed)."""
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and rec.get("id") == path.stem and "model_sha256" in rec


def _remove_previous_outputs(out: Path) -> None:
    """Delete the per-sample files an earlier ``sacmf test`` wrote into ``out``, and nothing else.

    Ours are: ``json/<id>.json`` holding a result record for ``<id>``, and ``<vis dir>/<id>.png`` for an
    id listed by a previous ``results.jsonl``/``skipped.jsonl`` or record. Anything else in the folder
    (other names, other extensions, files of other tools) is left alone.
    """
    ids: set[str] = set()
    for name in (RESULTS_FILE, SKIPPED_FILE):
        if (out / name).is_file():
            for line in (out / name).read_text(encoding="utf-8", errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    rec = json.loads(line)
                    if isinstance(rec, dict) and _is_plain_id(rec.get("id")):
                        ids.add(rec["id"])
    if (out / "json").is_dir():
        for path in sorted((out / "json").glob("*.json")):
            if path.is_file() and _our_record(path):
                ids.add(path.stem)
                path.unlink()
    for sub in VIS_DIRS:
        if not (out / sub).is_dir():
            continue
        removed = False
        for sid in sorted(ids):
            png = out / sub / f"{sid}.png"
            if png.is_file() and not png.is_symlink():
                png.unlink()
                removed = True
        if removed and not any((out / sub).iterdir()):
            (out / sub).rmdir()


def _skip_reason(sid: str, i: int, inputs: FolderInputs, seen: Tensor, used: Tensor, mods: Sequence[str]) -> str:
    """Why sample ``i`` has no input the model can use, naming each of its files."""
    parts = []
    for j, role in enumerate(ROLES):
        path = inputs.files.get(role, {}).get(sid)
        if path is None:
            continue
        if not bool(seen[i, j]):
            parts.append(f"{path}: empty or no finite value")
        elif not bool(used[i, j]):
            parts.append(f"{path}: {role} is not among the modalities {list(mods)}")
    return "no usable input (" + "; ".join(parts) + ")"


def run_test(
    ckpt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    image_dir: str | os.PathLike[str] | None,
    seq_dir: str | os.PathLike[str] | None,
    image_b_dir: str | os.PathLike[str] | None = None,
    seq_b_dir: str | os.PathLike[str] | None = None,
    vis: bool = False,
    batch_size: int = 32,
    det_threshold: float = 0.3,
    modalities: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Classify and detect every sample in the folders; write JSON (and PNGs with ``vis``); return a summary.

    Files: ``out/results.jsonl`` (one record per classified sample), ``out/json/<id>.json``,
    ``out/skipped.jsonl`` (``{"id", "reason"}`` per skipped sample); with ``vis``
    ``out/detections/<id>.png`` (Image-A with boxes and labels), ``out/heatmaps/<id>.png`` and
    ``out/fusion_weights/<id>.png``. ``modalities`` defaults to what the checkpoint was trained on.

    The output folder describes this run only: the per-sample files an earlier run wrote there (see
    :func:`_remove_previous_outputs`; nothing else is touched) are removed once every input has been
    read and checked, so a failed run leaves the previous outputs as they were.

    A sample with no usable input (its files are empty or non-finite, or are all outside
    ``modalities``) is skipped, not classified: the model would still emit a class for it, at a
    confidence that looks like an answer but reflects nothing. It is counted (``skipped``) with its
    reason (``skip_reasons``, naming the files) in the summary and in ``skipped.jsonl``; no record or
    picture is written for it. If no sample at all is usable, that is an error (almost always the wrong
    folder or ``modalities``).

    Bad arguments, an unusable output location, unreadable or ambiguous input files and malformed
    ``labels.jsonl`` lines raise ValueError naming the file.
    """
    from model import plots  # matplotlib only when drawing

    check_batching(batch_size, det_threshold)
    out = Path(out)
    _check_out(out)
    wanted = parse_modalities(modalities) if modalities else None
    model, meta = load_checkpoint(ckpt)
    cfg = meta.config
    names = list(meta.class_names)
    mods = wanted or trained_modalities(meta)
    as_path = {k: None if v is None else Path(v) for k, v in (("a", image_dir), ("s", seq_dir))}
    dirs = resolve_dirs(
        as_path["a"],
        as_path["s"],
        None if image_b_dir is None else Path(image_b_dir),
        None if seq_b_dir is None else Path(seq_b_dir),
    )
    truth = _labels_beside(dirs, names)
    inputs = prepare_folders(dirs, cfg)
    restricted = restrict(inputs.tensors, mods)
    usable = restricted["presence"].any(1)
    skipped = {
        sid: _skip_reason(sid, i, inputs, inputs.tensors["presence"], restricted["presence"], mods)
        for i, sid in enumerate(inputs.ids)
        if not bool(usable[i])
    }
    if not bool(usable.any()):
        detail = "; ".join(f"{sid}: {why}" for sid, why in list(skipped.items())[:5])
        raise ValueError(f"no sample has a usable input ({len(skipped)} skipped), e.g. {detail}")
    keep = torch.nonzero(usable).flatten()
    tensors = take(restricted, keep)
    ids = [inputs.ids[int(i)] for i in keep]
    raws = [inputs.raws[int(i)] for i in keep]
    preds = predict(
        model,
        tensors,
        batch_size=batch_size,
        det_threshold=det_threshold,
        raw_pixels=True,
        keep_heatmaps=vis,
    )
    _remove_previous_outputs(out)
    (out / "json").mkdir(parents=True, exist_ok=True)
    if vis:
        for sub in VIS_DIRS:
            (out / sub).mkdir(parents=True, exist_ok=True)
    records = []
    for i, sid in enumerate(ids):
        raw = raws[i]
        frame_hw = None if raw.image_a is None else (int(raw.image_a.shape[0]), int(raw.image_a.shape[1]))
        rec = sample_record(sid, i, preds, tensors["presence"][i], names, meta, frame_hw)
        if sid in truth:
            rec["true_class"] = names[truth[sid]]
            rec["true_class_index"] = truth[sid]
        records.append(rec)
        atomic_write(out / "json" / f"{sid}.json", (json.dumps(rec, indent=2) + "\n").encode())
        if vis:
            if raw.image_a is not None and rec["presence"]["image_a"]:
                title = f"{sid}: {rec['class']} ({rec['confidence']:.2f})"
                plots.save_detections(raw.image_a, preds.detections[i], names, out / "detections" / f"{sid}.png", title)
            assert preds.heatmaps is not None
            plots.save_heatmap(tensors["image_a"][i, 0], preds.heatmaps[i], names, out / "heatmaps" / f"{sid}.png")
            plots.save_fusion_weights(
                preds.modality_weights[i],
                preds.token_weights_img[i],
                preds.token_weights_seq[i],
                cfg.token_grid,
                cfg.n_patches,
                out / "fusion_weights" / f"{sid}.png",
                title=f"{sid}: fusion weights",
            )
    lines = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    atomic_write(out / RESULTS_FILE, lines.encode())
    skip_lines = "".join(json.dumps({"id": sid, "reason": why}) + "\n" for sid, why in skipped.items())
    atomic_write(out / SKIPPED_FILE, skip_lines.encode())
    summary: dict[str, Any] = {
        "n": len(records),
        "skipped": len(skipped),
        "skip_reasons": skipped,
        "out": str(out),
        "folders": {k: None if v is None else str(v) for k, v in dirs.items()},
        "modalities": list(mods),
        "classes": {name: sum(r["class"] == name for r in records) for name in names},
        "detections": sum(len(r["detections"]) for r in records),
    }
    labelled = [r for r in records if "true_class_index" in r]
    if labelled:
        summary["accuracy"] = sum(r["class_index"] == r["true_class_index"] for r in labelled) / len(labelled)
    return summary
