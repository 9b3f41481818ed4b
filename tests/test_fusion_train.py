"""Training recipes of the fusion networks: patches, each recipe's loss going down, exact resume, and
checkpoints that the networks' own loaders read back (smoke scale: tiny patches from real TNO pairs)."""

from __future__ import annotations

import csv
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daemon import cli
from model import fusion_train as ft

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TNO = SHARED / "fusion_testdata" / "TNO"
needs_data = pytest.mark.skipif(not TNO.is_dir(), reason=f"shared test data missing at {TNO}")

torch.set_num_threads(1)


def _tno(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(ir, vi) uint8 gray of a TNO pair (stored as 3 equal channels)."""
    return tuple(np.asarray(Image.open(TNO / m / f"{name}.png"))[..., 0] for m in ("ir", "vi"))  # type: ignore[return-value]


def _write_pairs(root: Path, crops: dict[str, tuple[str, slice, slice]]) -> tuple[Path, Path]:
    for sub in ("ir", "vi"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for out_name, (name, rows, cols) in crops.items():
        for sub, img in zip(("ir", "vi"), _tno(name), strict=True):
            Image.fromarray(np.ascontiguousarray(img[rows, cols])).save(root / sub / f"{out_name}.png")
    return root / "ir", root / "vi"


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32x32 patches (IR, VI) from TNO pair 01, in [0, 1], shape (2, 1, 32, 32)."""
    if not TNO.is_dir():
        pytest.skip("shared test data missing")
    ir, vi = _tno("01")
    a, b = ft.extract_patches(ir[200:232, 200:264] / 255, vi[200:232, 200:264] / 255, 32, 32, min_contrast=None)
    return torch.from_numpy(a)[:, None], torch.from_numpy(b)[:, None]


# ------------------------------------------------------------------------------------------------
# patches


def test_grid_patches_follow_the_authors_recipe() -> None:
    rng = np.random.default_rng(0)
    ir, vi = rng.random((480, 640)), rng.random((480, 640))
    vi[200:328, 400:528] = 0.5  # one flat (low-contrast) visible patch
    a, b = ft.extract_patches(ir, vi, 128, 200, min_contrast=None)
    assert a.shape == b.shape == (6, 128, 128)  # MSRS 640x480 at stride 200: 2 x 3 patches
    assert np.array_equal(a[4], ir[200:328, 200:328].astype(np.float32))
    kept, _ = ft.extract_patches(ir, vi, 128, 200, min_contrast=0.1)
    assert kept.shape[0] == 5 and not any(np.array_equal(k, ir[200:328, 400:528].astype(np.float32)) for k in kept)
    assert ft.is_low_contrast(np.full((8, 8), 0.5), 0.1) and not ft.is_low_contrast(ir[:64, :64], 0.1)
    assert ft.extract_patches(ir[:100, :100], vi[:100, :100], 128, 200)[0].shape == (0, 128, 128)


def test_random_crops_are_reproducible_and_inside_the_image() -> None:
    ir = np.arange(300 * 200, dtype=np.float64).reshape(300, 200) / 60000
    one = ft.extract_patches(ir, ir, 64, 0, min_contrast=None, rng=np.random.default_rng([7, 0]), crops=5)[0]
    two = ft.extract_patches(ir, ir, 64, 0, min_contrast=None, rng=np.random.default_rng([7, 0]), crops=5)[0]
    other = ft.extract_patches(ir, ir, 64, 0, min_contrast=None, rng=np.random.default_rng([7, 1]), crops=5)[0]
    assert one.shape == (5, 64, 64) and np.array_equal(one, two) and not np.array_equal(one, other)
    for p in one:  # each crop is a contiguous window of the image
        y, x = divmod(int(round(p[0, 0] * 60000)), 200)
        assert np.array_equal(p, ir[y : y + 64, x : x + 64].astype(np.float32))


def test_epoch_split_keeps_the_authors_proportion() -> None:
    cdd, cross = ft.RECIPES["cddfuse"], ft.RECIPES["crossfuse"]
    assert (cdd.epochs, cdd.stage1_epochs, cdd.batch_size, cdd.lr, cdd.clip_grad) == (120, 40, 8, 1e-4, 0.01)
    assert ft.TrainOptions(epochs=12).apply(cdd).stage1_epochs == 4
    assert ft.TrainOptions(epochs=2).apply(cdd).stage1_epochs == 1
    assert (cross.stage1_epochs, cross.stage1_batch_size, cross.weight_decay) == (4, 2, 0.9)
    assert ft.TrainOptions(epochs=9).apply(cross).stage1_epochs == 1
    with pytest.raises(ValueError, match="two stages"):
        ft.TrainOptions(epochs=1).apply(cdd)


@pytest.mark.parametrize("method", ["cddfuse", "crossfuse", "cmmdl"])
def test_no_lr_decay_keeps_each_stage_at_its_base_lr(method: str) -> None:
    """With the authors' schedule the lr has dropped by the last epoch; without decay it has not, and
    the recipe is otherwise unchanged (a short run on a small set follows the authors' first steps)."""
    epochs = 40  # past the first milestone of every recipe (CDDFuse/CMMDL: 20 epochs; CrossFuse: 2)
    decayed, recipe = ft.make_trainer(method, ft.TrainOptions(epochs=epochs))
    flat, flat_recipe = ft.make_trainer(method, ft.TrainOptions(epochs=epochs, lr_decay=False))
    assert replace(flat_recipe, gamma=recipe.gamma) == recipe and flat_recipe.gamma == 1.0
    for epoch in range(epochs - 1):
        decayed.end_epoch(epoch)
        flat.end_epoch(epoch)
    last = epochs - 1
    base = recipe.lr  # the last epoch is in the fusion stage of the two-stage recipes
    assert flat.lr(last) == pytest.approx(base)
    assert decayed.lr(last) <= 0.5 * base  # CDDFuse, CMMDL: x0.5 at epoch 20; CrossFuse: x0.1 from 2


# ------------------------------------------------------------------------------------------------
# each recipe learns


@needs_data
@pytest.mark.parametrize(
    ("method", "epoch", "loss_terms", "lr"),
    [
        ("cddfuse", 0, {"rec_vi", "rec_ir", "decomp", "grad"}, 1e-4),  # Phase I: reconstruction
        ("cddfuse", 3, {"intensity", "gradient", "fusion", "decomp"}, 1e-4),  # Phase II: fusion
        ("crossfuse", 0, {"ir_pixel", "ir_ssim", "vi_pixel", "vi_ssim"}, 1e-4),  # stage 1: auto-encoders
        ("crossfuse", 3, {"pix", "grad"}, 1e-3 * 0.1),  # stage 2, its 3rd epoch: the authors' x0.1
        ("cmmdl", 0, {"int", "grad"}, 1e-4),
    ],
)
def test_recipe_loss_goes_down(batch, method: str, epoch: int, loss_terms: set[str], lr: float) -> None:
    """A few steps with the authors' optimiser settings lower the loss on the batch they trained on."""
    trainer, _ = ft.make_trainer(method, ft.TrainOptions(epochs=4))
    assert trainer.stage(epoch) == (2 if epoch == 3 else 1)
    ir, vi = batch
    before = trainer.losses(ir, vi, epoch)
    assert loss_terms | {"total"} <= set(before)
    steps = [trainer.step(ir, vi, epoch)["total"] for _ in range(3)]
    after = trainer.losses(ir, vi, epoch)
    assert steps[0] == pytest.approx(before["total"], rel=1e-4)  # step losses are the same objective
    assert after["total"] < before["total"]
    assert trainer.lr(epoch) == pytest.approx(lr)


# ------------------------------------------------------------------------------------------------
# resume and checkpoints


@needs_data
def test_resume_continues_exactly_and_checkpoints_load(tmp_path: Path) -> None:
    """Stop after 3 of 4 steps (mid Phase II), resume: same weights and losses as an uninterrupted run."""
    from model.cddfuse import fuse_CDDFuse, load_CDDFuse

    ir_dir, vi_dir = _write_pairs(tmp_path / "data", {"a": ("01", slice(200, 232), slice(200, 232)),
                                                       "b": ("02", slice(300, 332), slice(100, 132))})  # fmt: skip
    opts = ft.TrainOptions(epochs=2, batch_size=4, patch=16, stride=16, min_contrast=None)
    full = ft.train("cddfuse", ir_dir, vi_dir, tmp_path / "full", opts)
    assert (full.epochs_done, full.global_step, full.stopped_early) == (2, 4, False)  # 8 patches, 2 x 2 steps

    part = ft.train("cddfuse", ir_dir, vi_dir, tmp_path / "part", replace(opts, max_steps=3))
    assert (part.epochs_done, part.global_step, part.stopped_early) == (1, 3, True)
    saved = torch.load(part.state_file, weights_only=True)
    assert (saved["epoch"], saved["batch"], saved["global_step"]) == (1, 1, 3)
    for change, shown in ((dict(epochs=3), "epochs=3 (the run has 2)"), (dict(crops_per_image=8), "crops_per_image=8")):
        with pytest.raises(ValueError, match=re.escape(shown)):  # refused, not silently ignored
            ft.train("cddfuse", ir_dir, vi_dir, tmp_path / "part", replace(opts, resume=True, **change))
    state_before = part.state_file.read_bytes()
    with pytest.raises(FileExistsError, match="--resume.*--overwrite"):  # a rerun without --resume wiped the run
        ft.train("cddfuse", ir_dir, vi_dir, tmp_path / "part", opts)
    assert part.state_file.read_bytes() == state_before and len(log_rows := (tmp_path / "part" / ft.LOG_FILE)
                                                                 .read_text().splitlines()) == 4  # fmt: skip
    with pytest.raises(ValueError, match="choose one"):
        ft.train("cddfuse", ir_dir, vi_dir, tmp_path / "part", replace(opts, resume=True, overwrite=True))
    rest = ft.train("cddfuse", ir_dir, vi_dir, tmp_path / "part", replace(opts, resume=True))
    assert (rest.epochs_done, rest.global_step, rest.stopped_early) == (2, 4, False)
    assert log_rows[0].startswith("global_step")

    def log(folder: Path) -> list[list[str]]:
        with (folder / ft.LOG_FILE).open() as fh:
            return [[r[0], r[1], r[2], r[6]] for r in csv.reader(fh)][1:]  # step, epoch, stage, losses

    assert log(tmp_path / "part") == log(tmp_path / "full")
    assert [r[2] for r in log(tmp_path / "full")] == ["1", "1", "2", "2"]  # Phase I then Phase II

    a = torch.load(full.state_file, weights_only=True)["trainer"]["model"]
    b = torch.load(rest.state_file, weights_only=True)["trainer"]["model"]
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=1e-7) for k in a)

    (ckpt,) = full.checkpoints
    assert ckpt.name == "CDDFuse_epoch_2.pth"
    groups = torch.load(ckpt, weights_only=True)
    assert set(groups) == {"DIDF_Encoder", "DIDF_Decoder", "BaseFuseLayer", "DetailFuseLayer"}
    assert all(k.startswith("module.") for g in groups.values() for k in g)  # DataParallel layout
    model = load_CDDFuse(ckpt)
    x = torch.rand(1, 1, 24, 20, generator=torch.Generator().manual_seed(0))
    from model.cddfuse import CDDFuse

    trained = CDDFuse()
    trained.load_state_dict(a)
    assert torch.allclose(fuse_CDDFuse(model, x, x.flip(-1)), fuse_CDDFuse(trained.eval(), x, x.flip(-1)), atol=1e-6)


