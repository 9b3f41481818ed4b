"""The benchmark commands run end to end and report sane figures (they are measured, not asserted, in
BENCHMARKS.md; here only that they work on real parts: models, a real daemon, real sockets)."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.bench_daemon import BenchOptions, run_bench
from daemon.serve_process import process_tree
from model.bench import backbone_latency
from tests.service_helpers import ROOT, tiny_checkpoint


def test_bench_model_times_every_backbone_and_batch() -> None:
    rows = backbone_latency(["tiny", "mobilenet_v3_small"], [1, 2], frame_size=32, rounds=1, calls=1)
    assert {(r.backbone, r.batch) for r in rows} == {(b, n) for b in ("tiny", "mobilenet_v3_small") for n in (1, 2)}
    for r in rows:
        assert r.ms_per_batch > 0 and abs(r.ms_per_window * r.batch - r.ms_per_batch) < 1e-6
        assert r.params_m > 0


def test_bench_daemon_short_run(tmp_path: Path) -> None:
    ckpt = tmp_path / "tiny.pt"
    tiny_checkpoint(ckpt, "bench-test")
    # 6 s per latency phase: 2 warm-up windows and the 0.6 s end margin leave >= 2 counted windows per group
    opts = BenchOptions(checkpoint=ckpt, groups=(1, 2), seconds=6.0, sat_seconds=3.0, idle_s=1.0, bare_repeats=5)
    assert opts.prepare_in == "ingest"  # the daemon's default: what the published figures measure
    lines: list[str] = []
    report = run_bench(opts, say=lines.append)
    shutil.rmtree(report["workdir"])  # run_bench keeps it for its caller (the CLI removes it after a good run)
    assert report["live_exit"] == 0 and report["replay_exit"] == 0
    assert report["idle"]["pct_of_core"] >= 0
    lat = report["latency"][1]
    assert lat["groups"] == 2 and lat["windows"] >= 2  # 2 groups x 1 window/s, edges excluded
    assert lat["latency_record"]["p50_ms"] > 0
    for sat in report["saturation"]:
        assert sat["windows"] > 0 and sat["windows_per_s"] > 0 and sat["ratio_to_forward"] > 0
        p = sat["pipeline"]
        assert p["model_calls"] > 0 and 1 <= p["mean_batch"] <= opts.max_batch_size and p["messages"] > 0
        # the second phase reuses group b1: its event time must go on, or all its data would be late
        assert p["late_messages"] == 0 and p["windows_dropped"] == 0
    assert any(line.startswith("ratio") for line in lines)
    bare = report["bare_after"]
    assert bare["prepare_ms_per_window"] > 0
    assert set(bare["pipe_us_per_window"]) == {"model_view", "every_frame"}
    assert all(v > 0 for v in bare["pipe_us_per_window"].values())


def test_bench_fusion_stage_times_the_stage_next_to_the_model(tmp_path: Path) -> None:
    from daemon.fusion_commands import bench_stage

    ckpt = tmp_path / "tiny.pt"
    tiny_checkpoint(ckpt, "bench-test")
    rows = bench_stage(["mean", "crossfuse"], 48, 64, repeats=1, checkpoint=ckpt, threads=1)
    assert [r["method"] for r in rows][1:] == ["mean", "crossfuse"]
    assert all(r["ms"] > 0 and r["size"] == "64x48" for r in rows)
    assert rows[2]["ratio"] > rows[1]["ratio"] >= 1.0  # a network costs more than averaging two frames


def test_bench_ingest_stops_when_its_sender_dies_instead_of_waiting_forever() -> None:
    """The bare receiver blocked in recv for good once the sender process had died (a killed child, a
    failed import): the benchmark printed its header and hung."""
    import time

    import pytest
    import zmq

    from daemon.bench_ingest import SenderDied, _bare

    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind("inproc://bench-ingest-dead")
    started = time.monotonic()
    try:
        with pytest.raises(SenderDied):
            _bare(sock, 10, True, alive=lambda: False)  # nothing ever comes: the sender is gone
    finally:
        sock.close(0)
        ctx.term()
    assert time.monotonic() - started < 5


def test_bench_options_are_checked_by_the_parser() -> None:
    """--repeats 0 was a StatisticsError, --messages 0 a ZeroDivisionError, --seconds nan a ValueError,
    --torch-threads 0 a RuntimeError after a 22 s phase, --backbones , an empty table with exit 0."""
    import subprocess
    import sys

    from tests.service_helpers import ROOT

    for argv in (["bench-ingest", "--repeats", "0"], ["bench-ingest", "--seconds", "nan"],
                 ["bench-curve", "--messages", "0"], ["bench-curve", "--repeats", "0"],
                 ["bench-daemon", "--torch-threads", "0"], ["bench-model", "--backbones", ","]):  # fmt: skip
        run = subprocess.run([sys.executable, "-m", "daemon.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)  # fmt: skip
        assert run.returncode == 2 and "Traceback" not in run.stderr, (argv, run.stderr[-500:])


def test_a_sigterm_stops_bench_ingest_and_its_sender_process_with_it() -> None:
    """SIGTERM (kill, timeout, a CI cancel) ended bench-ingest at once: its sender process stayed blocked
    for good, re-parented to init, with its socket folder. It now stops as Ctrl-C does (status 130)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "bench-ingest", "--seconds", "2", "--repeats", "3"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        children: list[int] = []
        while not children and time.monotonic() < deadline:
            children = [p for p in process_tree(proc.pid)[1:]
                        if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]  # fmt: skip
            time.sleep(0.05)
        assert children, "no sender process was started"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 130
        time.sleep(1.0)
        assert not [p for p in children if Path(f"/proc/{p}").exists()], "the sender outlived the command"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_bench_daemon_refuses_phases_too_short_or_too_long_to_measure(tmp_path: Path) -> None:
    """--seconds 1 printed 0.00 windows/s (no window left after the warm-up) and 1e308 crashed with an
    OverflowError after creating its work folder."""
    for kw, message in (({"seconds": 1.0}, "at least 4.6"), ({"seconds": 1e308}, "at most 86400")):
        with pytest.raises(ValueError, match=message):
            BenchOptions(checkpoint=tmp_path / "x.pt", **kw)
