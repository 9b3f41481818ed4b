"""`sacmf soak`: its ledger arithmetic, the publisher resume it relies on, and a short real run.

Why a short run is worth a test: the one-hour soak is a command the operator starts, but its machinery
(daemon subprocess, reconnect kinds, ledger against /metrics, RSS/fd sampling) must keep working; 20 s
with 30 reconnects exercises every reconnect kind several times and must account exactly.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from daemon import cli, soak
from ingest.publisher import SensorPublisher
from tests.ingest_helpers import KINDS, T0, WorkerThread, settings, wait_for
from tests.service_helpers import tiny_checkpoint

FRAME = np.zeros((8, 8), np.uint16)


# ---------------------------------------------------------------- publisher resume (used by the soak)


def test_resumed_publisher_continues_the_session_without_restart_or_gap(ctx):
    w = WorkerThread(settings("tcp://127.0.0.1:*"), ctx).start()
    old = SensorPublisher(w.endpoint, "g1", KINDS, bind=False, socket_type="push", context=ctx)
    assert [old.send_image("cam_vis", FRAME, T0 + i) for i in range(3)] == [0, 1, 2]
    assert old.next_seq == {"cam_vis": 3, "cam_ir": 0, "rad_vis": 0, "rad_ir": 0}
    old.close()
    # close() hands the messages to the socket, not to the worker: the worker's socket takes its two peers'
    # pipes in turn, so seq 3 could overtake 1 and 2 (a reorder, healed and counted as one). A publisher
    # that restarts is seconds behind its old socket; so is this one.
    wait_for(lambda: w.worker.tracker.stats("g1/cam_vis").delivered == 3, what="the old socket's 3 frames")
    new = SensorPublisher(
        w.endpoint, "g1", KINDS, bind=False, socket_type="push", context=ctx, session=old.session, next_seq=old.next_seq
    )
    assert new.send_image("cam_vis", FRAME, T0 + 3) == 3
    new.close()
    wait_for(lambda: w.worker.tracker.stats("g1/cam_vis").delivered == 4, what="4 frames")
    w.finish()
    s = w.worker.tracker.stats("g1/cam_vis")
    assert (s.restarts, s.gaps, s.gaps_detected, s.duplicates, s.joined_late) == (0, 0, 0, 0, 0)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"next_seq": {"cam_vis": 3}}, "give the session"),
        ({"session": 1, "next_seq": {"nope": 3}}, "not configured"),
        ({"session": 1, "next_seq": {"cam_vis": -1}}, "0..2"),
        ({"session": 1, "next_seq": {"cam_vis": True}}, "int"),
    ],
)
def test_publisher_next_seq_is_validated(ctx, kw, match):
    with pytest.raises(ValueError, match=match):
        SensorPublisher("inproc://soak-unused", "g1", KINDS, context=ctx, **kw)


# ---------------------------------------------------------------- ledger against the daemon's counts


def _daemon(**over: int) -> dict[str, int]:
    d = {"received": 12, "gaps_detected": 3, "missing": 3, "duplicates": 2, "reordered": 0, "stale": 0, "restarts": 1}
    return d | over


LEDGER = soak.SensorLedger(sent=12, seqs=13, skipped=3, resent=2, restarts=1)


def test_compare_sensor_exact_match():
    expected, problems = soak.compare_sensor(LEDGER, _daemon(), lossless=True)
    assert problems == []
    assert expected == {"stale": 0, "restarts": 1, "received": 12, "missing": 3, "duplicates": 2}


def test_compare_sensor_names_each_mismatch():
    _, problems = soak.compare_sensor(LEDGER, _daemon(missing=2, gaps_detected=2), lossless=True)
    assert problems[0] == "missing: daemon 2, expected 3"
    assert problems[1].startswith("conservation: delivered 10 + missing 2 = 12, but 13 seqs were used")
    _, problems = soak.compare_sensor(LEDGER, _daemon(gaps_detected=5, reordered=1), lossless=True)
    assert problems == ["gaps: detected 5 - healed by reordering 1 != missing 3"]


def test_compare_sensor_pub_checks_conservation_not_delivery():
    # two messages lost in transport at the start of a session: the daemon counts them as missing
    _, problems = soak.compare_sensor(LEDGER, _daemon(received=10, missing=5, gaps_detected=5), lossless=False)
    assert problems == []
    _, problems = soak.compare_sensor(LEDGER, _daemon(received=10), lossless=False)
    assert len(problems) == 1 and "invisible" in problems[0]


def test_reconnect_schedule_is_even():
    assert soak.reconnect_schedule(60.0, 3) == [10.0, 30.0, 50.0]
    assert soak.reconnect_schedule(60.0, 0) == []


def test_warmup_defaults():
    assert soak.SoakOptions().warmup == 360.0  # 10 % of an hour
    assert soak.SoakOptions(minutes=5).warmup == 60.0
    assert soak.SoakOptions(minutes=1).warmup == 30.0  # at most half the run
    with pytest.raises(ValueError, match="transport"):
        soak.SoakOptions(transport="udp")


def test_cli_registers_soak():
    args = cli.build_parser().parse_args(["soak", "--minutes", "2", "--reconnects", "7", "--json", "r.json"])
    assert args.func is soak.main and (args.minutes, args.reconnects, args.json) == (2.0, 7, Path("r.json"))


@pytest.mark.parametrize(
    "argv",
    [
        ["--minutes", "nan"],
        ["--minutes", "inf"],
        ["--minutes", "0"],
        ["--minutes", "-1"],
        ["--reconnects", "-1"],
        ["--groups", "0"],
        ["--sample-interval", "0"],
        ["--sample-interval", "nan"],
        ["--warmup", "-5"],
        ["--warmup", "inf"],
        ["--max-rss-growth", "nan"],
    ],
)
def test_soak_refuses_bad_numbers_before_starting_anything(argv, tmp_path: Path, capsys):
    """--minutes nan passed the options' check, started the daemon and crashed at the end of the load:
    a bad number is a usage error naming the option. (The checkpoint is missing on purpose: a run that got
    past the options would stop there, with exit 2 but without argparse's message.)"""
    with pytest.raises(SystemExit) as exc:
        cli.main(["soak", *argv, "--checkpoint", str(tmp_path / "missing.pt")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {argv[0]}:" in err and "Traceback" not in err


def test_soak_refuses_reconnects_that_cannot_fit(tmp_path: Path, capsys):
    """Reconnects planned closer than MIN_RECONNECT_SPACING_S, counting out the fd counts' quiet windows,
    cannot all happen: refused up front, not a FAIL after the run."""
    with pytest.raises(ValueError, match="do not fit"):
        soak.SoakOptions(minutes=0.01, reconnects=100)
    with pytest.raises(ValueError, match="do not fit"):  # a sample every 0.5 s leaves no quiet-free time
        soak.SoakOptions(minutes=1, reconnects=10, sample_interval_s=0.5)
    soak.SoakOptions(minutes=1, reconnects=0, sample_interval_s=0.5)  # no reconnect: nothing to fit
    with pytest.raises(ValueError, match="must be shorter than the run"):  # it printed RSS 726.8 -> 0.0 MiB
        soak.SoakOptions(minutes=0.5, reconnects=0, warmup_s=30.0)
    ckpt = tmp_path / "tiny.pt"
    tiny_checkpoint(ckpt, "soak-test")
    assert cli.main(["soak", "--minutes", "0.01", "--reconnects", "100", "--checkpoint", str(ckpt)]) == 2
    assert "error: 100 reconnects do not fit in 0.6 s" in capsys.readouterr().err


def test_reconnects_are_planned_outside_the_fd_counts_quiet_windows():
    """An fd count needs QUIET_S without a reconnect; a reconnect planned in that time was held off by the
    count, and one held off near the end of the run was never done."""
    opts = soak.SoakOptions(minutes=0.1, reconnects=300)  # the reviewer's run: a sample at 0 s and at 5 s
    windows = opts.fd_count_windows()
    assert windows == [(0.0, soak.SAMPLE_HOLD_S), (5.0 - soak.QUIET_S - soak.SAMPLE_LEAD_S, 5.0 + soak.SAMPLE_HOLD_S)]
    times = opts.reconnect_times()
    assert len(times) == 300 and times == sorted(times) and times[0] > 0 and times[-1] < opts.duration_s
    assert not [t for t in times if any(a <= t < b for a, b in windows)]
    assert min(b - a for a, b in itertools.pairwise(times)) >= soak.MIN_RECONNECT_SPACING_S
    # with nothing to leave out the plan is the plain even one
    assert soak.reconnect_schedule(60.0, 3, []) == [10.0, 30.0, 50.0]


# ---------------------------------------------------------------- a short real run


def test_short_soak_accounts_exactly_and_leaks_nothing(tmp_path: Path):
    ckpt = tmp_path / "tiny.pt"
    tiny_checkpoint(ckpt, "soak-test")
    opts = soak.SoakOptions(
        minutes=20 / 60,
        reconnects=30,
        checkpoint=ckpt,
        sample_interval_s=1.0,
        warmup_s=5.0,
        workdir=tmp_path / "soak",
        settle_s=30.0,
    )
    report = soak.run_soak(opts)
    checks = {c["name"]: c for c in report["checks"]}
    summary = soak.format_summary(report)
    for name in ("completed", "daemon_alive", "clean_exit", "healthy", "results_flowing", "accounting", "pipeline"):
        assert checks[name]["ok"], summary
    assert checks["no_errors"]["ok"], summary
    # 30 reconnects cycle through every kind: 10 restarts, 10 plain resumes, 5 with gaps, 5 with duplicates
    assert report["reconnects"] == {"restart": 10, "resume": 10, "resume_gap": 5, "resume_dup": 5}
    acc = report["accounting"]
    assert acc["lossless"] and acc["problems"] == []
    for key, s in acc["sensors"].items():
        d, led = s["daemon"], s["ledger"]
        assert d["received"] == led["sent"] > 100, key
        assert d["missing"] == led["skipped"] == 5 * soak.GAP_SEQS, key
        assert d["duplicates"] == led["resent"] > 0, key
        assert d["restarts"] == led["restarts"] == 10, key
        assert d["stale"] == 0, key
    # the numbers the long run judges are measured; at this scale fds must not grow at all (they are
    # counted away from reconnects), RSS is only reported (the 5 % limit is for the hour)
    res = report["resources"]
    assert res["rss_kib"]["baseline"] > 0 and res["rss_kib"]["growth_pct"] is not None
    assert {p["name"] for p in res["processes"].values()} >= {"serve", "ingest"}
    assert checks["fds"]["ok"], summary
    assert report["after_publishers_closed"]["fds"] <= res["fds"]["final"]
    assert report["results_received"].get("det/soak1", 0) > 0
    assert (tmp_path / "soak" / "serve.log").is_file()


def test_dense_reconnects_all_happen_when_a_sample_falls_at_the_end(tmp_path: Path):
    """150 reconnects in 3 s (one per 20 ms) with a sample due 0.15 s before the end: the sampler used to
    hold the reconnects off while it waited QUIET_S for its quiet, and the load ended with 10 of them
    undone (`completed` FAIL, "140 of 150"). They are now planned around the sample, and all are done."""
    ckpt = tmp_path / "tiny.pt"
    tiny_checkpoint(ckpt, "soak-test")
    opts = soak.SoakOptions(
        minutes=0.05, reconnects=150, checkpoint=ckpt, sample_interval_s=1.425, workdir=tmp_path / "soak", settle_s=30.0
    )
    report = soak.run_soak(opts)
    checks = {c["name"]: c for c in report["checks"]}
    summary = soak.format_summary(report)
    assert report["reconnects_total"] == 150, summary
    for name in ("completed", "daemon_alive", "clean_exit", "accounting", "pipeline", "fds"):
        assert checks[name]["ok"], summary
    # 3 s hold too few samples for a growth figure: it said PASS +0.00 % from the same three samples twice
    assert report["resources"]["samples_after_warmup"] < soak.MIN_SAMPLES_AFTER_WARMUP
    assert not checks["rss_growth"]["ok"] and "samples after the warm-up" in checks["rss_growth"]["detail"]


def test_soak_with_relative_paths_from_another_folder(tmp_path: Path):
    """The daemon runs in the repository root: a relative --workdir used to reach it as a relative config
    path there ("the daemon exited (2) before 'admin_listening'"). Paths are made absolute first."""
    tiny_checkpoint(tmp_path / "tiny.pt", "soak-test")
    root = Path(soak.__file__).resolve().parents[1]
    argv = ["soak", "--minutes", "0.03", "--reconnects", "3", "--sample-interval", "1", "--checkpoint", "tiny.pt",
            "--workdir", "rel/work", "--json", "rel/report.json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-m", "daemon.cli", *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    out = proc.stdout + proc.stderr[-3000:]
    assert proc.returncode in (0, 1) and (tmp_path / "rel" / "report.json").is_file(), out
    report = json.loads((tmp_path / "rel" / "report.json").read_text())
    checks = {c["name"]: c["ok"] for c in report["checks"]}
    for name in ("completed", "daemon_alive", "clean_exit", "results_flowing", "accounting", "pipeline"):
        assert checks[name], out
    assert report["workdir"] == str(tmp_path / "rel" / "work")
    assert (tmp_path / "rel" / "work" / "serve.log").is_file()
