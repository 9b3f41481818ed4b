"""SA-CMF checkpoint files: exact round trip, atomic writes, and a clear CheckpointError for every bad file."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from daemon import inference as daemon_inference
from model import checkpoint as ckpt_mod
from model.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from model.losses import sacmf_loss
from model.preprocess import collate, preprocess, raw_from_scene
from model.sacmf import SACMF, build_model
from model.synth import SynthConfig, generate_scene
from tests.service_helpers import TINY  # the one tiny test configuration

torch.set_num_threads(1)


def _batch(n: int = 6, seed0: int = 0) -> dict[str, torch.Tensor]:
    scfg = SynthConfig(size=32, seq_len=64)
    pcfg = TINY.preprocess_config()
    return collate([preprocess(raw_from_scene(generate_scene(seed0 + i, scfg)), pcfg) for i in range(n)])


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    return _batch()


@pytest.fixture(scope="module")
def trained(batch) -> SACMF:
    """A few optimiser steps, so BatchNorm statistics and the MI EMA buffers differ from their init."""
    torch.manual_seed(1)
    model = build_model(TINY).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        loss = sacmf_loss(model(batch), batch, TINY)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert int(model.mi.n_updates) == 2
    return model.eval()


@pytest.fixture()
def saved(trained, tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    save_checkpoint(trained, path, "v-test", extra={"training": {"epoch": 3, "val": {"macro_f1": 0.5}}})
    return path


def test_round_trip_gives_identical_outputs_and_metadata(trained, batch, tmp_path: Path):
    path = tmp_path / "rt.pt"
    training = {"epoch": 7, "modalities": ["image", "sequence"], "val": {"macro_f1": 0.25, "loss": None}}
    sha = save_checkpoint(trained, path, "sacmf-rt", extra={"training": training})
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    model, meta = load_checkpoint(path)
    assert not model.training
    assert meta.sha256 == sha and meta.version == "sacmf-rt" and meta.display_version == "sacmf-rt"
    assert meta.config == TINY and meta.class_names == TINY.class_names
    assert meta.training == training and meta.resume is None
    own, theirs = trained.state_dict(), model.state_dict()
    assert own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k]) for k in own)
    with torch.no_grad():
        a, b = trained(batch), model(batch)
    for key in ("logits", "det_logits", "modality_weights", "token_weights_img", "mi"):
        assert torch.equal(a[key], b[key]), key


def test_an_empty_version_falls_back_to_the_sha256_prefix(trained, tmp_path: Path):
    path = tmp_path / "nov.pt"
    sha = save_checkpoint(trained, path, "")
    _, meta = load_checkpoint(path)
    assert meta.version == "" and meta.display_version == f"sha256:{sha[:12]}"


def test_save_replaces_atomically_and_leaves_no_temp_files(trained, tmp_path: Path):
    path = tmp_path / "m.pt"
    path.write_bytes(b"old contents")
    sha = save_checkpoint(trained, path, "new")
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    with pytest.raises(TypeError, match="Path is not storable"):
        save_checkpoint(trained, path, "bad", extra={"training": {"root": Path("/tmp")}})
    with pytest.raises(ValueError, match="must not override"):
        save_checkpoint(trained, path, "bad", extra={"state_dict": {}})
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha  # failed saves left the file alone
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_daemon_uses_the_model_checkpoint_format(saved: Path):
    assert daemon_inference.CheckpointError is CheckpointError
    assert daemon_inference.save_checkpoint is save_checkpoint
    loaded = daemon_inference.load_checkpoint(saved)
    assert loaded.version == "v-test" and loaded.sha256 == hashlib.sha256(saved.read_bytes()).hexdigest()


def test_a_file_from_before_the_uniform_fusion_flag_still_loads(saved: Path, tmp_path: Path):
    raw = torch.load(saved, weights_only=True)
    del raw["config"]["uniform_fusion"]
    old = tmp_path / "old.pt"
    torch.save(raw, old)
    _, meta = load_checkpoint(old)
    assert meta.config.uniform_fusion is False


class _Evil:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def _edit(edit: Callable[[dict], object]) -> Callable[[Path, Path], None]:
    def write(src: Path, dst: Path) -> None:
        raw = torch.load(src, weights_only=True)
        edit(raw)
        torch.save(raw, dst)

    return write


def _first_float(raw: dict) -> str:
    return next(k for k, v in raw["state_dict"].items() if v.is_floating_point())


BAD = {
    "garbage": (lambda s, d: d.write_bytes(b"definitely not a checkpoint" * 20), "not a loadable checkpoint"),
    "truncated": (lambda s, d: d.write_bytes(s.read_bytes()[: len(s.read_bytes()) // 2]), "not a loadable checkpoint"),
    "empty": (lambda s, d: d.write_bytes(b""), "not a loadable checkpoint"),
    "missing file": (lambda s, d: None, "cannot read checkpoint"),
    "pickled object": (
        lambda s, d: d.write_bytes(pickle.dumps({"format": _Evil()}, protocol=2)),
        "not a loadable checkpoint",
    ),
    "not a dict": (lambda s, d: torch.save([1, 2, 3], d), "a checkpoint is a dict, got list"),
    "wrong format": (_edit(lambda c: c.update(format="sacmf-checkpoint/0")), "format 'sacmf-checkpoint/0' is not"),
    "missing key": (_edit(lambda c: c.pop("state_dict")), "lacks ['state_dict']"),
    "unknown config key": (_edit(lambda c: c["config"].update(wings=2)), "unknown key 'wings'"),
    "invalid config": (_edit(lambda c: c["config"].update(backbone="vgg")), "invalid config"),
    "class names": (_edit(lambda c: c.update(class_names=["a"] * 6)), "class_names"),
    "version type": (_edit(lambda c: c.update(version=3)), "version must be a str"),
    "missing tensor": (_edit(lambda c: c["state_dict"].pop("head.1.weight")), "missing ['head.1.weight']"),
    "unexpected tensor": (
        _edit(lambda c: c["state_dict"].update(extra_layer=torch.zeros(2))),
        "unexpected ['extra_layer']",
    ),
    "wrong shape": (
        _edit(lambda c: c["state_dict"].update({_first_float(c): torch.zeros(3, 3, 3)})),
        "shapes do not fit",
    ),
    "nan weights": (
        _edit(lambda c: c["state_dict"][_first_float(c)].fill_(float("nan"))),
        "non-finite values",
    ),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_files_raise_a_clear_checkpoint_error(name: str, saved: Path, tmp_path: Path):
    write, message = BAD[name]
    bad = tmp_path / f"bad-{name.replace(' ', '_')}.pt"
    write(saved, bad)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    text = str(info.value)
    assert message in text, text
    assert str(bad) in text  # says which file


def test_read_checkpoint_exposes_the_optional_keys(trained, tmp_path: Path):
    path = tmp_path / "last.pt"
    resume = {"epoch": 2, "generator": torch.Generator().manual_seed(0).get_state(), "history": [{"x": 1.0}]}
    save_checkpoint(trained, path, "v", extra={"resume": resume})
    raw, sha = read_checkpoint(path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert raw["resume"]["epoch"] == 2 and torch.equal(raw["resume"]["generator"], resume["generator"])
    _, meta = load_checkpoint(path)
    assert meta.resume is not None and meta.resume["history"] == [{"x": 1.0}]
    assert ckpt_mod.CHECKPOINT_FORMAT == "sacmf-checkpoint/1" == raw["format"]


def test_a_checkpoint_read_while_being_overwritten_in_place_is_refused(tmp_path: Path):
    """`rsync --inplace` or `dd conv=notrunc` replacing v1 by v2 and read half way: torch.load does not
    check the archive's CRCs, so the file loaded as v2 with most of v1's weights, and a hot reload
    served it under v2's name."""
    torch.manual_seed(0)
    save_checkpoint(build_model(TINY), tmp_path / "v1.pt", "v1")
    torch.manual_seed(1)
    save_checkpoint(build_model(TINY), tmp_path / "v2.pt", "v2")
    v1, v2 = (tmp_path / "v1.pt").read_bytes(), (tmp_path / "v2.pt").read_bytes()
    torn = tmp_path / "torn.pt"
    torn.write_bytes(v2[: 40 * 4096] + v1[40 * 4096 :])  # the head of the new file over the old one
    with pytest.raises(CheckpointError, match="fails its checksum"):
        read_checkpoint(torn)
    assert read_checkpoint(tmp_path / "v2.pt")[0]["version"] == "v2"  # whole files still load
