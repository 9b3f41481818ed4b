"""Real forward/backward passes of SA-CMF on CPU: shapes, batch independence, masks, losses, detection."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision import models

from model.backbones import BACKBONES, BackboneWeightsError, build_backbone, feature_shape
from model.losses import detection_targets, focal_heatmap_loss, sacmf_loss, sim_loss
from model.preprocess import RawSample, collate, preprocess, raw_from_scene
from model.sacmf import SACMF, SACMFConfig, build_model, decode_detections
from model.synth import NUM_CLASSES, generate_scene

torch.set_num_threads(1)
Batch = dict[str, torch.Tensor]

TINY = SACMFConfig(backbone="tiny", d_model=32, heads=4, img_layers=1, seq_layers=1, dropout=0.0)
PER_SAMPLE = (
    "logits",
    "logits_img",
    "logits_seq",
    "modality_weights",
    "token_weights_img",
    "token_weights_seq",
    "emb_img",
    "emb_seq",
    "emb_fused",
    "det_logits",
    "det_size",
    "det_offset",
)


def _batch(cfg: SACMFConfig, seeds: range | list[int]) -> Batch:
    pcfg = cfg.preprocess_config()
    return collate([preprocess(raw_from_scene(generate_scene(s)), pcfg) for s in seeds])


def _select(batch: Batch, idx: list[int]) -> Batch:
    return {k: v[idx] for k, v in batch.items()}


@pytest.fixture(scope="module")
def batch8() -> Batch:
    return _batch(TINY, range(8))


@pytest.fixture(scope="module")
def trained_tiny(batch8: Batch) -> SACMF:
    """A tiny model after a few training steps, so the EMA buffers and BatchNorm stats are non-trivial."""
    torch.manual_seed(0)
    model = build_model(TINY)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        loss = sacmf_loss(model(batch8), batch8, TINY)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert int(model.mi.n_updates) == 3
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Backbones
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_returns_spatial_map(name: str) -> None:
    backbone = build_backbone(name).eval()
    with torch.no_grad():
        y = backbone(torch.rand(2, 1, 64, 64))
    assert y.dim() == 4 and y.shape[:2] == (2, backbone.out_channels)
    if name == "inception_v3":  # 64 px is upsampled to the 75 px minimum: 75 -> 7x7 at Mixed_5d
        assert y.shape[2:] == (7, 7)
    else:
        assert y.shape[2:] == (8, 8)  # stride 8
    assert feature_shape(backbone, 64) == (backbone.out_channels, *y.shape[2:])
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        backbone(torch.rand(2, 3, 64, 64))


@pytest.mark.parametrize("name", BACKBONES)
def test_model_output_shapes(name: str) -> None:
    """Every backbone at the default frame size; inception_v3 runs at its 75 px minimum (one forward)."""
    cfg = dataclasses.replace(TINY, backbone=name)
    model = build_model(cfg).eval()
    batch = _batch(cfg, [0, 1])
    with torch.no_grad():
        out = model(batch)
    g, hd, c = cfg.token_grid, cfg.det_size, cfg.num_classes
    k_a, k_b = 2 * g * g, 2 * cfg.n_patches
    expected = {
        "logits": (2, c),
        "logits_img": (2, c),
        "logits_seq": (2, c),
        "modality_weights": (2, 2),
        "token_weights_img": (2, k_a),
        "token_weights_seq": (2, k_b),
        "mi_matrix": (k_a, k_b),
        "mi": (),
        "emb_img": (2, cfg.d_model),
        "emb_seq": (2, cfg.d_model),
        "emb_fused": (2, cfg.d_model),
        "present": (2, 2),
        "det_logits": (2, c, hd, hd),
        "det_size": (2, 2, hd, hd),
        "det_offset": (2, 2, hd, hd),
    }
    for key, shape in expected.items():
        assert tuple(out[key].shape) == shape, key
        assert torch.isfinite(out[key]).all(), key
    assert "mi_loss" not in out  # eval mode estimates nothing from the batch
    assert model.class_names == cfg.class_names and len(model.class_names) == NUM_CLASSES


def test_per_camera_backbones() -> None:
    cfg = dataclasses.replace(TINY, shared_backbone=False)
    model = build_model(cfg).eval()
    assert model.backbone_b is not None
    with torch.no_grad():
        out = model(_batch(cfg, [3, 4]))
    assert out["logits"].shape == (2, 6) and torch.isfinite(out["det_logits"]).all()


def test_backbone_loads_full_torchvision_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(1)
    full = models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)  # includes fc, layer3, layer4: ignored by the stride-8 cut
    backbone = build_backbone("resnet18", weights=path).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        got = backbone(x)
        z = (x.expand(-1, 3, -1, -1) - backbone.mean) / backbone.std
        want = full.layer2(full.layer1(full.maxpool(full.relu(full.bn1(full.conv1(z))))))
    torch.testing.assert_close(got, want)


def test_backbone_weights_roundtrip_and_mismatch(tmp_path: Path) -> None:
    src = build_backbone("mobilenet_v3_small").eval()
    own = tmp_path / "own.pth"
    torch.save(src.state_dict(), own)  # keys prefixed "body.": accepted as well
    dst = build_backbone("mobilenet_v3_small", weights=own).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))
    with pytest.raises(BackboneWeightsError, match="missing"):
        build_backbone("resnet18", weights=own)
    bad = {k: v for k, v in src.body.state_dict().items()}
    bad["features.0.0.weight"] = torch.zeros(16, 1, 3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(BackboneWeightsError, match="shape mismatch"):
        build_backbone("mobilenet_v3_small", weights=tmp_path / "bad.pth")
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        build_backbone("tiny", weights=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16")


def test_inception_ignores_aux_head_keys(tmp_path: Path) -> None:
    full = models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "inception.pth"
    torch.save(full.state_dict(), path)
    backbone = build_backbone("inception_v3", weights=path)
    assert torch.equal(backbone.body.Mixed_5d.branch1x1.conv.weight, full.Mixed_5d.branch1x1.conv.weight)


# --------------------------------------------------------------------------------------------------
# Batch independence, EMA buffers, presence, masks
# --------------------------------------------------------------------------------------------------


def test_eval_outputs_do_not_depend_on_batch_mates(trained_tiny: SACMF, batch8: Batch) -> None:
    with torch.no_grad():
        full = trained_tiny(batch8)
        for i, mates in ((0, [0]), (5, [5]), (3, [7, 3, 1])):
            part = trained_tiny(_select(batch8, mates))
            j = mates.index(i)
            for key in PER_SAMPLE:
                torch.testing.assert_close(part[key][j], full[key][i], atol=1e-5, rtol=0, msg=key)
            torch.testing.assert_close(part["mi"], full["mi"], atol=0, rtol=0)


def test_ema_buffers_update_only_in_training(batch8: Batch) -> None:
    model = build_model(TINY)
    before = model.mi.tau_ema.clone()
    model.eval()
    with torch.no_grad():
        model(batch8)
    assert torch.equal(model.mi.tau_ema, before) and int(model.mi.n_updates) == 0
    model.train()
    out = model(batch8)
    assert int(model.mi.n_updates) == 1 and not torch.equal(model.mi.tau_ema, before)
    assert "mi_loss" in out and "mi_batch" in out
    assert "mi.tau_ema" in model.state_dict()


def _with_missing(seed: int, missing: tuple[str, ...]) -> Batch:
    raw = raw_from_scene(generate_scene(seed))
    for role in missing:
        setattr(raw, role, None)
    raw.presence = None
    raw.__post_init__()
    return preprocess(raw, TINY.preprocess_config())


@pytest.mark.parametrize(
    ("missing", "present"),
    [
        (("image_a", "image_b"), (False, True)),
        (("seq_a", "seq_b"), (True, False)),
        (("image_a", "image_b", "seq_a", "seq_b"), (False, False)),
        (("image_b", "seq_a"), (True, True)),
    ],
)
def test_missing_modality_gets_zero_weight(
    trained_tiny: SACMF, missing: tuple[str, ...], present: tuple[bool, bool]
) -> None:
    batch = collate([_with_missing(20, missing), _with_missing(21, ())])
    with torch.no_grad():
        out = trained_tiny(batch)
    for key in PER_SAMPLE:
        assert torch.isfinite(out[key]).all(), key
    assert tuple(out["present"][0].tolist()) == present and out["present"][1].all()
    w = out["modality_weights"][0]
    for m, is_present in enumerate(present):
        if not is_present:
            assert float(w[m]) == 0.0  # exactly
    if any(present):
        assert float(w.sum()) == pytest.approx(1.0, abs=1e-6)
    else:
        assert float(w.sum()) == 0.0
    if not present[0]:
        assert float(out["token_weights_img"][0].abs().sum()) == 0.0
        assert float(out["emb_img"][0].abs().sum()) == 0.0
    if not present[1]:
        assert float(out["token_weights_seq"][0].abs().sum()) == 0.0
        assert float(out["emb_seq"][0].abs().sum()) == 0.0
    if "image_b" in missing and "image_a" not in missing:
        g2 = TINY.token_grid**2
        assert float(out["token_weights_img"][0, g2:].abs().sum()) == 0.0  # camera B's tokens
        assert float(out["token_weights_img"][0, :g2].min()) > 0.0


def test_absent_inputs_carry_no_information(trained_tiny: SACMF) -> None:
    """Whatever sits in the tensor of an absent input (garbage from a bad sensor) must not matter."""
    batch = collate([_with_missing(30, ("image_a", "seq_b")), _with_missing(31, ("image_a", "image_b"))])
    noisy = {k: v.clone() for k, v in batch.items()}
    noisy["image_a"] = torch.randn_like(noisy["image_a"]) * 5
    noisy["seq_b"][0] = torch.randn_like(noisy["seq_b"][0]) * 5  # absent in sample 0 only
    noisy["image_b"][1] = float("nan")
    with torch.no_grad():
        a, b = trained_tiny(batch), trained_tiny(noisy)
    for key in PER_SAMPLE:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_validity_mask_honoured(trained_tiny: SACMF, batch8: Batch) -> None:
    batch = {k: v.clone() for k, v in batch8.items()}
    gen = torch.Generator().manual_seed(3)
    invalid = torch.rand(batch["seq_a"].shape, generator=gen) < 0.3
    invalid[:, 16:32] = True  # the whole second patch of Seq-A
    batch["seq_a_valid"] &= ~invalid
    batch["seq_a"][invalid] = 0.0
    poisoned = {k: v.clone() for k, v in batch.items()}
    poisoned["seq_a"][invalid] = torch.randn(int(invalid.sum()), generator=gen) * 100
    with torch.no_grad():
        a, b = trained_tiny(batch), trained_tiny(poisoned)
    for key in PER_SAMPLE:
        assert torch.equal(a[key], b[key]), key
    assert float(a["token_weights_seq"][:, 1].abs().max()) == 0.0  # the masked patch token
    assert float(a["token_weights_seq"][:, 0].min()) > 0.0


def test_shape_mismatch_is_a_clear_error(trained_tiny: SACMF) -> None:
    other = dataclasses.replace(TINY, frame_size=32)
    with pytest.raises(ValueError, match="preprocess_config"):
        trained_tiny(_batch(other, [0]))


# --------------------------------------------------------------------------------------------------
# Losses and training
# --------------------------------------------------------------------------------------------------


def test_loss_terms_finite_and_differentiable(batch8: Batch) -> None:
    torch.manual_seed(2)
    model = build_model(TINY).train()
    out = model(batch8)
    losses = sacmf_loss(out, batch8, TINY)
    for key in ("cls", "sim", "mi", "det", "det_heatmap", "det_size", "det_offset", "aux", "total"):
        assert losses[key].dim() == 0 and torch.isfinite(losses[key]), key
        assert float(losses[key].detach()) > 0.0, key
    params = dict(model.named_parameters())
    for term, probe in (
        ("cls", "head.4.weight"),
        ("sim", "patch_embed.weight"),
        ("mi", "img_proj.weight"),
        ("det", "det_heat.weight"),
        ("aux", "head_seq.1.weight"),
    ):
        (grad,) = torch.autograd.grad(losses[term], [params[probe]], retain_graph=True, allow_unused=True)
        assert grad is not None and float(grad.abs().sum()) > 0.0, (term, probe)
    losses["total"].backward()
    for name in ("backbone.body.0.weight", "cross_img.0.attn.q.weight", "mi.logits_a", "gate.2.weight"):
        grad = params[name].grad
        assert grad is not None and torch.isfinite(grad).all() and float(grad.abs().sum()) > 0, name


def test_few_optimiser_steps_lower_the_loss() -> None:
    torch.manual_seed(3)
    batch = _batch(TINY, range(100, 116))
    model = build_model(TINY).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(25):
        losses = sacmf_loss(model(batch), batch, TINY)
        opt.zero_grad()
        losses["total"].backward()
        opt.step()
        history.append({k: float(v.detach()) for k, v in losses.items()})
    first = np.mean([h["total"] for h in history[:3]])
    last = np.mean([h["total"] for h in history[-3:]])
    assert last < 0.7 * first, (first, last)
    assert np.mean([h["cls"] for h in history[-3:]]) < np.mean([h["cls"] for h in history[:3]])
    assert np.mean([h["det"] for h in history[-3:]]) < np.mean([h["det"] for h in history[:3]])


def test_sim_loss_prefers_aligned_pairs() -> None:
    gen = torch.Generator().manual_seed(4)
    img = torch.randn(8, 16, generator=gen)
    labels = torch.full((8,), -1)
    both = torch.ones(8, dtype=torch.bool)
    aligned = sim_loss(img, img + 0.01 * torch.randn(8, 16, generator=gen), labels, both)
    shuffled = sim_loss(img, img[torch.roll(torch.arange(8), 1)], labels, both)
    assert float(aligned) < 0.1 < float(shuffled)
    # with labels, a same-class partner is a positive: swapping within a class costs nothing extra
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    swap = sim_loss(img, img[[1, 0, 3, 2, 5, 4, 7, 6]], labels, both)
    cross = sim_loss(img, img[[2, 3, 0, 1, 6, 7, 4, 5]], labels, both)
    assert float(swap) < float(cross)
    assert float(sim_loss(img, img, labels, torch.zeros(8, dtype=torch.bool))) == 0.0


# --------------------------------------------------------------------------------------------------
# Detection targets and decoding
# --------------------------------------------------------------------------------------------------


def _out_from_targets(tgt: Batch, stride: int) -> Batch:
    return {
        "det_logits": torch.logit(tgt["heatmap"].clamp(1e-6, 1 - 1e-6)),
        "det_size": tgt["size"],
        "det_offset": tgt["offset"],
        "det_stride": torch.tensor(float(stride)),
    }


def test_detection_targets_decode_round_trip() -> None:
    boxes = torch.tensor(
        [
            [[10.3, 12.0, 16.9, 18.4], [40.0, 40.0, 56.5, 47.2], [3.0, 50.0, 9.0, 57.0]],
            [[30.2, 30.1, 34.0, 34.9], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]],
        ]
    )
    classes = torch.tensor([[0, 3, 5], [1, 0, 0]])
    valid = torch.tensor([[True, True, True], [True, False, False]])
    tgt = detection_targets(boxes, classes, TINY, valid)
    hd = TINY.det_size
    assert tgt["heatmap"].shape == (2, 6, hd, hd) and float(tgt["heatmap"].max()) == 1.0
    assert tgt["reg_mask"].sum(dim=(1, 2)).tolist() == [3.0, 1.0]
    assert int((tgt["heatmap"] == 1.0).sum()) == 4
    dets = decode_detections(_out_from_targets(tgt, TINY.det_stride), k=20, threshold=0.5)
    for i in range(2):
        got = sorted(dets[i], key=lambda d: d[4])
        want = sorted(
            [(*boxes[i, j].tolist(), int(classes[i, j])) for j in range(3) if valid[i, j]], key=lambda d: d[4]
        )
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g[:4], w[:4], atol=1e-4)
            assert g[4] == w[4] and g[5] > 0.99
    # scale maps back to raw Image-A pixels (preprocessing multiplied by it)
    out = _out_from_targets(tgt, TINY.det_stride)
    scaled = decode_detections(out, 20, 0.5, scale=torch.tensor([0.5, 2.0]))
    np.testing.assert_allclose(sorted(scaled[1][0][:4]), sorted((boxes[1, 0] / 2.0).tolist()), atol=1e-4)


def test_scene_boxes_round_trip_through_preprocess() -> None:
    scene = generate_scene(42)
    sample = preprocess(raw_from_scene(scene), TINY.preprocess_config())
    tgt = detection_targets(sample["boxes"], sample["box_classes"], TINY)
    dets = decode_detections(
        {k: v.unsqueeze(0) for k, v in _out_from_targets(tgt, TINY.det_stride).items() if k != "det_stride"}
        | {"det_stride": torch.tensor(float(TINY.det_stride))},
        k=100,
        threshold=0.5,
        scale=sample["scale_a"].unsqueeze(0),
    )[0]
    # objects whose centres share a cell and class collapse to one peak; everything else comes back
    found = {(round(d[0], 2), round(d[1], 2), d[4]) for d in dets}
    hits = sum(
        (round(float(b[0]), 2), round(float(b[1]), 2), int(c)) in found
        for b, c in zip(scene.boxes, scene.object_classes, strict=True)
    )
    assert hits >= len(scene.boxes) - 1 and len(dets) <= len(scene.boxes)


def test_focal_loss_rewards_the_target() -> None:
    box = torch.tensor([[20.0, 20.0, 28.0, 26.0]])
    tgt = detection_targets(box, torch.tensor([2]), TINY)["heatmap"][None]
    perfect = torch.logit(tgt.clamp(1e-4, 1 - 1e-4))
    off = torch.roll(perfect, shifts=3, dims=-1)
    blank = torch.full_like(perfect, -5.0)
    lp, lo, lb = (float(focal_heatmap_loss(x, tgt)) for x in (perfect, off, blank))
    assert lp < 0.01 and lp < lo and lp < lb
    assert float(focal_heatmap_loss(off, tgt, torch.zeros(1))) == 0.0


def test_raw_sample_without_boxes_skips_detection_loss(trained_tiny: SACMF) -> None:
    scene = generate_scene(50)
    s = scene
    raw = RawSample(image_a=s.image_a, image_b=s.image_b, seq_a=s.seq_a, seq_b=s.seq_b, label=1)
    batch = collate([preprocess(raw, TINY.preprocess_config())] * 2)
    with torch.no_grad():
        losses = sacmf_loss(trained_tiny(batch), batch, TINY)
    assert float(losses["det"]) == 0.0 and float(losses["cls"]) > 0.0
