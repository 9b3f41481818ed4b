"""Training, exact resume, ``sacmf test`` and ``sacmf evaluate`` for real, plus hand-checked metric cases.

Every run uses the tiny backbone on a small generated set (32 px frames, 64-sample light curves) so the
whole file stays fast on a loaded 2-core machine; nothing is mocked.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daemon.cli import main as cli_main
from model.checkpoint import load_checkpoint
from model.evaluate import (
    average_precision,
    binary_auc,
    box_iou,
    classification_scores,
    confusion_matrix,
    detection_scores,
    evaluate,
    expected_calibration_error,
    jsonable,
    retrieval_recall,
    roc_auc_ovr,
)
from model.infer import parse_modalities, prepare_split, restrict, run_test, sibling_b_dir
from model.preprocess import ROLES
from model.sacmf import SACMFConfig, build_model, decode_detections
from model.synth import LABELS_FILE, SynthConfig, write_dataset
from model.train import TrainOptions, TrainResult, augment_presence, train, validate
from tests.service_helpers import TINY as TINY_BASE

torch.set_num_threads(1)

# dropout non-zero so that an exact resume has to restore the dropout RNG too
TINY = dataclasses.replace(TINY_BASE, dropout=0.1)
N_TRAIN, N_VAL, N_TEST = 40, 16, 16


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, N_TRAIN, N_VAL, N_TEST, seed=3, cfg=SynthConfig(size=32, seq_len=64))
    return root


def _opts(data: Path, out: Path, **kw) -> TrainOptions:
    base = dict(
        data_root=data / "train",
        val_root=data / "val",
        out=out,
        model=TINY,
        batch_size=8,
        epochs=3,
        lr=3e-3,
        warmup_steps=4,
        seed=0,
        progress=False,
        plots=False,
    )
    return TrainOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(data: Path, tmp_path_factory) -> TrainResult:
    return train(_opts(data, tmp_path_factory.mktemp("ckpt"), epochs=4, plots=True))


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.load()  # decodes the whole file
        return img.size


# ----------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_writes_its_files(trained: TrainResult, data: Path):
    # same data, eval mode, before vs after: the loss the run optimised must have dropped clearly
    split = prepare_split(data / "train", TINY)
    torch.manual_seed(0)
    initial = validate(build_model(TINY), split.tensors, TINY, 64)
    model, meta = load_checkpoint(trained.last_path)
    final = validate(model, split.tensors, TINY, 64)
    assert final["total"] < 0.9 * initial["total"], (initial["total"], final["total"])
    assert final["det"] < initial["det"]
    assert trained.history[-1]["train"]["total"] < 0.9 * trained.history[0]["train"]["total"]

    assert trained.epochs_done == 4 and trained.stop_reason == "epochs"
    doc = json.loads((trained.out / "metrics.json").read_text())
    assert [e["epoch"] for e in doc["epochs"]] == [1, 2, 3, 4]
    for e in doc["epochs"]:
        assert set(e["train"]) >= {"total", "cls", "sim", "mi", "det", "aux", "mi_nats"}
        for key in ("accuracy", "macro_f1", "weighted_f1", "ece", "image_weight"):
            assert 0.0 <= e["val"][key] <= 1.0, (key, e["val"][key])
    scores = [e["val"]["macro_f1"] for e in doc["epochs"]]
    assert trained.best_epoch == 1 + int(np.argmax(scores)) and trained.best_score == pytest.approx(max(scores))
    _, best_meta = load_checkpoint(trained.best_path)
    assert best_meta.training["epoch"] == trained.best_epoch and best_meta.resume is None
    assert meta.resume is not None and meta.training["modalities"] == ["image", "sequence"]
    for name in ("curves_loss.png", "curves_val.png"):
        w, h = _png(trained.out / name)
        assert w > 100 and h > 100


def test_resume_reproduces_an_uninterrupted_run(data: Path, tmp_path: Path):
    straight = train(_opts(data, tmp_path / "a", epochs=2))
    first = train(_opts(data, tmp_path / "b", epochs=2, stop_after_epochs=1))
    assert first.stop_reason == "stop_after_epochs" and first.epochs_done == 1
    resumed = train(_opts(data, tmp_path / "b", epochs=2, resume=True))
    assert resumed.epochs_done == 2
    a, _ = load_checkpoint(straight.last_path)
    b, _ = load_checkpoint(resumed.last_path)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)

    def strip(history):
        return [{k: v for k, v in h.items() if k != "time_s"} for h in history]

    assert strip(json.loads(json.dumps(resumed.history))) == strip(json.loads(json.dumps(straight.history)))
    with pytest.raises(ValueError, match="options differ.*lr"):
        train(_opts(data, tmp_path / "b", epochs=3, lr=1e-3, resume=True))


def test_missing_modality_augmentation_keeps_something_and_never_image_a_alone():
    gen = torch.Generator().manual_seed(0)
    full = torch.ones(4000, 4, dtype=torch.bool)
    out = augment_presence(full, gen, 0.5)
    dropped = (~out).any(1).float().mean().item()
    assert 0.45 < dropped < 0.55
    assert out.any(1).all()
    ia, ib = ROLES.index("image_a"), ROLES.index("image_b")
    assert not (~out[:, ia] & out[:, ib]).any()  # boxes are in Image-A pixels: it never goes alone
    whole_image = (~out[:, :2]).all(1).float().mean().item()
    assert 0.1 < whole_image < 0.2  # 0.5 * 0.3
    assert torch.equal(augment_presence(full, gen, 0.0), full)
    image_only = full.clone()
    image_only[:, 2:] = False
    out = augment_presence(image_only, gen, 0.9)
    assert out.any(1).all() and not out[:, 2:].any()


def test_single_modality_and_no_mi_ablations(data: Path, tmp_path: Path):
    assert parse_modalities("sequence, image") == ("image", "sequence")
    with pytest.raises(ValueError):
        parse_modalities("image,radar")
    batch = {"presence": torch.ones(3, 4, dtype=torch.bool), "x": torch.zeros(3)}
    assert restrict(batch, ("image",))["presence"].tolist() == [[True, True, False, False]] * 3
    assert batch["presence"].all()  # the input is not modified

    cfg = SACMFConfig(**{**TINY.to_dict(), "uniform_fusion": True, "lambda_mi": 0.0})
    res = train(_opts(data, tmp_path / "seq", model=cfg, modalities=("sequence",), epochs=1))
    doc = json.loads((res.out / "metrics.json").read_text())
    assert doc["epochs"][0]["train"]["mi"] == 0.0  # uniform fusion: no MI loss
    model, meta = load_checkpoint(res.best_path)
    assert meta.config.uniform_fusion and meta.training["modalities"] == ["sequence"]
    split = prepare_split(data / "val", cfg)
    with torch.no_grad():
        out = model(restrict(split.tensors, ("sequence",)))
    assert torch.all(out["modality_weights"][:, 0] == 0) and torch.all(out["modality_weights"][:, 1] == 1)
    w = out["token_weights_seq"]
    assert torch.all((w == 0) | ((w - w[w > 0].max()).abs() < 1e-6))  # uniform over valid tokens


# ----------------------------------------------------------------------------------------------------
# sacmf test / sacmf evaluate
# ----------------------------------------------------------------------------------------------------


def test_decoded_detections_carry_the_class_probabilities_at_their_cell():
    c, h = 3, 4
    logits = torch.full((1, c, h, h), -9.0)
    logits[0, :, 1, 2] = torch.tensor([2.0, 0.0, -1.0])  # one peak, class 0
    out = {
        "det_logits": logits,
        "det_size": torch.ones(1, 2, h, h),
        "det_offset": torch.full((1, 2, h, h), 0.5),
        "det_stride": torch.tensor(4.0),
    }
    (det,) = decode_detections(out, k=5, threshold=0.6)[0]
    x0, y0, x1, y1, cls, score, probs = det
    assert (x0, y0, x1, y1) == (8.0, 4.0, 12.0, 8.0) and cls == 0
    sig = torch.sigmoid(torch.tensor([2.0, 0.0, -1.0])).double()
    assert score == pytest.approx(float(sig[0]))
    np.testing.assert_allclose(probs, (sig / sig.sum()).numpy(), rtol=1e-6)


def test_test_command_writes_records_and_pictures(trained: TrainResult, data: Path, tmp_path: Path):
    out = tmp_path / "outputs"
    test_dir = data / "test"
    rc = cli_main(
        [
            "test",
            "--image-dir",
            str(test_dir / "Image-A"),
            "--seq-dir",
            str(test_dir / "Seq-A"),
            "--ckpt",
            str(trained.best_path),
            "--vis",
            "--out",
            str(out),
            "--det-threshold",
            "0.05",
        ]
    )
    assert rc == 0
    label_records = [json.loads(line) for line in (test_dir / LABELS_FILE).read_text().splitlines()]
    labels = {r["id"]: r["class"] for r in label_records}
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == sorted(labels)
    names = list(TINY.class_names)
    n_dets = 0
    for rec in records:
        assert json.loads((out / "json" / f"{rec['id']}.json").read_text()) == rec
        assert all(rec["presence"].values())  # the B folders were found beside the A folders
        assert sum(rec["class_probs"].values()) == pytest.approx(1.0, abs=1e-4)
        assert rec["class"] == max(rec["class_probs"], key=rec["class_probs"].get)
        assert rec["true_class_index"] == labels[rec["id"]]
        assert rec["fusion"]["image"] + rec["fusion"]["sequence"] == pytest.approx(1.0, abs=1e-4)
        assert len(rec["fusion"]["tokens_image"]) == 2 * TINY.token_grid**2
        for det in rec["detections"]:
            x0, y0, x1, y1 = det["box"]
            assert 0 <= x0 <= x1 <= 32 and 0 <= y0 <= y1 <= 32  # Image-A px of a 32 px frame
            assert det["class"] in names and 0.05 <= det["score"] <= 1
            assert sum(det["class_probs"]) == pytest.approx(1.0, abs=1e-3)
        n_dets += len(rec["detections"])
        for sub in ("detections", "heatmaps", "fusion_weights"):
            w, h = _png(out / sub / f"{rec['id']}.png")
            assert w >= 128 and h >= 128
    assert n_dets > 0

    # only the A folders, one light curve missing: B inputs are absent, and that sample has no sequence
    lone = tmp_path / "lone"
    shutil.copytree(test_dir / "Image-A", lone / "Image-A")
    shutil.copytree(test_dir / "Seq-A", lone / "Seq-A")
    gone = sorted(labels)[0]
    (lone / "Seq-A" / f"{gone}.npy").unlink()
    assert sibling_b_dir(lone / "Seq-A") == lone / "Seq-B"
    summary = run_test(trained.best_path, tmp_path / "out2", image_dir=lone / "Image-A", seq_dir=lone / "Seq-A")
    assert summary["n"] == N_TEST and summary["folders"]["image_b"] is None and "accuracy" not in summary
    recs = {json.loads(x)["id"]: json.loads(x) for x in (tmp_path / "out2" / "results.jsonl").read_text().splitlines()}
    for sid, rec in recs.items():
        assert not rec["presence"]["image_b"] and not rec["presence"]["seq_b"]
        assert rec["presence"]["seq_a"] == (sid != gone)
    assert recs[gone]["fusion"]["sequence"] == 0.0 and recs[gone]["fusion"]["image"] == pytest.approx(1.0)
    assert not (tmp_path / "out2" / "detections").exists()  # no --vis, no pictures


def test_evaluate_command_writes_sane_metrics_report_and_plots(trained: TrainResult, data: Path, tmp_path: Path):
    out = tmp_path / "eval"
    rc = cli_main(
        ["evaluate", "--data-root", str(data / "test"), "--ckpt", str(trained.best_path), "--out", str(out)]
        + ["--repeats", "2"]
    )
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    c = m["classification"]
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (6, 6) and cm.sum() == N_TEST == c["n"]
    assert c["accuracy"] == pytest.approx(np.trace(cm) / N_TEST)
    assert c["per_class"]["support"] == cm.sum(1).tolist()
    unit = [c[f"{avg}_{k}"] for avg in ("macro", "weighted", "micro") for k in ("precision", "recall", "f1")]
    unit += [c["accuracy"], m["ece"], m["auc"]["macro"], m["auc"]["weighted"]]
    d = m["detection"]
    unit += [d["map"], d["box_recall"], d["box_f1"], d["box_agnostic_f1"]]  # defined: the frames have objects
    # precision is undefined (null) when no detection reaches the threshold, as a briefly trained model may
    unit += [d[k] for k in ("box_precision", "box_agnostic_precision") if d[k] is not None]
    unit += [v for direction in ("image_to_sequence", "sequence_to_image") for v in m["retrieval"][direction].values()]
    unit += [m["low_snr"][k]["accuracy"] for k in ("low_snr", "high_snr") if m["low_snr"][k]["n"]]
    assert all(0.0 <= v <= 1.0 for v in unit), unit
    assert m["low_snr"]["low_snr"]["n"] + m["low_snr"]["high_snr"]["n"] == N_TEST
    assert d["n_gt"] > N_TEST  # every scene has its target plus field stars / other objects
    rob = m["robustness"]
    for key in ("image_absent", "sequence_absent"):
        assert 0.0 <= rob[key]["accuracy"] <= 1.0
        if c["accuracy"] > 0:
            assert rob[key]["retention"] == pytest.approx(rob[key]["accuracy"] / c["accuracy"])
    lat = m["latency"]
    assert lat["torch_threads"] == 1 and [b["batch"] for b in lat["batches"]] == [1, 8]
    for b in lat["batches"]:
        assert b["ms_per_batch"] > 0 and b["windows_per_s"] == pytest.approx(1000 * b["batch"] / b["ms_per_batch"])
    report = (out / "report.md").read_text()
    assert f"{c['accuracy']:.4f}" in report and "| precision |" in report and "mean retention" in report
    for name in ("confusion_matrix.png", "reliability.png", "per_class.png"):
        w, h = _png(out / name)
        assert w > 200 and h > 200


DETECTION_SCORES = ("map", "box_precision", "box_recall", "box_f1", "box_agnostic_precision")
DETECTION_SCORES += ("box_agnostic_recall", "box_agnostic_f1")


def test_evaluate_scores_detection_only_on_images_the_model_was_given(trained: TrainResult, data: Path, tmp_path: Path):
    # the fused model run on the light curves alone: the frames' boxes were never in its input, so
    # counting them as misses (the old mAP 0 and box F1 0) measures nothing about the model
    fast = dict(repeats=1, latency_batches=(1,))
    m = evaluate(data / "test", trained.best_path, tmp_path / "seq", modalities=("sequence",), **fast)
    d = m["detection"]
    assert (d["n_gt"], d["n_det"]) == (0, 0) and d["n_samples"] == 0
    assert all(d[k] is None for k in DETECTION_SCORES) and d["ap_per_class"] == [None] * 6
    assert json.loads((tmp_path / "seq" / "metrics.json").read_text())["detection"] == d
    report = (tmp_path / "seq" / "report.md").read_text()
    assert "## Detection: not applicable" in report and "| mAP |" not in report

    # with the image given, every labelled frame is scored as before
    m = evaluate(data / "test", trained.best_path, tmp_path / "img", modalities=("image",), **fast)
    d = m["detection"]
    assert d["n_samples"] == N_TEST and d["n_gt"] > N_TEST and d["map"] is not None
    assert "| mAP |" in (tmp_path / "img" / "report.md").read_text()


def test_evaluate_leaves_samples_without_snr_labels_out_of_both_snr_subsets(
    trained: TrainResult, data: Path, tmp_path: Path
):
    records = [json.loads(line) for line in (data / "test" / LABELS_FILE).read_text().splitlines()]
    # every other record loses its SNR fields; the rest keep theirs
    kept = records[1::2]
    want_low = sum(r["low_snr"] for r in kept)
    assert 0 < want_low < len(kept)  # both subsets non-empty, or the counts below prove little
    for strip, name in ((records[::2], "half"), (records, "none")):
        root = tmp_path / name / "test"
        shutil.copytree(data / "test", root)
        unlabelled = [{k: v for k, v in r.items() if k not in ("snr_img", "snr_seq", "low_snr")} for r in strip]
        ids = {r["id"] for r in strip}
        lines = [json.dumps(r) for r in unlabelled] + [json.dumps(r) for r in records if r["id"] not in ids]
        (root / LABELS_FILE).write_text("\n".join(lines) + "\n")
        m = evaluate(root, trained.best_path, tmp_path / name / "eval", repeats=1, latency_batches=(1,))
        low = m["low_snr"]
        if name == "half":
            assert (low["low_snr"]["n"], low["high_snr"]["n"]) == (want_low, len(kept) - want_low)
            assert low["n_unknown"] == len(records) - len(kept)
        else:
            assert low["low_snr"]["n"] == low["high_snr"]["n"] == 0 and low["n_unknown"] == N_TEST
            for key in ("low_snr", "high_snr"):
                assert all(low[key][k] is None for k in ("accuracy", "macro_f1", "weighted_f1"))
            report = (tmp_path / name / "eval" / "report.md").read_text()
            assert "| low_snr | 0 | n/a | n/a | n/a |" in report and "| high_snr | 0 | n/a | n/a | n/a |" in report
            assert f"{N_TEST} sample(s) without SNR labels" in report


def test_evaluate_refuses_an_out_path_that_is_a_file_before_evaluating(
    trained: TrainResult, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    taken = tmp_path / "taken"
    taken.write_text("not a report directory\n")
    args = ["evaluate", "--data-root", str(data / "test"), "--ckpt", str(trained.best_path), "--repeats", "1"]
    assert cli_main([*args, "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a folder" in err
    assert taken.read_text() == "not a report directory\n"
    # refused before the data is read: a missing split would otherwise be the error
    for out in (taken, taken / "sub"):
        with pytest.raises(ValueError, match=f"{taken} exists and is not a folder"):
            evaluate(tmp_path / "no-such-split", trained.best_path, out)


# ----------------------------------------------------------------------------------------------------
# Metric functions against hand-computed cases
# ----------------------------------------------------------------------------------------------------


def test_precision_recall_f1_by_hand():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    # class 0: P 1/2 R 1/2 F1 1/2; class 1: P 2/3 R 1 F1 4/5; class 2: P 1 R 1/2 F1 2/3
    s = classification_scores(confusion_matrix(y_true, y_pred, 4))  # class 3 never occurs: not averaged
    assert s["accuracy"] == pytest.approx(4 / 6) and s["micro_f1"] == pytest.approx(4 / 6)
    assert s["macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 2 / 3) / 3)
    assert s["macro_precision"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert s["macro_recall"] == pytest.approx((1 / 2 + 1 + 1 / 2) / 3)
    assert s["weighted_f1"] == pytest.approx((2 * 1 / 2 + 2 * 4 / 5 + 2 * 2 / 3) / 6)
    # class 3, in neither truth nor predictions, has no per-class score (it read 0: a measured failure)
    assert [math.isnan(s["per_class"][k][3]) for k in ("precision", "recall", "f1")] == [True] * 3
    assert s["per_class"]["precision"][:3] == pytest.approx([1 / 2, 2 / 3, 1])
    wrong = classification_scores(confusion_matrix(np.array([0, 0]), np.array([0, 1]), 2))["per_class"]
    # class 1 predicted once, never true: precision 0 (measured), no recall, F1 0 (it is averaged as 0)
    assert wrong["precision"][1] == 0.0 and math.isnan(wrong["recall"][1]) and wrong["f1"][1] == 0.0
    unbalanced = classification_scores(confusion_matrix(np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1]), 2))
    # class 0: P 1 R 2/3 F1 4/5 (support 3); class 1: P 1/2 R 1 F1 2/3 (support 1)
    assert unbalanced["weighted_f1"] == pytest.approx((3 * 4 / 5 + 2 / 3) / 4)
    assert unbalanced["macro_f1"] == pytest.approx((4 / 5 + 2 / 3) / 2)


def test_expected_calibration_error_by_hand():
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.6, 0.4]])
    y = np.array([0, 1, 1, 0])
    # bin (0.8, 0.9]: accuracy 1/2, confidence 0.9; bin (0.5, 0.6]: accuracy 1, confidence 0.6
    res = expected_calibration_error(probs, y)
    assert res["ece"] == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    assert sum(b["count"] for b in res["bins"]) == 4
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0]))["ece"] == pytest.approx(0.0)


def test_auc_by_hand():
    assert binary_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert binary_auc(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)  # a tie counts 1/2
    assert np.isnan(binary_auc(np.array([0.2, 0.3]), np.array([0, 0])))
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.3, 0.6, 0.1]])
    res = roc_auc_ovr(np.array([0, 1, 1, 0]), probs)
    # class 0 positives score 0.7 and 0.3 against 0.2 and 0.6: 3 of 4 pairs -> 0.75; class 1 likewise
    assert res["per_class"][:2] == [pytest.approx(0.75), pytest.approx(0.75)] and res["per_class"][2] is None
    assert res["macro"] == pytest.approx(0.75)


def test_average_precision_and_map_by_hand():
    # ranked hits T, F, T with 2 objects: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1 -> 1/2*1 + 1/2*2/3
    assert average_precision(np.array([0.9, 0.8, 0.7]), np.array([1, 0, 1]), 2) == pytest.approx(0.5 + 1 / 3)
    assert np.isnan(average_precision(np.array([]), np.array([]), 0))
    assert box_iou(np.array([[0, 0, 2, 2]]), np.array([[1, 1, 3, 3]]))[0, 0] == pytest.approx(1 / 7)

    gt_boxes = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [0, 20, 10, 30]], dtype=float)
    gt_classes = np.array([0, 0, 1])
    dets = [
        (0.0, 0.0, 10.0, 10.0, 0, 0.9, ()),  # TP
        (0.5, 0.0, 10.5, 10.0, 0, 0.8, ()),  # duplicate of the same object: FP
        (25.0, 25.0, 35.0, 35.0, 0, 0.7, ()),  # IoU 25/175 < 0.5: FP
        (0.0, 20.0, 10.0, 30.0, 0, 0.6, ()),  # right place, wrong class: FP for class 0
        (0.0, 20.0, 10.0, 30.0, 1, 0.5, ()),  # TP for class 1
    ]
    res = detection_scores([dets], [gt_boxes], [gt_classes], n_classes=3)
    # class 0: TP, FP, FP, FP with 2 objects -> AP 1/2; class 1: AP 1; class 2 has no objects
    assert res["ap_per_class"] == [pytest.approx(0.5), pytest.approx(1.0), None]
    assert res["map"] == pytest.approx(0.75)
    assert res["box_precision"] == pytest.approx(2 / 5) and res["box_recall"] == pytest.approx(2 / 3)
    assert res["box_f1"] == pytest.approx(2 * (2 / 5) * (2 / 3) / (2 / 5 + 2 / 3))
    # class-agnostic: the wrong-class box at 0.6 now takes object 3 first, the class-1 box is a duplicate
    assert res["box_agnostic_precision"] == pytest.approx(2 / 5)
    thresholded = detection_scores([dets], [gt_boxes], [gt_classes], n_classes=3, score_threshold=0.65)
    assert thresholded["box_precision"] == pytest.approx(1 / 3) and thresholded["box_recall"] == pytest.approx(1 / 3)
    assert thresholded["map"] == pytest.approx(0.75)  # AP still ranks every detection
    wrong_only = detection_scores([dets[:4]], [gt_boxes], [gt_classes], n_classes=3)
    assert wrong_only["box_recall"] == pytest.approx(1 / 3)
    assert wrong_only["box_agnostic_recall"] == pytest.approx(2 / 3)


def test_scores_over_nothing_are_undefined_not_zero():
    empty = classification_scores(np.zeros((3, 3), dtype=np.int64))
    keys = ["accuracy"] + [
        f"{avg}_{k}" for avg in ("macro", "weighted", "micro") for k in ("precision", "recall", "f1")
    ]
    assert empty["n"] == 0 and all(jsonable(empty[k]) is None for k in keys)

    no_box = np.zeros((0, 4))
    no_class = np.zeros(0, dtype=np.int64)
    nothing = detection_scores([[]], [no_box], [no_class], n_classes=3)
    assert all(jsonable(nothing[k]) is None for k in DETECTION_SCORES)
    # a false alarm on an empty frame: precision 0 is measured, recall has nothing to recall
    alarm = detection_scores([[(0.0, 0.0, 4.0, 4.0, 1, 0.9, ())]], [no_box], [no_class], n_classes=3)
    assert alarm["box_precision"] == 0.0 and np.isnan(alarm["box_recall"]) and alarm["box_f1"] == 0.0
    # real objects and nothing found above the threshold: recall and F1 0, precision undefined
    box = np.array([[0.0, 0.0, 4.0, 4.0]])
    missed = detection_scores([[(*box[0], 1, 0.1, ())]], [box], [np.array([1])], n_classes=3, score_threshold=0.5)
    assert np.isnan(missed["box_precision"]) and missed["box_recall"] == 0.0 and missed["box_f1"] == 0.0


def test_retrieval_recall_by_hand():
    q = np.eye(4)
    assert retrieval_recall(q, q, ks=(1,))["instance_r@1"] == 1.0
    # each query's partner is the second-best match: R@1 = 0, R@2 = 1
    g = np.array([[0.8, 1.0, 0, 0], [1.0, 0.8, 0, 0], [0, 0, 0.8, 1.0], [0, 0, 1.0, 0.8]])
    labels = np.array([0, 1, 2, 2])
    res = retrieval_recall(q, g, labels, ks=(1, 2))
    assert res["instance_r@1"] == 0.0 and res["instance_r@2"] == 1.0
    # class level at K=1: queries 2 and 3 retrieve the other class-2 sample
    assert res["class_r@1"] == 0.5 and res["class_r@2"] == 1.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_training_on_a_missing_gpu_is_refused_clearly(tmp_path: Path):
    with pytest.raises(ValueError, match="no CUDA device"):
        TrainOptions(data_root=tmp_path, out=tmp_path / "out", device="cuda")
    rc = cli_main(["train", "--data-root", str(tmp_path), "--out", str(tmp_path / "o"), "--device", "cuda"])
    assert rc == 2