@needs_data
def test_stop_request_ends_the_run_between_steps_with_state_log_and_count_agreeing(tmp_path: Path) -> None:
    """What the CLI does with SIGTERM/Ctrl-C: train() sees the request at the next step boundary, so the
    saved state, the returned step count and the log rows agree exactly."""
    ir_dir, vi_dir = _write_pairs(tmp_path / "data", {"a": ("01", slice(200, 232), slice(200, 232)),
                                                       "b": ("02", slice(300, 332), slice(100, 132))})  # fmt: skip
    opts = ft.TrainOptions(epochs=2, batch_size=4, patch=16, stride=16, min_contrast=None)
    done: list[int] = []
    result = ft.train("cddfuse", ir_dir, vi_dir, tmp_path / "run", opts,
                      on_step=lambda info: done.append(info.global_step), stop=lambda: len(done) >= 3)  # fmt: skip
    assert (result.global_step, result.stopped_early, result.interrupted) == (3, True, True)
    saved = torch.load(result.state_file, weights_only=True)
    assert (saved["epoch"], saved["batch"], saved["global_step"]) == (1, 1, 3)
    assert len((tmp_path / "run" / ft.LOG_FILE).read_text().splitlines()) == 1 + 3
    budget = ft.train("cddfuse", ir_dir, vi_dir, tmp_path / "budget", replace(opts, max_steps=1))
    assert (budget.stopped_early, budget.interrupted) == (True, False)  # a budget is not an interruption


