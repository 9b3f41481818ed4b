"""The PNG sink: per-group rate limit, and pictures that decode and show what the record says."""

from __future__ import annotations

import resource
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sinks.png import (
    _CLASS_COLOURS,
    _IMAGE_COLOUR,
    _SEQ_COLOUR,
    MIN_DISPLAY_SIDE,
    RECENT_FILES,
    PngFrame,
    PngSink,
    RateLimiter,
)
from sinks.record import Detection, FusionWeights, ResultRecord, TokenStats
from sinks.supervisor import SinkSupervisor

SEC = 1_000_000_000
T0 = 1_800_000_000 * SEC
NAMES = ["star", "stable_satellite", "spin_stabilised_satellite", "tumbling_rocket_body", "debris", "false_alarm"]


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def record(group: str = "g1", k: int = 0, image_w: float = 0.7, dets: list[Detection] | None = None) -> ResultRecord:
    probs = [0.05, 0.6, 0.1, 0.1, 0.1, 0.05]
    return ResultRecord(
        group=group,
        start_ns=T0 + k * SEC,
        end_ns=T0 + (k + 1) * SEC,
        presence=dict.fromkeys(("image_a", "image_b", "seq_a", "seq_b"), True),
        class_names=NAMES,
        target_probs=probs,
        fusion=FusionWeights(image_w, 1.0 - image_w, {"image": TokenStats(1.0, 0.8, 1.3, 32)}),
        detections=dets or [],
        mi_nats=0.2 + 0.01 * k,
        latency_s=0.3,
        model_version="test",
    )


def test_rate_limit_per_group_is_a_token_bucket():
    clock = FakeClock()
    limiter = RateLimiter(2.0, clock=clock)
    admitted = []
    for i in range(11):  # one write per 0.1 s for 1 s, two groups interleaved
        clock.t = 100.0 + i * 0.1
        admitted.append((limiter.admit("g1"), limiter.admit("g2")))
    g1 = [round(100.0 + i * 0.1, 1) for i, (a, _) in enumerate(admitted) if a]
    assert g1 == [100.0, 100.5, 101.0]  # 2 per second, burst 1
    assert [a for a, _ in admitted] == [b for _, b in admitted]  # buckets are independent
    with pytest.raises(ValueError):
        RateLimiter(0.0)


def test_the_sink_draws_at_most_n_windows_per_second_per_group(tmp_path: Path):
    clock = FakeClock()
    sink = PngSink(tmp_path, max_per_s=1.0, clock=clock)
    for k in range(10):  # 10 windows per group within 0.9 s, then one more a second later
        clock.t = 100.0 + k * 0.1
        sink.write(record("g1", k))
        sink.write(record("g2", k))
    clock.t = 101.05
    sink.write(record("g1", 10))
    assert sink.drawn == 5 and sink.skipped == 16  # bursts of 2, then 1 per second
    names = sorted(p.name for p in (tmp_path / "fusion_weights").iterdir())
    drawn = [("g1", 0), ("g1", 1), ("g2", 0), ("g2", 1), ("g1", 10)]
    assert names == sorted(f"{g}_{T0 + k * SEC}.png" for g, k in drawn)


def test_windows_arriving_at_the_rate_with_jitter_are_all_drawn(tmp_path: Path):
    """One window per second with a few ms of wall-clock jitter and max_per_s = 1 (the defaults): a
    bucket of burst 1 found 0.999 tokens for every early window and left a third of them undrawn."""
    clock = FakeClock()
    sink = PngSink(tmp_path, max_per_s=1.0, clock=clock)
    jitter = np.random.default_rng(0).normal(0, 0.005, 200)
    for k in range(200):
        clock.t = 100.0 + k + jitter[k]
        sink.write(record("g1", k))
    assert (sink.drawn, sink.skipped) == (200, 0)
    # bare records carry no pixels: only the fusion-weight picture
    assert not list((tmp_path / "detections").iterdir()) and not list((tmp_path / "heatmaps").iterdir())


def _frame() -> tuple[np.ndarray, np.ndarray]:
    """A 48x64 raw frame with a bright source at (x=40, y=12), and an 12x12 heatmap peaking there."""
    rng = np.random.default_rng(0)
    img = rng.normal(300, 5, (48, 64))
    yy, xx = np.mgrid[0:48, 0:64]
    img += 3000 * np.exp(-((xx - 40.5) ** 2 + (yy - 12.5) ** 2) / 3.0)
    heat = np.zeros((12, 12))
    heat[2, 7] = 0.9  # cell side = 64 / 12 px: the cell holding (40, 12)
    return np.clip(img, 0, 65535).astype(np.uint16), heat


