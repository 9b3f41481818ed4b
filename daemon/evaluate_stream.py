"""`sacmf evaluate-stream`: replay a recording that carries ground truth and score the stream.

Why a replay and not the recorded results: a replay is deterministic (daemon/replay.py), so the scores
belong to the model and the config, not to how loaded the machine was during the live run; the
recorded results are still used for what only the live run can tell, its latencies.

Ground truth comes from the recording itself: the simulator (daemon/simulate.py) puts each scene's
truth in the ``meta`` of its messages (``{"truth": {"t0", "t1", "target", "boxes", "classes"}}``, times
on the sensor clock). A result window is joined to the scene whose span contains the window's centre,
after the configured clock offset of the sensor that carried the truth; a window without a scene is
counted but not scored.

Scores (the method's conventions, sacmf.md §1.2): the window target's classification (accuracy,
macro-F1 over the classes that occur, per-class P/R/F1, confusion matrix) and detection P/R/F1 at an
IoU threshold (greedy matching by score, class-agnostic and class-aware), both at the daemon's
operating point (``[model] det_threshold``). Plus latency percentiles and how the fusion weights behave
over time and by true class, with plots (matplotlib, Agg), a JSON report and a markdown report.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from daemon.config import Config
from daemon.replay import ReplayReport, recorded_inputs, recorded_results, replay
from daemon.simulate import SceneTruth
from model.evaluate import classification_scores, confusion_matrix, detection_scores, jsonable
from sinks.jsonl import JsonlSink
from sinks.record import ResultRecord, final_revisions

PERCENTILES = (50, 90, 99)


# ---------------------------------------------------------------- ground truth


def recorded_truth(path: str | os.PathLike[str], cfg: Config | None = None) -> dict[str, list[SceneTruth]]:
    """Per group, the scenes found in the messages' ``meta``, sorted by start, times corrected by the
    configured clock offsets; the form with boxes wins when a scene came both ways."""
    found: dict[tuple[str, int], SceneTruth] = {}
    for _, frames in recorded_inputs(path):
        if len(frames) < 2:
            continue
        try:
            header = msgpack.unpackb(frames[1], raw=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            continue
        truth = SceneTruth.from_meta(header.get("meta") if isinstance(header, dict) else None)
        if truth is None:
            continue
        group, sensor = header.get("group"), header.get("sensor")
        g = cfg.ingest.groups.get(group) if cfg is not None else None
        offset = g.offsets_ns.get(sensor, 0) if g is not None else 0
        key = (str(group), truth.t0_ns)  # the scene's own start: one scene, whatever each sensor's offset
        if offset:
            truth = SceneTruth(**{**truth.__dict__, "t0_ns": truth.t0_ns + offset, "t1_ns": truth.t1_ns + offset})
        if key not in found or (truth.has_boxes and not found[key].has_boxes):
            found[key] = truth
    out: dict[str, list[SceneTruth]] = defaultdict(list)
    for (group, _), truth in sorted(found.items()):
        out[group].append(truth)
    return dict(out)


def join(results: Sequence[ResultRecord], truth: dict[str, list[SceneTruth]]) -> list[SceneTruth | None]:
    """The scene containing each result window's centre, or None."""
    starts = {g: [t.t0_ns for t in ts] for g, ts in truth.items()}
    out: list[SceneTruth | None] = []
    for r in results:
        scenes = truth.get(r.group, [])
        centre = (r.start_ns + r.end_ns) // 2
        i = bisect.bisect_right(starts.get(r.group, []), centre) - 1
        out.append(scenes[i] if i >= 0 and scenes[i].t0_ns <= centre < scenes[i].t1_ns else None)
    return out


# ---------------------------------------------------------------- metrics


