"""Helpers shared by the tests that run `sacmf serve` for real: a tiny checkpoint, HTTP, the daemon.

Why a module of its own: the service tests and the Prometheus tests both need the same daemon
subprocess fed by the simulator; one copy keeps their configurations from drifting apart.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import torch
import zmq
from prometheus_client.parser import text_string_to_metric_families

from daemon import simulate
from daemon.inference import save_checkpoint
from daemon.simulate import SimSettings
from ingest.publisher import SensorPublisher
from model.sacmf import SACMFConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
SEC = 1_000_000_000
T0 = 1_800_000_000 * SEC
TINY = SACMFConfig(
    backbone="tiny",
    d_model=16,
    heads=2,
    img_layers=1,
    seq_layers=1,
    frame_size=32,
    token_grid=4,
    seq_len=64,
    patch_len=16,
    det_channels=8,
    dropout=0.0,
)
_endpoints = itertools.count()


def tiny_checkpoint(path: Path, version: str, seed: int = 0) -> str:
    """A servable checkpoint in well under a second, until a trained one exists; returns its sha256."""
    torch.manual_seed(seed)
    return save_checkpoint(build_model(TINY), path, version)


def http(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, str]:
    """(status, body) for any status: the tests assert on 4xx/5xx answers as much as on 200."""
    data = b"" if method == "POST" else None
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sacmf(*args: str) -> subprocess.Popen:
    """The CLI as a subprocess of this interpreter (the venv's), from the repository root."""
    return subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


class Daemon:
    """`sacmf serve` in a subprocess, the simulator feeding it, and a SUB collecting its results."""

    def __init__(self, tmp: Path, checkpoint: Path) -> None:
        self.tmp = tmp
        self.checkpoint = tmp / "served.pt"
        shutil.copy(checkpoint, self.checkpoint)
        self.ctx = zmq.Context()
        sensors = {"cam_vis": "img", "cam_ir": "img", "rad_vis": "rad", "rad_ir": "rad"}
        self.pub = SensorPublisher("tcp://127.0.0.1:*", "g1", sensors, context=self.ctx)
        self.sim_stop = threading.Event()
        sim = SimSettings(frame_rate_hz=10, sample_rate_hz=500, chunk_samples=50, height=48, width=64)
        self.sim = threading.Thread(target=simulate.run, args=(self.pub, sim, self.sim_stop), daemon=True)
        # unique per daemon: two test modules in one session must not share (or unlink) each other's socket
        self.results_ep = f"ipc:///tmp/sacmf-res-{os.getpid()}-{next(_endpoints)}.ipc"
        self.jsonl, self.late, self.mcap = tmp / "results.jsonl", tmp / "late.jsonl", tmp / "rec.mcap"
        self.token = "s3cret"
        config = f"""
[ingest]
endpoints = ["{self.pub.endpoints[0]}"]
[window]
size_ms = 500
allowed_lateness_ms = 100
[groups.g1]
sensors = {{ cam_vis = "image_a", cam_ir = "image_b", rad_vis = "seq_a", rad_ir = "seq_b" }}
[logging]
format = "json"
[model]
checkpoint = "{self.checkpoint}"
torch_threads = 1
det_threshold = 0.0
det_max_detections = 3
[inference]
max_batch_size = 4
max_delay_ms = 20
latency_buckets_s = [0.1, 0.25, 0.5, 1.0, 2.5]
[sinks]
zmq_endpoint = "{self.results_ep}"
jsonl_path = "{self.jsonl}"
late_path = "{self.late}"
mcap_path = "{self.mcap}"
[admin]
listen = "127.0.0.1:0"
token = "{self.token}"
# with a token every endpoint needs it, loopback included, except these: the tests read them freely
# (tests/test_admin_auth.py checks the token itself)
public_endpoints = ["/healthz", "/readyz", "/metrics"]
[shutdown]
timeout_s = 30
"""
        self.config = tmp / "serve.toml"
        self.config.write_text(config)
        self.results: list[dict] = []
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"det/")
        self.sub.connect(self.results_ep)  # before the daemon binds: ZeroMQ reconnects until it does
        self.sub_stop = threading.Event()
        self.sub_thread = threading.Thread(target=self._collect, daemon=True)
        self.events: list[dict] = []
        self.proc: subprocess.Popen | None = None
        self.admin = ""

    def _collect(self) -> None:
        while not self.sub_stop.is_set():
            if self.sub.poll(50):
                topic, body = self.sub.recv_multipart()
                assert topic == b"det/g1"
                self.results.append(msgpack.unpackb(body))

    def _read_logs(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                self.events.append({"event": "_text", "line": line})

    def event(self, name: str, timeout: float = 90.0) -> dict:
        """The first log event called ``name``; fails fast if the daemon exits before logging it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = [e for e in self.events if e.get("event") == name]
            if found:
                return found[0]
            assert self.proc is not None
            if self.proc.poll() is not None and not found:
                time.sleep(0.2)
                found = [e for e in self.events if e.get("event") == name]
                if found:
                    return found[0]
                status = self.proc.returncode
                raise AssertionError(f"daemon exited ({status}) before {name!r}: {self.events[-5:]}")
            time.sleep(0.05)
        raise AssertionError(f"no {name!r} log event within {timeout} s; last: {self.events[-5:]}")

    def start(self) -> Daemon:
        self.sub_thread.start()
        self.proc = sacmf("serve", str(self.config))
        threading.Thread(target=self._read_logs, daemon=True).start()
        self.sim.start()
        self.admin = f"http://127.0.0.1:{self.event('admin_listening')['port']}"
        self.event("ready")
        return self

    def wait_results(self, pred, n: int = 1, timeout: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        start = len(self.results)
        while time.monotonic() < deadline:
            got = [r for r in self.results[start:] if pred(r)]
            if len(got) >= n:
                return got
            time.sleep(0.05)
        raise AssertionError(f"fewer than {n} matching results within {timeout} s; last log events: {self.events[-8:]}")

    def metrics_text(self) -> str:
        status, text = http(f"{self.admin}/metrics")
        assert status == 200, text
        return text

    def metrics(self) -> dict[str, dict]:
        """Sample name -> {sorted label items: value}, parsed by client_python's own text parser."""
        out: dict[str, dict] = {}
        for fam in text_string_to_metric_families(self.metrics_text()):
            for s in fam.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.sim_stop.set()
        self.sim.join(10)
        self.sub_stop.set()
        self.sub_thread.join(5)
        self.sub.close(0)
        self.pub.close()
        self.ctx.term()
