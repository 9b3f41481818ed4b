"""`sacmf simulate` as an operator runs it: it stops when told (duration, a signal) even with nobody
reading its PUSH socket, and bad options or endpoints are an `error:` with exit 2, not a traceback."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _simulate(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "simulate", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


PUSH_NOBODY = ["--socket", "push", "--connect", "--frame-rate", "200"]  # fills the send queue in seconds


def test_a_push_simulator_nobody_reads_still_ends_at_its_duration():
    proc = _simulate(*PUSH_NOBODY, "--endpoint", f"tcp://127.0.0.1:{_free_port()}", "--duration", "2")
    try:
        out, err = proc.communicate(timeout=60)  # was: blocked in a send for ever
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "sent: cam_vis=" in out


def test_a_push_simulator_nobody_reads_stops_on_the_first_sigterm():
    proc = _simulate(*PUSH_NOBODY, "--endpoint", f"tcp://127.0.0.1:{_free_port()}")
    try:
        assert proc.stdout is not None and "publishing group" in proc.stdout.readline()
        time.sleep(3)  # the 1000-message queue is full by now: the simulator waits in a send
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err  # the first signal, not a second one (exit 130)
    assert "sent: cam_vis=" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration", "0"], "--duration: must be a finite number > 0"),
        (["--frame-rate", "inf"], "--frame-rate: must be a finite number > 0 and <= 1000"),
        (["--sample-rate", "1e12"], "--sample-rate: must be a finite number > 0"),
        (["--size", "10"], "--size: size must look like 128x128"),
        (["--group", "a b"], "--group: must match"),
        (["--endpoint", "foo://x", "--duration", "1"], "error: foo://x:"),
        (["--record", "/nonexistent/dir/x.mcap", "--duration", "1"], "error: cannot record to /nonexistent/dir/x.mcap"),
    ],
)
def test_bad_simulator_options_are_errors_with_exit_2(args, message):
    proc = _simulate("--endpoint", f"tcp://127.0.0.1:{_free_port()}", *args)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and message in err and "Traceback" not in err, err
