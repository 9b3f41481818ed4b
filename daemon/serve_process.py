"""`sacmf serve` as a subprocess, for the commands that drive a real daemon: soak, fuzz-load, bench-daemon.

Why one module: each of them starts the daemon with a generated config, waits for its log events, reads
its admin endpoints and measures its processes (RSS, file descriptors, CPU time from /proc); one copy
keeps those measurements the same everywhere.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class ServeError(RuntimeError):
    """The daemon did not start, or exited, before what the caller waited for."""


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc), root first."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()  # the name may hold spaces and parentheses
        children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return out


def rss_kib(pid: int) -> int | None:
    """VmRSS of a process in KiB, None when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return 0  # a zombie has no VmRSS line


def fd_count(pid: int) -> int | None:
    """Open file descriptors of a process, None when it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def process_name(pid: int, root: int) -> str:
    """serve, ingest, or the multiprocessing helper it is: the daemon's processes all run python."""
    if pid == root:
        return "serve"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    if "resource_tracker" in cmd:
        return "resource_tracker"
    if "forkserver" in cmd:
        return "forkserver"
    if "spawn_main" in cmd:
        return "ingest"
    return cmd.split(" ", 1)[0].rsplit("/", 1)[-1] or "?"


def parse_metrics(text: str) -> dict[str, dict[tuple, float]]:
    """Sample name -> {sorted label items: value}, with client_python's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def metric(m: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for k, v in m.get(name, {}).items() if want <= set(k))


def _http(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError as exc:
        return 0, str(exc)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds so far, summed over ``pids`` (gone ones count 0)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15)
        except (OSError, ValueError, IndexError):
            continue
    return total


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class DaemonProcess:
    """`sacmf serve` in a subprocess of its own session; its JSON log goes to a file and is watched."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.events: dict[str, dict] = {}  # first event of each name
        self.errors: list[dict] = []
        self.proc: subprocess.Popen | None = None
        self.admin = ""
        self._lock = threading.Lock()

    def start(self) -> DaemonProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.cli", "serve", str(self.config)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # the operator's Ctrl-C reaches the soak, which then stops the daemon
        )
        threading.Thread(target=self._read_log, name="soak-daemon-log", daemon=True).start()
        return self

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        with open(self.log_path, "w") as out:
            for line in self.proc.stderr:
                out.write(line)
                out.flush()
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    event = {"event": "_text", "line": line.rstrip()[:500]}
                if not isinstance(event, dict):
                    continue
                with self._lock:
                    self.events.setdefault(str(event.get("event")), event)
                    if event.get("level") in ("error", "critical") and len(self.errors) < 100:
                        self.errors.append(event)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_event(self, name: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if name in self.events:
                    return self.events[name]
            if not self.alive():
                time.sleep(0.3)  # the last lines may still be on their way
                with self._lock:
                    if name in self.events:
                        return self.events[name]
                raise ServeError(f"the daemon exited ({self.proc.returncode}) before {name!r}; log: {self.log_path}")
            time.sleep(0.05)
        raise ServeError(f"no {name!r} from the daemon within {timeout:.0f} s; log: {self.log_path}")

    def metrics(self) -> dict[str, dict[tuple, float]] | None:
        status, text = self.get("/metrics")
        return parse_metrics(text) if status == 200 else None

    def healthy(self) -> bool:
        return self.get("/healthz")[0] == 200

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, then wait; SIGKILL past the timeout (returns None then)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                return None
        return self.proc.returncode

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        """(status, body) of an admin request; status 0 when the daemon does not answer at all."""
        return _http(f"{self.admin}{path}", timeout)

    def wait_ready(self, timeout: float) -> dict:
        """Until the daemon is ready; sets ``admin`` and returns the ``ready`` log event (its endpoints)."""
        self.admin = f"http://127.0.0.1:{self.wait_event('admin_listening', timeout)['port']}"
        return self.wait_event("ready", timeout)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds (user + system) so far of each of the daemon's processes, by name."""
        return {process_name(pid, self.pid): cpu_seconds([pid]) for pid in process_tree(self.pid)}

    def rss_mb(self) -> dict[str, float]:
        """Resident memory and its peak (``*_peak``) of each of the daemon's processes, in MB."""
        out = {}
        for pid in process_tree(self.pid):
            name = process_name(pid, self.pid)
            for key, suffix in (("VmRSS", ""), ("VmHWM", "_peak")):
                kb = _status_kib(pid, key)
                if kb is not None:
                    out[name + suffix] = round(kb / 1024, 1)
        return out

    def close(self) -> None:
        """Kill it if it still runs (after ``stop``, nothing to do)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
