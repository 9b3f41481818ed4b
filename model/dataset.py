"""Reader for the four-modality folder layout, so synthetic and user-supplied data load the same way.

Layout (one directory per split)::

    <root>/<split>/Image-A/<id>.png|.npy   visible frame, 2-D (16-bit PNG keeps the dynamic range)
    <root>/<split>/Image-B/<id>.png|.npy   infrared frame, 2-D
    <root>/<split>/Seq-A/<id>.npy|.txt     visible light curve, 1-D
    <root>/<split>/Seq-B/<id>.npy|.txt     infrared light curve, 1-D
    <root>/<split>/labels.jsonl            one JSON object per line: {"id": str, "class": int, ...}

Files are aligned by identical id. Samples are returned *raw* (integer images as stored, float32
sequences, no normalisation, no resizing): the model's preprocessing is one shared function applied
later, so training, evaluation and the live daemon cannot drift apart. Optional label fields written by
:func:`model.synth.write_dataset` (boxes, object classes, SNRs) are passed through when present.

Box labels for your own data: ``"boxes": [[x0, y0, x1, y1], ...]`` in Image-A pixels with as many
``"object_classes"`` (and ``"boxes_b"``, rows ``null`` where the object is not in Image-B). A record
without ``"boxes"`` has no box labels: the detection loss and the detection scores skip it. A record
with ``"boxes": []`` is a frame labelled empty: it teaches the model empty sky, and every detection on
it is a false positive.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from model.synth import LABELS_FILE, MODALITY_DIRS, NUM_CLASSES

IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".npy")
SEQ_EXTS = (".npy", ".txt")
_EXTS = {"Image-A": IMAGE_EXTS, "Image-B": IMAGE_EXTS, "Seq-A": SEQ_EXTS, "Seq-B": SEQ_EXTS}


class DatasetLayoutError(ValueError):
    """The folder layout is incomplete or the modalities are not aligned by id."""


def index_folder(directory: Path, exts: Sequence[str], role: str | None = None) -> dict[str, Path]:
    """Id (file stem) -> file of one modality folder; a file this reader would not use is an error, never
    a silent skip. Shared by the dataset reader and ``sacmf test`` (which names the ``role``), so a folder
    that trains also tests.

    Why strict: a second file for one id (``x.png`` beside ``x.npy``) or a format not read here
    (``y.bmp``) would otherwise drop an input without a word. Hidden files and subfolders are not
    inputs of any kind and are left alone.
    """
    what = f"{role} file" if role else "file"
    found: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if path.suffix.lower() not in exts:
            raise DatasetLayoutError(
                f"unexpected file {path}: not a readable {role or 'input'} file (extensions read: "
                f"{', '.join(exts)}); convert it or move it out of {directory}"
            )
        if path.stem in found:
            raise DatasetLayoutError(
                f"two {what}s for id {path.stem!r}: {found[path.stem].name} and {path.name} (in {directory}); keep one"
            )
        found[path.stem] = path
    return found


def _index_modality(directory: Path, exts: Sequence[str]) -> dict[str, Path]:
    if not directory.is_dir():
        raise DatasetLayoutError(f"missing modality directory {directory}")
    return index_folder(directory, exts)


def read_labels(path: Path, num_classes: int = NUM_CLASSES) -> list[dict[str, Any]]:
    """Every record of a ``labels.jsonl``, each line checked; errors name the file and line.

    Why so strict: a malformed line would otherwise surface as a KeyError far away, or worse, as a wrong
    class (Python reads class -1 as the last name) that accuracy is then counted against. Shared by the
    dataset reader and ``sacmf test`` (which passes its checkpoint's class count).
    """
    if not path.is_file():
        raise DatasetLayoutError(f"missing labels file {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetLayoutError(f"{path}: cannot read the labels ({exc})") from exc
    records = []
    seen: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetLayoutError(f"{path}:{lineno}: invalid JSON ({exc})") from exc
        if not isinstance(rec, dict) or not isinstance(rec.get("id"), str) or not rec["id"]:
            raise DatasetLayoutError(f"{path}:{lineno}: each line needs a non-empty string 'id'")
        cls = rec.get("class")
        if isinstance(cls, bool) or not isinstance(cls, int) or not 0 <= cls < num_classes:
            raise DatasetLayoutError(f"{path}:{lineno}: 'class' must be an integer in [0, {num_classes}), got {cls!r}")
        if rec["id"] in seen:
            raise DatasetLayoutError(f"{path}:{lineno}: duplicate id {rec['id']!r}")
        seen.add(rec["id"])
        records.append(rec)
    return records


def _load_image(path: Path) -> np.ndarray:
    """One image file as a 2-D array; a file that cannot be read is a DatasetLayoutError naming it, so
    one bad file in thousands is found from the message, not from a traceback."""
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            with Image.open(path) as img:
                if img.mode not in ("I;16", "I;16B", "I;16L", "I", "L", "F"):
                    img = img.convert("L")  # colour files: luminance, like a monochrome sensor
                arr = np.asarray(img)  # decodes the whole file: a truncated one fails here
    except (OSError, ValueError, EOFError, SyntaxError) as exc:  # PIL: OSError subclasses, SyntaxError
        raise DatasetLayoutError(f"{path}: cannot read the image ({type(exc).__name__}: {exc})") from None
    if arr.ndim != 2:
        raise DatasetLayoutError(f"{path}: expected a 2-D single-channel image, got shape {arr.shape}")
    if arr.size == 0:
        raise DatasetLayoutError(f"{path}: the image is empty (shape {arr.shape})")
    if arr.dtype.kind not in "uif":
        raise DatasetLayoutError(f"{path}: expected an integer or float image, got dtype {arr.dtype}")
    return arr


def _load_seq(path: Path) -> np.ndarray:
    """One sequence file as float32 [T]; unreadable files are a DatasetLayoutError naming them."""
    try:
        arr = np.load(path, allow_pickle=False) if path.suffix.lower() == ".npy" else np.loadtxt(path, ndmin=1)
    except (OSError, ValueError, EOFError) as exc:  # pickled object arrays, text that is not numbers
        raise DatasetLayoutError(f"{path}: cannot read the sequence ({type(exc).__name__}: {exc})") from None
    if arr.ndim != 1:
        raise DatasetLayoutError(f"{path}: expected a 1-D sequence, got shape {arr.shape}")
    if arr.dtype.kind not in "uif":
        raise DatasetLayoutError(f"{path}: expected integer or float samples, got dtype {arr.dtype}")
    return arr.astype(np.float32, copy=False)


class FourModalityDataset(Dataset[dict[str, Any]]):
    """Raw samples from ``root/split``; the layout is validated up front so errors surface at startup.

    Each item is a dict::

        id            str
        image_a       np.ndarray [H, W], stored dtype (uint16 for the synthetic PNGs)
        image_b       np.ndarray [H', W'], stored dtype
        seq_a, seq_b  np.ndarray float32 [T], [T']
        label         int, target class
        boxes         np.ndarray float32 [N, 4] (x0, y0, x1, y1) in Image-A px; [0, 4] if not labelled
        boxes_known   bool: the record has a "boxes" list (``[]`` is a labelled empty frame, whose
                      detections are false positives; a record without the key has no box labels)
        boxes_b       np.ndarray float32 [N, 4] in Image-B, NaN rows where absent
        object_classes np.ndarray int64 [N]
        snr_img, snr_seq  float (NaN if not labelled); low_snr bool
    """

    def __init__(self, root: Path | str, split: str = "train") -> None:
        self.split_dir = Path(root) / split
        if not self.split_dir.is_dir():
            raise DatasetLayoutError(f"missing split directory {self.split_dir}")
        self.records = read_labels(self.split_dir / LABELS_FILE)
        self.files = {m: _index_modality(self.split_dir / m, _EXTS[m]) for m in MODALITY_DIRS}
        ids = {rec["id"] for rec in self.records}
        problems = []
        for modality, index in self.files.items():
            missing = sorted(ids - index.keys())
            orphans = sorted(index.keys() - ids)
            if missing:
                problems.append(f"{modality}: no file for {len(missing)} labelled id(s), e.g. {missing[:5]}")
            if orphans:
                problems.append(f"{modality}: {len(orphans)} file(s) without a label, e.g. {orphans[:5]}")
        if problems:
            raise DatasetLayoutError(f"misaligned layout in {self.split_dir}:\n  " + "\n  ".join(problems))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        sid = rec["id"]
        boxes = _boxes(rec.get("boxes"))
        boxes_b = _boxes(rec.get("boxes_b"))
        classes = np.asarray(rec.get("object_classes", []), dtype=np.int64)
        if boxes_b.shape[0] != boxes.shape[0] or classes.shape[0] != boxes.shape[0]:
            raise DatasetLayoutError(f"{sid}: boxes, boxes_b and object_classes must have the same length")
        return {
            "id": sid,
            "image_a": _load_image(self.files["Image-A"][sid]),
            "image_b": _load_image(self.files["Image-B"][sid]),
            "seq_a": _load_seq(self.files["Seq-A"][sid]),
            "seq_b": _load_seq(self.files["Seq-B"][sid]),
            "label": int(rec["class"]),
            "boxes": boxes,
            "boxes_known": rec.get("boxes") is not None,
            "boxes_b": boxes_b,
            "object_classes": classes,
            "snr_img": float(rec.get("snr_img", float("nan"))),
            "snr_seq": float(rec.get("snr_seq", float("nan"))),
            "low_snr": bool(rec.get("low_snr", False)),
        }


def _boxes(raw: list[list[float] | None] | None) -> np.ndarray:
    if not raw:
        return np.zeros((0, 4), dtype=np.float32)
    return np.asarray([[np.nan] * 4 if b is None else b for b in raw], dtype=np.float32).reshape(-1, 4)


def collate_raw(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack equal-shape raw arrays into tensors; per-object fields stay lists (their N varies).

    Integer images become int32 [B, H, W] (lossless for uint16; torch has few uint16 ops), float images
    float32; sequences float32 [B, T], labels int64 [B]. Raises if shapes differ: resizing belongs to the
    shared preprocessing.
    """
    out: dict[str, Any] = {"id": [s["id"] for s in batch]}
    for key in ("image_a", "image_b"):
        stacked = np.stack([s[key] for s in batch])
        dtype = np.int32 if np.issubdtype(stacked.dtype, np.integer) else np.float32
        out[key] = torch.from_numpy(stacked.astype(dtype, copy=False))
    for key in ("seq_a", "seq_b"):
        out[key] = torch.from_numpy(np.stack([s[key] for s in batch]))
    out["label"] = torch.tensor([s["label"] for s in batch], dtype=torch.int64)
    for key in ("boxes", "boxes_b", "object_classes"):
        out[key] = [torch.from_numpy(s[key]) for s in batch]
    for key in ("snr_img", "snr_seq"):
        out[key] = torch.tensor([s[key] for s in batch], dtype=torch.float32)
    out["low_snr"] = torch.tensor([s["low_snr"] for s in batch], dtype=torch.bool)
    out["boxes_known"] = torch.tensor([s["boxes_known"] for s in batch], dtype=torch.bool)
    return out
