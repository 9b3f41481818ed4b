"""`sacmf fuzz-load`, short: 20,000 malformed messages against a real `sacmf serve` subprocess.

The full run (1,000,000 messages, BENCHMARKS.md) is a command, not a test; this one runs the same code
path end to end (daemon start, real ZeroMQ socket, /metrics, /healthz, SIGTERM) in about ten seconds, so
CI sees a regression in any check the command makes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from daemon import cli, fuzz_load
from daemon.serve_process import parse_metrics
from ingest import fuzzcases, protocol
from tests.service_helpers import tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-load") / "tiny.pt"
    tiny_checkpoint(path, "tiny-fuzz-load")
    return path


def test_fuzz_load_short_run(checkpoint: Path, tmp_path: Path) -> None:
    opts = fuzz_load.LoadOptions(messages=20_000, valid_every=10, seed=7, checkpoint=checkpoint, workdir=tmp_path)
    report = fuzz_load.run(opts)
    assert report.ok, fuzz_load.format_report(report)
    expected_checks = {"no_stall", "daemon_alive", "healthz_ok", "healthz_ok_throughout", "rejected_sum",
                       "rejected_by_reason", "valid_delivered", "no_loss", "no_internal_errors", "no_window_lost",
                       "results_after_flood", "pipeline", "clean_shutdown"}  # fmt: skip
    assert set(report.checks) == expected_checks
    # exact accounting: every malformed message under its reason, every valid one delivered
    assert report.malformed_sent == 20_000 == sum(report.rejected.values())
    assert report.rejected == report.expected_reasons
    assert set(report.families) == set(fuzzcases.FAMILIES)  # every family was sent
    # the families reach every reason the decoder and the router can give without CURVE or rate limits
    # (future_time is live mode only; fuzz-load runs the lossless replay mode)
    assert set(report.rejected) == set(protocol.REJECT_REASONS) - {"rate_limited", "unauthorised_group", "future_time"}
    assert report.valid_delivered == report.valid_expected
    assert sum(report.valid_expected.values()) == report.valid_sent == report.sent_total - 20_000
    assert report.valid_sent >= 20_000 // 9
    assert report.results_after_flood > 0 and report.windows_emitted == report.results_received
    assert report.windows_emitted == report.windows_received == report.windows_succeeded > 0
    assert report.health_checks > 0 and report.health_failures == 0
    assert report.exit_code == 0 and report.rss_before_mb and report.rss_after_mb


def test_fuzz_load_command_writes_json_and_fails_fast_on_bad_input(checkpoint: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.json"
    argv = ["fuzz-load", "--messages", "2000", "--valid-every", "4", "--seed", "1", "--checkpoint", str(checkpoint),
            "--json", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "2,000 malformed" in text and "all passed" in text
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["malformed_sent"] == 2000 and data["valid_every"] == 4
    # a flood shorter than the poll interval was never polled, and "0 checks, 0 failures" passed
    assert data["health_checks"] > 0 and data["checks"]["healthz_ok_throughout"] and data["checks"]["pipeline"]
    assert cli.main(["fuzz-load", "--messages", "10", "--checkpoint", str(tmp_path / "missing.pt")]) == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["--seed", "-1"],
        ["--messages", "0"],
        ["--messages", "-5"],
        ["--messages", "1e3"],
        ["--valid-every", "1"],
        ["--valid-every", "0"],
    ],
)
def test_fuzz_load_refuses_bad_numbers_before_starting_anything(argv, checkpoint: Path, capsys) -> None:
    """--seed -1 started the daemon, then failed `run_completed: ValueError` (numpy takes no negative
    seed): every numeric option is a usage error naming it, before anything starts."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["fuzz-load", *argv, "--checkpoint", str(checkpoint)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {argv[0]}:" in err and "Traceback" not in err


def test_healthz_polled_never_fails_the_check() -> None:
    """A check that observed nothing must not pass: 0 polls of /healthz is a failure, not "0 failures"."""
    report = fuzz_load.LoadReport()
    fuzz_load.check_health_polls(report, 0, 0, "")
    assert report.checks == {"healthz_ok_throughout": False}
    assert report.failures == ["healthz_ok_throughout: /healthz was never polled"]
    fuzz_load.check_health_polls(report := fuzz_load.LoadReport(), 3, 0, "")
    assert report.checks == {"healthz_ok_throughout": True}


PIPELINE_METRICS = """\
sacmf_windows_emitted_total{{group="g1",completeness="full"}} {emitted}
sacmf_inference_windows_received_total {received}
sacmf_inference_requests_total{{result="success"}} {succeeded}
sacmf_inference_requests_total{{result="failure"}} 0
sacmf_inference_windows_dropped_total 0
sacmf_inference_queue_depth 0
"""


