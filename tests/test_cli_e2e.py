"""The commands as a user runs them: `sacmf simulate` into a worker, `sacmf demo`, heartbeats."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from daemon import config as config_mod
from ingest.publisher import SensorPublisher
from ingest.subscriber import IngestWorker
from sinks.jsonl import read_jsonl
from sinks.mcap_recorder import read_recording
from sinks.record import ResultRecord
from tests.ingest_helpers import settings, wait_for

ROOT = Path(__file__).resolve().parents[1]


def sacmf(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_simulate_feeds_a_worker_at_the_configured_rates(ctx, tmp_path):
    ep = f"ipc:///tmp/sacmf-sim-{os.getpid()}.ipc"
    windows = []
    worker = IngestWorker(settings(ep, mode="live", bind=True, idle_ns=30 * 10**9), windows.append, context=ctx)
    proc = sacmf("simulate", "--endpoint", ep, "--connect", "--frame-rate", "20", "--sample-rate", "500",
                 "--chunk", "50", "--size", "32x48", "--duration", "5.5")  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            worker.poll(50)
        out, err = proc.communicate(timeout=10)
        for _ in range(20):
            worker.poll(20)
    finally:
        proc.kill()
    worker.flush()
    worker.close()
    assert proc.returncode == 0, err
    assert "sent:" in out
    # The first two windows may be cut by the simulator's start: the PUB socket drops what it sends before
    # its connection is up (the slow joiner), and a cold interpreter on a busy CI machine can take longer
    # than one window to get there. At the stop, more than the last window can be cut: a frame of the next
    # window may go out while the chunk straddling the boundary (sent once its last sample is taken) does
    # not. So the interior ends at the last radiation sample received (2 ms apart at 500 Hz).
    last_sample = max(int(w.samples["seq_a"].t_ns[-1]) for w in windows if len(w.samples["seq_a"]))
    interior = [w for w in windows[2:] if w.end_ns - 2_000_000 <= last_sample]
    assert len(interior) >= 2
    for w in interior:  # whatever closed them (watermark, or the final flush on a loaded machine)
        counts = (len(w.frames["image_a"]), len(w.samples["seq_a"].t_ns), len(w.samples["seq_b"].t_ns))
        assert all(w.presence.values())
        assert counts == (20, 500, 500), (w.start_ns, counts, [x.start_ns for x in windows])
        assert w.frames["image_a"][0].image.shape == (32, 48)
    msgs = worker.messages()
    assert msgs["g1", "cam_vis", "img"] == msgs["g1", "cam_ir", "img"] > 60
    for sensor in ("cam_vis", "cam_ir", "rad_vis", "rad_ir"):
        assert worker.tracker.stats(f"g1/{sensor}").gaps == 0
        assert msgs["g1", sensor, "hb"] >= 3  # at least one heartbeat per second


def test_demo_shows_a_live_view_writes_outputs_and_stops_on_ctrl_c(tmp_path):
    """`sacmf demo`: simulator + daemon in one command; the view refreshes, Ctrl-C drains and exits 0."""
    out = tmp_path / "demo"
    proc = sacmf("demo", "--frame-rate", "5", "--out", str(out))
    lines = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        shown = re.match(r"\[\s*[\d.]+ s\] windows (\d+)", line)
        if shown and int(shown.group(1)) >= 3:
            break
    proc.send_signal(signal.SIGINT)
    out_text, err = proc.communicate(timeout=60)
    text = "".join(lines) + out_text
    assert proc.returncode == 0, err
    assert re.search(r"metrics: http://127\.0\.0\.1:\d+/metrics", text)
    assert "latency p50" in text and "latest window g1" in text and "fusion weights: image" in text
    summary = re.search(r"demo: (\d+) windows, (\d+) messages, 0 rejected", out_text)
    assert summary and int(summary.group(1)) >= 3 and int(summary.group(2)) > 50
    results = list(read_jsonl(out / "results.jsonl"))
    assert len(results) == int(summary.group(1)) and results[-1]["flushed"]  # Ctrl-C flushed the open window
    assert all(r["presence"]["image_a"] for r in results[:-1])
    for sub in ("detections", "heatmaps", "fusion_weights"):
        pictures = list((out / sub).glob("g1_*.png"))
        assert pictures
        with Image.open(pictures[0]) as img:
            img.verify()
    recorded = list(read_recording(out / "recording.mcap"))
    assert sum(isinstance(r.body, list) for r in recorded) == int(summary.group(2))  # every input, recorded
    assert sum(isinstance(r.body, ResultRecord) for r in recorded) == len(results)
    assert f"sacmf evaluate-stream {out}/recording.mcap --config {out}/demo.toml" in out_text
    served = config_mod.load(out / "demo.toml")  # the demo's own config: from any folder, with its group
    assert list(served.ingest.groups) == ["g1"] and served.model.checkpoint.is_file()


def test_heartbeats_at_least_once_a_second_per_sensor(ctx):
    sensors = {"cam_vis": "img", "rad_vis": "rad"}
    pub = SensorPublisher("tcp://127.0.0.1:*", "g1", sensors, context=ctx)
    worker = IngestWorker(settings(pub.endpoints[0], mode="live", bind=False), lambda w: None, context=ctx)
    wait_for(lambda: (worker.poll(20), worker.messages()["g1", "rad_vis", "hb"] > 0)[1], what="subscription")
    pub.send_samples("rad_vis", np.ones(3, np.float32), 0, 1)
    start = {s: worker.messages()["g1", s, "hb"] for s in sensors}
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.2:
        worker.poll(20)
    for s in sensors:
        assert worker.messages()["g1", s, "hb"] - start[s] >= 2
    assert worker.tracker.stats("g1/rad_vis").delivered == 1
    pub.close()
    worker.close()
