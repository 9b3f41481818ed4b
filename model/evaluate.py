"""Metrics and the ``sacmf evaluate`` report.

Why the metrics are implemented here in numpy rather than taken from scikit-learn: the project does not
depend on it, and each definition below is a few lines that the tests check against hand-computed
cases. Definitions follow the usual conventions (and the reference's metric list, sacmf.md section 1.2):

* per-class precision / recall / F1 with zero division counted as 0 in the averages; "macro" averages
  over the classes that occur in the truth or the predictions (scikit-learn's default label set),
  "weighted" weights by support, "micro" pools all decisions (equal to accuracy for single-label
  classification). The per-class table shows such a score as NaN instead (a class never predicted
  has no precision, one absent from the truth no recall, one in neither no F1), by the rule below;
* a score over no samples at all (an empty subset, box precision without detections, box recall without
  ground truth) is NaN, written as null in metrics.json and n/a in report.md: a 0 there would read as a
  measured failure of the model;
* one-vs-rest ROC AUC by the Mann-Whitney rank statistic (ties count one half); a class without
  positives or negatives has no AUC and is left out of the averages;
* ECE over 10 equal-width confidence bins, confidence = top softmax probability;
* detection AP per class at IoU 0.5 with greedy matching in descending score (each ground-truth box
  matches once; duplicates are false positives) and all-point interpolated precision, mAP = mean over
  classes with ground truth;
* cross-modal retrieval R@K on the cosine similarity of the per-modality embeddings, instance level
  (the query's own partner within the top K) and class level (a partner of the same class in the top K).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

from model.checkpoint import atomic_write, load_checkpoint
from model.infer import PreparedSplit, check_out_dir, predict, prepare_split, restrict, take, trained_modalities
from model.sacmf import SACMF, Detection

AP_MIN_SCORE = 0.01  # detections below this sigmoid score are not ranked for AP

# ----------------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------------


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """[C, C] int64 counts, rows = true class, columns = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * n_classes + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def classification_scores(cm: np.ndarray) -> dict[str, Any]:
    """Accuracy, per-class and macro / weighted / micro precision, recall and F1 from a confusion matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    support = cm.sum(1)
    predicted = cm.sum(0)
    precision = _div(tp, predicted)
    recall = _div(tp, support)
    f1 = _div(2 * precision * recall, precision + recall)
    n = cm.sum()
    used = (support + predicted) > 0  # classes seen in the truth or the predictions
    nan = float("nan")
    out: dict[str, Any] = {
        "n": int(n),
        "accuracy": float(tp.sum() / n) if n else nan,
        "per_class": {  # undefined scores NaN (null in metrics.json, n/a in report.md), not 0
            "precision": np.where(predicted > 0, precision, nan).tolist(),
            "recall": np.where(support > 0, recall, nan).tolist(),
            "f1": np.where(used, f1, nan).tolist(),
            "support": support.astype(int).tolist(),
        },
    }
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        out[f"macro_{name}"] = float(values[used].mean()) if used.any() else nan
        out[f"weighted_{name}"] = float((values * support).sum() / n) if n else nan
    micro = float(tp.sum() / n) if n else nan  # micro P = micro R = micro F1 = accuracy (single label)
    out["micro_precision"] = out["micro_recall"] = out["micro_f1"] = micro
    return out


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC = P(score of a random positive > that of a random negative), ties 1/2; NaN if undefined."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks for ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc_ovr(y_true: np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """One-vs-rest AUC per class (NaN where undefined) and its macro and support-weighted means."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs)
    per = np.array([binary_auc(probs[:, c], y_true == c) for c in range(probs.shape[1])])
    ok = np.isfinite(per)
    support = np.array([(y_true == c).sum() for c in range(probs.shape[1])], dtype=np.float64)
    return {
        "per_class": [None if not np.isfinite(v) else float(v) for v in per],
        "macro": float(per[ok].mean()) if ok.any() else float("nan"),
        "weighted": float((per[ok] * support[ok]).sum() / support[ok].sum()) if ok.any() else float("nan"),
    }


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """ECE = sum over bins |B|/n |accuracy(B) - mean confidence(B)|; bins (lo, hi], the first includes 0."""
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(1)
    correct = probs.argmax(1) == np.asarray(y_true)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)  # (lo, hi]
    bins, ece, n = [], 0.0, conf.size
    for b in range(n_bins):
        m = idx == b
        count = int(m.sum())
        acc = float(correct[m].mean()) if count else 0.0
        mean_conf = float(conf[m].mean()) if count else 0.0
        if count:
            ece += count / n * abs(acc - mean_conf)
        bins.append(
            {"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count, "accuracy": acc, "confidence": mean_conf}
        )
    return {"ece": float(ece), "bins": bins}


# ----------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [N, 4] and b [M, 4] (x0, y0, x1, y1) -> [N, M]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(hi - lo, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _match(
    dets: Sequence[Detection], gt_boxes: np.ndarray, gt_classes: np.ndarray, iou_thr: float, class_aware: bool
) -> list[tuple[int, float, bool]]:
    """Greedy matching in descending score: (class, score, true positive) per detection."""
    order = sorted(range(len(dets)), key=lambda j: -dets[j][5])
    used = np.zeros(len(gt_boxes), dtype=bool)
    iou = box_iou(np.array([d[:4] for d in dets]), gt_boxes) if len(dets) and len(gt_boxes) else None
    out = []
    for j in order:
        cls, score = int(dets[j][4]), float(dets[j][5])
        hit = False
        if iou is not None:
            cand = iou[j].copy()
            if class_aware:
                cand[gt_classes != cls] = -1.0
            k = int(cand.argmax())
            if cand[k] >= iou_thr and not used[k]:
                used[k] = hit = True
        out.append((cls, score, hit))
    return out


