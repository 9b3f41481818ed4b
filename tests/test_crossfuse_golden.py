"""CrossFuse re-implementation against the golden vectors produced with the authors' network definitions.

The golden weights are seeded random values (not the released ones), so these tests prove architecture,
key mapping and pre/post-processing, not fusion quality. Intermediate tensors are compared first so that a
failure points at the stage that broke. Tolerances follow the golden README (its measured noise floor:
raw 1.5e-7 for 1 vs 2 threads, 5e-7 for float64), with headroom for our Winograd convolutions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.crossfuse import (
    CheckpointError,
    CrossFuse,
    CrossFuse_autoencoder_loss,
    CrossFuse_loss,
    CrossFuseConfig,
    authors_key_map,
    fuse_CrossFuse,
    load_CrossFuse,
    ms_ssim,
    read_checkpoint,
    stretch,
    tile_tokens,
    untile_tokens,
)
from tests.torch_helpers import torch_threads

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "crossfuse"
WEIGHTS = GOLDEN / "weights.safetensors"
OVERRIDE = GOLDEN / "perturbed" / "weights_override.safetensors"

pytestmark = pytest.mark.skipif(not GOLDEN.is_dir(), reason=f"golden vectors not found at {GOLDEN}")

RAW_TOL = 2e-5  # observed <= 3.3e-6 with Winograd convs, <= 6e-7 without
STRETCHED_TOL = 0.02  # 0-255 scale; observed <= 1.3e-3
FEATURE_TOL = 1e-4  # deep and CAM features (README suggestion); observed <= 3.3e-6


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a shared, oversubscribed CPU, OpenMP barriers make 2 threads slower."""
    with torch_threads(1):
        yield


def golden(name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(GOLDEN / name))