def test_crossfuse_release_files_load_and_recon_decoder_round_trips(tmp_path: Path) -> None:
    from model.crossfuse import load_CrossFuse, read_checkpoint

    trainer, recipe = ft.make_trainer("crossfuse", ft.TrainOptions(epochs=9))  # 1 AE epoch + 8 fusion epochs
    folder = tmp_path / "models"
    folder.mkdir()
    after_stage1 = trainer.save_release(folder, 1)
    assert sorted(p.name for p in after_stage1) == ["auto_encoder_epoch_1_ir.model", "auto_encoder_epoch_1_vi.model"]
    written = trainer.save_release(folder, 3)
    assert written[-1].name == "fusetrans_epoch_2.model"
    loaded = load_CrossFuse(folder)  # the authors' folder layout, strict about every key
    ours = trainer.model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in loaded.state_dict().items())
    flat = read_checkpoint(folder)
    recon = ft.ReconDecoder()
    recon.load_authors_state(
        {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith("auto_vi/recon_decoder1.")}
    )
    x_sh, x_de = torch.randn(1, 32, 40, 48), torch.randn(1, 128, 5, 6)
    assert torch.equal(recon(x_sh, x_de), trainer.recon["vi"](x_sh, x_de))
    assert recon(torch.randn(1, 32, 43, 50), torch.randn(1, 128, 5, 6)).shape == (1, 1, 43, 50)  # odd sizes


