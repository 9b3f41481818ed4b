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