def inputs(folder: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """The golden inputs are 0-255 (the authors' encoder divides by 255); our contract is [0, 1]."""
    return golden(f"{folder}input_ir.npy") / 255, golden(f"{folder}input_vi.npy") / 255


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def chstats(x: torch.Tensor) -> torch.Tensor:
    """(1,C,H,W) -> (C,4): mean, population std, min, max per channel (the README's *_chstats layout)."""
    flat = x[0].flatten(1).double()
    return torch.stack([flat.mean(1), flat.std(1, correction=0), flat.amin(1), flat.amax(1)], dim=1).float()


@pytest.fixture(scope="module")
def model() -> CrossFuse:
    return load_CrossFuse(WEIGHTS)


@pytest.fixture(scope="module")
def features(model: CrossFuse) -> dict[str, torch.Tensor]:
    """Every intermediate the README provides, for the main 160x160 case (a single CAM tile)."""
    ir, vi = inputs()
    with torch.inference_mode():
        ir_sh, ir_de = model.encoder_ir(ir)
        vi_sh, vi_de = model.encoder_vi(vi)
        ir_tok, grid = tile_tokens(ir_de, 32, 2)
        vi_tok, _ = tile_tokens(vi_de, 32, 2)
        ir_self, _ = model.cam.self_attend(ir_tok, vi_tok)
        tile0 = untile_tokens(ir_self[:1], (1, 1), (32, 32), 2)
        cam = model.cam(ir_de, vi_de)
    assert grid == (1, 1)
    return {"ir_shallow": ir_sh, "ir_deep": ir_de, "vi_deep": vi_de, "cam_tile0_ir_self": tile0, "cam_out": cam}


# --------------------------------------------------------------------------------------------------------
# Intermediates (localise a failure) then outputs


def test_shallow_feature(features: dict[str, torch.Tensor]) -> None:
    assert max_diff(features["ir_shallow"][:, ::8], golden("ir_shallow.npy")) <= 1e-5  # channels 0, 8, 16, 24
    assert max_diff(chstats(features["ir_shallow"]), golden("ir_shallow_chstats.npy")) <= 1e-5


@pytest.mark.parametrize("name", ["ir_deep", "vi_deep", "cam_tile0_ir_self", "cam_out"])
def test_deep_and_cam_features(features: dict[str, torch.Tensor], name: str) -> None:
    assert max_diff(features[name], golden(f"{name}.npy")) <= FEATURE_TOL
    assert max_diff(chstats(features[name]), golden(f"{name}_chstats.npy")) <= FEATURE_TOL


@pytest.mark.parametrize("winograd", [True, False], ids=["winograd", "direct"])
def test_main_case_output(model: CrossFuse, winograd: bool) -> None:
    model.set_winograd(winograd)
    try:
        raw = fuse_CrossFuse(model, *inputs())
    finally:
        model.set_winograd(True)
    assert max_diff(raw, golden("output_raw.npy")) <= RAW_TOL
    assert max_diff(stretch(raw), golden("output_stretched.npy")) <= STRETCHED_TOL


def test_case2_tiling_and_shape_adjust(model: CrossFuse) -> None:
    """269x283: 4 CAM tiles on a 33x35 deep map and an asymmetric reflection pad in the decoder."""
    captured: list[torch.Tensor] = []
    hook = model.cam.register_forward_hook(lambda _module, _args, out: captured.append(out))
    try:
        raw = fuse_CrossFuse(model, *inputs("case2_269x283/"))
    finally:
        hook.remove()
    (cam,) = captured
    assert max_diff(cam, golden("case2_269x283/cam_out.npy")) <= FEATURE_TOL
    assert max_diff(chstats(cam), golden("case2_269x283/cam_out_chstats.npy")) <= FEATURE_TOL
    assert max_diff(raw, golden("case2_269x283/output_raw.npy")) <= RAW_TOL
    assert max_diff(stretch(raw), golden("case2_269x283/output_stretched.npy")) <= STRETCHED_TOL


def test_perturbed_weights_exercise_norms() -> None:
    """Non-default LayerNorm/BatchNorm values: catches a skipped or mis-mapped norm (moves raw by 0.15)."""
    perturbed = load_CrossFuse(WEIGHTS, override=OVERRIDE)
    raw = fuse_CrossFuse(perturbed, *inputs())
    assert max_diff(raw, golden("perturbed/output_raw.npy")) <= RAW_TOL
    assert max_diff(stretch(raw), golden("perturbed/output_stretched.npy")) <= STRETCHED_TOL


# --------------------------------------------------------------------------------------------------------
# Checkpoint layouts and refusals


def test_key_map_covers_golden_file_exactly() -> None:
    mapped, unused = authors_key_map()
    keys = set(read_checkpoint(WEIGHTS))
    assert keys == set(mapped) | set(unused)
    assert len(keys) == 186
    assert not set(mapped) & set(unused)


def test_released_layout_with_module_prefix_loads_same_weights(model: CrossFuse, tmp_path: Path) -> None:
    """The authors' three bare ``torch.save(state_dict)`` files, one of them DataParallel-prefixed."""
    flat = read_checkpoint(WEIGHTS)
    folder = tmp_path / "models"
    files = {
        "auto_ir": folder / "autoencoder" / "auto_encoder_epoch_4_ir.model",
        "auto_vi": folder / "autoencoder" / "auto_encoder_epoch_4_vi.model",
        "trans": folder / "transfuse" / "fusetrans_epoch_32_bs_8_num_20k_lr_0.1_s1_c1.model",
    }
    for group, path in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = "module." if group == "auto_vi" else ""
        state = {prefix + k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(group + "/")}
        torch.save(state, path)
    for source in (folder, {g: str(p) for g, p in files.items()}):
        reloaded = load_CrossFuse(source)
        ours, theirs = model.state_dict(), reloaded.state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    save_file(state, str(path))
    return path


def test_unknown_key_is_refused_by_name(tmp_path: Path) -> None:
    state = read_checkpoint(WEIGHTS)
    state["trans/decoder_fusion.conv_extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"unknown key 'trans/decoder_fusion\.conv_extra\.weight'"):
        load_CrossFuse(_save(state, tmp_path / "extra.safetensors"))


def test_missing_key_is_refused_by_name(tmp_path: Path) -> None:
    state = read_checkpoint(WEIGHTS)
    del state["trans/cross_atten_block.cross_atten_block.cross_atten2.norm.bias"]
    with pytest.raises(CheckpointError, match=r"missing key.*cross_atten2\.norm\.bias"):
        load_CrossFuse(_save(state, tmp_path / "missing.safetensors"))


def test_shape_mismatch_is_refused_by_name(tmp_path: Path) -> None:
    state = read_checkpoint(WEIGHTS)
    key = "auto_vi/fea_encoder1.dense_blocks.2.dense_conv1.conv2d.0.weight"
    state[key] = torch.zeros(64, 191, 3, 3)
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape \(64, 191, 3, 3\), expected \(64, 192, 3, 3\)"):
        load_CrossFuse(_save(state, tmp_path / "shape.safetensors"))


def test_box_filter_must_be_the_fixed_constant(tmp_path: Path) -> None:
    """We compute the authors' fixed 1/9 filters analytically, so a checkpoint must really hold them."""
    state = read_checkpoint(WEIGHTS)
    state["trans/decoder_fusion.weight.conv_de.weight"] = state["trans/decoder_fusion.weight.conv_de.weight"] * 2
    with pytest.raises(CheckpointError, match=r"conv_de\.weight.*1/9"):
        load_CrossFuse(_save(state, tmp_path / "box.safetensors"))


def test_override_with_unknown_key_is_refused(tmp_path: Path) -> None:
    bad = _save({"trans/no_such.weight": torch.zeros(1)}, tmp_path / "override.safetensors")
    with pytest.raises(CheckpointError, match=r"unknown key 'trans/no_such\.weight'"):
        load_CrossFuse(WEIGHTS, override=bad)


def test_ungrouped_single_file_is_refused_with_hint(tmp_path: Path) -> None:
    path = tmp_path / "auto_encoder_epoch_4_ir.model"
    torch.save({"fea_encoder1.conv1.conv2d.0.bias": torch.zeros(32)}, path)
    with pytest.raises(CheckpointError, match="no group prefix"):
        load_CrossFuse(path)


# --------------------------------------------------------------------------------------------------------
# Our efficient equivalents of the authors' operations


def test_omitted_tile_shift_is_a_token_permutation(model: CrossFuse) -> None:
    """roll(-16) -> self-attention -> roll(+16) on a 32x32 tile equals self-attention alone."""
    tile = golden("ir_deep.npy").repeat(1, 1, 2, 2)[:, :, :32, :32]  # (1,128,32,32), real statistics
    block = model.cam.self2_ir[0]
    with torch.inference_mode():
        rolled = torch.roll(tile, shifts=(-16, -16), dims=(2, 3))
        tokens, _ = tile_tokens(rolled, 32, 2)
        shifted = torch.roll(untile_tokens(block(tokens), (1, 1), (32, 32), 2), shifts=(16, 16), dims=(2, 3))
        tokens, _ = tile_tokens(tile, 32, 2)
        plain = untile_tokens(block(tokens), (1, 1), (32, 32), 2)
    assert max_diff(shifted, plain) <= 1e-5
    assert max_diff(plain, tile) > 1e-2  # the block does change its input


def test_box_filter_shortcut_matches_full_conv(model: CrossFuse) -> None:
    """Channel-sum + 3x3 box equals the authors' dense C->C conv with 1/9 weights (zero padding)."""
    from model.crossfuse import _box_all_channels

    x = golden("ir_deep.npy")
    full = F.conv2d(x, torch.full((128, 128, 3, 3), 1 / 9), padding=1)
    assert max_diff(_box_all_channels(x).expand_as(full), full) <= 1e-5


def test_tile_padding_is_reflection_and_extends_beyond_the_edge() -> None:
    from model.crossfuse import _reflect_index

    for n in (2, 5, 17, 33):
        for pad in range(n):
            x = torch.arange(float(n)).view(1, 1, 1, n)
            expected = F.pad(x, (0, pad, 0, 0), mode="reflect").flatten()
            assert torch.equal(x.flatten()[_reflect_index(n, pad, x.device)], expected)
    # beyond what ReflectionPad allows, the mirror pattern continues: 0 1 2 | 1 0 1 2 1 0
    assert _reflect_index(3, 6, torch.device("cpu")).tolist() == [0, 1, 2, 1, 0, 1, 2, 1, 0]


def test_tokens_round_trip_and_order() -> None:
    x = torch.randn(2, 8, 40, 70)
    tokens, grid = tile_tokens(x, 32, 2)
    assert grid == (2, 3) and tokens.shape == (12, 256, 32)
    # token 1 of tile 0 is the 2x2 block at rows 0-1, columns 2-3, flattened (channel, row, col)
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 2:4].flatten())
    # the second image's first tile comes after the first image's 6 tiles
    assert torch.equal(tokens[6, 0], x[1, :, 0:2, 0:2].flatten())
    assert torch.equal(untile_tokens(tokens, grid, (40, 70), 2), x)