def classification(y_true: Sequence[str], y_pred: Sequence[str], class_names: Sequence[str]) -> dict:
    """:func:`model.evaluate.classification_scores` on class names, reshaped for the report.

    A true class the model does not know is appended to the label list (it can only be missed).
    ``confusion[i][j]`` counts windows of true class ``labels[i]`` predicted as ``labels[j]``.
    """
    labels = list(class_names) + sorted({*y_true, *y_pred} - set(class_names))
    index = {c: i for i, c in enumerate(labels)}
    cm = confusion_matrix(np.array([index[c] for c in y_true]), np.array([index[c] for c in y_pred]), len(labels))
    s = classification_scores(cm)
    pc = s["per_class"]
    per_class = {
        c: {"precision": pc["precision"][i], "recall": pc["recall"][i], "f1": pc["f1"][i], "support": pc["support"][i]}
        for c, i in index.items()
        if cm[i].sum() or cm[:, i].sum()
    }
    return jsonable(
        {  # undefined scores (NaN) are null
            "n": s["n"],
            "accuracy": s["accuracy"],
            "macro_f1": s["macro_f1"],
            "weighted_f1": s["weighted_f1"],
            "per_class": per_class,
            "labels": labels,
            "confusion": cm.tolist(),
        }
    )


def detection(pairs: Sequence[tuple[ResultRecord, SceneTruth]], class_names: Sequence[str], iou: float) -> dict:
    """:func:`model.evaluate.detection_scores` on the published detections (already cut at the daemon's
    ``det_threshold``, so AP ranks only those) against the truth boxes; unknown truth classes never match."""
    index = {c: i for i, c in enumerate(class_names)}
    unknown = len(class_names)
    dets = [[(*d.box, index[d.cls], d.score, ()) for d in r.detections] for r, _ in pairs]
    boxes = [np.asarray(t.boxes, dtype=np.float64).reshape(-1, 4) for _, t in pairs]
    classes = [np.array([index.get(c, unknown) for c in t.classes], dtype=np.int64) for _, t in pairs]
    s = detection_scores(dets, boxes, classes, unknown + 1, iou_thr=iou)
    ap = {c: s["ap_per_class"][i] for c, i in index.items() if s["ap_per_class"][i] is not None}
    return jsonable(
        {
            "iou": iou,
            "windows": len(pairs),
            "objects": s["n_gt"],
            "detections": s["n_det"],
            "map": s["map"],
            "ap_per_class": ap,
            "class_agnostic": {k: s[f"box_agnostic_{k}"] for k in ("precision", "recall", "f1")},
            "class_aware": {k: s[f"box_{k}"] for k in ("precision", "recall", "f1")},
        }
    )  # undefined (NaN: mAP or precision without detections, recall without objects) is null, not 0


def percentiles(values: Sequence[float]) -> dict | None:
    if not values:
        return None
    v = np.asarray(values, dtype=np.float64)
    return {"n": int(v.size), **{f"p{q}": float(np.percentile(v, q)) for q in PERCENTILES}, "max": float(v.max())}


def _stats(values: Sequence[float]) -> dict | None:
    if not values:
        return None
    v = np.asarray(values, dtype=np.float64)
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "max": float(v.max()),
    }


# ---------------------------------------------------------------- the evaluation


@dataclass
class Evaluation:
    report: dict
    files: list[Path]
    replay: ReplayReport


PLOTS = ("fusion_over_time.png", "fusion_by_class.png", "confusion.png", "latency.png")


