"""``sacmf test`` on awkward folders: every input file is used or refused, and every answer is earned.

Why these cases: each once passed without a word (a second file for an id, a format not read, stale
outputs of an earlier run, labels out of range, a sample with nothing in it still given a class) or ended
in a traceback instead of an error naming the file. Real files, a real tiny checkpoint, real forward
passes; the data are a few 32 px samples so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daemon.cli import main as cli_main
from model.infer import run_test
from model.synth import LABELS_FILE, SynthConfig, write_dataset
from tests.service_helpers import tiny_checkpoint

torch.set_num_threads(1)

N_TEST = 4


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    tiny_checkpoint(path, "inputs-test")
    return path


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_dataset(root, 1, 1, N_TEST, seed=5, cfg=SynthConfig(size=32, seq_len=64))
    return root / "test"


@pytest.fixture
def split(synth: Path, tmp_path: Path) -> Path:
    """A private copy of the test split (Image-A/B, Seq-A/B, labels.jsonl) that a test may spoil."""
    return Path(shutil.copytree(synth, tmp_path / "split"))


def _run(ckpt: Path, split: Path, out: Path, **kw):
    return run_test(ckpt, out, image_dir=split / "Image-A", seq_dir=split / "Seq-A", **kw)


def _ids(split: Path) -> list[str]:
    return sorted(p.stem for p in (split / "Image-A").iterdir())


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_second_file_for_an_id_is_an_error_naming_both(ckpt: Path, split: Path, tmp_path: Path, capsys):
    sid = _ids(split)[0]
    with Image.open(split / "Image-A" / f"{sid}.png") as img:
        np.save(split / "Image-A" / f"{sid}.npy", np.asarray(img))
    with pytest.raises(ValueError, match=rf"two image_a files for id '{sid}': {sid}\.npy and {sid}\.png"):
        _run(ckpt, split, tmp_path / "out")
    # through the command: one line on stderr, exit 2, no traceback, nothing written
    args = ["test", "--ckpt", str(ckpt), "--image-dir", str(split / "Image-A"), "--out", str(tmp_path / "out")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{sid}.npy" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_file_in_a_format_not_read_is_an_error_but_hidden_files_and_folders_are_not_inputs(
    ckpt: Path, split: Path, tmp_path: Path
):
    (split / "Image-A" / ".DS_Store").write_bytes(b"\0")
    (split / "Seq-A" / "notes").mkdir()
    assert _run(ckpt, split, tmp_path / "ok")["n"] == N_TEST
    bmp = split / "Image-A" / "extra.bmp"
    Image.new("L", (32, 32)).save(bmp)
    with pytest.raises(ValueError, match=r"extra\.bmp: not a readable image_a file"):
        _run(ckpt, split, tmp_path / "bad")


def test_a_rerun_into_the_same_folder_leaves_only_this_runs_files_and_nothing_foreign_is_touched(
    ckpt: Path, split: Path, tmp_path: Path
):
    out = tmp_path / "out"
    ids = _ids(split)
    assert _run(ckpt, split, out, vis=True)["n"] == N_TEST
    assert sorted(p.stem for p in (out / "json").iterdir()) == ids
    foreign = [out / "json" / "notes.txt", out / "heatmaps" / "mine.png", out / "README.md"]
    for path in foreign:
        path.write_text("not sacmf's\n")
    (out / "json" / "other.json").write_text('{"id": "something else"}\n')
    foreign.append(out / "json" / "other.json")

    lone = tmp_path / "lone"
    for sub in ("Image-A", "Seq-A"):
        (lone / sub).mkdir(parents=True)
        for path in (split / sub).glob(f"{ids[1]}.*"):
            shutil.copy(path, lone / sub)
    summary = run_test(ckpt, out, image_dir=lone / "Image-A", seq_dir=lone / "Seq-A")
    assert summary["n"] == 1
    assert [r["id"] for r in _lines(out / "results.jsonl")] == [ids[1]]
    assert sorted(p.name for p in (out / "json").iterdir()) == [f"{ids[1]}.json", "notes.txt", "other.json"]
    assert all(path.read_text() for path in foreign)  # still there, unchanged in kind
    assert not (out / "detections").exists() and not (out / "fusion_weights").exists()  # emptied: ours
    assert [p.name for p in (out / "heatmaps").iterdir()] == ["mine.png"]


def test_an_output_path_that_is_a_file_is_refused_before_any_work(ckpt: Path, split: Path, tmp_path: Path):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me\n")
    missing_ckpt = tmp_path / "no-such.pt"  # loading it would fail differently: the check comes first
    for model in (ckpt, missing_ckpt):
        for out in (blocker, blocker / "below"):
            with pytest.raises(ValueError, match=r"taken exists and is not a folder"):
                _run(model, split, out)
    assert blocker.read_text() == "keep me\n"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"id": "ID"}', "'class' must be an integer"),
        ('{"id": "ID", "class": 9}', "got 9"),
        ('{"id": "ID", "class": -1}', "got -1"),
        ('{"id": "ID", "class": true}', "got True"),
        ('{"id": "ID", "class": 1.0}', "got 1.0"),
        ('{"id": 7, "class": 1}', "non-empty string 'id'"),
        ('{"id": "ID", "class": 1', "invalid JSON"),
        ('["ID", 1]', "non-empty string 'id'"),
    ],
)
def test_each_labels_line_is_checked_with_file_and_line_in_the_error(
    ckpt: Path, split: Path, tmp_path: Path, line: str, problem: str
):
    labels = split / LABELS_FILE
    good = labels.read_text().splitlines()
    sid = _ids(split)[0]
    labels.write_text("\n".join([good[1], line.replace("ID", sid), *good[2:]]) + "\n")
    with pytest.raises(ValueError, match=rf"{LABELS_FILE}:2: .*{problem}"):
        _run(ckpt, split, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_sample_without_a_usable_input_is_skipped_and_reported_not_classified(
    ckpt: Path, split: Path, tmp_path: Path
):
    ids = _ids(split)
    seq = split / "Seq-A"
    np.save(seq / f"{ids[0]}.npy", np.full(64, np.nan, np.float32))  # a dead radiometer
    np.save(seq / f"{ids[1]}.npy", np.zeros(0, np.float32))  # an empty capture
    out = tmp_path / "out"
    # the light curves alone (no Image-A and no Seq-B beside this copy): those two samples carry nothing
    shutil.rmtree(split / "Seq-B")
    summary = run_test(ckpt, out, image_dir=None, seq_dir=seq)
    assert summary["n"] == N_TEST - 2 and summary["skipped"] == 2
    assert sorted(summary["skip_reasons"]) == ids[:2]
    for sid in ids[:2]:
        assert f"{seq / sid}.npy: empty or no finite value" in summary["skip_reasons"][sid]
        assert not (out / "json" / f"{sid}.json").exists()
    assert [r["id"] for r in _lines(out / "results.jsonl")] == ids[2:]
    assert _lines(out / "skipped.jsonl") == [{"id": s, "reason": summary["skip_reasons"][s]} for s in ids[:2]]
    assert sum(summary["classes"].values()) == N_TEST - 2

    # nothing usable at all (the image modality asked of light curves) is an error, not an empty answer
    with pytest.raises(ValueError, match=r"no sample has a usable input .*not among the modalities \['image'\]"):
        run_test(ckpt, tmp_path / "none", image_dir=None, seq_dir=seq, modalities=["image"])


def test_an_empty_image_is_an_error_naming_the_file(ckpt: Path, split: Path, tmp_path: Path):
    sid = _ids(split)[0]
    (split / "Image-A" / f"{sid}.png").unlink()
    np.save(split / "Image-A" / f"{sid}.npy", np.zeros((0, 5), np.float32))
    with pytest.raises(ValueError, match=rf"Image-A/{sid}\.npy: .*empty"):
        _run(ckpt, split, tmp_path / "out")


@pytest.mark.parametrize(
    ("kw", "problem"),
    [
        ({"batch_size": -1}, "batch size"),
        ({"batch_size": 0}, "batch size"),
        ({"batch_size": 2.5}, "batch size"),
        ({"det_threshold": float("nan")}, "detection threshold"),
        ({"det_threshold": -1.0}, "detection threshold"),
        ({"det_threshold": 5.0}, "detection threshold"),
    ],
)
def test_batch_size_and_detection_threshold_are_checked_before_any_work(
    ckpt: Path, split: Path, tmp_path: Path, kw: dict, problem: str
):
    with pytest.raises(ValueError, match=problem):
        _run(ckpt, split, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=problem):  # a missing checkpoint would fail otherwise: checked first
        _run(tmp_path / "no-such.pt", split, tmp_path / "out", **kw)


def test_good_edge_values_still_run(ckpt: Path, split: Path, tmp_path: Path):
    summary = _run(ckpt, split, tmp_path / "out", batch_size=1, det_threshold=1.0)
    assert summary["n"] == N_TEST and summary["skipped"] == 0 and summary["detections"] == 0
    assert "accuracy" in summary  # labels.jsonl beside the folders was read