def test_cmmdl_release_file_loads(tmp_path: Path) -> None:
    from model.cmmdl import fuse_CMMDL, load_CMMDL

    trainer, _ = ft.make_trainer("cmmdl")
    (path,) = trainer.save_release(tmp_path, 5)
    sd = torch.load(path, weights_only=True)
    assert path.name == "CMMDL_model_epoch_5.pth" and all(k.startswith("module.") for k in sd)
    loaded = load_CMMDL(path)
    x = torch.rand(1, 1, 20, 24, generator=torch.Generator().manual_seed(1))
    trainer.model.eval()
    assert torch.allclose(fuse_CMMDL(loaded, x, 1 - x), fuse_CMMDL(trainer.model, x, 1 - x), atol=1e-6)


@needs_data
def test_fuse_train_cli_then_fuse_with_the_checkpoint(tmp_path: Path, capsys) -> None:
    ir_dir, vi_dir = _write_pairs(tmp_path / "data", {"p": ("03", slice(150, 182), slice(300, 364))})
    out = tmp_path / "run"
    args = ["fuse-train", "--method", "cmmdl", "--ir", str(ir_dir), "--vi", str(vi_dir), "--out", str(out)]
    args += ["--epochs", "2", "--batch-size", "2", "--patch", "32", "--stride", "32", "--min-contrast", "0"]
    assert cli.main([*args, "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "cmmdl epoch 1/2 stage 1 1/1 loss" in err and "cmmdl epoch 2/2" in err and "done: 2 epoch(s)" in err
    ckpt = out / "models" / "CMMDL_model_epoch_2.pth"
    assert ckpt.is_file() and not (out / "models" / "CMMDL_model_epoch_1.pth").exists()  # latest set only
    assert cli.main([*args, "--resume"]) == 0  # nothing left to do: reports the run and its checkpoint
    err = capsys.readouterr().err
    assert "done: 2 epoch(s), 2 step(s)" in err and str(ckpt) in err
    fused = tmp_path / "fused"
    rc = cli.main(["fuse", "--method", "cmmdl", "--ckpt", str(ckpt), "--ir", str(ir_dir), "--vi", str(vi_dir)]
                  + ["--out", str(fused)])  # fmt: skip
    assert rc == 0 and np.asarray(Image.open(fused / "p.png")).shape == (32, 64)


@needs_data
def test_fuse_train_saves_its_state_on_sigterm_and_resumes(tmp_path: Path) -> None:
    """A batch scheduler or systemd stops a run with SIGTERM: the state is saved like on Ctrl-C, the
    per-step log is on disk while it runs, and --resume continues from where it stopped."""
    import signal
    import subprocess
    import sys
    import time

    ir_dir, vi_dir = _write_pairs(tmp_path / "data", {"a": ("01", slice(100, 228), slice(100, 228))})
    out = tmp_path / "run"
    args = [sys.executable, "-m", "daemon.cli", "fuse-train", "--method", "cmmdl", "--ir", str(ir_dir)]
    args += ["--vi", str(vi_dir), "--out", str(out), "--patch", "32", "--stride", "0", "--crops-per-image", "4"]
    args += ["--batch-size", "2", "--epochs", "100", "--threads", "1", "--min-contrast", "0"]
    proc = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True)
    log = out / ft.LOG_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "stopping after this step" in stderr and "interrupted; state saved" in stderr
    state = torch.load(out / ft.STATE_FILE, weights_only=False)
    done = state["global_step"]
    assert done >= 2 and len(log.read_text().splitlines()) == done + 1  # header + one row per step
    resumed = subprocess.run(
        [*args, "--resume", "--max-steps", str(done + 2)], capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(out / ft.STATE_FILE, weights_only=False)["global_step"] == done + 2


# ------------------------------------------------------------------------------------------------
# CrossFuse: the stage-2 start check


CROP = (slice(100, 356), slice(200, 456))  # 256x256 of TNO pair 01: a 32x32 deep map


def _twin_encoders() -> tuple[ft.Trainer, ft.Recipe, torch.Tensor]:
    """A CrossFuse trainer whose VI encoder is a copy of its IR encoder (healthy: every weight 1/2), and
    the TNO crop (1,1,256,256) in [0, 1] to check it on."""
    import copy

    trainer, recipe = ft.make_trainer("crossfuse", ft.TrainOptions(epochs=4))
    trainer.model.encoder_vi = copy.deepcopy(trainer.model.encoder_ir)
    ir = torch.from_numpy(_tno("01")[0][CROP] / 255).float()[None, None]
    return trainer, recipe, ir


def _shift_vi_activity(trainer: ft.Trainer, ir: torch.Tensor) -> None:
    """Shift the VI encoder's last bias so that B = A - 2 median(A) on ``ir``: A + B crosses zero."""
    from model.crossfuse import deep_activity

    m = trainer.model
    with torch.no_grad():
        a = deep_activity(m.encoder_ir(ir)[1])
        fuse = m.encoder_vi.block2.fuse.conv
        fuse.bias -= 2 * a.median() / fuse.bias.numel()  # a bias shifts the max-pooled channel sum exactly


@needs_data
def test_crossfuse_stage2_warns_when_the_deep_skip_weights_are_ill_conditioned() -> None:
    """The decoder's fixed weights A / (A + B) blow up where A + B (box-filtered channel sums of the two
    deep features) crosses zero. Twin encoders are healthy (every weight 1/2); shifting the VI
    encoder's last bias so that B = A - 2 median(A) makes A + B cross zero, and the check must say so
    before stage 2 spends hours on encoders it cannot change."""
    from model.crossfuse import deep_skip_health

    trainer, recipe, ir = _twin_encoders()
    stage2 = recipe.stage1_epochs
    m = trainer.model
    twins = deep_skip_health(m.encoder_ir, m.encoder_vi, ir, ir)
    assert twins.opposite_sign == 0.0 and twins.weight_max == pytest.approx(0.5, abs=1e-3)
    assert not twins.ill_conditioned
    assert trainer.stage_report(ir, ir, stage2) is None
    _shift_vi_activity(trainer, ir)
    shifted = deep_skip_health(m.encoder_ir, m.encoder_vi, ir, ir)
    assert shifted.ill_conditioned and shifted.opposite_sign > 0.1 and shifted.weight_p999 > 10
    note = trainer.stage_report(ir, ir, stage2)
    assert note is not None and "ill-conditioned" in note and "--seed" in note
    assert trainer.stage_report(ir, ir, 0) is None  # stage 1 trains the encoders: nothing to check yet


@needs_data
def test_fuse_notes_crossfuse_weights_with_ill_conditioned_deep_skip(tmp_path: Path) -> None:
    """`sacmf fuse` with such weights says why the output will be grey; healthy weights get no note."""
    from daemon.fusion_commands import fuse_folder

    ir_dir, vi_dir = _write_pairs(tmp_path / "data", {"a": ("01", *CROP)})
    trainer, recipe, ir = _twin_encoders()
    for folder in ("twins", "shifted"):
        (tmp_path / folder).mkdir()
    trainer.save_release(tmp_path / "twins", recipe.epochs)
    _shift_vi_activity(trainer, ir)
    trainer.save_release(tmp_path / "shifted", recipe.epochs)
    healthy = fuse_folder("crossfuse", tmp_path / "twins", ir_dir, vi_dir, tmp_path / "out1")
    assert len(healthy.written) == 1 and not any("deep-skip" in n for n in healthy.notes)
    sick = fuse_folder("crossfuse", tmp_path / "shifted", ir_dir, vi_dir, tmp_path / "out2")
    assert len(sick.written) == 1 and any("deep-skip weights blow up" in n for n in sick.notes)


def test_crossfuse_deep_sign_penalty_pushes_negative_activity_up(batch) -> None:
    """The opt-in stage-1 term (ours) is zero where the deep activity is positive, and steps on it raise
    an activity that was made negative; it is refused for networks without CrossFuse's encoders."""
    from model.crossfuse import deep_activity

    ir, vi = batch
    plain, _ = ft.make_trainer("crossfuse", ft.TrainOptions(epochs=4))
    assert not any(k.endswith("_sign") for k in plain.losses(ir, vi, 0))  # the authors' loss by default
    trainer, recipe = ft.make_trainer("crossfuse", ft.TrainOptions(epochs=4, deep_sign_weight=1000.0))
    assert recipe.deep_sign_weight == 1000.0
    enc = trainer.model.encoder_ir
    with torch.no_grad():
        enc.block2.fuse.conv.bias -= 1.0 + deep_activity(enc(ir)[1]).abs().max() / enc.block2.fuse.conv.bias.numel()
        assert (deep_activity(enc(ir)[1]) < 0).all()
    before = trainer.losses(ir, vi, 0)
    assert before["ir_sign"] > 0 and before["ir_total"] > before["ir_pixel"] + before["ir_ssim"]
    for _ in range(5):
        trainer.step(ir, vi, 0)
    assert trainer.losses(ir, vi, 0)["ir_sign"] < before["ir_sign"]
    with pytest.raises(ValueError, match="CrossFuse stage-1 term"):
        ft.make_trainer("cddfuse", ft.TrainOptions(deep_sign_weight=1.0))


@needs_data
def test_a_stop_inside_a_step_is_recorded_and_the_resume_says_so(tmp_path: Path) -> None:
    """A second Ctrl-C lands wherever it lands: after the encoder's optimiser stepped and before the
    decoder's, say. The state then holds weights one optimiser ahead of its step count, and the resumed
    run repeats that batch: it can differ from an uninterrupted run by about one step. The state file
    now says the stop was inside a step, and the resumed run says what that costs."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    ir_dir, vi_dir = _write_pairs(tmp_path / "data", {"a": ("01", slice(100, 196), slice(100, 196))})
    options = ft.TrainOptions(epochs=3, batch_size=2, patch=32, stride=32, min_contrast=0.0)
    out = tmp_path / "run"
    stepped = {"n": 0}

    def interrupt(optimizer, args, kwargs) -> None:  # the first optimiser of the third step has stepped
        stepped["n"] += 1
        if stepped["n"] == 2 * 2 + 1:  # CDDFuse phase I: two optimisers per step (encoder, decoder)
            raise KeyboardInterrupt

    handle = register_optimizer_step_post_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            ft.train("cddfuse", ir_dir, vi_dir, out, options)
    finally:
        handle.remove()
    state = torch.load(out / ft.STATE_FILE, weights_only=False)
    assert state["global_step"] == 2 and state["mid_step"] is True
    ft.train("cddfuse", ir_dir, vi_dir, out, replace(options, resume=True, max_steps=2))  # stops before a step
    assert torch.load(out / ft.STATE_FILE, weights_only=False)["mid_step"] is True  # still the partial weights
    notes: list[str] = []
    result = ft.train("cddfuse", ir_dir, vi_dir, out, replace(options, resume=True, max_steps=3),
                      on_step=lambda info: notes.append(info.note or ""))  # fmt: skip
    assert "stopped inside step 3" in notes[0] and any("stopped inside step 3" in n for n in result.notes)
    assert torch.load(out / ft.STATE_FILE, weights_only=False)["mid_step"] is False  # a clean stop this time
