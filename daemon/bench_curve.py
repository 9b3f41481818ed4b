"""`sacmf bench-curve`: what CURVE costs, next to plain TCP, measured in one run.

Two questions an operator asks before turning ``[security] curve`` on:

1. **Transport**: how many messages per second a CURVE connection carries compared with plain TCP, for
   256x256 uint8 camera frames (65,536-byte payloads: the size at which pyzmq stops copying) and for
   small radiation messages (100 float32 samples). A sender thread pushes as fast as a lossless PUSH
   socket lets it; the receiver counts for a fixed time. Encryption runs in libzmq's I/O threads (one
   per context here, like two hosts), so this is the ceiling of one connection, not of the daemon.
2. **Ingest hot path**: the cost per message of the ingest worker (receive, validate, account, window)
   with plain TCP, with CURVE, with CURVE plus the per-key group allow-list (which reads the ZAP User-Id
   of every message), and with a rate limit that never triggers (the bucket check alone). Messages are
   queued first and then drained, so this is the Python-side cost per message.

Modes alternate within each repeat (plain, CURVE, plain, ...) so that a loaded machine slows both
alike, and each figure is the median over repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import zmq

from daemon.cli_types import integer, number
from ingest import protocol, security
from ingest.settings import GroupSettings, IngestSettings
from ingest.subscriber import IngestWorker
from ingest.windowing import WindowSpec

SEC = 1_000_000_000
T0 = 1_800_000_000 * SEC
FRAME = np.arange(256 * 256, dtype=np.uint32).astype(np.uint8).reshape(256, 256)
SAMPLES = np.linspace(0.0, 1.0, 100, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class Keys:
    """A server and a client key pair, and a directory admitting the client."""

    server: security.KeyPair
    client: security.KeyPair
    server_file: Path
    client_file: Path
    admitted: Path


def make_keys(root: Path) -> Keys:
    from daemon.keygen import generate

    admitted = root / "admitted"
    admitted.mkdir(mode=0o755)
    server_pub, server_sec = generate("daemon", root)
    client_pub, client_sec = generate("sensor", root)
    (admitted / client_pub.name).write_bytes(client_pub.read_bytes())
    return Keys(
        security.load_secret_certificate(server_sec),
        security.load_secret_certificate(client_sec),
        server_sec,
        client_sec,
        admitted,
    )


# ---------------------------------------------------------------- transport


def _message(payload: str, seq: int) -> list:
    if payload == "frame":
        header = protocol.encode_image_header("g1", "cam_vis", 1, seq, T0, 0, FRAME, None)
        return [protocol.topic("img", "g1", "cam_vis"), header, FRAME]
    header = protocol.encode_rad_header("g1", "rad_vis", 1, seq, T0, 1_000_000, SAMPLES, None)
    return [protocol.topic("rad", "g1", "rad_vis"), header, SAMPLES.tobytes()]


def transport_run(curve: bool, payload: str, seconds: float, keys: Keys) -> float:
    """Messages per second through one PUSH -> PULL tcp connection (lossless, sender unthrottled)."""
    rx_ctx, tx_ctx = zmq.Context(), zmq.Context()
    auth = None
    pull = rx_ctx.socket(zmq.PULL)
    push = tx_ctx.socket(zmq.PUSH)
    try:
        if curve:
            security.make_server(pull, keys.server)
            auth = security.ZapHandler(rx_ctx, keys.admitted, socket_name="bench", log_interval_s=1e9).start()
        pull.bind("tcp://127.0.0.1:*")
        push.setsockopt(zmq.SNDTIMEO, 100)
        if curve:
            security.make_client(push, keys.client, keys.server.public)
        push.connect(pull.getsockopt_string(zmq.LAST_ENDPOINT))
        msg = _message(payload, 0)
        zero_copy = payload == "frame"
        stop = threading.Event()

        def send() -> None:
            while not stop.is_set():
                try:
                    push.send_multipart(msg, copy=not zero_copy)
                except zmq.Again:
                    continue

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        for _ in range(50):  # connected and flowing before the clock starts
            pull.recv_multipart(copy=not zero_copy)
        n, start = 0, time.perf_counter()
        end = start + seconds
        while True:
            pull.recv_multipart(copy=not zero_copy)
            n += 1
            if not n % 64 and time.perf_counter() >= end:
                break
        elapsed = time.perf_counter() - start
        stop.set()
        sender.join(5)
        return n / elapsed
    finally:
        push.close(linger=0)
        pull.close(linger=0)
        if auth is not None:
            auth.stop()
        tx_ctx.term()
        rx_ctx.term()


# ---------------------------------------------------------------- ingest hot path

WORKER_MODES = ("plain", "curve", "curve+groups", "rate limit")


def _settings(mode: str, keys: Keys) -> IngestSettings:
    spec = WindowSpec(size_ns=SEC, allowed_lateness_ns=0, idle_timeout_ns=60 * SEC, mode="replay")
    s = IngestSettings(
        endpoints=("tcp://127.0.0.1:*",),
        groups={"g1": GroupSettings("g1", {"rad_vis": "seq_a"}, spec)},
        bind=True,
        transport="pull",
        rcvhwm=0,
    )
    if mode.startswith("curve"):
        groups = {"sensor": ("g1",)} if mode == "curve+groups" else {}
        curve = security.CurveConfig(keys.server_file, authorized_dir=keys.admitted, groups=groups, log_interval_s=1e9)
        s = dataclasses.replace(s, curve=curve)
    if mode == "rate limit":
        s = dataclasses.replace(s, rate_limits={"g1/rad_vis": security.RateLimit(1e9, 1e12)})
    return s


def worker_run(mode: str, n: int, keys: Keys) -> float:
    """Microseconds per message for the ingest worker to drain ``n`` queued radiation messages."""
    ctx = zmq.Context()
    windows = []
    worker = IngestWorker(_settings(mode, keys), windows.append, context=ctx)
    push = ctx.socket(zmq.PUSH)
    try:
        push.setsockopt(zmq.SNDHWM, 0)
        if mode.startswith("curve"):
            security.make_client(push, keys.client, keys.server.public)
        push.connect(worker.bound_endpoints[0])
        dt = SEC // 1000
        for i in range(n):  # 100 samples per message, 10 messages per 1 s window
            header = protocol.encode_rad_header("g1", "rad_vis", 1, i, T0 + i * 100 * dt, dt, SAMPLES, None)
            push.send_multipart([b"rad/g1/rad_vis", header, SAMPLES.tobytes()])
        time.sleep(0.5)  # let libzmq move (and decrypt) what it can before the clock starts
        done, start = 0, time.perf_counter()
        deadline = start + 60
        while done < n and time.perf_counter() < deadline:
            done += worker.poll(100)
        elapsed = time.perf_counter() - start
        if done < n:
            raise RuntimeError(f"{mode}: only {done} of {n} messages arrived")
        if sum(worker.stats.rejected.values()):
            raise RuntimeError(f"{mode}: messages were rejected: {dict(worker.stats.rejected)}")
        return elapsed / n * 1e6
    finally:
        push.close(linger=0)
        worker.close()
        ctx.term()


# ---------------------------------------------------------------- command


def run(seconds: float, repeats: int, messages: int) -> dict[str, dict[str, float]]:
    """All figures (medians): transport msg/s per (payload, mode), worker us/msg per mode."""
    with tempfile.TemporaryDirectory(prefix="sacmf-bench-curve-") as tmp:
        keys = make_keys(Path(tmp))
        transport: dict[tuple[str, bool], list[float]] = {}
        worker: dict[str, list[float]] = {}
        for _ in range(repeats):
            for payload in ("frame", "small"):
                for curve in (False, True):
                    transport.setdefault((payload, curve), []).append(transport_run(curve, payload, seconds, keys))
            for mode in WORKER_MODES:
                worker.setdefault(mode, []).append(worker_run(mode, messages, keys))
    out: dict[str, dict[str, float]] = {"transport": {}, "worker": {}}
    for (payload, curve), values in transport.items():
        out["transport"][f"{payload}/{'curve' if curve else 'plain'}"] = statistics.median(values)
    for mode, values in worker.items():
        out["worker"][mode] = statistics.median(values)
    return out


def format_table(res: dict[str, dict[str, float]]) -> str:
    t, w = res["transport"], res["worker"]
    sizes = {"frame": 65536, "small": SAMPLES.nbytes}
    lines = [
        "| transport (tcp loopback, PUSH->PULL) | plain msg/s | CURVE msg/s | CURVE / plain | CURVE MB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for payload, label in (("frame", "256x256 uint8 frame (64 KiB)"), ("small", "small: 100 float32 (400 B)")):
        plain, curve = t[f"{payload}/plain"], t[f"{payload}/curve"]
        mb = curve * sizes[payload] / 1e6
        lines.append(f"| {label} | {plain:,.0f} | {curve:,.0f} | {curve / plain:.2f} | {mb:,.1f} |")
    lines += ["", "| ingest worker (drain, small messages) | us/message | vs plain |", "|---|---:|---:|"]
    for mode in WORKER_MODES:
        lines.append(f"| {mode} | {w[mode]:.2f} | {w[mode] / w['plain']:.2f} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from daemon import logs

    logs.configure(args.log_level or "warning", args.log_format or "auto")  # one line per handshake otherwise
    res = run(args.seconds, args.repeats, args.messages)
    print(f"bench-curve: median of {args.repeats} alternating runs ({args.seconds:g} s each; worker: {args.messages})")
    print(format_table(res))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("bench-curve", help="CURVE vs plain TCP: frames and small messages, and the ingest hot path")
    b.add_argument(
        "--seconds", type=number(0, 3600, above=True), default=2.0, help="duration of each transport measurement"
    )
    b.add_argument("--repeats", type=integer(1), default=3, help="alternating runs per mode (the median is reported)")
    b.add_argument("--messages", type=integer(1), default=20000, help="messages per ingest-worker measurement")
    b.set_defaults(func=main)
