"""The [image_fusion] stage inside the daemon: a real Service's prepare, inference and finish threads, a
real SA-CMF forward pass, real fusion networks (the golden CDDFuse weights) on real TNO frames, and the
records as the JSONL sink writes them.

Why these tests exist: the stage sits between the windows and the model, so its failures were invisible
in the output. A fusion failure served a whole batch unfused and uncounted; a network giving NaN fed
the model a black frame; a batch of slow fusions made /healthz report the daemon stale; broken weights
crashed ``serve`` with a traceback while ``check-config`` said OK; a reload never reloaded them; and a
record did not say whether its window had been fused. Failures are forced with real bad inputs and
real broken weight files (or, for a network that goes bad after it loaded, by breaking its weights in
memory), never by replacing our own code.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from daemon import cli
from daemon import config as config_mod
from daemon.fusion_stage import FusionStage
from ingest.windowing import Frame, Samples, Window
from sinks.jsonl import JsonlSink, read_jsonl
from sinks.record import RecordError, from_wire, to_wire
from sinks.supervisor import SinkSupervisor
from tests.service_helpers import ROOT, SEC, T0

SHARED = ROOT.parent / "shared"
TNO = SHARED / "fusion_testdata" / "TNO"
CDDFUSE_W = SHARED / "golden" / "cddfuse" / "weights.safetensors"
UNFUSED = {"method": "none", "sha256": None}  # image_fusion on the wire when the model saw the raw Image-A
needs_data = pytest.mark.skipif(not TNO.is_dir(), reason=f"shared test data missing at {TNO}")
needs_golden = pytest.mark.skipif(not CDDFUSE_W.is_file(), reason=f"golden weights missing at {CDDFUSE_W}")

torch.set_num_threads(1)


def tno(name: str, rows: slice = slice(None), cols: slice = slice(None)) -> tuple[np.ndarray, np.ndarray]:
    """(visible, infrared) uint8 gray frames of a TNO pair (stored as 3 equal channels), cropped."""
    vi, ir = (np.asarray(Image.open(TNO / kind / name).convert("L"))[rows, cols] for kind in ("vi", "ir"))
    return vi, ir


def window(vi: np.ndarray | None, ir: np.ndarray | None, k: int = 0, group: str = "g1") -> Window:
    """A 1 s window with one frame per present camera and both radiometers; ``k`` spaces windows apart."""
    start = T0 + k * SEC
    frames = {}
    if vi is not None:
        frames["image_a"] = [Frame("cam_vis", k, start + SEC // 2, 1_000_000, vi)]
    if ir is not None:
        frames["image_b"] = [Frame("cam_ir", k, start + SEC // 2, 1_000_000, ir)]
    rng = np.random.default_rng(k)
    samples = {
        role: Samples(None, (1 + 0.1 * rng.standard_normal(1000)).astype(np.float32), 1_000_000, t0=start)
        for role in ("seq_a", "seq_b")
    }
    presence = {"image_a": vi is not None, "image_b": ir is not None, "seq_a": True, "seq_b": True}
    return Window(group, start, start + SEC, frames, samples, presence, "full", "watermark")


@pytest.fixture(scope="module")
def model_ckpt() -> Path:
    """The embedded trained model: it answers on image content (a tiny untrained one barely tells a fused
    frame from a raw one: 1e-5 apart, too close to batched-vs-single rounding to tell which it saw)."""
    path = ROOT / "model" / "weights" / "default.pt"
    if not path.is_file():
        pytest.skip(f"no embedded model at {path}")
    return path


def config(model_ckpt: Path, fusion: dict, **sections: dict) -> config_mod.Config:
    """The documented config.toml with a tiny model, the given [image_fusion] and section overrides."""
    raw = tomllib.loads((ROOT / "config.toml").read_text())
    raw["model"]["checkpoint"] = str(model_ckpt)
    raw["image_fusion"] = fusion
    for name, values in sections.items():
        raw[name].update(values)
    return config_mod.parse(raw)


def service(cfg: config_mod.Config, jsonl: Path):
    """A Service with its model loaded and a real JSONL result sink; its threads are not started yet."""
    from daemon.service import Service

    svc = Service(cfg)
    svc.runner.load()
    svc.results = SinkSupervisor([JsonlSink(jsonl)])
    return svc


def run_threads(svc, windows: list[Window], jsonl: Path, during=None, timeout: float = 120.0) -> dict:
    """The real prepare -> inference -> finish threads on ``windows``; {group: record} as JSONL holds them.

    ``during`` is called every 0.05 s while the threads run (to watch /healthz)."""
    for w in windows:
        svc.queue.put(w)
    svc.queue.close()
    loops = (svc._prepare_loop, svc._inference_loop, svc._finish_loop)
    threads = [threading.Thread(target=f, daemon=True) for f in loops]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        if during is not None:
            during()
        time.sleep(0.05)
    assert not any(t.is_alive() for t in threads), "the pipeline did not finish"
    assert svc.results.close(10.0)
    records = [from_wire(d) for d in read_jsonl(jsonl)]
    assert len({r.group for r in records}) == len(records)
    return {r.group: r for r in records}


def metric(svc, name: str, **labels: str) -> float | None:
    """One sample of the service's /metrics exposition (None when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    body = svc.metrics.exposition()[0].decode()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def probs_of(svc, w: Window) -> list[float]:
    """The model's answer on exactly this window, alone (the reference a published record must match)."""
    return svc.runner.run([w])[0].target_probs


