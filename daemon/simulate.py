"""`sacmf simulate`: publishes a synthetic sensor group in real time over protocol v1.

It stands in for real sensors in demos, tests and benchmarks: two cameras (a star field with a moving
target, visible and infrared) and two radiometers that measure the target's light curve (a rotation
period with glints, plus noise). Timing is paced on the wall clock and stamped with the sensor's
(simulated) clock, so it exercises the same paths a real group does.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from ingest.publisher import SensorPublisher


@dataclass(frozen=True)
class SimSettings:
    group: str = "g1"
    cameras: tuple[str, str] = ("cam_vis", "cam_ir")
    radiometers: tuple[str, str] = ("rad_vis", "rad_ir")
    frame_rate_hz: float = 10.0
    sample_rate_hz: float = 1000.0
    chunk_samples: int = 100  # samples per radiation message
    height: int = 128
    width: int = 128
    exposure_ms: float = 20.0
    clock_offset_ms: float = 0.0  # the simulated sensors' clock error
    seed: int = 0


class Scene:
    """A deterministic star field with one tracked target on a linear track."""

    def __init__(self, s: SimSettings) -> None:
        self.s = s
        rng = np.random.default_rng(s.seed)
        n_stars = 30
        self.star_xy = rng.uniform(4, [s.width - 4, s.height - 4], size=(n_stars, 2))
        self.star_flux = rng.lognormal(6.0, 0.8, n_stars)
        self.period_s = rng.uniform(2.0, 8.0)
        self.rng = np.random.default_rng(s.seed + 1)
        yy, xx = np.mgrid[0 : s.height, 0 : s.width]
        self._yy, self._xx = yy.astype(np.float32), xx.astype(np.float32)

    def light_curve(self, t_s: np.ndarray, band: int) -> np.ndarray:
        phase = 2 * np.pi * t_s / self.period_s
        base = 1.0 + 0.3 * np.sin(phase) + (0.15 if band else 0.0) * np.sin(2 * phase)
        glint = np.exp(-(((phase % (2 * np.pi)) - np.pi) ** 2) / 0.01) * (2.0 if band == 0 else 0.5)
        return (base + glint + self.rng.normal(0, 0.02, t_s.shape)).astype(np.float32)

    def frame(self, t_s: float, band: int) -> np.ndarray:
        s = self.s
        tx = (s.width * 0.2 + 3.0 * t_s) % s.width
        ty = (s.height * 0.3 + 1.5 * t_s) % s.height
        sigma = 1.2 if band == 0 else 1.8
        img = np.full((s.height, s.width), 100.0 if band == 0 else 300.0, np.float32)
        flux = self.star_flux * (1.0 if band == 0 else 0.4)
        target_flux = 2000.0 * float(self.light_curve(np.array([t_s]), band)[0])
        for (x, y), f in zip([*self.star_xy, (tx, ty)], [*flux, target_flux], strict=True):
            x0, x1, y0, y1 = int(max(x - 5, 0)), int(min(x + 6, s.width)), int(max(y - 5, 0)), int(min(y + 6, s.height))
            if x0 >= x1 or y0 >= y1:
                continue
            d2 = (self._xx[y0:y1, x0:x1] - x) ** 2 + (self._yy[y0:y1, x0:x1] - y) ** 2
            img[y0:y1, x0:x1] += f / (2 * np.pi * sigma**2) * np.exp(-d2 / (2 * sigma**2))
        img = self.rng.poisson(np.maximum(img, 0)).astype(np.float32) + self.rng.normal(0, 5, img.shape)
        return np.clip(img, 0, 65535).astype(np.uint16)


def run(
    publisher: SensorPublisher,
    settings: SimSettings,
    stop: threading.Event,
    duration_s: float | None = None,
) -> dict[str, int]:
    """Publish until ``stop`` is set or ``duration_s`` has passed. Returns messages sent per sensor."""
    s = settings
    scene = Scene(s)
    offset_ns = int(s.clock_offset_ms * 1e6)
    dt_ns = int(1e9 / s.sample_rate_hz)
    chunk_ns = dt_ns * s.chunk_samples
    frame_ns = int(1e9 / s.frame_rate_hz)
    start = time.time_ns()
    t0_s = start / 1e9
    next_frame, next_chunk = start, start
    sent = dict.fromkeys([*s.cameras, *s.radiometers], 0)
    end = start + int(duration_s * 1e9) if duration_s else None
    while not stop.is_set():
        now = time.time_ns()
        if end is not None and now >= end:
            break
        if now >= next_frame:
            t_s = next_frame / 1e9 - t0_s
            for band, cam in enumerate(s.cameras):
                publisher.send_image(cam, scene.frame(t_s, band), next_frame + offset_ns, int(s.exposure_ms * 1e6))
                sent[cam] += 1
            next_frame += frame_ns
        if now >= next_chunk + chunk_ns:  # a chunk is published once its last sample has been taken
            t = (next_chunk - start + np.arange(s.chunk_samples) * dt_ns) / 1e9
            for band, rad in enumerate(s.radiometers):
                publisher.send_samples(rad, scene.light_curve(t, band), next_chunk + offset_ns, dt_ns)
                sent[rad] += 1
            next_chunk += chunk_ns
        wake = min(next_frame, next_chunk + chunk_ns)
        stop.wait(max(0.0, (wake - time.time_ns()) / 1e9))
    return sent
