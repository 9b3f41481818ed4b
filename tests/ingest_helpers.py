"""Helpers shared by the socket-level ingest tests: settings, a worker thread, window signatures."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ingest.settings import GroupSettings, IngestSettings
from ingest.subscriber import IngestWorker
from ingest.windowing import Window, WindowSpec

ROLES = {"cam_vis": "image_a", "cam_ir": "image_b", "rad_vis": "seq_a", "rad_ir": "seq_b"}
KINDS = {"cam_vis": "img", "cam_ir": "img", "rad_vis": "rad", "rad_ir": "rad"}
SEC = 1_000_000_000
T0 = 1_800_000_000 * SEC  # an epoch-aligned event time base


def settings(
    endpoint: str, *, mode: str = "replay", bind: bool = True, roles: dict | None = None, **kw
) -> IngestSettings:
    spec = WindowSpec(
        size_ns=SEC,
        allowed_lateness_ns=kw.pop("lateness_ns", 100_000_000),
        idle_timeout_ns=kw.pop("idle_ns", 60 * SEC),
        mode=mode,
        max_wait_ns=kw.pop("max_wait_ns", 0),
    )
    return IngestSettings(
        endpoints=(endpoint,),
        groups={"g1": GroupSettings("g1", roles or ROLES, spec)},
        bind=bind,
        transport="pull" if mode == "replay" else "sub",
        **kw,
    )


class WorkerThread:
    """Runs an IngestWorker in a thread (as the daemon will) and collects its windows."""

    def __init__(self, s: IngestSettings, ctx, **kw) -> None:
        self.windows: list[Window] = []
        self.late: list[tuple] = []
        self.worker = IngestWorker(s, self.windows.append, on_late=lambda *a: self.late.append(a), context=ctx, **kw)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.worker.run, args=(self.stop, 10), daemon=True)

    @property
    def endpoint(self) -> str:
        return self.worker.bound_endpoints[0]

    def start(self) -> WorkerThread:
        self.thread.start()
        return self

    def finish(self, flush: bool = True) -> list[Window]:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive(), "worker loop did not stop"
        if flush:
            self.worker.flush()
        self.worker.close()
        return self.windows


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def signature(w: Window) -> tuple:
    """Everything a consumer can see in a window, as comparable plain data."""
    frames = {r: [(f.sensor, f.seq, f.t_ns, f.exp_ns, f.image.tobytes()) for f in fs] for r, fs in w.frames.items()}
    samples = {r: (s.t_ns.tolist(), s.values.tolist()) for r, s in w.samples.items()}
    return (w.group, w.start_ns, w.end_ns, w.completeness, tuple(sorted(w.presence.items())), frames, samples)
