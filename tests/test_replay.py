"""Record -> replay -> evaluate, for real: `sacmf serve` records its inputs and results while the
simulator feeds it, the recording replays to identical results at two speeds, `sacmf evaluate-stream`
scores it against the simulator's truth, and the ingest raw-message hook changes nothing it observes.

The daemon serves a tiny untrained checkpoint, so the scores are low: the tests check that the numbers
are the right numbers (recomputed here from the results and the simulator's own scenes), not that the
model is good.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch
import zmq
from PIL import Image

from daemon import config as config_mod
from daemon.fusion_stage import FusionStage
from daemon.replay import comparable, recorded_inputs, replay
from daemon.serve_process import process_tree
from daemon.service import decode_inputs, encode_inputs
from daemon.simulate import SceneSource, SceneTruth, SimSettings
from ingest import protocol
from ingest.subscriber import IngestWorker
from sinks.jsonl import read_jsonl
from sinks.mcap_recorder import read_recording
from sinks.record import ResultRecord, from_wire, to_wire
from tests.ingest_helpers import KINDS, SEC, T0, settings, signature
from tests.service_helpers import ROOT, Daemon, tiny_checkpoint

torch.set_num_threads(1)

# what tests/service_helpers.Daemon runs: the simulator's settings, and the config's 500 ms windows
SIM = SimSettings(frame_rate_hz=10, sample_rate_hz=500, chunk_samples=50, height=48, width=64)
WINDOW_NS = SEC // 2


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "daemon.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@dataclass
class Recording:
    tmp: Path
    config: Path
    mcap: Path
    jsonl: Path
    png_dir: Path
    shutdown: dict  # the daemon's shutdown_complete log event
    metrics: dict[str, dict]  # a /metrics scrape while serving
    processes_with_torch: dict[str, bool]  # "serve" / "ingest" -> whether libtorch was mapped while serving


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Recording:
    """`sacmf serve` with an MCAP recording (inputs on by default) and PNG pictures, stopped by SIGTERM."""
    tmp = tmp_path_factory.mktemp("record")
    tiny_checkpoint(tmp / "tiny.pt", "tiny-replay")
    d = Daemon(tmp, tmp / "tiny.pt")
    png_dir = tmp / "png"
    text = d.config.read_text().replace("[sinks]\n", f'[sinks]\npng_dir = "{png_dir}"\npng_max_per_s = 0.5\n')
    d.config.write_text(text)
    try:
        d.start()
        d.wait_results(lambda r: not r["flushed"], n=5, timeout=60)
        with_torch = _processes_with_torch(d.proc.pid)
        time.sleep(0.6)  # one more ingest snapshot (every 0.5 s), so the scrape sees the recording counters
        metrics = d.metrics()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(60) == 0
        done = d.event("shutdown_complete", timeout=10)
    finally:
        d.close()
    return Recording(tmp, d.config, d.mcap, d.jsonl, png_dir, done, metrics, with_torch)


def _processes_with_torch(serve_pid: int) -> dict[str, bool]:
    """Which of the daemon's processes have torch's library mapped (from /proc/<pid>/maps)."""
    out = {}
    for pid in process_tree(serve_pid):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        name = "serve" if pid == serve_pid else "ingest" if b"multiprocessing.spawn" in cmdline else None
        if name is not None:
            out[name] = "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    return out


# ----------------------------------------------------------------------------------------------------
# recording
# ----------------------------------------------------------------------------------------------------


def test_the_daemon_records_every_input_beside_its_results(recording: Recording):
    inputs, results = [], []
    for rec in read_recording(recording.mcap, strict=True):
        (inputs if isinstance(rec.body, list) else results).append(rec)
    assert recording.shutdown["clean"] is True and recording.shutdown["inputs_dropped"] == 0
    assert len(inputs) == recording.shutdown["inputs_recorded"] > 50
    # what the recording lacks is exported while serving, not only logged at the end
    assert recording.metrics["sacmf_recording_inputs_dropped_total"] == {(): 0.0}
    assert recording.metrics["sacmf_sink_records_written_total"][(("sink", "mcap_inputs"),)] > 0
    seqs: dict[str, list[int]] = {}
    for rec in inputs:
        msg = protocol.decode(rec.body)  # the exact frames: they validate as protocol v1 again
        assert rec.topic == rec.body[0].decode() == f"{msg.kind}/{msg.group}/{msg.sensor}"
        if msg.kind == "hb":
            continue
        assert rec.publish_time == msg.t_ns  # publish time = event time, log time = receive time
        assert 0 <= rec.log_time - msg.t_ns < 5 * SEC
        seqs.setdefault(msg.sensor, []).append(msg.seq)
        # the simulator's truth rides along, and it is the scene the simulator really drew
        truth = SceneTruth.from_meta(msg.meta)
        expected = SceneSource(SIM).truth(msg.t_ns // SEC)
        assert (
            truth is not None
            and truth.target == expected.target
            and (truth.t0_ns, truth.t1_ns)
            == (
                expected.t0_ns,
                expected.t1_ns,
            )
        )
        if msg.sensor == "cam_vis":
            assert truth.boxes == expected.boxes and truth.classes == expected.classes
    assert set(seqs) == set(KINDS) and any(m.topic.startswith("hb/") for m in inputs)
    for sensor, s in seqs.items():  # nothing missing from the recording: contiguous per sensor
        assert s == list(range(s[0], s[0] + len(s))), sensor
    # results and inputs join by window id: every result window has its recorded inputs
    assert [r.body.start_ns for r in results] == [r["start_ns"] for r in read_jsonl(recording.jsonl)]
    in_window = {r.body.start_ns: 0 for r in results}
    for rec in inputs:
        start = rec.publish_time - rec.publish_time % WINDOW_NS
        if start in in_window and not rec.topic.startswith("hb/"):
            in_window[start] += 1
    assert all(n > 0 for n in in_window.values())


def test_the_daemon_draws_rate_limited_pictures(recording: Recording):
    windows = len(list(read_jsonl(recording.jsonl)))
    for sub in ("detections", "heatmaps", "fusion_weights"):
        files = sorted((recording.png_dir / sub).glob("g1_*.png"))
        assert 1 <= len(files) < windows  # a burst of 2, then 1 every 2 s, of 2 windows per second
        for f in files:
            with Image.open(f) as img:
                img.load()
                assert img.mode == "RGB" and min(img.size) >= 192
    starts = sorted(int(f.stem.split("_")[1]) for f in (recording.png_dir / "detections").glob("g1_*.png"))
    assert all(b - a >= WINDOW_NS for a, b in zip(starts, starts[1:], strict=False))


# ----------------------------------------------------------------------------------------------------
# replay
# ----------------------------------------------------------------------------------------------------


def test_replay_gives_identical_results_at_two_speeds(recording: Recording, tmp_path: Path):
    out = tmp_path / "max"
    run = cli("replay", str(recording.mcap), "--max", "--config", str(recording.config), "--out", str(out))
    assert run.returncode == 0, run.stderr
    fast = [from_wire(d) for d in read_jsonl(out / "results.jsonl")]
    assert "windows" in run.stdout and str(len(fast)) in run.stdout

    cfg = config_mod.load(recording.config)
    span_ns = [t for t, _ in recorded_inputs(recording.mcap)]
    started = time.monotonic()
    paced = replay(recording.mcap, cfg, speed=4.0).results
    wall = time.monotonic() - started
    assert wall >= 0.8 * (span_ns[-1] - span_ns[0]) / 1e9 / 4  # it really was paced
    assert len(fast) == len(paced) >= 5
    for a, b in zip(fast, paced, strict=True):
        assert isinstance(a, ResultRecord)
        assert comparable(a) == comparable(b)  # field by field, floats bit for bit; latency aside
    assert fast[-1].flushed and not any(r.flushed for r in fast[:-1])  # the recording's end flushes once
    starts = [r.start_ns for r in fast]
    assert all(b - a == WINDOW_NS for a, b in zip(starts, starts[1:], strict=False))


def test_the_ingest_process_prepares_windows_without_loading_torch(recording: Recording):
    """The ingest process runs the model's preprocessing (here with a resize: 48x64 frames, a 32-px
    model) in numpy; loading torch there would cost about 470 MB of resident memory per daemon."""
    assert recording.processes_with_torch == {"serve": True, "ingest": False}


def test_the_live_daemon_and_a_replay_agree_on_every_complete_window(recording: Recording):
    """The live daemon prepared each window in its ingest process ([inference] prepare_in = "ingest", the
    default); the replay prepares in-process. Same inputs, same model: the same results, up to the
    float rounding of different batch compositions. A window prepared with other settings, or paired
    with another window's inputs, would differ by far more."""
    live = {r["start_ns"]: from_wire(r) for r in read_jsonl(recording.jsonl) if not r["flushed"]}
    replayed = {r.start_ns: r for r in replay(recording.mcap, config_mod.load(recording.config)).results}
    both = [t for t in live if t in replayed and live[t].presence == replayed[t].presence]
    assert len(both) >= 4, (sorted(live), sorted(replayed))
    for t in both:
        a, b = comparable(live[t]), comparable(replayed[t])
        assert np.allclose(a["target_probs"], b["target_probs"], atol=1e-5), t
        assert np.allclose(
            [a["fusion"]["image"], a["fusion"]["sequence"]], [b["fusion"]["image"], b["fusion"]["sequence"]], atol=1e-5
        )
        assert [d["class"] for d in a["detections"]] == [d["class"] for d in b["detections"]]
        for da, db in zip(a["detections"], b["detections"], strict=True):
            assert np.allclose(da["box"], db["box"], atol=1e-3) and abs(da["score"] - db["score"]) < 1e-5