def test_pictures_decode_and_show_boxes_heat_and_weights(tmp_path: Path):
    image, heat = _frame()
    det = Detection([36.0, 8.0, 45.0, 17.0], "stable_satellite", 0.8, [0.05, 0.6, 0.1, 0.1, 0.1, 0.05])
    rec = record(dets=[det], image_w=0.7)
    sink = PngSink(tmp_path, max_per_s=5.0)
    sink.write(PngFrame(rec, image, heat, (64.0, 64.0)))
    assert sink.drawn == 1 and len(sink.files) == 3
    zoom = -(-MIN_DISPLAY_SIDE // 64)  # small frames are enlarged by a whole factor, from the longer side
    pics = {}
    for sub in ("detections", "heatmaps", "fusion_weights"):
        with Image.open(tmp_path / sub / f"g1_{T0}.png") as img:
            img.load()
            pics[sub] = np.asarray(img.convert("RGB")).astype(int)
    det_px = pics["detections"]
    assert det_px.shape == (48 * zoom, 64 * zoom, 3)
    colour = _CLASS_COLOURS[NAMES.index("stable_satellite")]
    assert tuple(det_px[14 * zoom, 36 * zoom]) == colour  # the box's left edge, in its class colour
    assert tuple(det_px[40 * zoom, 10 * zoom]) != colour  # far from the box: the sky
    heat_px = pics["heatmaps"]
    hot, cold = heat_px[12 * zoom, 40 * zoom], heat_px[40 * zoom, 10 * zoom]
    assert hot[0] > 200 and hot[0] - hot[2] > 40  # the hot cell is tinted (red/yellow end of the colour map)
    assert abs(cold[0] - cold[2]) < 10  # elsewhere the grey frame shows through
    fw = pics["fusion_weights"]
    bottom, top = 220 - 30, 30
    image_bar_top = bottom - (bottom - top) * 0.7
    assert tuple(fw[bottom - 5, 60]) == _IMAGE_COLOUR and tuple(fw[int(image_bar_top) - 3, 60]) == (255, 255, 255)
    seq_bar_top = bottom - (bottom - top) * 0.3
    assert tuple(fw[int(seq_bar_top) + 3, 125]) == _SEQ_COLOUR and tuple(fw[int(seq_bar_top) - 3, 125]) != _SEQ_COLOUR


def test_a_picture_item_checks_its_arrays():
    rec = record()
    with pytest.raises(ValueError):
        PngFrame(rec, np.zeros((4, 4, 4, 4)))
    with pytest.raises(ValueError):
        PngFrame(rec, np.zeros((8, 8)), np.zeros((2, 2)))  # a heatmap without its extent
    with pytest.raises(TypeError):
        PngFrame({"not": "a record"})  # type: ignore[arg-type]


def test_under_a_supervisor_a_slow_burst_is_rate_limited_in_wall_time(tmp_path: Path):
    sink = PngSink(tmp_path, max_per_s=2.0)
    sup = SinkSupervisor([sink], queue_size=64)
    image, heat = _frame()
    for k in range(20):  # a replay-speed burst: 20 windows at once
        sup.submit(PngFrame(record(k=k), image, heat, (64.0, 64.0)))
    assert sup.close(30)
    # skipped windows are counted as such, not as written (nor as a recovery of a failing sink)
    assert (sup.written["png"], sup.skipped["png"]) == (sink.drawn, sink.skipped) and sink.drawn + sink.skipped == 20
    assert 2 <= sink.drawn <= 4  # a burst of 2 at once; drawing them took well under a second
    for path in sink.files:
        with Image.open(path) as img:
            img.verify()


def test_a_failed_picture_is_retried_as_the_same_window(tmp_path: Path):
    """The disk fills while drawing: no temp file stays behind, and the supervisor's retry draws the window
    (not rate-limited away as a second window, nor a second point in the sparklines)."""
    clock = FakeClock()
    sink = PngSink(tmp_path, max_per_s=1.0, clock=clock)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))  # no PNG fits
        with pytest.raises(OSError):
            sink.write(record("g1", 0))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == []
    sink.write(record("g1", 0))  # the retry, at the same instant
    assert (sink.drawn, sink.skipped) == (1, 0) and len(sink._history["g1"].image) == 1
    assert [p.name for p in (tmp_path / "fusion_weights").iterdir()] == [f"g1_{T0}.png"]
    sink.write(record("g1", 1))  # the burst's second token (the retry did not take another)
    sink.write(record("g1", 2))  # a third window within the same second is rate-limited
    assert (sink.drawn, sink.skipped) == (2, 1)


def test_retention_keeps_the_newest_windows_across_a_restart_and_memory_stays_bounded(tmp_path: Path):
    """A months-long run: the directory holds at most keep_windows windows' pictures (those a previous run
    left count too, oldest first), unrelated files stay, and the sink remembers only recent paths."""
    clock = FakeClock()
    image, heat = _frame()
    first = PngSink(tmp_path, max_per_s=1.0, clock=clock, keep_windows=3)
    (tmp_path / "detections" / "notes.txt").write_text("an operator's file")
    for k in range(5):
        clock.t = 100.0 + k
        first.write(PngFrame(record(k=k), image, heat, (64.0, 64.0)))
    assert first.deleted == 2

    def kept(sub: str) -> list[str]:
        return sorted(p.name for p in (tmp_path / sub).iterdir() if p.suffix == ".png")

    newest = [f"g1_{T0 + k * SEC}.png" for k in (2, 3, 4)]
    assert all(kept(sub) == newest for sub in ("detections", "heatmaps", "fusion_weights"))
    second = PngSink(tmp_path, max_per_s=1.0, clock=clock, keep_windows=3)  # a restart
    clock.t = 200.0
    second.write(PngFrame(record(k=5), image, heat, (64.0, 64.0)))
    assert kept("detections") == [*newest[1:], f"g1_{T0 + 5 * SEC}.png"]
    assert (tmp_path / "detections" / "notes.txt").exists()

    unbounded = PngSink(tmp_path / "all", max_per_s=1e9, clock=clock)  # keep_windows 0: keep everything
    for k in range(RECENT_FILES):
        clock.t = 300.0 + k
        unbounded.write(record(k=k))
    clock.t = 1000.0
    unbounded.write(record(k=RECENT_FILES))
    assert unbounded.drawn == RECENT_FILES + 1 == len(list((tmp_path / "all" / "fusion_weights").iterdir()))
    assert len(unbounded.files) == RECENT_FILES  # the latest paths only
    with pytest.raises(ValueError, match="keep_windows"):
        PngSink(tmp_path, keep_windows=-1)