def average_precision(scores: np.ndarray, hits: np.ndarray, n_gt: int) -> float:
    """All-point interpolated AP: area under the precision envelope of the ranked detections."""
    if n_gt == 0:
        return float("nan")
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-np.asarray(scores), kind="stable")
    tp = np.asarray(hits, dtype=np.float64)[order]
    ctp, cfp = np.cumsum(tp), np.cumsum(1.0 - tp)
    recall = ctp / n_gt
    precision = ctp / (ctp + cfp)
    mrec = np.concatenate([[0.0], recall, [recall[-1]]])
    mpre = np.concatenate([[1.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    return float(np.sum((mrec[1:] - mrec[:-1]) * mpre[1:]))


def detection_scores(
    detections: Sequence[Sequence[Detection]],
    gt_boxes: Sequence[np.ndarray],
    gt_classes: Sequence[np.ndarray],
    n_classes: int,
    iou_thr: float = 0.5,
    score_threshold: float = 0.0,
) -> dict[str, Any]:
    """mAP@iou over classes with ground truth, and box P/R/F1 (class-aware and class-agnostic).

    AP ranks every detection given (decode with a low threshold so the ranking is complete); box
    P/R/F1 count only detections scoring at least ``score_threshold``, the operating point a user sees.
    Precision without detections and recall without ground truth are NaN: with no objects there is
    nothing to find, which is not the same as finding none of them. F1 = 2 TP / (2 TP + FP + FN), so
    it is 0 for a model that finds nothing among real objects and NaN only with neither objects nor
    detections.
    """
    triples = list(zip(detections, gt_boxes, gt_classes, strict=True))
    matched = [_match(d, b, c, iou_thr, True) for d, b, c in triples]
    flat = [m for per_image in matched for m in per_image]
    all_classes = [np.asarray(c, dtype=np.int64).reshape(-1) for c in gt_classes]
    n_gt = np.bincount(np.concatenate(all_classes) if all_classes else np.zeros(0, np.int64), minlength=n_classes)
    ap = []
    for c in range(n_classes):
        sel = [(s, h) for cls, s, h in flat if cls == c]
        ap.append(average_precision(np.array([s for s, _ in sel]), np.array([h for _, h in sel]), int(n_gt[c])))
    ap_arr = np.array(ap)
    out: dict[str, Any] = {
        "iou": iou_thr,
        "n_gt": int(n_gt.sum()),
        "n_det": len(flat),
        "ap_per_class": [None if not np.isfinite(v) else float(v) for v in ap_arr],
        "map": float(np.nanmean(ap_arr)) if np.isfinite(ap_arr).any() else float("nan"),
    }
    kept = [([x for x in d if x[5] >= score_threshold], b, c) for d, b, c in triples]
    aware = [m for d, b, c in kept for m in _match(d, b, c, iou_thr, True)]
    agnostic = [m for d, b, c in kept for m in _match(d, b, c, iou_thr, False)]
    out["score_threshold"] = score_threshold
    for name, res in (("box", aware), ("box_agnostic", agnostic)):
        tp = sum(h for _, _, h in res)
        precision = tp / len(res) if res else float("nan")
        recall = tp / int(n_gt.sum()) if n_gt.sum() else float("nan")
        denom = len(res) + int(n_gt.sum())  # (TP + FP) + (TP + FN); 2 TP / denom = 2PR / (P + R)
        f1 = 2 * tp / denom if denom else float("nan")
        out[f"{name}_precision"], out[f"{name}_recall"], out[f"{name}_f1"] = precision, recall, f1
    return out


# ----------------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------------


def retrieval_recall(
    query: np.ndarray, gallery: np.ndarray, labels: np.ndarray | None = None, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """R@K of cosine retrieval; query i's partner is gallery i (``instance``), or any same label (``class``)."""
    q = np.asarray(query, dtype=np.float64)
    g = np.asarray(gallery, dtype=np.float64)
    q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    sim = q @ g.T  # [n, n]
    n = sim.shape[0]
    own = sim[np.arange(n), np.arange(n)]
    rank = (sim > own[:, None]).sum(1)  # 0 = partner ranked first (ties in its favour)
    order = np.argsort(-sim, axis=1, kind="stable")
    out = {}
    for k in ks:
        out[f"instance_r@{k}"] = float((rank < k).mean()) if n else float("nan")
        if labels is not None:
            lab = np.asarray(labels)
            top = lab[order[:, : min(k, n)]]
            out[f"class_r@{k}"] = float((top == lab[:, None]).any(1).mean()) if n else float("nan")
    return out


# ----------------------------------------------------------------------------------------------------
# Latency
# ----------------------------------------------------------------------------------------------------


@torch.inference_mode()
def measure_latency(model: SACMF, tensors: dict[str, Tensor], batch: int, repeats: int, warmup: int = 2) -> float:
    """Median seconds of one eval forward of ``batch`` windows (first rows of ``tensors``), after warm-up."""
    model.eval()
    n = int(tensors["label"].shape[0])
    idx = torch.arange(batch) % n
    x = take(tensors, idx)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------------------
# sacmf evaluate
# ----------------------------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """Non-finite floats -> None, numpy scalars -> Python: strict JSON that every reader accepts."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _gt(split: PreparedSplit, given: Tensor) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Ground-truth boxes (model px) and classes per sample, and which samples can be scored.

    ``given`` is the presence mask the model actually ran with (after ``--modalities``), not the data's:
    boxes in an Image-A the model never received are not misses, so those samples are left out.
    """
    t = split.tensors
    boxes, classes = [], []
    for i in range(len(split)):
        v = t["box_valid"][i]
        boxes.append(t["boxes"][i][v].numpy())
        classes.append(t["box_classes"][i][v].numpy())
    usable = (t["boxes_known"] & given[:, 0]).numpy()
    return boxes, classes, usable


def _snr_subsets(split: PreparedSplit) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) masks; a sample is high only when both SNRs are labelled, else its SNR is unknown.

    The dataset reads a missing ``low_snr`` as False, so without this a split labelled without SNRs
    would land entirely in the high-SNR row.
    """
    low = np.asarray(split.low_snr, dtype=bool)
    known = low | (np.isfinite(split.snr_img) & np.isfinite(split.snr_seq))
    return low, known & ~low


def _subset_scores(y: np.ndarray, pred: np.ndarray, n_classes: int) -> dict[str, Any]:
    s = classification_scores(confusion_matrix(y, pred, n_classes))
    return {"n": s["n"], "accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "weighted_f1": s["weighted_f1"]}


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "n/a"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _report(m: dict[str, Any], names: Sequence[str]) -> str:
    """metrics.json -> report.md (markdown tables, every number from ``m``)."""
    c = m["classification"]
    lines = [
        f"# SA-CMF evaluation: `{m['data_root']}`",
        "",
        f"Checkpoint `{m['checkpoint']['path']}` (version `{m['checkpoint']['version']}`, sha256 "
        f"`{m['checkpoint']['sha256'][:12]}`), backbone `{m['checkpoint']['backbone']}`, modalities "
        f"{', '.join(m['modalities'])}; n = {c['n']} samples.",
        "",
        "## Classification",
        "",
        "| metric | macro | weighted | micro |",
        "|---|---|---|---|",
    ]
    for k in ("precision", "recall", "f1"):
        lines.append(f"| {k} | {_fmt(c['macro_' + k])} | {_fmt(c['weighted_' + k])} | {_fmt(c['micro_' + k])} |")
    lines += [
        "",
        "| accuracy | AUC (OvR, macro) | AUC (OvR, weighted) | ECE (10 bins) |",
        "|---|---|---|---|",
        f"| {_fmt(c['accuracy'])} | {_fmt(m['auc']['macro'])} | {_fmt(m['auc']['weighted'])} | {_fmt(m['ece'])} |",
        "",
        "| class | support | precision | recall | F1 | AUC |",
        "|---|---|---|---|---|---|",
    ]
    pc = c["per_class"]
    for i, name in enumerate(names):
        lines.append(
            f"| {name} | {pc['support'][i]} | {_fmt(pc['precision'][i])} | {_fmt(pc['recall'][i])} | "
            f"{_fmt(pc['f1'][i])} | {_fmt(m['auc']['per_class'][i])} |"
        )
    d = m["detection"]
    if d["n_samples"] == 0:
        lines += [
            "",
            "## Detection: not applicable",
            "",
            "No sample was given to the model with both an Image-A input and box labels (modalities "
            f"{', '.join(m['modalities'])}), so there is nothing to score: every detection metric is n/a "
            "(null in metrics.json), not 0.",
        ]
    else:
        lines += [
            "",
            f"## Detection (IoU {d['iou']}, {d['n_samples']} frames given to the model, {d['n_gt']} ground-truth "
            f"boxes; AP over {d['n_det']} detections scoring >= {AP_MIN_SCORE}, box P/R/F1 at score >= "
            f"{d['score_threshold']})",
            "",
            "| mAP | box P | box R | box F1 | class-agnostic P | class-agnostic R | class-agnostic F1 |",
            "|---|---|---|---|---|---|---|",
            f"| {_fmt(d['map'])} | {_fmt(d['box_precision'])} | {_fmt(d['box_recall'])} | {_fmt(d['box_f1'])} | "
            f"{_fmt(d['box_agnostic_precision'])} | {_fmt(d['box_agnostic_recall'])} | "
            f"{_fmt(d['box_agnostic_f1'])} |",
            "",
            "| class | AP |",
            "|---|---|",
            *[f"| {name} | {_fmt(d['ap_per_class'][i])} |" for i, name in enumerate(names)],
        ]
    r = m.get("retrieval")
    if r:
        lines += [
            "",
            f"## Cross-modal retrieval ({r['n']} samples with both modalities)",
            "",
            "| direction | level | R@1 | R@5 | R@10 |",
            "|---|---|---|---|---|",
        ]
        for direction in ("image_to_sequence", "sequence_to_image"):
            for level in ("instance", "class"):
                vals = [r[direction][f"{level}_r@{k}"] for k in (1, 5, 10)]
                lines.append(f"| {direction.replace('_', ' ')} | {level} | " + " | ".join(map(_fmt, vals)) + " |")
    rob = m.get("robustness")
    if rob:
        lines += [
            "",
            "## Missing-modality robustness (accuracy with a modality absent / full accuracy)",
            "",
            "| condition | accuracy | macro-F1 | retention |",
            "|---|---|---|---|",
            f"| both present | {_fmt(c['accuracy'])} | {_fmt(c['macro_f1'])} | 1.0000 |",
        ]
        for key in ("image_absent", "sequence_absent"):
            lines.append(
                f"| {key.replace('_', ' ')} | {_fmt(rob[key]['accuracy'])} | {_fmt(rob[key]['macro_f1'])} | "
                f"{_fmt(rob[key]['retention'])} |"
            )
        lines.append(f"| **mean retention** | | | **{_fmt(rob['mean_retention'])}** |")
    low = m["low_snr"]
    lines += [
        "",
        "## Low-SNR subset (image SNR < 6 or sequence SNR < 2)",
        "",
        "| subset | n | accuracy | macro-F1 | weighted F1 |",
        "|---|---|---|---|---|",
    ]
    for key in ("low_snr", "high_snr"):
        s = low[key]
        lines.append(f"| {key} | {s['n']} | {_fmt(s['accuracy'])} | {_fmt(s['macro_f1'])} | {_fmt(s['weighted_f1'])} |")
    if low["n_unknown"]:
        lines += ["", f"{low['n_unknown']} sample(s) without SNR labels are in neither subset."]
    lat = m["latency"]
    lines += [
        "",
        f"## Latency (model forward, eval mode, {lat['torch_threads']} torch thread(s), median of "
        f"{lat['repeats']} runs, {lat['machine']})",
        "",
        "| batch | ms per batch | ms per window | windows/s |",
        "|---|---|---|---|",
    ]
    for b in lat["batches"]:
        cells = (str(b["batch"]), f"{b['ms_per_batch']:.2f}", f"{b['ms_per_window']:.2f}", f"{b['windows_per_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Reading + preprocessing (files -> tensors, not included above): "
        f"{lat['preprocess_ms_per_window']:.2f} ms per window.",
        "",
        "Figures: `confusion_matrix.png`, `reliability.png`, `per_class.png`.",
        "",
    ]
    return "\n".join(lines)


def evaluate(
    data_root: str | os.PathLike[str],
    ckpt: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    batch_size: int = 64,
    repeats: int = 20,
    latency_batches: Sequence[int] = (1, 8),
    det_threshold: float = 0.3,
    modalities: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate ``ckpt`` on the labelled split ``data_root``; write metrics.json, report.md and PNGs."""
    from model import plots

    out = Path(out)
    check_out_dir(out)
    model, meta = load_checkpoint(ckpt)
    cfg = meta.config
    names = list(meta.class_names)
    n_classes = len(names)
    t0 = time.perf_counter()
    split = prepare_split(data_root, cfg)
    prep_ms = 1000 * (time.perf_counter() - t0) / len(split)  # includes reading the files
    mods = tuple(modalities) if modalities else trained_modalities(meta)
    tensors = restrict(split.tensors, mods)
    # decode down to a low score so AP sees the whole ranking; P/R/F1 use det_threshold
    preds = predict(model, tensors, batch_size=batch_size, det_threshold=AP_MIN_SCORE, det_k=100)
    y = split.labels.numpy()
    pred = preds.pred.numpy()
    probs = preds.probs.numpy()
    cm = confusion_matrix(y, pred, n_classes)
    cls = classification_scores(cm)
    auc = roc_auc_ovr(y, probs)
    ece = expected_calibration_error(probs, y)

    boxes, classes, usable = _gt(split, tensors["presence"])
    idx = np.flatnonzero(usable)
    det = detection_scores(
        [preds.detections[i] for i in idx],
        [boxes[i] for i in idx],
        [classes[i] for i in idx],
        n_classes,
        score_threshold=det_threshold,
    )
    det["n_samples"] = int(idx.size)

    metrics: dict[str, Any] = {
        "data_root": str(data_root),
        "checkpoint": {
            "path": str(meta.path),
            "version": meta.display_version,
            "sha256": meta.sha256,
            "backbone": cfg.backbone,
            "uniform_fusion": cfg.uniform_fusion,
        },
        "modalities": list(mods),
        "classification": cls,
        "confusion_matrix": cm.tolist(),
        "auc": auc,
        "ece": ece["ece"],
        "calibration_bins": ece["bins"],
        "detection": det,
        "mi_nats": preds.mi_nats,
        "mean_modality_weights": preds.modality_weights.double().mean(0).tolist(),
    }

    both = preds.present.all(1).numpy()
    if both.sum() >= 2:
        ei, es, yb = preds.emb_img.numpy()[both], preds.emb_seq.numpy()[both], y[both]
        metrics["retrieval"] = {
            "n": int(both.sum()),
            "image_to_sequence": retrieval_recall(ei, es, yb),
            "sequence_to_image": retrieval_recall(es, ei, yb),
        }

    if len(mods) == 2:
        rob: dict[str, Any] = {}
        for key, keep in (("image_absent", ("sequence",)), ("sequence_absent", ("image",))):
            p = predict(model, restrict(tensors, keep), batch_size=batch_size, det_k=1)
            s = _subset_scores(y, p.pred.numpy(), n_classes)
            s["retention"] = s["accuracy"] / cls["accuracy"] if cls["accuracy"] > 0 else float("nan")
            rob[key] = s
        rob["mean_retention"] = 0.5 * (rob["image_absent"]["retention"] + rob["sequence_absent"]["retention"])
        metrics["robustness"] = rob

    low, high = _snr_subsets(split)
    metrics["low_snr"] = {
        "low_snr": _subset_scores(y[low], pred[low], n_classes),
        "high_snr": _subset_scores(y[high], pred[high], n_classes),
        "n_unknown": int((~low & ~high).sum()),
    }

    lat_batches = []
    for b in latency_batches:
        sec = measure_latency(model, tensors, b, repeats)
        lat_batches.append(
            {"batch": b, "ms_per_batch": 1000 * sec, "ms_per_window": 1000 * sec / b, "windows_per_s": b / sec}
        )
    metrics["latency"] = {
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "batches": lat_batches,
        "preprocess_ms_per_window": prep_ms,
    }

    out.mkdir(parents=True, exist_ok=True)
    metrics = jsonable(metrics)
    atomic_write(out / "metrics.json", (json.dumps(metrics, indent=2, allow_nan=False) + "\n").encode())
    atomic_write(out / "report.md", _report(metrics, names).encode())
    plots.save_confusion_matrix(cm, names, out / "confusion_matrix.png")
    plots.save_reliability(ece["bins"], ece["ece"], out / "reliability.png")
    pc = cls["per_class"]
    plots.save_bars(
        {"precision": pc["precision"], "recall": pc["recall"], "F1": pc["f1"]},
        names,
        out / "per_class.png",
        "per-class scores",
    )
    return metrics