def test_evaluate_stream_scores_the_recording_against_its_truth(recording: Recording, tmp_path: Path):
    out = tmp_path / "eval"
    run = cli("evaluate-stream", str(recording.mcap), "--config", str(recording.config), "--out", str(out))
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    results = [from_wire(d) for d in read_jsonl(out / "results.jsonl")]
    assert report["windows"] == len(results) == report["windows_with_truth"] >= 5

    # recompute the scores from the replayed results and the simulator's own scenes
    scenes = SceneSource(SIM)
    truths = [scenes.truth((r.start_ns + r.end_ns) // 2 // SEC) for r in results]
    hits = [r.target_class == t.target for r, t in zip(results, truths, strict=True)]
    cls = report["classification"]
    assert cls["n"] == len(results) and cls["accuracy"] == pytest.approx(np.mean(hits))
    assert sum(map(sum, cls["confusion"])) == len(results) and 0.0 <= cls["macro_f1"] <= 1.0
    assert report["truth_targets"] == {t: sum(x.target == t for x in truths) for t in {x.target for x in truths}}
    det = report["detection"]
    # boxes count where the window had an Image-A frame to find them in (under load a live window can
    # close without one; the recording replays it that way)
    assert det["objects"] == sum(len(t.classes) for r, t in zip(results, truths, strict=True) if r.presence["image_a"])
    assert det["detections"] == sum(len(r.detections) for r in results)
    for key in ("class_agnostic", "class_aware"):
        assert all(0.0 <= det[key][m] <= 1.0 for m in ("recall", "f1"))  # the frames hold objects
        p = det[key]["precision"]  # undefined (null) exactly when nothing was detected
        assert p is None if det["detections"] == 0 else 0.0 <= p <= 1.0
    assert det["class_aware"]["recall"] <= det["class_agnostic"]["recall"]

    live = report["latency_s"]["live"]  # the daemon's own results in the recording
    assert live["n"] == len([r for r in read_recording(recording.mcap) if isinstance(r.body, ResultRecord)])
    assert 0.0 < live["p50"] <= live["p90"] <= live["p99"] <= live["max"] < 30.0
    fusion = report["fusion"]
    assert fusion["image"]["n"] == fusion["windows_with_both_modalities"] > 0
    both = [r for r in results if r.fusion.image > 0 and r.fusion.sequence > 0]
    assert fusion["image"]["mean"] == pytest.approx(np.mean([r.fusion.image for r in both]))
    # the per-class figures use the same windows as the headline (a window with one modality is 1/0 by construction)
    assert sum(v["image"]["n"] for v in fusion["by_true_class"].values() if v["image"]) == len(both)
    assert report["replay"]["messages"] == sum(1 for _ in recorded_inputs(recording.mcap))
    # at --max the replay runs ahead of the model: no latency on the recording clock (it measured the distance
    # to the end of the recording)
    assert report["latency_s"]["replay_recording_clock"] is None and not report["replay"]["recording_truncated"]

    assert "Accuracy" in (out / "report.md").read_text()
    for name in ("fusion_over_time.png", "fusion_by_class.png", "confusion.png", "latency.png"):
        with Image.open(out / name) as img:
            img.load()
            assert img.width >= 600 and img.height >= 300
        assert name in report["plots"]


def test_evaluate_stream_checks_iou_clears_old_plots_and_says_when_nothing_was_readable(
    recording: Recording, tmp_path: Path
):
    """--iou 0/1.5/nan ran with meaningless matches; a cut recording with no readable message said only
    "no ground truth" with exit 0, and an earlier run's plots stayed in the output folder."""
    for iou in ("0", "1.5", "nan"):
        run = cli("evaluate-stream", str(recording.mcap), "--config", str(recording.config), "--iou", iou)
        assert run.returncode == 2 and "--iou" in run.stderr, iou
    out = tmp_path / "eval"
    out.mkdir()
    (out / "latency.png").write_bytes(b"an earlier run's plot")
    cut = tmp_path / "cut.mcap"
    cut.write_bytes(recording.mcap.read_bytes()[:2000])  # the header and a torn first chunk: no message
    run = cli("evaluate-stream", str(cut), "--config", str(recording.config), "--out", str(out))
    assert run.returncode == 1 and "no readable input message" in run.stderr, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["replay"]["recording_truncated"] and report["plots"] == [] and not (out / "latency.png").exists()


def test_recorded_truth_keeps_one_scene_per_scene_whatever_the_clock_offsets(recording: Recording):
    """A radiometer's clock offset shifts its copy of a scene's truth: it must not split the scene in two
    (the join then picked the radiometer's copy, without boxes, and detection went unscored)."""
    from daemon.evaluate_stream import recorded_truth

    plain = config_mod.load(recording.config)
    text = recording.config.read_text().replace("[groups.g1]\n", "[groups.g1]\nclock_offset_ms = { rad_ir = 100 }\n")
    shifted_path = recording.tmp / "offset.toml"
    shifted_path.write_text(text)
    scenes = recorded_truth(recording.mcap, plain)["g1"]
    shifted = recorded_truth(recording.mcap, config_mod.load(shifted_path))["g1"]
    assert len(shifted) == len(scenes) >= 2
    # the offset costs no scene its boxes; a scene whose camera frames never reached the recording (PUB/SUB
    # loses the first messages of a new subscription) has none either way
    assert [t.has_boxes for t in shifted] == [t.has_boxes for t in scenes] and sum(t.has_boxes for t in scenes) >= 2


def test_replay_runs_without_the_live_rate_limits_and_dead_letter_file(recording: Recording):
    """Rate limits run on the wall clock: in a replay the pace would decide what they drop."""
    from daemon.replay import replay_settings

    text = recording.config.read_text() + "\n[rate_limit]\nmessages_per_s = 15\n"
    text = text.replace("[ingest]\n", f'[ingest]\ndead_letter = "{recording.tmp / "dead.bin"}"\n')
    path = recording.tmp / "limited.toml"
    path.write_text(text)
    cfg = config_mod.load(path)
    assert cfg.ingest.rate_limits and cfg.ingest.dead_letter_path is not None  # set live
    s = replay_settings(cfg, "ipc:///tmp/x")
    assert s.rate_limits == {} and s.dead_letter_path is None


def test_replay_and_evaluate_refuse_what_is_not_a_sacmf_recording(recording: Recording, tmp_path: Path):
    from mcap.writer import Writer

    text, empty, foreign = tmp_path / "notes.txt", tmp_path / "empty.mcap", tmp_path / "imu.mcap"
    text.write_text("hello, not MCAP\n")
    empty.write_bytes(b"")
    with foreign.open("wb") as fh:  # a valid MCAP file of someone else's
        w = Writer(fh)
        w.start()
        ch = w.register_channel("/imu", "json", 0)
        w.add_message(ch, log_time=1, data=b"{}", publish_time=1)
        w.finish()
    for path, message in (
        (text, "not an MCAP recording"),
        (empty, "not an MCAP recording"),
        (foreign, "not a sacmf channel"),
    ):
        for command in ("replay", "evaluate-stream"):
            run = cli(command, str(path), "--config", str(recording.config), "--out", str(tmp_path / command))
            assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr, (path, run.stderr)
    run = cli("replay", str(recording.mcap), "--config", str(recording.config), "--speed", "0")
    assert run.returncode == 2 and "--speed" in run.stderr


def test_a_config_without_the_recorded_group_is_named_not_taken_for_missing_truth(recording: Recording, tmp_path):
    """Evaluating with a config that lacks the recorded group said only "no ground truth ... nothing scored"."""
    other = tmp_path / "other.toml"
    other.write_text(recording.config.read_text().replace("[groups.g1]", "[groups.g7]"))
    for command in ("replay", "evaluate-stream"):
        run = cli(command, str(recording.mcap), "--config", str(other), "--out", str(tmp_path / command))
        assert "name groups or sensors that" in run.stderr and "unknown_group" in run.stderr, run.stderr
        assert "--config the recording was made with" in run.stderr


def _with_image_fusion(recording: Recording, tmp_path: Path, method: str, checkpoint: str = "") -> Path:
    text = recording.config.read_text() + f'\n[image_fusion]\nmethod = "{method}"\ncheckpoint = "{checkpoint}"\n'
    path = tmp_path / f"fusion_{method}.toml"
    path.write_text(text)
    return path


def test_replay_and_evaluate_apply_the_configured_image_fusion(recording: Recording, tmp_path: Path):
    """A model trained on fused frames must be replayed on fused frames: replay and evaluate-stream ran
    the model on the raw cameras whatever [image_fusion] said, and their records said "unfused"."""
    cfg_path = _with_image_fusion(recording, tmp_path, "mean")
    cfg = config_mod.load(cfg_path)
    fused = replay(recording.mcap, cfg, fusion=FusionStage.from_settings(cfg.image_fusion)).results
    plain = {r.start_ns: r for r in replay(recording.mcap, config_mod.load(recording.config)).results}
    both = [r for r in fused if r.presence["image_a"] and r.presence["image_b"]]
    assert len(both) >= 4 and len(fused) == len(plain)
    for r in fused:
        wire = to_wire(r)["image_fusion"]
        if r in both:
            assert wire == {"method": "mean", "sha256": None}
            assert r.target_probs != plain[r.start_ns].target_probs  # the model saw another Image-A
        else:
            assert r.image_fusion is None and comparable(r) == comparable(plain[r.start_ns])

    out = tmp_path / "eval"
    run = cli("evaluate-stream", str(recording.mcap), "--config", str(cfg_path), "--out", str(out))
    assert run.returncode == 0, run.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["replay"]["image_fusion"] == {"method": "mean", "sha256": None}
    assert "pixel-fused with Image-B by mean" in (out / "report.md").read_text()
    results = [from_wire(d) for d in read_jsonl(out / "results.jsonl")]
    assert sum(r.image_fusion is not None for r in results) == len(both)

    run = cli("replay", str(recording.mcap), "--config", str(cfg_path), "--out", str(tmp_path / "replay"))
    assert run.returncode == 0 and "image fusion: mean (0 window(s) failed" in run.stdout, run.stderr
    results = [from_wire(d) for d in read_jsonl(tmp_path / "replay" / "results.jsonl")]
    assert [comparable(r) for r in results] == [comparable(r) for r in fused]


def test_replay_fails_the_windows_whose_fusion_fails_and_refuses_bad_weights(recording: Recording, tmp_path: Path):
    golden = ROOT.parent / "shared" / "golden" / "cddfuse" / "weights.safetensors"
    if not golden.is_file():
        pytest.skip(f"golden weights missing at {golden}")
    stage = FusionStage("cddfuse", golden)
    with torch.no_grad():  # the network goes bad after it loaded and warmed up: every fused pixel is NaN
        next(stage.model.parameters()).view(-1)[0] = float("nan")
    rep = replay(recording.mcap, config_mod.load(recording.config), fusion=stage)
    two_cameras = rep.fusion_failed
    assert two_cameras >= 4 and rep.failed == two_cameras  # failed, not served unfused
    assert len(rep.results) == rep.windows - two_cameras
    assert all(not (r.presence["image_a"] and r.presence["image_b"]) for r in rep.results)

    (tmp_path / "bad.safetensors").write_bytes(b"not weights at all")
    broken = _with_image_fusion(recording, tmp_path, "cddfuse", str(tmp_path / "bad.safetensors"))
    for command in ("replay", "evaluate-stream"):
        run = cli(command, str(recording.mcap), "--config", str(broken), "--out", str(tmp_path / command))
        assert run.returncode == 2 and "[image_fusion] checkpoint" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr and not (tmp_path / command).exists()


def test_a_damaged_recording_replays_what_it_can_and_says_so(recording: Recording, tmp_path: Path):
    """A flipped bit in a middle chunk: replay and evaluate-stream went on as after a crash's torn tail,
    dropping every later message, and exited 0. Now only that chunk is lost and both exit 1 saying so."""
    from tests.test_sinks import _chunk_offsets

    data = bytearray(recording.mcap.read_bytes())
    chunks = _chunk_offsets(bytes(data))
    assert len(chunks) >= 3
    data[chunks[len(chunks) // 2] + 100] ^= 0x01
    damaged = tmp_path / "damaged.mcap"
    damaged.write_bytes(bytes(data))
    whole = replay(recording.mcap, config_mod.load(recording.config))
    for command in ("replay", "evaluate-stream"):
        run = cli(command, str(damaged), "--config", str(recording.config), "--out", str(tmp_path / command))
        assert run.returncode == 1 and "the recording is damaged: 1 corrupt chunk(s) skipped" in run.stderr, run.stderr
    results = [from_wire(d) for d in read_jsonl(tmp_path / "replay" / "results.jsonl")]
    assert results and results[-1].end_ns >= whole.results[-1].end_ns - WINDOW_NS  # it went on past the chunk
    report = json.loads((tmp_path / "evaluate-stream" / "report.json").read_text())
    assert report["replay"]["recording_damage"].startswith("1 corrupt chunk(s) skipped")


def test_output_folders_keep_the_whole_recording_name():
    from daemon.replay import default_output_dir

    assert default_output_dir("/data/day.1.mcap", "replay") == Path("outputs/replay/day.1")
    assert default_output_dir("day.2.mcap", "evaluate-stream") == Path("outputs/evaluate-stream/day.2")


def test_simulate_record_writes_a_replayable_file_with_truth(tmp_path: Path):
    path = tmp_path / "sim.mcap"
    run = cli("simulate", "--endpoint", "tcp://127.0.0.1:*", "--frame-rate", "5", "--sample-rate", "200",
              "--chunk", "20", "--size", "40x40", "--duration", "2.2", "--record", str(path))  # fmt: skip
    assert run.returncode == 0, run.stderr
    msgs = [(t, protocol.decode(f)) for t, f in recorded_inputs(path)]
    sent = dict(kv.split("=") for kv in run.stdout.split("sent:")[1].strip().split(", "))
    assert {s: sum(m.sensor == s for _, m in msgs) for s in sent} == {s: int(n) for s, n in sent.items()}
    scenes = SceneSource(SimSettings(frame_rate_hz=5, sample_rate_hz=200, chunk_samples=20, height=40, width=40))
    for _, m in msgs:
        truth = SceneTruth.from_meta(m.meta)
        assert truth is not None and truth.target == scenes.truth(m.t_ns // SEC).target
        assert len(msgpack.packb(m.meta)) <= protocol.MAX_META_BYTES
        if m.kind == "img" and m.sensor == "cam_vis":
            assert np.array_equal(m.data, scenes.frame(m.t_ns, 0)[0]) and truth.has_boxes


def test_simulate_delay_sends_a_sensor_late_with_its_event_times(tmp_path: Path):
    """`--delay rad_ir=700`: rad_ir's messages leave 0.7 s after they are due, with unchanged event times
    and consecutive seqs; the other sensors are on time. What late data looks like to the daemon."""
    path = tmp_path / "lag.mcap"
    run = cli("simulate", "--endpoint", "tcp://127.0.0.1:*", "--frame-rate", "5", "--sample-rate", "200",
              "--chunk", "20", "--size", "40x40", "--duration", "2.5", "--delay", "rad_ir=700",
              "--record", str(path))  # fmt: skip
    assert run.returncode == 0, run.stderr
    lag: dict[str, list[float]] = {}
    seqs: dict[str, list[int]] = {}
    for sent_ns, frames in recorded_inputs(path):
        m = protocol.decode(frames)
        due = m.t_ns + (20 * 5_000_000 if m.kind == "rad" else 0)  # a chunk is due once its last sample is taken
        lag.setdefault(m.sensor, []).append((sent_ns - due) / 1e9)
        seqs.setdefault(m.sensor, []).append(m.seq)
    assert min(lag["rad_ir"]) >= 0.7  # never early (a loaded machine may make any message later)
    assert all(sorted(lag[s])[len(lag[s]) // 2] < 0.2 for s in ("cam_vis", "cam_ir", "rad_vis"))
    assert all(q == list(range(q[0], q[0] + len(q))) for q in seqs.values())
    assert 0 < len(seqs["rad_ir"]) < len(seqs["rad_vis"])  # what was still held at the stop is not sent
    bad = cli("simulate", "--delay", "rad_x=5", "--duration", "0.1")
    assert bad.returncode == 2 and "SENSOR=MS with SENSOR in cam_vis, cam_ir, rad_vis, rad_ir" in bad.stderr


# ----------------------------------------------------------------------------------------------------
# the ingest raw-message hook
# ----------------------------------------------------------------------------------------------------


def _stream() -> list[list[bytes]]:
    """Two windows of all four sensors, a duplicate, a reordered frame, a heartbeat and a bad message."""
    out = []
    rng = np.random.default_rng(3)
    for i in range(8):
        t = T0 + i * SEC // 4
        for seq_sensor in ("cam_vis", "cam_ir"):
            img = rng.integers(0, 4000, (16, 20), dtype=np.uint16)
            out.append([protocol.topic("img", "g1", seq_sensor),
                        protocol.encode_image_header("g1", seq_sensor, 7, i, t, 1000, img), img.tobytes()])  # fmt: skip
        for rad in ("rad_vis", "rad_ir"):
            v = rng.normal(1.0, 0.1, 25).astype(np.float32)
            out.append([protocol.topic("rad", "g1", rad),
                        protocol.encode_rad_header("g1", rad, 7, i, t, 10_000_000, v), v.tobytes()])  # fmt: skip
    out.insert(9, out[4])  # a duplicate
    out[12], out[13] = out[13], out[12]  # reordered
    out.append([protocol.topic("hb", "g1", "cam_vis"), protocol.encode_heartbeat("g1", "cam_vis", 7, T0 + 2 * SEC, 7)])
    out.insert(5, [b"img/g1/cam_vis", b"\xc1not msgpack", b""])  # rejected: never reaches the hook
    return out


def _ingest(ctx, stream: list[list[bytes]], on_raw=None) -> tuple[IngestWorker, list]:
    windows: list = []
    worker = IngestWorker(settings(f"inproc://raw-hook-{id(windows)}"), windows.append, on_raw=on_raw, context=ctx)
    push = ctx.socket(zmq.PUSH)
    push.connect(worker.bound_endpoints[0])
    for frames in stream:
        push.send_multipart(frames)
    deadline = time.monotonic() + 10
    while sum(worker.messages().values()) + sum(worker.stats.rejected.values()) < len(stream):
        worker.poll(20)
        assert time.monotonic() < deadline
    worker.flush()
    push.close(0)
    worker.close()
    return worker, windows


def test_the_raw_hook_sees_every_valid_message_and_changes_nothing(ctx):
    stream = _stream()
    seen: list[tuple[list[bytes], int, str]] = []

    def hook(frames, recv_ns, msg):
        seen.append(([bytes(protocol._buffer(f)) for f in frames], recv_ns, msg.kind))

    plain, plain_windows = _ingest(ctx, stream)
    hooked, hooked_windows = _ingest(ctx, stream, on_raw=hook)
    assert [signature(w) for w in hooked_windows] == [signature(w) for w in plain_windows]
    assert len(plain_windows) == 2
    assert hooked.messages() == plain.messages() and hooked.stats.rejected == plain.stats.rejected == {"msgpack": 1}
    assert hooked.tracker.stats("g1/cam_vis").duplicates == 1
    valid = [f for f in stream if f[1] != b"\xc1not msgpack"]
    assert [f for f, _, _ in seen] == valid  # byte for byte, in arrival order, duplicate and heartbeat too
    assert [r for _, r, _ in seen] == sorted(r for _, r, _ in seen) and seen[-1][2] == "hb"

    def broken(frames, recv_ns, msg):
        raise RuntimeError("recorder bug")

    survived, survived_windows = _ingest(ctx, stream, on_raw=broken)  # a failing hook costs the pipeline nothing
    assert [signature(w) for w in survived_windows] == [signature(w) for w in plain_windows]
    assert survived.stats.raw_callback_errors == len(valid)


def test_input_batches_cross_the_recording_pipe_byte_for_byte(ctx):
    """The daemon's ingest -> recorder pipe: small frames inside the index, camera payloads zero-copy."""
    big = np.arange(70_000, dtype=np.uint8)  # >= 64 KiB: travels as its own ZeroMQ frame
    pull = ctx.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    push.send_multipart([b"x", big.tobytes()], copy=False)  # receive the payload as a zmq.Frame, as ingest does
    received = pull.recv_multipart(copy=False)
    batch = [(T0, [b"img/g1/cam_vis", b"\x81\xa1v\x01", received[1]]), (T0 + 1, [b"hb/g1/cam_vis", b"\x80"])]
    push.send_multipart(encode_inputs(batch), copy=False)
    parts = pull.recv_multipart(copy=False)
    assert len(parts) == 2  # the index, and the one large payload
    decoded = decode_inputs(parts)
    assert [(t, [bytes(f) for f in fs]) for t, fs in decoded] == [
        (T0, [b"img/g1/cam_vis", b"\x81\xa1v\x01", big.tobytes()]),
        (T0 + 1, [b"hb/g1/cam_vis", b"\x80"]),
    ]
    push.close(0)
    pull.close(0)