@pytest.mark.parametrize(
    ("emitted", "received", "succeeded", "results", "ok"),
    [
        (12, 12, 12, 12, True),
        (12, 9, 9, 9, False),  # 3 windows lost between ingest and the model: no other check sees it
        (12, 12, 12, 10, False),  # 2 results lost on the way out
        (0, 0, 0, 0, False),  # no window at all proves nothing
    ],
)
def test_pipeline_check_needs_every_window_through_the_model(emitted, received, succeeded, results, ok) -> None:
    """The flood's checks counted messages and drops, and "a result after the flood": windows that never
    reached the model passed them all. /metrics text through the daemon's own parser."""
    m = parse_metrics(PIPELINE_METRICS.format(emitted=emitted, received=received, succeeded=succeeded))
    r = fuzz_load.LoadReport()
    fuzz_load.check_pipeline(r, m, results)
    assert r.checks == {"pipeline": ok}
    assert (r.windows_received, r.windows_succeeded, r.results_received) == (received, succeeded, results)
    if not ok:
        assert f"windows emitted {emitted}, received {received}, succeeded {succeeded}" in r.failures[0]


def _sacmf(*argv: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """The command as a user runs it, with this test's copy of the code (PYTHONPATH) and from ``cwd``."""
    root = Path(fuzz_load.__file__).resolve().parents[1]
    env = {**os.environ, **(env or {}), "PYTHONPATH": str(root)}
    return subprocess.Popen([sys.executable, "-m", "daemon.cli", *argv], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def test_fuzz_load_from_another_folder_with_relative_paths(checkpoint: Path, tmp_path: Path) -> None:
    """The daemon runs in the repository root: a relative --workdir reached it as a config path there, and
    the results socket ipc://rel/... named two different files. --json into a folder that does not exist
    yet printed the report, then a FileNotFoundError traceback (exit 1) though every check passed."""
    (tmp_path / "tiny.pt").write_bytes(checkpoint.read_bytes())
    proc = _sacmf("fuzz-load", "--messages", "300", "--checkpoint", "tiny.pt", "--workdir", "rel/work",
                  "--json", "rel/out/report.json", cwd=tmp_path)  # fmt: skip
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "all passed" in out, out + err[-3000:]
    assert "Traceback" not in err
    data = json.loads((tmp_path / "rel" / "out" / "report.json").read_text())
    assert data["ok"] and data["results_received"] > 0
    assert (tmp_path / "rel" / "work" / "daemon.log").is_file()


def _serving(config: Path) -> list[int]:
    """Pids of the processes whose command line names ``config`` (the daemon started with it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(config).encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_fuzz_load_stops_the_daemon_and_says_where_its_files_are(
    sig: signal.Signals, checkpoint: Path, tmp_path: Path
) -> None:
    """Ctrl-C during the flood gave a KeyboardInterrupt traceback and left /tmp/sacmf-fuzz-load-* without
    a word. Now: the daemon is stopped, the report says where its log was kept, exit 1, no traceback."""
    proc = _sacmf("fuzz-load", "--messages", "1000000", "--checkpoint", str(checkpoint), cwd=tmp_path,
                  env={"TMPDIR": str(tmp_path)})  # fmt: skip
    deadline = time.monotonic() + 90
    logs: list[Path] = []
    while time.monotonic() < deadline and proc.poll() is None:
        logs = list(tmp_path.glob("sacmf-fuzz-load-*/daemon.log"))
        if logs and '"ready"' in logs[0].read_text():
            break
        time.sleep(0.1)
    assert logs and proc.poll() is None, "the daemon never got ready"
    config = logs[0].parent / "serve.toml"
    try:
        assert _serving(config)
        time.sleep(0.5)  # into the flood
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, out + err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert "FAILED run_completed: interrupted" in out
        assert f"daemon log and config kept in {logs[0].parent}" in out
        sent = re.search(r"fuzz-load: ([\d,]+) malformed \+ ([\d,]+) valid", out)  # what it did send: not 0 + 0
        assert sent and int(sent.group(1).replace(",", "")) > 0, out
        assert logs[0].is_file() and not _serving(config)
        assert not list(tmp_path.glob("sacmf-fuzz-ipc-*"))  # the socket's folder is removed
    finally:  # a failed run must not leave its daemon behind: it leads a process group of its own, and
        proc.kill()  # with its log reader gone it does not stop on one SIGTERM
        for pid in _serving(config):
            os.killpg(pid, signal.SIGKILL)


def test_a_daemon_that_takes_nothing_ends_the_flood_instead_of_hanging_it(ctx):
    """PUSH blocks while the receiver is behind; a receiver that never reads must fail the run, not hang it."""

    class Silent:
        def alive(self) -> bool:
            return True

    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 10)
    push.bind("tcp://127.0.0.1:*")
    pull = ctx.socket(zmq.PULL)  # connected, never read: the queues fill, then the sender must give up
    pull.setsockopt(zmq.RCVHWM, 10)
    pull.connect(push.getsockopt_string(zmq.LAST_ENDPOINT))
    send = fuzz_load._lossless_sender(push, 2.0, Silent())  # type: ignore[arg-type]
    t = time.monotonic()
    with pytest.raises(TimeoutError, match="took no message"):
        for _ in range(100_000):
            send([b"rad/g1/rad_vis", b"x" * 1000])
    assert 1.5 < time.monotonic() - t < 30
    push.close(0)
    pull.close(0)
