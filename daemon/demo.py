"""`sacmf demo`: the simulator feeding the ingest path, with each window printed as it closes.

Until the daemon loop exists this is the main job: it shows the whole ingest path working on a
fresh machine with nothing configured (the simulator binds an ephemeral loopback port, the worker
connects to it).
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

import zmq

from daemon import simulate
from daemon.simulate import SimSettings
from ingest.publisher import SensorPublisher
from ingest.resample import resample
from ingest.settings import GroupSettings, IngestSettings
from ingest.subscriber import IngestWorker
from ingest.windowing import Window, WindowSpec


def describe(w: Window, n_resample: int = 64) -> str:
    start = datetime.fromtimestamp(w.start_ns / 1e9, UTC).strftime("%H:%M:%S.%f")[:-3]
    span = (w.end_ns - w.start_ns) / 1e9
    parts = [f"window {w.group} {start}Z +{span:g}s  [{w.completeness}, closed by {w.trigger}]"]
    for role, frames in w.frames.items():
        if frames:
            f = frames[-1]
            parts.append(f"{role}: {len(frames)} frames {f.image.shape} mean {float(f.image.mean()):.0f}")
    for role, samples in w.samples.items():
        if len(samples.t_ns):
            values, valid = resample(samples, w.start_ns, w.end_ns, n_resample)
            mean = float(values[valid].mean()) if valid.any() else float("nan")
            parts.append(f"{role}: {len(samples.t_ns)} samples, {valid.mean():.0%} of bins valid, mean {mean:.3f}")
    missing = [r for r, present in w.presence.items() if not present]
    if missing:
        parts.append("missing: " + ",".join(missing))
    return "\n    ".join(parts)


def run(sim: SimSettings, stop: threading.Event, duration_s: float | None = None) -> int:
    ctx = zmq.Context()
    sensors = {c: "img" for c in sim.cameras} | {r: "rad" for r in sim.radiometers}
    roles = dict(zip([*sim.cameras, *sim.radiometers], ["image_a", "image_b", "seq_a", "seq_b"], strict=True))
    pub = SensorPublisher("tcp://127.0.0.1:*", sim.group, sensors, context=ctx)
    spec = WindowSpec(size_ns=1_000_000_000, allowed_lateness_ns=200_000_000, max_wait_ns=1_000_000_000)
    settings = IngestSettings(endpoints=tuple(pub.endpoints), groups={sim.group: GroupSettings(sim.group, roles, spec)})
    count = 0

    def on_window(w: Window) -> None:
        nonlocal count
        count += 1
        print(describe(w), flush=True)

    worker = IngestWorker(settings, on_window, context=ctx)
    time.sleep(0.3)  # let the subscription reach the publisher (ZeroMQ slow joiner)
    print(f"demo: simulator on {pub.endpoints[0]}, 1 s windows; Ctrl-C stops", flush=True)
    sim_thread = threading.Thread(target=simulate.run, args=(pub, sim, stop, duration_s), daemon=True)
    sim_thread.start()
    try:
        while not stop.is_set() and sim_thread.is_alive():
            worker.poll(100)
        stop.set()
        sim_thread.join()
        pub.close()
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:  # drain what is in flight, then close the rest
            worker.poll(50)
        worker.flush()
    finally:
        worker.close()
        ctx.term()
    st = worker.stats
    rejected = sum(st.rejected.values())
    print(f"demo: {count} windows, {sum(worker.messages().values())} messages, {rejected} rejected", flush=True)
    return 0