def test_inference_fast_paths_equal_reference_ops() -> None:
    """Pooling, upsample+pad and the pre-padded dense buffer give the same values as the plain ops."""
    from model.crossfuse import DenseBlock, _max_pool2, _upsample2_reflect_pad1

    x = torch.randn(2, 6, 13, 10)
    assert torch.equal(_max_pool2(x), F.max_pool2d(x, 2))
    reference = F.pad(F.interpolate(x, scale_factor=2.0, mode="nearest"), (1, 1, 1, 1), mode="reflect")
    assert torch.equal(_upsample2_reflect_pad1(x), reference)
    block = DenseBlock(6, 4, 3, 5).eval()
    with torch.no_grad():  # pre-padded buffer path
        fast = block(x)
    slow = block(x)  # grad mode: pad + cat as the authors do
    assert max_diff(fast, slow) <= 1e-5


def test_upsample_pad_is_differentiable_like_reference() -> None:
    from model.crossfuse import _upsample2_reflect_pad1

    x = torch.randn(1, 3, 5, 7, requires_grad=True)
    w = torch.randn(1, 3, 12, 16)
    (grad,) = torch.autograd.grad((_upsample2_reflect_pad1(x) * w).sum(), x)
    reference = F.pad(F.interpolate(x, scale_factor=2.0, mode="nearest"), (1, 1, 1, 1), mode="reflect")
    (expected,) = torch.autograd.grad((reference * w).sum(), x)
    assert torch.allclose(grad, expected, atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# Inference contract


def test_input_range_and_shape_are_checked(model: CrossFuse) -> None:
    ir, vi = inputs()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fuse_CrossFuse(model, ir * 255, vi * 255)
    with pytest.raises(ValueError, match="equal shape"):
        fuse_CrossFuse(model, ir, vi[..., :-1])
    with pytest.raises(ValueError, match=">= 16"):
        fuse_CrossFuse(model, ir[..., :15, :], vi[..., :15, :])


def test_small_and_odd_sizes_run(model: CrossFuse) -> None:
    """Below the authors' ~136 px limit the tile padding keeps mirroring; odd sizes keep their shape."""
    g = torch.Generator().manual_seed(0)
    for h, w in ((17, 23), (97, 131)):
        ir, vi = torch.rand(1, 1, h, w, generator=g), torch.rand(1, 1, h, w, generator=g)
        raw = fuse_CrossFuse(model, ir, vi)
        assert raw.shape == (1, 1, h, w) and torch.isfinite(raw).all()
        assert raw.std() > 0


def test_batch_equals_single_images(model: CrossFuse) -> None:
    """Each image of a batch is fused independently (own tiles, own stretch), as the authors' batch-1 runs."""
    ir, vi = inputs()
    pair_ir = torch.cat([ir, vi.flip(-1)])[..., 20:100, 10:90]
    pair_vi = torch.cat([vi, ir.flip(-1)])[..., 20:100, 10:90]
    batch = fuse_CrossFuse(model, pair_ir, pair_vi)
    for i in range(2):
        assert max_diff(batch[i : i + 1], fuse_CrossFuse(model, pair_ir[i : i + 1], pair_vi[i : i + 1])) <= 1e-5
    assert max_diff(batch[0], batch[1]) > 1e-3


def test_stretch_is_per_image_minmax_with_epsilon() -> None:
    raw = torch.tensor([[[[-1.0, 0.0], [1.0, 3.0]]], [[[2.0, 2.0], [2.0, 2.0]]]])
    out = stretch(raw)
    assert torch.allclose(out[0].flatten(), torch.tensor([0.0, 1.0, 2.0, 4.0]) / (4 + 1e-6) * 255)
    assert torch.equal(out[1], torch.zeros(1, 2, 2))  # constant image: 0, not NaN


# --------------------------------------------------------------------------------------------------------
# Training losses


def test_loss_terms_finite_differentiable_and_decrease() -> None:
    """A few Adam steps on the CAM + decoder (encoders frozen, as the authors train) lower the total."""
    torch.manual_seed(0)
    cfg = CrossFuseConfig(shallow_channels=4, growth=8, dense_layers=2, deep_channels=16, tile=8, heads=4)
    net = CrossFuse(cfg).train()
    g = torch.Generator().manual_seed(1)
    ir = F.avg_pool2d(torch.rand(2, 1, 40, 40, generator=g), 3, 1, 1)  # smooth-ish patches in [0, 1]
    vi = 1 - ir.flip(-1)
    with torch.no_grad():
        ir_sh, ir_de = net.encoder_ir(ir)
        vi_sh, vi_de = net.encoder_vi(vi)
    trainable = [*net.cam.parameters(), *net.decoder.parameters()]
    opt = torch.optim.Adam(trainable, lr=1e-3)

    def step() -> dict[str, torch.Tensor]:
        raw = net.decoder(net.cam(ir_de, vi_de), ir_de, vi_de, ir_sh, vi_sh)
        return CrossFuse_loss(raw, ir, vi)

    first = step()
    assert set(first) == {"pix", "grad", "total"}
    assert all(torch.isfinite(v) and v > 0 for v in first.values())
    assert torch.allclose(first["total"], first["pix"] + first["grad"])
    first["total"].backward()
    grads = [p.grad for p in trainable]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert sum(gr.abs().sum().item() for gr in grads) > 0
    opt.step()
    for _ in range(7):
        opt.zero_grad()
        loss = step()["total"]
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = step()["total"]
    assert last < first["total"].detach()


def test_ms_ssim_identity_and_degradation() -> None:
    g = torch.Generator().manual_seed(2)
    x = F.avg_pool2d(torch.rand(2, 1, 64, 64, generator=g), 5, 1, 2) * 255
    assert abs(ms_ssim(x, x).item() - 1) <= 1e-5
    mild = ms_ssim(x, x + 5 * torch.randn(x.shape, generator=g)).item()
    strong = ms_ssim(x, x + 40 * torch.randn(x.shape, generator=g)).item()
    assert 0 < strong < mild < 1


def test_autoencoder_loss_is_zero_on_identity_and_trainable() -> None:
    g = torch.Generator().manual_seed(3)
    image = F.avg_pool2d(torch.rand(1, 1, 48, 48, generator=g), 5, 1, 2)
    perfect = CrossFuse_autoencoder_loss(image, image)
    assert perfect["pixel"] == 0 and abs(perfect["ssim"].item()) <= 0.5  # 1e4 * float32 rounding of MS-SSIM
    recon = torch.nn.Parameter(image + 0.2 * torch.rand(image.shape, generator=g))
    opt = torch.optim.Adam([recon], lr=1e-2)
    first = CrossFuse_autoencoder_loss(recon, image)
    assert all(torch.isfinite(v) and v > 0 for v in first.values())
    assert torch.allclose(first["total"], first["pixel"] + first["ssim"])
    for _ in range(5):
        opt.zero_grad()
        loss = CrossFuse_autoencoder_loss(recon, image)["total"]
        loss.backward()
        assert torch.isfinite(recon.grad).all() and recon.grad.abs().sum() > 0
        opt.step()
    assert CrossFuse_autoencoder_loss(recon, image)["total"] < first["total"].detach()
