"""Logs are one JSON object per line on stderr when not on a TTY; command output stays on stdout."""

from __future__ import annotations

import json
import subprocess
import sys

CODE = """
from daemon import logs
import structlog
logs.configure("info", "auto")
log = structlog.get_logger("t")
log.info("window_emitted", group="g1", start_ns=5)
log.debug("hidden")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("boom")
print("stdout stays clean")
"""


def test_json_lines_on_stderr_when_not_a_tty():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "stdout stays clean\n"
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert [x["event"] for x in lines] == ["window_emitted", "boom"]  # debug filtered at level info
    first = lines[0]
    assert first["level"] == "info" and first["group"] == "g1" and first["start_ns"] == 5
    assert first["timestamp"].endswith("Z")
    assert "ZeroDivisionError" in lines[1]["exception"]


GONE_READER = """
import sys, structlog
from daemon import logs
logs.configure("info", "json")
log = structlog.get_logger("t")
log.info("before")
sys.stdout.write("ready\\n"); sys.stdout.flush()
sys.stdin.readline()  # the parent has closed its end of our stderr by now
for i in range(3):
    log.warning("draining", i=i)  # what SIGTERM logs first: it raised BrokenPipeError here
print("logs lost", logs.lost_lines, flush=True)
print("traceback", file=sys.stderr)  # stderr is /dev/null now: this must not raise either
"""


def test_a_vanished_log_reader_costs_log_lines_not_the_process():
    """A supervisor that reads the daemon's stderr is killed: logging must not raise in the thread that
    logs (on SIGTERM, the shutdown itself), or the daemon never finishes shutting down."""
    proc = subprocess.Popen([sys.executable, "-c", GONE_READER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
    assert proc.stdout.readline() == "ready\n"
    proc.stderr.close()  # the reader goes away
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out = proc.stdout.read()
    assert proc.wait(60) == 0, out
    assert out == "logs lost 1\n"  # the first failed line; fd 2 goes to /dev/null after it
