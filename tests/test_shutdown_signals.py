"""`sacmf serve` shutdown on signals, for real: readiness while draining, a second signal, the deadline.

The daemon runs as a subprocess fed by the simulator (tests/service_helpers.py). To make a drain last
as long as a test needs, without mocking anything, its JSONL result sink is pointed at a named pipe
(FIFO) whose buffer the test has filled beforehand: the sink's first ``os.write`` blocks in the kernel
until the test reads the pipe (or forever, if it never does). Everything else (ingest process, model,
ZeroMQ and MCAP sinks, admin HTTP) is the real thing.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from collections import Counter
from pathlib import Path

import pytest
import torch

from daemon.serve_process import process_tree
from tests.service_helpers import ROOT, Daemon, http, sacmf, tiny_checkpoint

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    tiny_checkpoint(path, "tiny-v1")
    return path


class StuckPipe:
    """A FIFO with a reader that does not read and a buffer already full: writers to it block.

    The read end stays open (so a writer neither blocks in ``open`` nor gets EPIPE), and the buffer is
    filled with newlines (so what the daemon writes after them still parses as JSON Lines). ``release``
    starts reading everything until every writer has closed the pipe (EOF).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        self.rfd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # does not wait for a writer
        wfd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # a reader exists: does not wait either
        try:
            for size in (65536, 4096, 512, 64, 8, 1):  # down to single bytes: not even a short line fits
                with contextlib.suppress(BlockingIOError):
                    while True:
                        os.write(wfd, b"\n" * size)
        finally:
            os.close(wfd)
        self.data = bytearray()
        self._reader: threading.Thread | None = None

    def release(self) -> None:
        os.set_blocking(self.rfd, True)
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        while chunk := os.read(self.rfd, 65536):
            self.data += chunk

    def lines(self, timeout: float = 10.0) -> list[dict]:
        """The JSON objects read, once the writer has closed its end."""
        assert self._reader is not None
        self._reader.join(timeout)
        assert not self._reader.is_alive(), "the daemon did not close its end of the pipe"
        return [json.loads(line) for line in bytes(self.data).splitlines() if line.strip()]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.join(5)  # the daemon is gone by now: EOF ends it
        if self._reader is None or not self._reader.is_alive():
            os.close(self.rfd)
        self.path.unlink(missing_ok=True)


@pytest.fixture
def stuck_daemon(tmp_path: Path, checkpoint: Path):
    """Factory: a started daemon whose JSONL result sink writes into a StuckPipe, with ``timeout_s``."""
    made: list[tuple[Daemon, StuckPipe]] = []

    def make(timeout_s: float) -> tuple[Daemon, StuckPipe]:
        d = Daemon(tmp_path, checkpoint)
        text = d.config.read_text()
        assert "timeout_s = 30\n" in text and "[sinks]\n" in text
        # fsync "never": fsync(2) on a pipe is EINVAL, which would only add a close warning
        text = text.replace("timeout_s = 30\n", f"timeout_s = {timeout_s}\n").replace(
            "[sinks]\n", '[sinks]\nfsync = "never"\n'
        )
        d.config.write_text(text)
        pipe = StuckPipe(d.jsonl)
        made.append((d, pipe))
        d.start()
        d.wait_results(lambda r: True, n=1)  # serving; the JSONL lane is now stuck in its first write
        return d, pipe

    yield make
    for d, pipe in made:
        d.close()
        pipe.close()
        Path(d.results_ep.removeprefix("ipc://")).unlink(missing_ok=True)  # left behind by a kill or os._exit


def _wait_exit(d: Daemon, timeout: float) -> tuple[int | None, float]:
    """(exit status or None, seconds waited)."""
    t0 = time.monotonic()
    try:
        status = d.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        status = None
    return status, time.monotonic() - t0


def _log_time(event: dict) -> datetime.datetime:
    return datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00"))


def _events(d: Daemon, name: str) -> list[dict]:
    return [e for e in d.events if e.get("event") == name]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after "(comm)"
                    out.append(int(entry.name))
    return out


