"""The model's offline commands (synth, train, test, evaluate) on bad input: a usage error or a clear
message naming the option or file, never a traceback, a silently accepted value or a mixed output folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daemon import cli
from model.checkpoint import CheckpointError, load_checkpoint
from model.dataset import DatasetLayoutError, _load_image, _load_seq
from model.sacmf import SACMFConfig
from model.synth import SynthConfig, write_dataset
from model.train import TrainOptions, train
from tests.service_helpers import TINY, tiny_checkpoint

# ------------------------------------------------------------------------------------------------
# options


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["synth", "--n-train", "-3"], "--n-train: must be >= 0, got -3"),
        (["train", "--data-root", "d", "--lr", "inf"], "--lr: must be a finite number > 0, got inf"),
        (["train", "--data-root", "d", "--lambda-mi", "nan"], "--lambda-mi: must be a finite number >= 0"),
        (["train", "--data-root", "d", "--stop-after-epochs", "0"], "--stop-after-epochs: must be >= 1"),
        (["train", "--data-root", "d", "--threads", "-1"], "--threads: must be >= 1"),
        (["test", "--ckpt", "c", "--batch-size", "-1"], "--batch-size: must be >= 1"),
        (["test", "--ckpt", "c", "--threads", "0"], "--threads: must be >= 1"),
        (["evaluate", "--data-root", "d", "--ckpt", "c", "--det-threshold", "-1"], "--det-threshold: must be"),
        (["evaluate", "--data-root", "d", "--ckpt", "c", "--repeats", "0"], "--repeats: must be >= 1"),
    ],
)
def test_bad_option_values_are_usage_errors_naming_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_synth_settings_the_generator_refuses_are_an_error_not_a_traceback(tmp_path: Path, capsys):
    rc = cli.main(["synth", "--out", str(tmp_path / "d"), "--frame-size", "16", "--n-train", "1"])
    assert rc == 2 and "error: size must be >= 32 px" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_train_options_refuse_values_that_would_fail_or_mislead_later(tmp_path: Path):
    base = dict(data_root=tmp_path, out=tmp_path / "o")
    for bad in (dict(lr=math.inf), dict(lr=0.0), dict(weight_decay=math.nan), dict(max_minutes=0.0),
                dict(stop_after_epochs=0), dict(threads=0), dict(resume=True, overwrite=True)):  # fmt: skip
        with pytest.raises(ValueError):
            TrainOptions(**base, **bad)
    for bad_model in (dict(lambda_mi=math.nan), dict(dropout=1.0), dict(frame_size=0), dict(heads=True)):
        with pytest.raises(ValueError):
            SACMFConfig(**bad_model)


# ------------------------------------------------------------------------------------------------
# input files


def test_unreadable_input_files_are_errors_naming_the_file(tmp_path: Path):
    good = tmp_path / "good.png"
    noise = np.random.default_rng(0).integers(0, 65535, (64, 64), dtype=np.uint16)  # compresses badly
    Image.fromarray(noise).save(good)
    assert _load_image(good).shape == (64, 64)
    cases = {
        "garbage.png": b"garbage",
        "truncated.png": good.read_bytes()[: good.stat().st_size // 2],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    np.save(tmp_path / "empty.npy", np.zeros((0, 5), np.float32))
    np.save(tmp_path / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    for name in ("garbage.png", "truncated.png", "empty.npy", "strings.npy"):
        with pytest.raises(DatasetLayoutError, match=f"{name}: "):
            _load_image(tmp_path / name)
    (tmp_path / "words.txt").write_text("1.0\nx\n")
    for name in ("objects.npy", "words.txt", "strings.npy"):
        with pytest.raises(DatasetLayoutError, match=f"{name}: "):
            _load_seq(tmp_path / name)


# ------------------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"frame_size": 0}, "frame_size must be > 0"),
        ({"det_stride": 0}, "det_stride must be > 0"),
        ({"d_model": -4}, "d_model must be > 0"),
        ({"dropout": math.nan}, "dropout must be a finite number"),
        ({"heads": "4"}, "heads must be an int"),
    ],
)
def test_a_checkpoint_with_a_bad_config_value_is_a_checkpoint_error(tmp_path: Path, change, message):
    path = tmp_path / "c.pt"
    tiny_checkpoint(path, "v1")
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"].update(change)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


# ------------------------------------------------------------------------------------------------
# train: an earlier run in --out


def test_train_refuses_to_mix_a_new_run_into_an_earlier_one_unless_told(tmp_path: Path):
    data = tmp_path / "data"
    write_dataset(data, 8, 0, 0, seed=1, cfg=SynthConfig(size=32, seq_len=64))
    out = tmp_path / "run"
    opts = TrainOptions(data_root=data / "train", out=out, model=dataclasses.replace(TINY, dropout=0.0),
                        batch_size=4, epochs=1, warmup_steps=1, progress=False, plots=False)  # fmt: skip
    first = train(opts)
    before = (out / "metrics.json").read_text()
    with pytest.raises(ValueError, match="holds an earlier run.*--resume continues it, --overwrite replaces it"):
        train(dataclasses.replace(opts, lr=3e-3))
    assert (out / "metrics.json").read_text() == before  # refused before touching anything
    again = train(dataclasses.replace(opts, lr=3e-3, overwrite=True))
    assert again.epochs_done == 1 and (out / "metrics.json").read_text() != before
    assert json.loads((out / "metrics.json").read_text())["summary"]["epochs_done"] == 1
    _, meta = load_checkpoint(first.last_path)
    assert meta.resume is not None and meta.resume["fingerprint"]["lr"] == 3e-3  # the new run's file
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        train(dataclasses.replace(opts, out=tmp_path / "file"))


@pytest.mark.parametrize("stored", [5, [1, 2], ["image", "radar"]])
def test_a_damaged_modality_list_in_a_checkpoint_is_an_error_not_a_guess(tmp_path: Path, stored):
    from model.infer import trained_modalities

    path = tmp_path / "c.pt"
    tiny_checkpoint(path, "v1")
    ckpt = torch.load(path, weights_only=True)
    ckpt["training"] = {"modalities": stored}
    torch.save(ckpt, path)
    _, meta = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="training.modalities"):
        trained_modalities(meta)