def nan_first(w: np.ndarray) -> np.ndarray:
    w.flat[0] = np.nan
    return w


def golden_with(tmp_path: Path, name: str, change) -> Path:
    """A copy of the golden CDDFuse weights with one tensor changed by ``change``: a real weights file."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(CDDFUSE_W))
    key = "BaseFuseLayer/module.attn.proj.weight"
    tensors[key] = change(tensors[key].copy())
    save_file(tensors, str(tmp_path / name))
    return tmp_path / name


# ----------------------------------------------------------------------------------------------------
# 1. one window's fusion failure costs only that window, and is counted


def same_answer(a: list[float], b: list[float]) -> bool:
    """Equal up to batched-vs-single float rounding (1e-8 here); fused and raw frames differ by far more."""
    return bool(np.abs(np.subtract(a, b)).max() < 1e-5)


@needs_data
def test_a_window_whose_fusion_fails_costs_only_itself(model_ckpt: Path, tmp_path: Path) -> None:
    """The rest of the batch is fused and served; the failed window is failed, not served raw (its model
    was trained on fused frames), and counted by reason."""
    vi, ir = tno("01.png", slice(100, 196), slice(200, 328))
    cfg = config(model_ckpt, {"method": "mean"}, inference={"max_batch_size": 8})
    svc = service(cfg, tmp_path / "r.jsonl")
    bad_ir = np.zeros((2, 2, 2, 2), np.uint8)  # an infrared frame no fusion can take
    windows = [
        window(vi, ir, 0, "ok1"),
        window(vi, bad_ir, 1, "bad"),
        window(vi, ir[:, ::-1].copy(), 2, "ok2"),
        window(vi, None, 3, "vis_only"),
    ]
    records = run_threads(svc, windows, tmp_path / "r.jsonl")

    assert set(records) == {"ok1", "ok2", "vis_only"} and svc.state.failed_windows == 1
    for group, w in (("ok1", windows[0]), ("ok2", windows[2])):  # the model saw the fused frame
        fused, _ = svc.fusion.fuse_window(w)
        assert same_answer(records[group].target_probs, probs_of(svc, fused))
        assert not same_answer(records[group].target_probs, probs_of(svc, w))
        assert to_wire(records[group])["image_fusion"] == {"method": "mean", "sha256": None}
    assert same_answer(records["vis_only"].target_probs, probs_of(svc, windows[3]))
    assert to_wire(records["vis_only"])["image_fusion"] == UNFUSED  # nothing to fuse: passed through, and says so
    assert metric(svc, "sacmf_inference_requests_total", result="failure") == 1
    assert metric(svc, "sacmf_image_fusion_failures_total", reason="error") == 1
    assert metric(svc, "sacmf_image_fusion_failures_total", reason="non_finite") == 0
    seen = {
        r: metric(svc, "sacmf_image_fusion_windows_total", group=g, result=r)
        for g, r in (("ok1", "fused"), ("bad", "failed"), ("vis_only", "not_fused"))
    }
    assert seen == {"fused": 1, "failed": 1, "not_fused": 1}


@needs_data
@needs_golden
@pytest.mark.parametrize("feed", ["image_a", "none"])
def test_a_network_that_outputs_nan_never_feeds_the_model_a_black_frame(
    model_ckpt: Path, tmp_path: Path, feed: str
) -> None:
    """feed image_a: the window fails; feed none (quality gauges only): the model never sees fused frames,
    so the window is served from its raw frames. Counted either way."""
    vi, ir = tno("01.png", slice(100, 148), slice(200, 264))
    cfg = config(model_ckpt, {"method": "cddfuse", "checkpoint": str(CDDFUSE_W), "feed": feed})
    svc = service(cfg, tmp_path / "r.jsonl")
    with torch.no_grad():  # the network goes bad after it loaded and warmed up: a NaN in its weights
        next(svc.fusion.model.parameters()).view(-1)[0] = float("nan")
    w = window(vi, ir, 0, "nan")
    records = run_threads(svc, [w, window(vi, None, 1, "vis_only")], tmp_path / "r.jsonl")
    if feed == "image_a":
        assert set(records) == {"vis_only"} and svc.state.failed_windows == 1
    else:
        assert set(records) == {"nan", "vis_only"} and svc.state.failed_windows == 0
        assert same_answer(records["nan"].target_probs, probs_of(svc, w))
        assert to_wire(records["nan"])["image_fusion"] == UNFUSED
    assert metric(svc, "sacmf_image_fusion_failures_total", reason="non_finite") == 1


# ----------------------------------------------------------------------------------------------------
# 2. fusion weights are validated when they load


@needs_golden
def test_fusion_weights_that_are_not_finite_or_give_non_finite_output_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not finite"):
        FusionStage("cddfuse", golden_with(tmp_path, "nan.safetensors", nan_first))
    huge = golden_with(tmp_path, "huge.safetensors", lambda w: w * np.float32(1e38))  # finite, overflows
    with pytest.raises(ValueError, match="warm-up failed.*non-finite"):
        FusionStage("cddfuse", huge)
    assert FusionStage("cddfuse", CDDFUSE_W).sha256 == hashlib.sha256(CDDFUSE_W.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------------
# 3. /healthz during a batch of slow fusions


@needs_data
@needs_golden
def test_health_stays_green_through_a_batch_of_fused_windows(model_ckpt: Path, tmp_path: Path) -> None:
    """Twelve CDDFuse windows take several times health_max_age_s as one batch, each well under it.

    The limit is four times one window's fusion time measured here and now (about 0.3 s on an idle
    host): a fixed 1 s went stale under load, when one window alone took longer."""
    vi, ir = tno("01.png", slice(100, 164), slice(200, 264))
    stage = FusionStage("cddfuse", CDDFUSE_W)
    stage.fuse_window_frames(vi, ir)  # warm
    t0 = time.monotonic()
    stage.fuse_window_frames(vi, ir)
    limit = max(1.0, 4 * (time.monotonic() - t0))
    cfg = config(
        model_ckpt,
        {"method": "cddfuse", "checkpoint": str(CDDFUSE_W)},
        inference={"max_batch_size": 12},
        admin={"health_max_age_s": limit},
    )
    svc = service(cfg, tmp_path / "r.jsonl")
    stale: list[list[str]] = []

    def watch() -> None:
        ok, detail = svc.health()
        if not ok:
            stale.append(detail["stale"])

    started = time.monotonic()
    records = run_threads(svc, [window(vi, ir, k, f"w{k}") for k in range(12)], tmp_path / "r.jsonl", watch)
    took = time.monotonic() - started
    assert stale == []
    assert len(records) == 12 and took > 2 * limit  # the batch did outlast the limit


# ----------------------------------------------------------------------------------------------------
# 4. serve and check-config refuse broken fusion weights with exit status 2


@needs_golden
def test_serve_and_check_config_refuse_broken_fusion_weights(
    model_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(CDDFUSE_W.read_bytes()[:100_000])  # a copy that stopped part-way
    text = (ROOT / "config.toml").read_text()
    text = text.replace('checkpoint = "model/weights/default.pt"', f'checkpoint = "{model_ckpt}"')
    text = text.replace('method = "none"', 'method = "cddfuse"')
    bad, good = tmp_path / "bad.toml", tmp_path / "good.toml"
    bad.write_text(text.replace('checkpoint = ""', f'checkpoint = "{truncated}"'))
    good.write_text(text.replace('checkpoint = ""', f'checkpoint = "{CDDFUSE_W}"'))

    assert cli.main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "error: [image_fusion] checkpoint" in err and str(truncated) in err
    assert cli.main(["serve", str(bad)]) == 2  # refused before anything binds or starts
    err = capsys.readouterr().err
    assert "error: [image_fusion] checkpoint" in err and "Traceback" not in err

    assert cli.main(["check-config", str(good)]) == 0
    sha = hashlib.sha256(CDDFUSE_W.read_bytes()).hexdigest()
    assert f"image fusion: cddfuse (weights sha256 {sha}, warm-up OK)" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# 5. hot reload covers the fusion weights: validate beside, then swap, or keep the old


@needs_data
@needs_golden
def test_reload_swaps_the_fusion_weights_only_when_they_validate(model_ckpt: Path, tmp_path: Path) -> None:
    live = tmp_path / "fusion.safetensors"
    shutil.copy(CDDFUSE_W, live)
    svc = service(config(model_ckpt, {"method": "cddfuse", "checkpoint": str(live)}), tmp_path / "r.jsonl")
    first, first_sha = svc.fusion, hashlib.sha256(live.read_bytes()).hexdigest()

    shutil.copy(golden_with(tmp_path, "nan.safetensors", nan_first), live)  # an operator deploys bad weights
    status, body = svc.reload()
    assert status == 422 and "[image_fusion]" in body["error"] and "not finite" in body["error"]
    assert body["image_fusion"] == {"method": "cddfuse", "sha256": first_sha} and svc.fusion is first
    assert metric(svc, "sacmf_model_reloads_total", result="failure") == 1

    shutil.copy(golden_with(tmp_path, "new.safetensors", lambda w: w * np.float32(0.5)), live)
    status, body = svc.reload()
    new_sha = hashlib.sha256(live.read_bytes()).hexdigest()
    assert status == 200 and new_sha != first_sha
    assert body["image_fusion"] == {"method": "cddfuse", "sha256": new_sha} and svc.fusion.sha256 == new_sha
    assert metric(svc, "sacmf_image_fusion_info", method="cddfuse", sha256=new_sha) == 1
    assert metric(svc, "sacmf_image_fusion_info", method="cddfuse", sha256=first_sha) is None

    vi, ir = tno("01.png", slice(100, 148), slice(200, 264))
    records = run_threads(svc, [window(vi, ir, 0, "after")], tmp_path / "r.jsonl")
    assert to_wire(records["after"])["image_fusion"] == {"method": "cddfuse", "sha256": new_sha}


# ----------------------------------------------------------------------------------------------------
# 6. the record says whether and how its window was fused; records without the field still read


def test_image_fusion_field_round_trips_and_old_records_still_read() -> None:
    from sinks.record import FusionWeights, ResultRecord

    rec = ResultRecord("g1", T0, T0 + SEC, {"image_a": True}, ["a", "b"], [0.25, 0.75], FusionWeights(0.5, 0.5))
    wire = to_wire(rec)
    assert wire["image_fusion"] == UNFUSED
    assert from_wire(wire).image_fusion is None
    old = {k: v for k, v in wire.items() if k != "image_fusion"}  # written before the field existed (schema 1)
    assert from_wire(old).image_fusion is None and to_wire(from_wire(old)) == wire
    fused = {**wire, "image_fusion": {"method": "cddfuse", "sha256": "ab" * 32}}
    back = from_wire(fused)
    assert (back.image_fusion.method, back.image_fusion.sha256) == ("cddfuse", "ab" * 32)
    assert to_wire(back) == fused
    for bad in ("cddfuse", {"sha256": None}, {"method": "none", "sha256": "ab" * 32}):
        with pytest.raises(RecordError, match="image_fusion"):
            from_wire({**wire, "image_fusion": bad})


# ----------------------------------------------------------------------------------------------------
# 7. a wider camera enters the fusion by its own range: the ADC depth does not matter


@needs_data
@needs_golden
def test_8_bit_and_14_bit_cameras_give_the_same_fused_frame_on_tno() -> None:
    vi8, ir8 = tno("01.png")  # 576 x 768
    ir14 = (ir8.astype(np.uint16) * 64 + 37).astype(np.uint16)  # the same scene as 14-bit counts (max 16357)
    vi12 = (vi8.astype(np.uint16) * 16 + 200).astype(np.uint16)  # a 12-bit visible camera in uint16
    mean = FusionStage("mean")
    ref = mean.fuse_window_frames(vi8, ir8).astype(np.float64)
    assert np.abs(mean.fuse_window_frames(vi8, ir14) - ref).max() <= 1.0
    assert np.abs(mean.fuse_window_frames(vi12, ir14) / 257.0 - ref).max() <= 1.0  # at uint16's full scale
    ir_part = ref - mean.fuse_window_frames(vi8, np.zeros_like(ir8)).astype(np.float64)
    assert ir_part.max() - ir_part.min() > 100  # the infrared camera brings its contrast (8-bit grey levels)
    net = FusionStage("cddfuse", CDDFUSE_W)
    crop = (slice(100, 196), slice(200, 328))  # its infrared spans 53..196 of 255
    ir_crop = ir8[crop].astype(np.float64)
    # 8-bit frames are read /255 as the networks were trained; a 14-bit one by its own range, which for
    # this crop is the 8-bit crop stretched to its full range
    stretched = np.round((ir_crop - ir_crop.min()) / np.ptp(ir_crop) * 255).astype(np.uint8)
    ref = net.fuse_window_frames(vi8[crop], stretched).astype(np.float64)
    assert np.abs(net.fuse_window_frames(vi8[crop], ir14[crop]) - ref).max() <= 1.0
