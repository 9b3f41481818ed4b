"""The daemon core for real: adapter, inference runner and hot reload, pipe codec, admin HTTP, and
`sacmf serve` as a subprocess fed by the simulator over ZeroMQ.

Until a trained checkpoint exists, a tiny-backbone SA-CMF is built here, saved with
``daemon.inference.save_checkpoint`` to a temp file and served.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from datetime import datetime
from http.client import HTTPConnection
from pathlib import Path

import msgpack
import numpy as np
import pytest
import structlog
import torch
import zmq

from daemon import simulate
from daemon.adapt import pick_frame, prepare_window, window_to_raw, windows_to_batch
from daemon.admin import AdminHandlers, AdminServer, parse_listen
from daemon.inference import CheckpointError, InferenceRunner, load_checkpoint
from daemon.service import WINDOW, decode_message, encode_message
from daemon.simulate import SimSettings
from daemon.window_view import model_view
from ingest.resample import resample
from ingest.windowing import Frame, Samples, Window
from model.checkpoint import save_checkpoint
from sinks.jsonl import read_jsonl
from sinks.mcap_recorder import read_recording
from sinks.record import ResultRecord, from_wire, to_wire
from tests.service_helpers import ROOT, SEC, T0, TINY, Daemon, http, sacmf, tiny_checkpoint

torch.set_num_threads(1)


def make_window(
    start_ns: int = T0,
    *,
    roles: tuple[str, ...] = ("image_a", "image_b", "seq_a", "seq_b"),
    shape: tuple[int, ...] = (48, 64),
    completeness: str = "full",
    seed: int = 0,
) -> Window:
    """A 1 s window: 5 frames per camera (a bright source on a noisy sky), 1 kHz radiation samples."""
    rng = np.random.default_rng(seed)
    frames: dict[str, list[Frame]] = {"image_a": [], "image_b": []}
    for role in ("image_a", "image_b"):
        if role in roles:
            for k in range(5):
                img = rng.normal(100, 5, shape)
                img[10:13, 20:23] += 3000
                frames[role].append(Frame(f"cam_{role}", k, start_ns + k * SEC // 5, 20_000_000, img.astype(np.uint16)))
    samples = {}
    for role in ("seq_a", "seq_b"):
        if role in roles:
            values = (1 + 0.1 * rng.standard_normal(1000)).astype(np.float32)
            samples[role] = Samples(None, values, 1_000_000, t0=start_ns)
        else:
            samples[role] = Samples.empty()
    presence = {r: r in roles for r in ("image_a", "image_b", "seq_a", "seq_b")}
    return Window("g1", start_ns, start_ns + SEC, frames, samples, presence, completeness, "watermark")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    tiny_checkpoint(path, "tiny-v1")
    return path


# ----------------------------------------------------------------------------------------------------
# Window -> model input
# ----------------------------------------------------------------------------------------------------


def test_the_frame_nearest_the_window_centre_is_picked():
    def frame(t_s: float, exp_s: float = 0.1, seq: int = 0) -> Frame:
        return Frame("c", seq, T0 + int(t_s * SEC), int(exp_s * SEC), np.zeros((2, 2), np.uint16))

    frames = [frame(0.1), frame(0.45), frame(0.8)]  # exposure mid-points 0.15, 0.5, 0.85 s
    assert pick_frame(frames, T0, T0 + SEC) is frames[1]
    # the exposure mid-point counts, not the start: a long exposure starting early can be the centre one
    frames = [frame(0.3, exp_s=0.4, seq=1), frame(0.55, exp_s=0.0, seq=2)]  # mid-points 0.5 and 0.55
    assert pick_frame(frames, T0, T0 + SEC).seq == 1
    tie = [frame(0.4, 0.0, 1), frame(0.6, 0.0, 2)]  # equidistant: the earlier one
    assert pick_frame(tie, T0, T0 + SEC).seq == 1
    assert pick_frame([], T0, T0 + SEC) is None


def test_the_model_view_keeps_the_picked_frames_and_gives_the_same_inputs():
    """The ingest process sends only the frame per camera the model uses; nothing downstream may
    see a difference in what it computes from the window."""
    w = make_window(seed=3, roles=("image_a", "seq_a", "seq_b"))  # image_b configured but silent
    view = model_view(w)
    assert len(w.frames["image_a"]) == 5 and view.frames["image_a"] == [pick_frame(w.frames["image_a"], T0, T0 + SEC)]
    assert view.frames["image_b"] == [] and w.frames["image_b"] == []
    assert (view.group, view.start_ns, view.end_ns, view.presence, view.samples) == (
        w.group,
        w.start_ns,
        w.end_ns,
        w.presence,
        w.samples,
    )
    full, slim = prepare_window(w, TINY.preprocess_config()), prepare_window(view, TINY.preprocess_config())
    assert full.keys() == slim.keys() and all(torch.equal(full[k], slim[k]) for k in full)
    assert model_view(view) == view


def test_window_to_raw_resamples_with_validity_masks_and_keeps_presence():
    t = T0 + np.arange(0, SEC // 2, 1_000_000, dtype=np.int64)  # seq_a: samples only in the first half
    values = np.arange(t.shape[0], dtype=np.float32)
    rgb = np.stack([np.full((4, 6), v, np.uint8) for v in (10, 20, 60)], axis=2)
    w = Window(
        "g1",
        T0,
        T0 + SEC,
        {"image_a": [Frame("cam", 0, T0 + SEC // 2, 0, rgb)], "image_b": []},
        {"seq_a": Samples(t, values, 1_000_000), "seq_b": Samples.empty()},
        {"image_a": True, "image_b": False, "seq_a": True},  # seq_b not configured for this group
        "partial",
        "watermark",
    )
    raw = window_to_raw(w, 64)
    assert raw.presence == {"image_a": True, "image_b": False, "seq_a": True, "seq_b": False}
    assert raw.image_a.shape == (4, 6) and np.allclose(raw.image_a, 30.0)  # channels averaged
    assert raw.image_b is None and raw.seq_b is None
    assert raw.seq_a_valid[:32].all() and not raw.seq_a_valid[32:].any()  # the gap is "no data", not zeros
    # bin k covers [k/64 s, (k+1)/64 s): the mean of the sample indices falling in it, computed directly
    bins = ((t - T0) * 64) // SEC
    expected = np.array([values[bins == k].mean() for k in range(32)])
    assert np.allclose(raw.seq_a[:32], expected)
    ref_values, ref_valid = resample(w.samples["seq_a"], T0, T0 + SEC, 64)
    assert np.array_equal(raw.seq_a, ref_values) and np.array_equal(raw.seq_a_valid, ref_valid)


def test_multichannel_samples_near_the_float32_limit_average_without_overflow():
    """A 2-channel detector reading 3e38 (finite in float32) was averaged over its channels in float32:
    the sum overflowed to inf, the preprocessing invalidated every bin and the modality went absent; the
    same reading from a 1-channel detector was kept."""
    w = make_window(roles=("seq_a",))
    w.samples["seq_a"] = Samples(None, np.full((1000, 2), 3e38, np.float32), 1_000_000, t0=T0)
    raw = window_to_raw(w, seq_len=16)
    assert np.isfinite(raw.seq_a).all() and raw.seq_a_valid.all()
    assert np.allclose(raw.seq_a, 3e38, rtol=1e-6)


def test_colour_frames_near_the_float32_limit_average_without_overflow():
    """A finite [H, W, 3] float32 frame whose channels sum past float32's range keeps its bright pixel."""
    rgb = np.ones((4, 6, 3), np.float32)
    rgb[2, 3] = 3e38
    frames = {"image_a": [Frame("cam", 0, T0 + SEC // 2, 0, rgb)], "image_b": []}
    samples = {"seq_a": Samples.empty(), "seq_b": Samples.empty()}
    w = Window("g1", T0, T0 + SEC, frames, samples, {"image_a": True}, "partial", "watermark")
    raw = window_to_raw(w, 64)
    assert np.isfinite(raw.image_a).all() and raw.image_a[2, 3] == pytest.approx(3e38, rel=1e-6)


def test_windows_to_batch_fits_the_model_contract():
    windows = [make_window(seed=1), make_window(T0 + SEC, roles=("seq_a",), seed=2)]
    batch = windows_to_batch(windows, TINY.preprocess_config())
    s, n = TINY.frame_size, TINY.seq_len
    assert batch["image_a"].shape == (2, 1, s, s) and batch["seq_b"].shape == (2, n)
    assert batch["presence"].tolist() == [[True] * 4, [False, False, True, False]]
    assert float(batch["scale_a"][0]) == pytest.approx(s / 64)  # 48x64 frame -> longest side 64
    with pytest.raises(ValueError):
        windows_to_batch([], TINY.preprocess_config())


# ----------------------------------------------------------------------------------------------------
# Inference runner and hot reload
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def runner(checkpoint: Path, tmp_path: Path) -> InferenceRunner:
    path = tmp_path / "served.pt"
    shutil.copy(checkpoint, path)
    r = InferenceRunner(path, max_batch_size=3, det_threshold=0.0, det_max_detections=3)
    r.load()
    return r


def test_runner_turns_windows_into_schema_valid_records(runner: InferenceRunner):
    windows = [
        make_window(seed=1),
        make_window(T0 + SEC, roles=("seq_a", "seq_b"), seed=2),
        make_window(T0 + 2 * SEC, completeness="flushed", seed=3),
    ]
    records = runner.run(windows)
    assert [r.start_ns for r in records] == [w.start_ns for w in windows]
    for rec, w in zip(records, windows, strict=True):
        assert from_wire(msgpack.unpackb(msgpack.packb(to_wire(rec)))) == rec
        assert rec.class_names == list(TINY.class_names) and rec.model_version == "tiny-v1"
        assert sum(rec.target_probs) == pytest.approx(1.0, abs=1e-6)
        assert rec.presence == w.presence and rec.flushed == (w.completeness == "flushed")
    full, no_image = records[0], records[1]
    assert full.fusion.image + full.fusion.sequence == pytest.approx(1.0, abs=1e-6)
    assert no_image.fusion.image == 0.0 and no_image.fusion.sequence == pytest.approx(1.0)
    assert no_image.detections == [] and set(no_image.fusion.tokens) == {"sequence"}
    assert full.fusion.tokens["image"].n == 2 * TINY.token_grid**2
    assert len(full.detections) == 3  # threshold 0: the top 3 peaks
    for det in full.detections:
        x0, y0, x1, y1 = det.box
        assert 0 <= x0 <= x1 <= 64 and 0 <= y0 <= y1 <= 48  # Image-A pixels of a 48x64 frame
        assert sum(det.class_probs) == pytest.approx(1.0, abs=1e-6)
    # eval mode: a window's result does not depend on its batch-mates
    alone = runner.run([windows[2]])[0]
    assert np.allclose(alone.target_probs, records[2].target_probs, atol=1e-5)


@pytest.mark.parametrize("modalities", [["sequence"], ["image"]])
def test_a_single_modality_checkpoint_is_fed_only_what_it_was_trained_on(tmp_path: Path, modalities: list[str]):
    """`sacmf train --modalities sequence` records what the model learnt from, and `sacmf evaluate` and
    `sacmf test` feed it only that. The daemon fed it the whole window: the untrained branch took half
    the fusion weight, changed the class, and a sequence-only model published detections from a head
    that was never trained. Now the daemon gives the answer `sacmf evaluate` measured."""
    from model.infer import restrict
    from model.sacmf import build_model

    torch.manual_seed(0)
    path = tmp_path / "one.pt"
    save_checkpoint(build_model(TINY), path, "one", extra={"training": {"modalities": modalities}})
    r = InferenceRunner(path, det_threshold=0.0, det_max_detections=3)
    loaded = r.load()
    assert loaded.modalities == tuple(modalities)
    windows = [make_window(seed=1), make_window(T0 + SEC, seed=2)]
    records = r.run(windows)
    batch = restrict(windows_to_batch(windows, loaded.config.preprocess_config()), modalities)
    with torch.inference_mode():
        expected = torch.softmax(loaded.model(batch)["logits"].double(), dim=1)
    for rec, probs in zip(records, expected.tolist(), strict=True):
        assert np.allclose(rec.target_probs, probs, atol=1e-6)  # what an offline evaluation computes
        assert rec.presence == dict.fromkeys(("image_a", "image_b", "seq_a", "seq_b"), True)  # the window's data
        if modalities == ["sequence"]:
            assert rec.fusion.image == 0.0 and rec.fusion.sequence == pytest.approx(1.0)
            assert rec.detections == [] and set(rec.fusion.tokens) == {"sequence"}
        else:
            assert rec.fusion.sequence == 0.0 and len(rec.detections) == 3


def test_record_presence_says_which_inputs_the_model_could_use(runner: InferenceRunner):
    """A dead infrared camera sending all-NaN frames and a radiometer sending only NaN ([ingest]
    non_finite = "keep"): the preprocessing treats both as absent, and the record must say so instead of
    claiming four inputs for an answer made from two."""
    w = make_window(seed=4)
    dead = np.full((48, 64), np.nan, np.float32)
    w.frames["image_b"] = [dataclasses.replace(f, image=dead) for f in w.frames["image_b"]]
    w.samples["seq_b"] = Samples(None, np.full(1000, np.nan, np.float32), 1_000_000, t0=T0)
    (rec,) = runner.run([w])
    assert rec.presence == {"image_a": True, "image_b": False, "seq_a": True, "seq_b": False}
    assert rec.fusion.tokens["image"].n == TINY.token_grid**2  # one camera's tokens


def _tampered(src: Path, dst: Path, edit) -> Path:
    ckpt = torch.load(src, weights_only=True)
    edit(ckpt)
    torch.save(ckpt, dst)
    return dst


def _set_first(ckpt: dict, value) -> None:
    key = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][key] = value(ckpt["state_dict"][key])


BAD_CHECKPOINTS = {
    "garbage": (lambda src, dst: dst.write_bytes(b"not a checkpoint" * 10), "not a loadable checkpoint"),
    "truncated": (lambda src, dst: dst.write_bytes(src.read_bytes()[:5000]), "not a loadable checkpoint"),
    "missing key": (lambda src, dst: _tampered(src, dst, lambda c: c.pop("class_names")), "lacks ['class_names']"),
    "wrong shape": (
        lambda src, dst: _tampered(src, dst, lambda c: _set_first(c, lambda t: torch.zeros(*t.shape, 2))),
        "shapes do not fit",
    ),
    "missing tensor": (
        lambda src, dst: _tampered(src, dst, lambda c: c["state_dict"].pop("head.1.weight")),
        "missing ['head.1.weight']",
    ),
    "nan weights": (
        lambda src, dst: _tampered(src, dst, lambda c: _set_first(c, lambda t: torch.full_like(t, float("nan")))),
        "non-finite",
    ),
    "unknown config": (
        lambda src, dst: _tampered(src, dst, lambda c: c["config"].update(wings=2)),
        "unknown key 'wings'",
    ),
    "not a file": (lambda src, dst: dst.unlink(), "cannot read checkpoint"),
}


def test_a_bad_checkpoint_is_refused_and_the_old_model_keeps_serving(runner: InferenceRunner, checkpoint: Path):
    before = runner.run([make_window()])[0]
    for i, (name, (write, message)) in enumerate(BAD_CHECKPOINTS.items(), start=1):
        write(checkpoint, runner.checkpoint)
        outcome = runner.reload()
        assert not outcome.ok, name
        assert message in outcome.error, (name, outcome.error)
        assert runner.reloads == {"success": 0, "failure": i}
        assert runner.model_version == "tiny-v1" and outcome.version == "tiny-v1"
        again = runner.run([make_window()])[0]
        assert again.target_probs == before.target_probs and again.model_version == "tiny-v1"
    # a valid new checkpoint swaps; records name the new model
    sha = tiny_checkpoint(runner.checkpoint, "tiny-v2", seed=7)
    outcome = runner.reload()
    assert outcome.ok and outcome.version == "tiny-v2" and outcome.sha256 == sha
    assert runner.model_sha256 == hashlib.sha256(runner.checkpoint.read_bytes()).hexdigest()
    after = runner.run([make_window()])[0]
    assert after.model_version == "tiny-v2" and after.target_probs != before.target_probs
    assert runner.reloads == {"success": 1, "failure": len(BAD_CHECKPOINTS)}


def test_load_checkpoint_without_a_version_falls_back_to_the_sha256_prefix(checkpoint: Path, tmp_path: Path):
    path = _tampered(checkpoint, tmp_path / "nov.pt", lambda c: c.update(version=""))
    loaded = load_checkpoint(path)
    assert loaded.version == f"sha256:{loaded.sha256[:12]}"
    with pytest.raises(CheckpointError, match="format"):
        load_checkpoint(_tampered(checkpoint, tmp_path / "fmt.pt", lambda c: c.update(format="other/9")))


def test_reload_swaps_only_between_batches(runner: InferenceRunner):
    """While a batch holds the model (the runner's batch lock), a validated reload waits to swap."""
    tiny_checkpoint(runner.checkpoint, "tiny-v3", seed=3)
    done = threading.Event()
    with runner._lock:  # a batch in flight
        t = threading.Thread(target=lambda: (runner.reload(), done.set()))
        t.start()
        time.sleep(1.0)  # long enough to load and warm the tiny model
        assert not done.is_set() and runner.model_version == "tiny-v1"
    t.join(30)
    assert done.is_set() and runner.model_version == "tiny-v3"


# ----------------------------------------------------------------------------------------------------
# The ingest -> main pipe
# ----------------------------------------------------------------------------------------------------


def test_pipe_messages_carry_windows_with_out_of_band_frames(ctx, tmp_path: Path):
    ep = f"ipc:///tmp/sacmf-pipe-{os.getpid()}.ipc"
    pull = ctx.socket(zmq.PULL)
    pull.bind(ep)
    push = ctx.socket(zmq.PUSH)
    push.connect(ep)
    w = make_window(shape=(256, 256), seed=5)
    push.send_multipart(encode_message(WINDOW, w), copy=False)
    assert pull.poll(5000)
    frames = pull.recv_multipart(copy=False)
    kind, got = decode_message(frames)
    push.close(0)
    pull.close(0)
    assert kind == WINDOW and isinstance(got, Window)
    assert len(frames) == 2 + 10  # the 10 images travel as their own frames; 4 kB series ride inside
    assert len(frames[1].bytes) < 20_000  # the pickle itself holds no pixel data
    a, b = w.frames["image_a"][2].image, got.frames["image_a"][2].image
    assert np.array_equal(a, b) and not b.flags.owndata
    assert any(np.shares_memory(b, np.frombuffer(f.buffer, np.uint8)) for f in frames[2:])  # a view, not a copy
    assert np.array_equal(got.samples["seq_a"].t_ns, w.samples["seq_a"].t_ns)
    assert (got.group, got.start_ns, got.presence, got.completeness) == (w.group, w.start_ns, w.presence, "full")


def test_pipe_messages_keep_small_arrays_inside_the_pickle():
    """A ZeroMQ frame per 4-byte scalar costs more than copying it; large arrays still travel
    out-of-band, as views of the received frames."""
    msg = {"scale": np.float32([0.5]), "mask": np.ones(256, bool), "image": np.arange(64 * 64, dtype=np.float32)}
    frames = encode_message(WINDOW, msg)
    assert len(frames) == 3  # kind, pickle, the image
    kind, got = decode_message([zmq.Frame(f) for f in frames])
    assert kind == WINDOW and got.keys() == msg.keys()
    assert all(np.array_equal(got[k], msg[k]) and got[k].dtype == msg[k].dtype for k in msg)
    assert got["mask"].flags.writeable and not got["image"].flags.owndata


# ----------------------------------------------------------------------------------------------------
# Admin HTTP
# ----------------------------------------------------------------------------------------------------


def _admin(host: str, token: str = "") -> tuple[AdminServer, list]:
    calls: list = []
    handlers = AdminHandlers(
        metrics=lambda accept: (b"# nothing\n", "text/plain"),
        health=lambda: (True, {}),
        ready=lambda: (False, {"draining": True}),
        reload=lambda: (calls.append(1), (200, {"result": "success"}))[1],
    )
    return AdminServer(host, 0, handlers, token=token).start(), calls


def test_admin_answers_a_bad_or_huge_content_length_instead_of_dropping_the_connection():
    server, calls = _admin("127.0.0.1")
    try:
        for length, expected in (("abc", 400), ("1e3", 400), (str(10**9), 413)):
            conn = HTTPConnection("127.0.0.1", server.address[1], timeout=10)
            conn.putrequest("POST", "/reload")
            conn.putheader("Content-Length", length)
            conn.endheaders()
            response = conn.getresponse()
            assert response.status == expected and "error" in json.loads(response.read()), length
            conn.close()
    finally:
        server.stop()
    assert calls == []


def test_a_malformed_accept_header_gets_metrics_and_a_failing_handler_a_logged_500():
    """client_python compares an OpenMetrics version unparsed: `version=abc` raised inside the handler,
    the connection closed without an answer and a bare traceback went to stderr."""
    from daemon.metrics import DaemonMetrics

    metrics = DaemonMetrics()

    def health():
        raise RuntimeError("a bug in a probe")

    handlers = AdminHandlers(metrics=metrics.exposition, health=health, ready=lambda: (True, {}),
                             reload=lambda: (200, {}))  # fmt: skip
    server = AdminServer("127.0.0.1", 0, handlers).start()
    base = f"http://127.0.0.1:{server.address[1]}"
    try:
        for accept in ("application/openmetrics-text; version=abc", "application/openmetrics-text; version=1.0.0-rc1"):
            status, body = http(f"{base}/metrics", headers={"Accept": accept})
            assert status == 200 and "sacmf_inference_windows_received_total" in body, accept
        status, body = http(f"{base}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert status == 200 and body.rstrip().endswith("# EOF")  # a well-formed request still gets OpenMetrics
        with structlog.testing.capture_logs() as logs:
            status, body = http(f"{base}/healthz")
        assert status == 500 and "error" in json.loads(body)
        assert [e["event"] for e in logs if e["log_level"] == "error"] == ["admin_request_failed"]
    finally:
        server.stop()


def test_the_modality_weight_gauge_follows_only_windows_that_had_both_modalities():
    """A group with radiometers only has image weight 0 by construction: the gauge said 0 for good and
    SacmfFusionCollapsed fired for a healthy group."""
    from prometheus_client import generate_latest

    from daemon.metrics import DaemonMetrics
    from tests.test_sinks import make_result

    metrics = DaemonMetrics()
    seq_only = dataclasses.replace(make_result(0, group="g2"), presence={"seq_a": True, "seq_b": True})
    metrics.observe_published(seq_only)
    assert "sacmf_fusion_modality_weight{" not in generate_latest(metrics.registry).decode()
    both = make_result(0)  # Image-A and Seq-A present
    metrics.observe_published(both)
    text = generate_latest(metrics.registry).decode()
    assert f'sacmf_fusion_modality_weight{{group="g1",modality="image"}} {both.fusion.image}' in text
    assert 'group="g2"' not in text.split("sacmf_fusion_modality_weight")[-1]


def test_a_reload_before_the_model_is_loaded_is_refused_not_a_crash(tmp_path: Path, checkpoint: Path):
    """POST /reload is served from the admin server's start, before the first load has finished."""
    from daemon.config import parse
    from daemon.service import Service

    raw = {"groups": {"g1": {"sensors": {"cam": "image_a"}}}, "model": {"checkpoint": str(checkpoint)}}
    status, body = Service(parse(raw)).reload()  # no load() yet
    assert (status, body) == (503, {"result": "refused", "error": "starting"})


def test_a_window_that_misses_the_drain_deadline_is_counted_as_lost_at_shutdown(tmp_path: Path, checkpoint: Path):
    """A window arriving while the lossless queue is full and the drain's deadline has passed: counted, not hidden."""
    from prometheus_client import generate_latest

    from daemon.config import parse
    from daemon.service import WINDOW, Service

    raw = {
        "groups": {"g1": {"sensors": {"cam": "image_a"}}},
        "model": {"checkpoint": str(checkpoint)},
        "inference": {"policy": "block", "queue_size": 1, "max_batch_size": 1},
    }
    service = Service(parse(raw))
    assert service._dispatch(WINDOW, make_window(T0)) is False  # queued: the queue had room
    service.state.draining = True
    service._drain_deadline = time.monotonic() - 1.0
    assert service._dispatch(WINDOW, make_window(T0 + SEC)) is False
    assert (service.state.windows_received, service.state.windows_lost, service.queue.depth) == (2, 1, 1)
    text = generate_latest(service.metrics.registry).decode()
    assert 'sacmf_inference_windows_dropped_total{reason="shutdown"} 1.0' in text
    assert 'sacmf_inference_windows_dropped_total{reason="queue_full"} 0.0' in text


def test_windows_still_queued_when_the_drain_deadline_passes_are_counted_as_lost(
    tmp_path: Path, checkpoint: Path, monkeypatch
):
    """A model slower than the drain allows: windows left in the queue or in a stage at the deadline got
    no result and were counted nowhere (shutdown_complete said 0 dropped)."""
    from prometheus_client import generate_latest

    from daemon.config import parse
    from daemon.inference import synthetic_window
    from daemon.service import WINDOW, Service

    raw = {
        "groups": {"g1": {"sensors": {"a": "image_a", "b": "image_b", "r1": "seq_a", "r2": "seq_b"}}},
        "model": {"checkpoint": str(checkpoint)},
        "inference": {"policy": "block", "queue_size": 16, "max_batch_size": 1},
        "sinks": {"zmq_endpoint": "", "jsonl_path": str(tmp_path / "r.jsonl"), "mcap_path": ""},
    }
    service = Service(parse(raw))
    service.runner.load()
    service._open_sinks()
    forward = service.runner.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.2)
        return forward(*args, **kwargs)

    monkeypatch.setattr(service.runner, "forward", slow_forward)
    loops = (service._prepare_loop, service._inference_loop, service._finish_loop)
    service._threads = [threading.Thread(target=f, daemon=True) for f in loops]
    for t in service._threads:
        t.start()
    config = service.runner.current.config
    for i in range(16):
        w = synthetic_window(config, seed=i, group="g1")
        service._dispatch(WINDOW, dataclasses.replace(w, start_ns=w.start_ns + i * SEC, end_ns=w.end_ns + i * SEC))
    service.queue.close()  # the ingest process said DONE
    assert not service._shutdown(time.monotonic() + 1.0)
    st = service.state
    assert 0 < st.results_published < 16 and st.failed_windows == 0
    assert st.windows_lost == 16 - st.results_published  # every window is a result or counted lost
    text = generate_latest(service.metrics.registry).decode()
    assert f'sacmf_inference_windows_dropped_total{{reason="shutdown"}} {float(st.windows_lost)}' in text


class _Sink:
    """A results sink that writes slowly, or a late sink whose disk is gone (every write fails)."""

    def __init__(self, name: str, fail: bool = False) -> None:
        self.name, self.fail, self.records, self.closed = name, fail, [], False

    def write(self, record) -> None:
        if self.fail:
            raise OSError(5, "Input/output error")
        time.sleep(0.01)
        self.records.append(record)

    def close(self) -> None:
        self.closed = True


def test_a_late_sink_failing_to_the_end_leaves_the_results_time_to_close(tmp_path: Path, checkpoint: Path):
    """Sinks closed one after another on one deadline: a late sink retrying until it took all of it, and
    the results sinks (MCAP summary, fsync) were closed with 0 s left, i.e. not at all before exit."""
    from daemon.config import parse
    from daemon.service import Service
    from sinks.supervisor import RetryPolicy, SinkSupervisor

    raw = {"groups": {"g1": {"sensors": {"cam": "image_a"}}}, "model": {"checkpoint": str(checkpoint)}}
    service = Service(parse(raw))
    late, results = _Sink("late", fail=True), _Sink("jsonl")
    service.late = SinkSupervisor([late], retry=RetryPolicy(base_s=0.05, cap_s=0.05, max_attempts=10**6))
    service.results = SinkSupervisor([results])
    for i in range(20):
        service.late.submit(i)
        service.results.submit(i)
    t = time.monotonic()
    clean = service._close_sinks(2.0)
    assert time.monotonic() - t < 2.5 and not clean  # the late records were given up
    assert results.closed and results.records == list(range(20))
    lost = service._sinks_lost()  # the record in its retries failed, the queued ones were abandoned
    assert list(lost) == ["late"] and lost["late"]["failed"] + lost["late"]["abandoned"] == 20


def test_admin_reload_needs_the_token_except_on_loopback_without_one():
    server, calls = _admin("127.0.0.1")
    base = f"http://127.0.0.1:{server.address[1]}"
    try:
        assert server.loopback
        assert http(f"{base}/reload", "POST")[0] == 200  # loopback, no token configured: like SIGHUP
        assert http(f"{base}/reload")[0] == 405
        assert http(f"{base}/nope")[0] == 404
        assert http(f"{base}/healthz")[0] == 200
        status, body = http(f"{base}/readyz")
        assert status == 503 and json.loads(body) == {"status": "not_ready", "draining": True}
    finally:
        server.stop()
    assert len(calls) == 1

    server, calls = _admin("127.0.0.1", token="s3cret")
    base = f"http://127.0.0.1:{server.address[1]}"
    try:
        assert http(f"{base}/reload", "POST")[0] == 403
        assert http(f"{base}/reload", "POST", {"Authorization": "Bearer wrong"})[0] == 403
        assert http(f"{base}/reload", "POST", {"Authorization": "Basic s3cret"})[0] == 403
        assert http(f"{base}/reload", "POST", {"Authorization": "Bearer s3cret"})[0] == 200
    finally:
        server.stop()
    assert len(calls) == 1

    server, calls = _admin("0.0.0.0")  # beyond loopback without a token: reload over HTTP is off
    try:
        assert not server.loopback
        status, body = http(f"http://127.0.0.1:{server.address[1]}/reload", "POST")
        # the refusal says what would help: there is no configured token to present
        assert status == 403 and "without [admin] token" in body and "configured admin token" not in body
        status, body = http(f"http://127.0.0.1:{server.address[1]}/metrics")
        assert status == 403 and "public_endpoints" in body
    finally:
        server.stop()
    assert calls == []


def test_parse_listen():
    assert parse_listen("127.0.0.1:9102") == ("127.0.0.1", 9102)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("9102", "host:", "host:x", "h:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


# ----------------------------------------------------------------------------------------------------
# `sacmf serve` end to end
# ----------------------------------------------------------------------------------------------------


def test_serve_without_a_checkpoint_fails_fast_and_says_how_to_get_one(tmp_path: Path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        (ROOT / "config.toml").read_text().replace('"model/weights/default.pt"', f'"{tmp_path / "none.pt"}"')
    )
    proc = sacmf("serve", str(cfg))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert f"no model checkpoint at {tmp_path / 'none.pt'}" in err and "save_checkpoint" in err


def test_serve_exits_at_once_when_its_input_address_is_taken(tmp_path: Path, checkpoint: Path):
    """The ingest process's socket stayed open after its bind failed, so its context never terminated:
    serve waited out the whole shutdown timeout (30 s here) before it exited 2."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cfg = tmp_path / "c.toml"
    text = (ROOT / "config.toml").read_text().replace('"model/weights/default.pt"', f'"{checkpoint}"')
    text = text.replace('endpoints = ["tcp://127.0.0.1:5555"]', f'endpoints = ["tcp://127.0.0.1:{port}"]')
    text = text.replace("bind = false", "bind = true", 1).replace('listen = "127.0.0.1:9102"', 'listen = "127.0.0.1:0"')
    text = text.replace('zmq_endpoint = "tcp://127.0.0.1:5556"', 'zmq_endpoint = ""')
    cfg.write_text(text)
    try:
        proc = sacmf("serve", str(cfg))
        _, err = proc.communicate(timeout=120)
    finally:
        taken.close()
    assert proc.returncode == 2 and "Address already in use" in err, err[-2000:]
    started = json.loads(next(line for line in err.splitlines() if '"shutdown_started"' in line or
                              '"ingest_start_failed"' in line))  # fmt: skip
    done = json.loads(next(line for line in err.splitlines() if '"shutdown_complete"' in line))
    took = (datetime.fromisoformat(done["timestamp"]) - datetime.fromisoformat(started["timestamp"])).total_seconds()
    assert took < 10, took  # was the whole 30 s timeout


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, checkpoint: Path):
    d = Daemon(tmp_path_factory.mktemp("serve"), checkpoint)
    try:
        yield d.start()
    finally:
        d.close()


def test_serve_publishes_schema_valid_results(daemon: Daemon):
    got = daemon.wait_results(lambda r: True, n=3)
    for wire in got:
        rec = from_wire(wire)
        assert isinstance(rec, ResultRecord)
        assert rec.group == "g1" and rec.end_ns - rec.start_ns == SEC // 2 and rec.start_ns % (SEC // 2) == 0
        assert rec.model_version == "tiny-v1" and rec.class_names == list(TINY.class_names)
        assert set(rec.presence) == {"image_a", "image_b", "seq_a", "seq_b"}
        assert 0.0 < rec.latency_s < 30.0  # window end -> published, wall clock
        for det in rec.detections:  # the simulator's frames are 48x64
            assert 0 <= det.box[0] <= det.box[2] <= 64 and 0 <= det.box[1] <= det.box[3] <= 48
    assert any(r["presence"] == dict.fromkeys(("image_a", "image_b", "seq_a", "seq_b"), True) for r in got)


def test_metrics_health_and_readiness_answer(daemon: Daemon):
    daemon.wait_results(lambda r: True, n=1)
    status, body = http(f"{daemon.admin}/healthz")
    assert status == 200, body
    assert set(json.loads(body)["loop_age_s"]) >= {"receiver", "inference", "ingest"}
    status, body = http(f"{daemon.admin}/readyz")
    assert status == 200 and json.loads(body)["model_version"] == "tiny-v1"
    m = daemon.metrics()
    assert not [name for name in m if name.endswith("_created")]
    assert m["sacmf_ready"][()] == 1.0
    ok = m["sacmf_inference_requests_total"][(("result", "success"),)]
    assert ok >= 1 and m["sacmf_window_latency_seconds_count"][()] == ok
    assert m["sacmf_inference_batch_size_count"][()] >= 1
    assert (("le", "0.25"),) in m["sacmf_window_latency_seconds_bucket"]  # the configured SLO edges
    assert m["sacmf_model_info"] == {(("sha256", load_checkpoint(daemon.checkpoint).sha256), ("version", "tiny-v1")): 1}
    # ingest metrics come from the ingest process through the same registry
    assert m["sacmf_ingest_messages_total"][(("group", "g1"), ("kind", "img"), ("sensor", "cam_vis"))] > 0
    assert sum(m["sacmf_windows_emitted_total"].values()) >= 1
    assert m["sacmf_inference_windows_received_total"][()] >= 1
    assert m["sacmf_sink_errors_total"][(("sink", "zmq"),)] == 0
    weights = m["sacmf_fusion_modality_weight"]
    assert weights[(("group", "g1"), ("modality", "image"))] + weights[
        (("group", "g1"), ("modality", "sequence"))
    ] == pytest.approx(1.0)


def test_metrics_exposition_passes_promtool(daemon: Daemon):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    status, text = http(f"{daemon.admin}/metrics")
    out = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hot_reload_keeps_the_old_model_on_a_corrupt_file_then_swaps(daemon: Daemon):
    auth = {"Authorization": f"Bearer {daemon.token}"}
    assert http(f"{daemon.admin}/reload", "POST")[0] == 403  # a token is configured: required
    daemon.checkpoint.write_bytes(b"\x00" * 1000)
    status, body = http(f"{daemon.admin}/reload", "POST", auth)
    assert status == 422 and json.loads(body)["result"] == "failure"
    assert daemon.wait_results(lambda r: True, n=2)[-1]["model_version"] == "tiny-v1"  # still serving
    m = daemon.metrics()
    assert m["sacmf_model_reloads_total"] == {(("result", "failure"),): 1, (("result", "success"),): 0}
    sha = tiny_checkpoint(daemon.checkpoint, "tiny-v2", seed=11)
    status, body = http(f"{daemon.admin}/reload", "POST", auth)
    assert status == 200 and json.loads(body) == {"result": "success", "version": "tiny-v2", "sha256": sha}
    daemon.wait_results(lambda r: r["model_version"] == "tiny-v2", n=2)
    m = daemon.metrics()
    assert m["sacmf_model_reloads_total"][(("result", "success"),)] == 1
    assert m["sacmf_model_info"] == {(("sha256", sha), ("version", "tiny-v2")): 1}


def test_a_reload_that_changes_the_preprocessing_reaches_the_ingest_process(daemon: Daemon):
    """The ingest process prepares windows with the served model's preprocessing; a model with another
    sequence length changes it. Windows it prepared under the old settings in the meantime are made
    again in the main process: none fails, and the ingest process takes the new settings."""
    import dataclasses

    from daemon.inference import save_checkpoint
    from model.sacmf import build_model

    failed = daemon.metrics().get("sacmf_inference_requests_total", {}).get((("result", "failure"),), 0)
    torch.manual_seed(12)
    save_checkpoint(build_model(dataclasses.replace(TINY, seq_len=2 * TINY.seq_len)), daemon.checkpoint, "tiny-v3")
    status, body = http(f"{daemon.admin}/reload", "POST", {"Authorization": f"Bearer {daemon.token}"})
    assert status == 200, body
    daemon.event("ingest_prepare_key_changed", timeout=30)
    daemon.wait_results(lambda r: r["model_version"] == "tiny-v3", n=3)
    m = daemon.metrics()
    assert m["sacmf_inference_requests_total"].get((("result", "failure"),), 0) == failed


def test_sigterm_under_load_exits_0_and_loses_no_window(daemon: Daemon):
    daemon.wait_results(lambda r: True, n=1)
    assert daemon.sim.is_alive()  # the simulator is still publishing
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(60) == 0
    done = daemon.event("shutdown_complete", timeout=10)
    assert done["clean"] is True
    assert done["windows_emitted"] == done["windows_received"] == done["results_published"] > 0
    assert done["windows_dropped"] == 0 and done["windows_failed"] == 0 and done["windows_flushed"] >= 1
    written = list(read_jsonl(daemon.jsonl))
    assert len(written) == done["results_published"] == done["sinks_written"]["jsonl"]
    starts = [r["start_ns"] for r in written]
    assert starts == sorted(starts) and all(b - a == SEC // 2 for a, b in zip(starts, starts[1:], strict=False))
    assert written[-1]["flushed"] is True and not any(r["flushed"] for r in written[: -done["windows_flushed"]])
    deadline = time.monotonic() + 5
    while len(daemon.results) < len(written) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [r["start_ns"] for r in daemon.results] == starts  # ZeroMQ subscribers saw every one too
    recorded = [m.body for m in read_recording(daemon.mcap) if isinstance(m.body, ResultRecord)]
    assert [r.start_ns for r in recorded] == starts


def test_late_policy_update_republishes_a_window_with_its_late_stream(tmp_path: Path, checkpoint: Path):
    """A radiometer 1.2 s behind the others, with max_wait 300 ms: each window first comes out without it
    (revision 0), then again with its data once it has caught up (revision 1), and nothing is left for
    the late-data sink."""
    d = Daemon(tmp_path, checkpoint)
    d.config.write_text(
        d.config.read_text().replace(
            "allowed_lateness_ms = 100\n",
            'allowed_lateness_ms = 100\nmax_wait_ms = 300\nlate_policy = "update"\nupdate_horizon_ms = 5000\n',
        )
    )
    lagging = SimSettings(frame_rate_hz=10, sample_rate_hz=500, chunk_samples=50, height=48, width=64,
                          delays_ms={"rad_ir": 1200})  # fmt: skip
    d.sim = threading.Thread(target=simulate.run, args=(d.pub, lagging, d.sim_stop), daemon=True)
    try:
        d.start()

        # The daemon joins the stream mid-way: the window it joins in can hold a radiometer chunk without the
        # frame before it (a 1-in-5 chance here), so the checks start with the window after that one.
        def joined_ns() -> int:
            return min((r["start_ns"] for r in d.results if r["presence"]["seq_a"]), default=1 << 63)

        updates = d.wait_results(lambda r: r["revision"] == 1 and r["start_ns"] > joined_ns(), n=3, timeout=60)
        time.sleep(0.6)  # the ingest process's next metrics snapshot (every 0.5 s) covers them
        m = d.metrics()
        firsts = {(r["group"], r["start_ns"]): r for r in d.results if r["revision"] == 0}
        for upd in updates:
            first = firsts[(upd["group"], upd["start_ns"])]  # the same window came out before, without rad_ir
            assert first["presence"]["seq_b"] is False and upd["presence"]["seq_b"] is True
            assert first["presence"]["image_a"] and upd["presence"]["image_a"] and upd["presence"]["seq_a"]
            assert upd["latency_s"] > max(1.0, first["latency_s"])  # rad_ir reaches a window's end 1.2 s late
        assert not any(r["revision"] > 1 for r in d.results)  # one update per window, not one per late chunk
        assert m["sacmf_windows_updated_total"][(("group", "g1"),)] >= 3
        rad_ir = (("group", "g1"), ("sensor", "rad_ir"))
        used = m["sacmf_ingest_late_used_messages_total"][rad_ir]
        assert m["sacmf_ingest_late_messages_total"][rad_ir] >= used >= 15  # each 0.5 s window: 5 late chunks
        # late data went into results, not to the late sink; and updates stay out of the latency histogram
        assert m["sacmf_late_records_total"][()] == 0
        published = m["sacmf_inference_requests_total"][(("result", "success"),)]
        assert m["sacmf_window_latency_seconds_count"][()] < published
    finally:
        d.close()