def evaluate(
    path: str | os.PathLike[str],
    cfg: Config,
    out_dir: str | os.PathLike[str],
    *,
    speed: float | None = None,
    batch_size: int | None = None,
    iou: float = 0.5,
    fusion: Any = None,
) -> Evaluation:
    """Replay ``path``, score it against its truth, write report.json, report.md and the plots.

    ``fusion``: the ``[image_fusion]`` stage the served model expects (None: off), applied as in the daemon.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    truth = recorded_truth(path, cfg)
    live = recorded_results(path)
    for name in ("results.jsonl", *PLOTS):  # this run's outputs only: an earlier run's plots must not stay
        (out / name).unlink(missing_ok=True)
    sink = JsonlSink(out / "results.jsonl", max_bytes=2**40, backups=0, fsync="never")
    try:
        rep = replay(path, cfg, speed=speed, batch_size=batch_size, sinks=[sink], fusion=fusion)
    finally:
        sink.close()
    results = final_revisions(rep.results)  # late_policy "update": score each window's last revision
    live = [r for r in live if r.revision == 0]  # latency: a window's first result, not its late updates
    scenes = join(results, truth)
    scored = [(r, t) for r, t in zip(results, scenes, strict=True) if t is not None]
    class_names = list(results[0].class_names) if results else []
    cls = (
        classification([t.target for _, t in scored], [r.target_class for r, _ in scored], class_names)
        if scored
        else None
    )
    with_boxes = [(r, t) for r, t in scored if t.has_boxes and r.presence.get("image_a", False)]
    det = detection(with_boxes, class_names, iou) if with_boxes else None
    both = [r for r in results if r.fusion.image > 0 and r.fusion.sequence > 0]
    by_class: dict[str, list[ResultRecord]] = defaultdict(list)  # as the headline: windows with both modalities
    for r, t in scored:
        if r.fusion.image > 0 and r.fusion.sequence > 0:
            by_class[t.target].append(r)
    report = {
        "recording": str(path),
        "model_version": rep.model_version,
        "windows": len(results),
        "window_updates": len(rep.results) - len(results),
        "windows_with_truth": len(scored),
        "truth_targets": dict(Counter(t.target for _, t in scored)),
        "classification": cls,
        "detection": det,
        "latency_s": {
            "live": percentiles([r.latency_s for r in live]),
            # paced replay only: at --max the sender runs ahead of the model, so the "recording clock" is the
            # end of the recording and these numbers would only say how far from it each window is
            "replay_recording_clock": None
            if speed is None
            else percentiles([r.latency_s for r in rep.results if r.revision == 0]),
        },
        "fusion": {
            "image": _stats([r.fusion.image for r in both]),
            "sequence": _stats([r.fusion.sequence for r in both]),
            "windows_with_both_modalities": len(both),
            "by_true_class": {
                c: {"image": _stats([r.fusion.image for r in rs]), "sequence": _stats([r.fusion.sequence for r in rs])}
                for c, rs in sorted(by_class.items())
            },
            "mi_nats": _stats([r.mi_nats for r in results if r.mi_nats is not None]),
        },
        "replay": {
            "speed": speed,
            "batch_size": batch_size or cfg.inference.max_batch_size,
            "messages": rep.messages,
            "rejected": rep.rejected,
            "late_records": len(rep.late),
            "windows_flushed": rep.flushed,
            "windows_failed": rep.failed,
            "recording_damage": rep.damage.describe() if rep.damage.lost else None,
            # an unfinished file cut inside a record: the expected tail of a crash; the cut window scores
            # on what was recorded of it
            "recording_truncated": rep.damage.truncated,
            "image_fusion": fusion.identity if fusion is not None else None,
            "image_fusion_failed": rep.fusion_failed,
            "wall_s": rep.wall_s,
            "windows_per_s": len(results) / rep.wall_s if rep.wall_s > 0 else None,
        },
    }
    files = [out / "results.jsonl"]
    files += _plots(out, results, scenes, live, cls, replay_latency=speed is not None)
    report["plots"] = [f.name for f in files if f.suffix == ".png"]
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text(markdown(report))
    files += [out / "report.json", out / "report.md"]
    return Evaluation(report, files, rep)


# ---------------------------------------------------------------- plots


def _plots(
    out: Path,
    results: Sequence[ResultRecord],
    scenes: Sequence[SceneTruth | None],
    live: Sequence[ResultRecord],
    cls: dict | None,
    *,
    replay_latency: bool,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    from matplotlib.figure import Figure  # the OO API: no global pyplot state

    files = []
    if not results:
        return files
    t0 = results[0].start_ns
    t = np.array([(r.start_ns + r.end_ns) / 2e9 - t0 / 1e9 for r in results])
    classes = sorted({s.target for s in scenes if s is not None})
    cmap = matplotlib.colormaps["tab10"]
    colour = {c: cmap(i % 10) for i, c in enumerate(classes)}

    # 1. fusion weights and MI over time, on the true class of each window
    fig = Figure(figsize=(11, 6), layout="constrained")
    ax, ax_mi = fig.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    for r, s, x in zip(results, scenes, t, strict=True):
        if s is not None:
            half = (r.end_ns - r.start_ns) / 2e9
            ax.axvspan(x - half, x + half, color=colour[s.target], alpha=0.18, lw=0)
    ax.plot(t, [r.fusion.image for r in results], "-o", ms=4, label="image weight", color="royalblue")
    ax.plot(t, [r.fusion.sequence for r in results], "--s", ms=3, label="sequence weight", color="darkorange")
    ax.set_ylim(0, 1)
    ax.set_ylabel("modality weight")
    handles, labels = ax.get_legend_handles_labels()
    from matplotlib.patches import Patch

    handles += [Patch(color=colour[c], alpha=0.3) for c in classes]
    labels += [f"truth: {c}" for c in classes]
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.set_title("SA-CMF fusion weights per window (background: true target class)")
    mi = [r.mi_nats if r.mi_nats is not None else np.nan for r in results]
    ax_mi.plot(t, mi, "-", color="grey")
    ax_mi.set_ylabel("MI (nats)")
    ax_mi.set_xlabel("window centre, s since the first window")
    files.append(_save(fig, out / "fusion_over_time.png"))

    # 2. image weight by true class
    if classes:
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        ax = fig.subplots()
        data = [
            [r.fusion.image for r, s in zip(results, scenes, strict=True)
             if s and s.target == c and r.fusion.image > 0 and r.fusion.sequence > 0]
            for c in classes
        ]  # fmt: skip
        ax.boxplot(data, tick_labels=classes, showmeans=True)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("image weight (sequence = 1 - image)")
        ax.set_title("Does the model lean on the image or the light curve, by true class?")
        ax.tick_params(axis="x", labelrotation=20)
        files.append(_save(fig, out / "fusion_by_class.png"))

    # 3. confusion matrix
    if cls is not None:
        conf = np.array(cls["confusion"])
        keep = [i for i in range(len(cls["labels"])) if conf[i].sum() or conf[:, i].sum()]
        conf = conf[np.ix_(keep, keep)]
        names = [cls["labels"][i] for i in keep]
        fig = Figure(figsize=(7, 6), layout="constrained")
        ax = fig.subplots()
        frac = conf / np.maximum(conf.sum(1, keepdims=True), 1)
        im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(len(names)):
            for j in range(len(names)):
                ink = "white" if frac[i, j] > 0.5 else "black"
                ax.text(
                    j,
                    i,
                    str(conf[i, j]),
                    ha="center",
                    va="center",
                    color=ink,
                    fontweight="bold" if i == j else "normal",
                )
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("predicted target class")
        ax.set_ylabel("true target class")
        acc, f1 = cls["accuracy"], cls["macro_f1"]
        ax.set_title(f"Window target class (n={cls['n']})\naccuracy {acc:.2f}, macro-F1 {f1:.2f}")
        fig.colorbar(im, ax=ax, label="fraction of the true class")
        files.append(_save(fig, out / "confusion.png"))

    # 4. latency
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    series = [("live (recorded results)", [r.latency_s for r in live], "seagreen")]
    if replay_latency:  # paced replays only (see the report)
        series.append(("replay, recording clock", [r.latency_s for r in results], "slateblue"))
    for label, values, c in series:
        if not values:
            continue
        ax.hist(values, bins=30, alpha=0.5, color=c, label=label)
        for q, ls in zip(PERCENTILES, ("-", "--", ":"), strict=True):
            ax.axvline(float(np.percentile(values, q)), color=c, ls=ls, lw=1)
    ax.set_xlabel("latency: window end (event time) -> result, s   (lines: p50 solid, p90 dashed, p99 dotted)")
    ax.set_ylabel("windows")
    ax.legend()
    ax.set_title("Result latency")
    files.append(_save(fig, out / "latency.png"))
    return files


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path


# ---------------------------------------------------------------- markdown


def _f(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(report: dict) -> str:
    """The JSON report for people: headline numbers first, then tables, then the plots."""
    lines = [f"# Stream evaluation: `{report['recording']}`", ""]
    lines += [f"Model `{report['model_version']}`; {report['windows']} windows replayed, "]
    lines[-1] += f"{report['windows_with_truth']} with ground truth."
    if report.get("window_updates"):
        lines[-1] += (
            f" Late data updated windows {report['window_updates']} times (late_policy = update): each window is"
            " scored by its last revision, latencies are those of its first result."
        )
    cls = report["classification"]
    if cls:
        lines += ["", "## Target classification", ""]
        lines += [
            f"Accuracy **{_f(cls['accuracy'])}**, macro-F1 **{_f(cls['macro_f1'])}** over {cls['n']} windows.",
            "",
        ]
        lines += ["| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        for c, m in cls["per_class"].items():
            lines.append(f"| {c} | {_f(m['precision'])} | {_f(m['recall'])} | {_f(m['f1'])} | {m['support']} |")
    else:
        lines += ["", "No ground truth in this recording: classification and detection are not scored."]
    det = report["detection"]
    if det:
        lines += ["", f"## Detection (IoU >= {det['iou']}, {det['windows']} frames, {det['objects']} objects)", ""]
        lines += [f"{det['detections']} published detections; mAP over them {_f(det['map'])}.", ""]
        lines += ["| matching | precision | recall | F1 |", "|---|---|---|---|"]
        for key in ("class_agnostic", "class_aware"):
            m = det[key]
            lines.append(f"| {key.replace('_', '-')} | {_f(m['precision'])} | {_f(m['recall'])} | {_f(m['f1'])} |")
    lines += ["", "## Latency (s)", "", "| source | n | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|"]
    for key, label in (("live", "live run (recorded results)"), ("replay_recording_clock", "replay, recording clock")):
        m = report["latency_s"][key]
        if m:
            lines.append(f"| {label} | {m['n']} | {_f(m['p50'])} | {_f(m['p90'])} | {_f(m['p99'])} | {_f(m['max'])} |")
        elif key == "replay_recording_clock" and report["replay"]["speed"] is None:
            lines.append(f"| {label} | | not measured at --max (the replay runs ahead of the model) | | | |")
        else:
            lines.append(f"| {label} | 0 | n/a | n/a | n/a | n/a |")
    fu = report["fusion"]
    lines += ["", "## Fusion weights", ""]
    img, mi = fu["image"] or {}, fu["mi_nats"] or {}
    lines.append(
        f"Windows with both modalities: {fu['windows_with_both_modalities']}; "
        f"image weight mean {_f(img.get('mean'))} (std {_f(img.get('std'))}); "
        f"MI mean {_f(mi.get('mean'))} nats (min {_f(mi.get('min'))}, max {_f(mi.get('max'))})."
    )
    if fu["by_true_class"]:
        lines += ["", "| true class | windows | image weight mean | sequence weight mean |", "|---|---|---|---|"]
        for c, m in fu["by_true_class"].items():
            n = m["image"]["n"] if m["image"] else 0
            i_mean = m["image"]["mean"] if m["image"] else None
            s_mean = m["sequence"]["mean"] if m["sequence"] else None
            lines.append(f"| {c} | {n} | {_f(i_mean)} | {_f(s_mean)} |")
    rp = report["replay"]
    lines += ["", "## Replay", ""]
    lines.append(
        f"{rp['messages']} input messages, {sum(rp['rejected'].values())} rejected, {rp['late_records']} late, "
        f"{rp['windows_flushed']} windows flushed at the end, {rp['windows_failed']} failed; "
        f"{_f(rp['wall_s'], 2)} s wall ({_f(rp['windows_per_s'], 1)} windows/s, batch {rp['batch_size']})."
    )
    if rp.get("recording_damage"):
        lines.append(
            f"**The recording is damaged** ({rp['recording_damage']}): the windows around the damage were scored on "
            "incomplete input, or not at all."
        )
    if rp.get("recording_truncated"):
        lines.append(
            "The recording ends cut short (a writer that crashed): its last window was scored on what it holds."
        )
    if rp.get("image_fusion"):
        f = rp["image_fusion"]
        lines.append(
            f"Image-A pixel-fused with Image-B by {f['method']} (weights sha256 {f['sha256'] or 'n/a'}) before the "
            f"model; {rp['image_fusion_failed']} window(s) failed their fusion."
        )
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"
