"""`sacmf bench-ingest`: throughput of socket -> validated -> accounted -> closed window.

Each scenario sends the same pre-encoded protocol-v1 stream from a separate sender process (so the
two cores are split sender/receiver) over PUSH/PULL (lossless: every run processes exactly the same
messages) to two receivers in turn: a bare pyzmq ``recv_multipart`` + ``msgpack.unpackb`` loop, the
floor any Python subscriber pays, and our IngestWorker up to the last closed window. Runs alternate
between the two so that machine noise hits both alike; the report gives medians and their ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import numpy as np
import zmq

from daemon.cli_types import sigterm_as_interrupt
from ingest import protocol
from ingest.settings import GroupSettings, IngestSettings
from ingest.subscriber import IngestWorker
from ingest.windowing import WindowSpec

T0 = 1_800_000_000 * 10**9


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # img or rad
    shape: tuple[int, ...]  # image shape, or (samples per message,)
    dt_ns: int  # event-time step between messages (img) or between samples (rad)
    unit: str  # what the headline rate counts: msgs, MB or samples

    def payload(self) -> np.ndarray:
        rng = np.random.default_rng(0)
        if self.kind == "img":
            return rng.integers(0, 255, self.shape, dtype=np.uint8)
        return rng.normal(size=self.shape).astype(np.float32)


SCENARIOS = (
    Scenario("small radiation messages", "rad", (8,), 1_000_000, "msgs"),
    Scenario("256x256 uint8 frames", "img", (256, 256), 10_000_000, "MB"),
    Scenario("radiation samples (1000/msg)", "rad", (1000,), 10_000, "samples"),
)


def _messages(sc: Scenario, n: int) -> list[list]:
    data = sc.payload()
    body = data if data.nbytes >= 65536 else data.tobytes()
    sensor = "cam" if sc.kind == "img" else "rad"
    topic = protocol.topic(sc.kind, "g1", sensor)
    out = []
    for seq in range(n):
        if sc.kind == "img":
            h = protocol.encode_image_header("g1", sensor, 1, seq, T0 + seq * sc.dt_ns, 0, data)
        else:
            h = protocol.encode_rad_header("g1", sensor, 1, seq, T0 + seq * sc.shape[0] * sc.dt_ns, sc.dt_ns, data)
        out.append([topic, h, body])
    return out


def _sender(endpoint: str, sc: Scenario, n: int, go: mp.Event) -> None:
    msgs = _messages(sc, n)
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 2000)
    s.connect(endpoint)
    go.wait()
    copy = sc.kind != "img"
    for m in msgs:
        s.send_multipart(m, copy=copy)
    s.close(linger=-1)
    ctx.term()


class SenderDied(RuntimeError):
    """The sender process exited before sending everything: a measurement that would wait forever."""


def _bare(sock: zmq.Socket, n: int, copy: bool, alive: Callable[[], bool]) -> float:
    unpack = msgpack.unpackb
    sock.setsockopt(zmq.RCVTIMEO, 1000)  # the loop stays a bare recv; a silence of 1 s checks the sender

    def recv() -> list:
        while True:
            try:
                return sock.recv_multipart(copy=copy)
            except zmq.Again:
                if not alive():
                    raise SenderDied("the sender process exited before sending every message") from None

    frames = recv()
    t0 = time.perf_counter()
    unpack(frames[1] if copy else frames[1].buffer)
    for _ in range(n - 1):
        frames = recv()
        unpack(frames[1] if copy else frames[1].buffer)
    return time.perf_counter() - t0


def _worker(endpoint: str, sc: Scenario, ctx: zmq.Context, late_policy: str = "sink") -> IngestWorker:
    role = "image_a" if sc.kind == "img" else "seq_a"
    sensor = "cam" if sc.kind == "img" else "rad"
    spec = WindowSpec(
        size_ns=10**9, allowed_lateness_ns=0, mode="replay", late_policy=late_policy, update_horizon_ns=5 * 10**9
    )
    settings = IngestSettings(
        endpoints=(endpoint,), groups={"g1": GroupSettings("g1", {sensor: role}, spec)}, bind=True, transport="pull"
    )
    return IngestWorker(settings, lambda w: None, context=ctx)


def _ours(worker: IngestWorker, sc: Scenario, n: int, alive: Callable[[], bool]) -> float:
    """Time from the first message to the last window closed (the final flush included)."""
    key = "g1/cam" if sc.kind == "img" else "g1/rad"
    tracker = worker.tracker
    while not worker.sock.poll(1000):
        if not alive():
            raise SenderDied("the sender process exited before sending anything")
    t0 = time.perf_counter()
    while tracker.stats(key).delivered < n:
        if not worker.poll(100) and not alive() and not worker.sock.poll(0):
            raise SenderDied("the sender process exited before sending every message")
    worker.flush()
    dt = time.perf_counter() - t0
    rejected, gaps = sum(worker.stats.rejected.values()), tracker.stats(key).gaps
    if rejected or gaps:
        raise RuntimeError(f"benchmark stream was not clean: {rejected} rejected, {gaps} gaps")
    return dt


def _run_once(sc: Scenario, n: int, which: str, transport: str, late_policy: str = "sink") -> float:
    """One measurement: bind the receiver, start the sender process, time the receiving side."""
    mpc = mp.get_context("spawn")
    go = mpc.Event()
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{tmp}/bench.ipc" if transport == "ipc" else "tcp://127.0.0.1:*"
        ctx = zmq.Context()
        if which == "bare":
            receiver = ctx.socket(zmq.PULL)
            receiver.setsockopt(zmq.RCVHWM, 10000)
            receiver.bind(endpoint)
            bound = receiver.getsockopt_string(zmq.LAST_ENDPOINT)
        else:
            receiver = _worker(endpoint, sc, ctx, late_policy)
            bound = receiver.bound_endpoints[0]
        proc = mpc.Process(target=_sender, args=(bound, sc, n, go))
        proc.start()
        time.sleep(0.2)
        go.set()
        try:
            if which == "bare":
                dt = _bare(receiver, n, sc.kind != "img", proc.is_alive)
            else:
                dt = _ours(receiver, sc, n, proc.is_alive)
        finally:
            receiver.close()
            proc.join(30)
            if proc.is_alive():
                proc.kill()
            ctx.destroy(linger=0)
    if proc.exitcode != 0:
        raise SenderDied(f"the sender process exited with status {proc.exitcode}")
    return dt


def _rate(sc: Scenario, n: int, seconds: float) -> float:
    if sc.unit == "msgs":
        return n / seconds
    if sc.unit == "MB":
        return n * int(np.prod(sc.shape)) / seconds / 1e6
    return n * sc.shape[0] / seconds


def main(args: argparse.Namespace) -> int:
    with sigterm_as_interrupt():  # the runs' finally blocks kill the sender and remove the socket folder
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    print(f"sacmf bench-ingest: {args.repeats} alternating runs per scenario, ~{args.seconds:g} s each, "
          f"transport {args.transport}, late_policy {args.late_policy}, pid {os.getpid()}, "
          f"{os.cpu_count()} cores")  # fmt: skip
    print(f"{'scenario':32} {'unit':>8} {'bare median':>13} {'sacmf median':>13} {'ratio':>6}  runs (sacmf)")
    for sc in SCENARIOS:
        # size the run from one quick bare measurement so that each lasts about args.seconds
        probe_n = 2000 if sc.kind == "img" else 20000
        try:
            per_msg = _run_once(sc, probe_n, "bare", args.transport) / probe_n
        except SenderDied as exc:
            print(f"error: {sc.name}: {exc}", flush=True)
            return 1
        n = max(1000, int(args.seconds / per_msg))
        bare, ours = [], []
        try:
            for _ in range(args.repeats):
                bare.append(_rate(sc, n, _run_once(sc, n, "bare", args.transport)))
                ours.append(_rate(sc, n, _run_once(sc, n, "ours", args.transport, args.late_policy)))
        except SenderDied as exc:
            print(f"error: {sc.name}: {exc}", flush=True)
            return 1
        b, o = statistics.median(bare), statistics.median(ours)
        runs = ", ".join(f"{x:,.0f}" for x in ours)
        unit = {"msgs": "msg/s", "MB": "MB/s", "samples": "samples/s"}[sc.unit]
        print(f"{sc.name:32} {unit:>8} {b:13,.0f} {o:13,.0f} {o / b:6.2f}  {runs}  (n={n:,})", flush=True)
    return 0