def _ipc_dirs(pid: int) -> set[Path]:
    """Directories of the unix sockets ``pid`` has bound (the daemon's private ingest pipe directory)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    dirs = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()  # Num RefCount Protocol Flags Type St Inode Path
        if len(fields) >= 8 and fields[6] in inodes and fields[7].endswith("/ingest.ipc"):
            dirs.add(Path(fields[7]).parent)
    return dirs


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_readyz_is_503_while_draining_healthz_still_answers_then_exit_0(stuck_daemon):
    d, pipe = stuck_daemon(timeout_s=30)
    assert http(f"{d.admin}/readyz")[0] == 200
    d.proc.send_signal(signal.SIGTERM)
    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and d.proc.poll() is None:  # tight loop: no sleep
        try:
            status, body = http(f"{d.admin}/readyz")
        except (urllib.error.URLError, ConnectionError):
            break  # the admin server is gone: the process is exiting
        seen.append((status, body))
        if status == 503:
            break
    not_ready = [json.loads(body) for status, body in seen if status == 503]
    assert not_ready, f"no 503 from /readyz after SIGTERM: {Counter(s for s, _ in seen)}, exit {d.proc.poll()}"
    assert d.proc.poll() is None  # observed during the drain, not after it
    assert not_ready[0]["status"] == "not_ready" and not_ready[0]["stopping"] is True  # at once, by the signal
    # liveness still answers while draining (a liveness probe must not kill a draining daemon); the drain
    # begins within the main loop's 0.2 s tick of the signal
    deadline = time.monotonic() + 5
    while True:
        status, body = http(f"{d.admin}/healthz")
        if json.loads(body).get("draining") or time.monotonic() > deadline:
            break
    assert status == 200 and json.loads(body)["draining"] is True, body
    assert d.metrics()["sacmf_ready"][()] == 0.0
    assert http(f"{d.admin}/readyz")[0] == 503  # and it stays unready
    d.event("shutdown_started", timeout=5)
    assert d.proc.poll() is None and not _events(d, "shutdown_complete")  # still draining: the sink is stuck

    pipe.release()  # the slow sink catches up: the drain can finish
    status, waited = _wait_exit(d, 25)
    assert status == 0, (status, d.events[-5:])
    done = d.event("shutdown_complete", timeout=5)
    assert done["clean"] is True and done["windows_dropped"] == 0 and done["windows_failed"] == 0
    written = pipe.lines()
    assert len(written) == done["sinks_written"]["jsonl"] == done["results_published"] > 0
    assert not _events(d, "shutdown_forced")


def test_a_second_signal_during_the_drain_exits_at_once_with_130(stuck_daemon):
    d, _pipe = stuck_daemon(timeout_s=60)
    pipe_dirs = _ipc_dirs(d.proc.pid)  # while its sockets are still bound
    d.proc.send_signal(signal.SIGTERM)
    d.event("shutdown_started", timeout=10)
    time.sleep(0.5)
    assert d.proc.poll() is None  # the drain is in progress (held by the stuck sink, up to 60 s)
    assert http(f"{d.admin}/readyz")[0] == 503
    children = _children(d.proc.pid)
    d.proc.send_signal(signal.SIGINT)  # either signal counts as the second one
    status, waited = _wait_exit(d, 5)
    assert pipe_dirs, "the daemon's private pipe directory was not found"
    leftovers = [p for p in pipe_dirs if p.exists()]
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    assert status == 130, (status, d.events[-5:])
    assert not leftovers, f"the forced exit left its pipe directory behind: {leftovers}"
    assert waited < 5
    time.sleep(0.3)  # the log reader thread catches up with the last line
    forced = _events(d, "shutdown_forced")
    assert forced and forced[0]["level"] == "error", d.events[-5:]
    assert not _events(d, "shutdown_complete")  # it did not finish the drain
    # no child outlives it (the ingest process if still running is killed; multiprocessing's resource
    # tracker sees its parent gone)
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in children if _alive(p)]


def test_a_drain_that_cannot_finish_exits_1_at_the_shutdown_deadline(stuck_daemon):
    timeout_s = 3.0
    d, _pipe = stuck_daemon(timeout_s=timeout_s)
    d.proc.send_signal(signal.SIGTERM)
    status, waited = _wait_exit(d, timeout_s + 30)
    assert status == 1, (status, waited, d.events[-5:])
    assert waited >= timeout_s, waited  # it waited for the sink
    # ... but not past the deadline: timed by the daemon's own log, since the process's exit after it
    # (torch's library teardown) took 1 s on an idle host and up to 8 s on a loaded one
    begun, done = d.event("shutdown_started", timeout=5), d.event("shutdown_complete", timeout=5)
    drained_s = (_log_time(done) - _log_time(begun)).total_seconds()
    assert timeout_s - 0.5 <= drained_s <= timeout_s + 2, drained_s
    assert done["clean"] is False
    assert done["sinks_written"]["jsonl"] == 0 and done["sinks_written"]["zmq"] == done["results_published"] > 0
    assert not _events(d, "shutdown_forced")


def test_sigterm_during_a_stalled_sighup_reload_is_acted_on_at_once(tmp_path: Path, checkpoint: Path):
    """A reload whose checkpoint read never completes (slow storage: a FIFO nobody writes) must not hold up
    SIGTERM: /readyz turns 503 at once and the daemon drains and exits 0 within timeout_s."""
    d = Daemon(tmp_path, checkpoint)
    d.config.write_text(d.config.read_text().replace("timeout_s = 30\n", "timeout_s = 5\n"))
    try:
        d.start()
        d.checkpoint.unlink()
        os.mkfifo(d.checkpoint)  # the reload's read blocks in open(): no writer ever comes
        d.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # the reload is under way
        d.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 1.0  # the signal reaches the main thread's handler asynchronously
        while (status := http(f"{d.admin}/readyz"))[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert status[0] == 503 and json.loads(status[1])["stopping"] is True, status  # was 200 for 6 s and more
        assert d.proc.wait(40) == 0  # was: never, until a second signal
        done = d.event("shutdown_complete")
        # within timeout_s, by the daemon's own log (its process exit after that, torch's teardown, is
        # slow under load and says nothing about the drain)
        assert done["clean"] is True
        assert (_log_time(done) - _log_time(d.event("shutdown_started"))).total_seconds() < 5
    finally:
        d.close()


# a bug in serve's main loop, injected once the daemon is up: everything else is the real daemon
_BROKEN_MAIN_LOOP = """
import sys, threading
from daemon import config, logs
from daemon.service import Service

class Broken:  # what the main loop polls every 0.2 s
    def is_set(self):
        raise RuntimeError("injected main-loop bug")

def inject(svc):
    svc.state.ingest_up.wait(120)
    print("child", svc._child.pid, flush=True)
    svc.reload_requested = Broken()

if __name__ == "__main__":  # the ingest process is spawned: it imports this file
    logs.configure("info", "json")  # as `sacmf serve` does: JSON lines on stderr
    svc = Service(config.load(sys.argv[1]))
    threading.Thread(target=inject, args=(svc,), daemon=True).start()
    sys.exit(svc.run())
"""


def test_a_main_loop_bug_drains_and_exits_instead_of_hanging_on_the_ingest_process(tmp_path: Path, checkpoint: Path):
    """The ingest process is not daemonic, so multiprocessing joins it at interpreter exit: a main thread
    that died by an unexpected exception left serve hanging there forever (the child waits for a stop
    that nobody sends), out of reach of a supervisor's restart. It must log, drain and exit 1."""
    d = Daemon(tmp_path, checkpoint)
    script = tmp_path / "broken.py"
    script.write_text(_BROKEN_MAIN_LOOP)
    d.sub_thread.start()
    d.sim.start()  # under load, as in service
    proc = subprocess.Popen(
        [sys.executable, str(script), str(d.config)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        for pid in process_tree(proc.pid)[::-1]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"serve hung after its main loop failed; stderr tail: {err[-1500:]}")
    finally:
        d.close()
    assert proc.returncode == 1, err[-1500:]
    assert '"main_loop_failed"' in err and "injected main-loop bug" in err
    assert '"shutdown_complete"' in err  # drained: sinks closed, the ingest process told to stop
    child = int(out.split()[1])
    assert not Path(f"/proc/{child}").exists() or b") Z" in Path(f"/proc/{child}/stat").read_bytes()


def test_sigterm_while_a_reload_is_loading_a_model_still_exits_0(tmp_path: Path, checkpoint: Path):
    """A reload runs on a daemonic thread: when the drain finished while it was still loading or warming a
    model inside PyTorch, the interpreter's exit aborted the process (status 134) after a clean drain."""
    import dataclasses

    from model.checkpoint import save_checkpoint
    from model.sacmf import build_model
    from tests.service_helpers import TINY

    big = dataclasses.replace(TINY, d_model=128, frame_size=256, token_grid=8, seq_len=1024, det_channels=64)
    torch.manual_seed(5)
    d = Daemon(tmp_path, checkpoint)
    try:
        d.start()
        save_checkpoint(build_model(big), tmp_path / "big.pt", "big")  # a second or so to load and warm up
        os.replace(tmp_path / "big.pt", d.checkpoint)
        d.proc.send_signal(signal.SIGHUP)
        d.event("model_reload_started", timeout=30)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(60) == 0, d.events[-5:]
        assert d.event("shutdown_complete")["clean"] is True
    finally:
        d.close()


def test_a_sighup_while_starting_is_a_reload_once_ready_not_the_end(tmp_path: Path, checkpoint: Path):
    """SIGHUP's default action ends a process: a `systemctl reload` in the seconds serve spends importing
    torch and loading the model killed it (status 129) before it was ever ready."""
    d = Daemon(tmp_path, checkpoint)
    try:
        d.sub_thread.start()
        d.proc = sacmf("serve", str(d.config))
        threading.Thread(target=d._read_logs, daemon=True).start()
        deadline = time.monotonic() + 60  # torch is being imported: seconds before the daemon's own handlers
        while "libtorch" not in Path(f"/proc/{d.proc.pid}/maps").read_text() and time.monotonic() < deadline:
            time.sleep(0.01)
        d.proc.send_signal(signal.SIGHUP)
        d.sim.start()
        d.event("ready", timeout=90)
        assert d.event("reload_requested_during_start", timeout=10)
        assert d.event("model_reloaded", timeout=30)["version"] == "tiny-v1"
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(60) == 0
    finally:
        d.close()


def test_a_ctrl_c_while_the_ingest_process_starts_is_a_clean_stop(tmp_path: Path, checkpoint: Path):
    """A terminal's Ctrl-C goes to the whole process group: the ingest process, still importing before
    it ignores SIGINT, died with a KeyboardInterrupt traceback and serve exited 1."""
    d = Daemon(tmp_path, checkpoint)
    try:
        d.sub_thread.start()
        d.sim.start()
        d.proc = sacmf("serve", str(d.config))
        threading.Thread(target=d._read_logs, daemon=True).start()

        def ingest_started() -> bool:  # not any child: imports may run short-lived helpers (ldconfig)
            for pid in process_tree(d.proc.pid)[1:]:
                with contextlib.suppress(OSError):
                    if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        return True
            return False

        deadline = time.monotonic() + 90
        while not ingest_started() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert ingest_started(), "no ingest process was started"
        tree = process_tree(d.proc.pid)
        for pid in reversed(tree):  # as the terminal does: every process of the group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        assert d.proc.wait(60) == 0
        time.sleep(0.5)  # the log reader catches up with the last lines
        text = [e["line"] for e in d.events if e.get("event") == "_text"]
        assert not [line for line in text if "KeyboardInterrupt" in line or "Traceback" in line], text
        assert [e for e in d.events if e.get("event") == "shutdown_complete"][0]["clean"] is True
    finally:
        d.close()
