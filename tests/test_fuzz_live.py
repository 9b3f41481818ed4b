"""10,000+ malformed messages, interleaved with valid ones, against a running worker on a real socket.

The worker must stay up, reject every bad message with a reason, and deliver every valid one.
"""

from __future__ import annotations

import msgpack
import numpy as np
import zmq

from ingest import protocol
from tests.ingest_helpers import SEC, T0, WorkerThread, settings, wait_for

SESSION = 0xDEADBEEF


def valid_rad(seq: int) -> list[bytes]:
    values = np.full(10, seq, np.float32)
    t = T0 + seq * 10_000_000
    return [
        b"rad/g1/rad_vis",
        protocol.encode_rad_header("g1", "rad_vis", SESSION, seq, t, 1_000_000, values),
        values.tobytes(),
    ]


def valid_img(seq: int) -> list[bytes]:
    image = np.full((8, 8), seq % 250, np.uint8)
    t = T0 + seq * 100_000_000
    return [
        b"img/g1/cam_vis",
        protocol.encode_image_header("g1", "cam_vis", SESSION, seq, t, 0, image),
        image.tobytes(),
    ]


def malformed(rng: np.random.Generator, i: int) -> tuple[str, list[bytes]]:
    """One bad message of a randomly chosen family. Uses the configured sensors' topics where it can,
    so that a worker that wrongly accepted it would corrupt real accounting."""
    good = valid_rad(1_000_000 + i)
    header = msgpack.unpackb(good[1])
    family = rng.integers(0, 12)
    if family == 0:  # random bytes, 1..5 frames
        return "random", [rng.bytes(int(rng.integers(0, 40))) for _ in range(int(rng.integers(1, 6)))]
    if family == 1:  # truncated msgpack
        return "truncated", [good[0], good[1][: int(rng.integers(0, len(good[1])))], good[2]]
    if family == 2:  # a field of the wrong type
        key = str(rng.choice(["seq", "t_ns", "dt_ns", "n", "session", "v", "dtype"]))
        header[key] = [None, "x", -1, 1.5, [1], {"a": 1}, True][int(rng.integers(0, 7))]
        if key == "t_ns" and header[key] == -1:  # -1 ns is a valid event time
            header[key] = 2**63
        return "wrong_type", [good[0], msgpack.packb(header), good[2]]
    if family == 3:  # lying shape: declares a different length than the payload
        header["n"] = int(header["n"]) + int(rng.integers(1, 50))
        return "lying_shape", [good[0], msgpack.packb(header), good[2]]
    if family == 4:  # huge declared size
        img = valid_img(1)
        h = msgpack.unpackb(img[1])
        h["shape"] = [int(rng.integers(20000, 2**31)), int(rng.integers(20000, 2**31)), 4]
        return "huge", [img[0], msgpack.packb(h), img[2]]
    if family == 5:  # NaN/Inf payload
        values = np.full(10, np.nan if rng.random() < 0.5 else np.inf, np.float32)
        return "non_finite", [good[0], good[1], values.tobytes()]
    if family == 6:  # header/topic disagree
        return "mismatch", [b"rad/g1/rad_ir", good[1], good[2]]
    if family == 7:  # extra frames
        return "extra_frames", [*good, *(b"x" for _ in range(int(rng.integers(1, 80))))]
    if family == 8:  # missing or unknown field
        if rng.random() < 0.5:
            header.pop(str(rng.choice(list(header))))
        else:
            header["bogus"] = 1
        return "fields", [good[0], msgpack.packb(header), good[2]]
    if family == 9:  # bad topic
        return "topic", [rng.choice([b"\xff\xfe/g1/x", b"rad/g1", b"rad/g1/a/b", b"zzz/g1/rad_vis"]), good[1], good[2]]
    if family == 10:  # unconfigured sensor
        header["sensor"] = "ghost"
        return "unknown_sensor", [b"rad/g1/ghost", msgpack.packb(header), good[2]]
    header["dtype"] = "int64"  # disallowed dtype
    return "dtype", [good[0], msgpack.packb(header), good[2]]


def test_fuzz_live_worker(ctx):
    n_bad, n_rad, n_img = 10_000, 1_000, 100
    w = WorkerThread(settings("tcp://127.0.0.1:*", lateness_ns=10 * SEC), ctx).start()
    push = ctx.socket(zmq.PUSH)
    push.connect(w.endpoint)
    rng = np.random.default_rng(2026)
    families: dict[str, int] = {}
    bad_at = set(rng.choice(n_bad + n_rad + n_img, n_bad, replace=False).tolist())
    rad_seq = img_seq = 0
    for k in range(n_bad + n_rad + n_img):
        if k in bad_at:
            family, frames = malformed(rng, k)
            families[family] = families.get(family, 0) + 1
        elif rad_seq < n_rad and (img_seq >= n_img or rng.random() < n_rad / (n_rad + n_img)):
            frames, rad_seq = valid_rad(rad_seq), rad_seq + 1
        else:
            frames, img_seq = valid_img(img_seq), img_seq + 1
        push.send_multipart(frames)
    assert (rad_seq, img_seq) == (n_rad, n_img)
    worker = w.worker
    try:
        wait_for(lambda: sum(worker.stats.rejected.values()) >= n_bad, timeout=60, what="all rejections")
        wait_for(lambda: worker.tracker.stats("g1/rad_vis").delivered == n_rad, what="all valid radiation")
        assert w.thread.is_alive(), "the worker loop died"
    finally:
        windows = w.finish()
        push.close(linger=0)
    assert sum(worker.stats.rejected.values()) == n_bad

    assert len(families) == 12 and min(families.values()) > 500
    assert set(worker.stats.rejected) <= set(protocol.REJECT_REASONS)
    assert len(worker.stats.rejected) >= 10  # the families map onto many distinct reasons
    rad, img = worker.tracker.stats("g1/rad_vis"), worker.tracker.stats("g1/cam_vis")
    assert (rad.delivered, rad.gaps, rad.duplicates) == (n_rad, 0, 0)
    assert (img.delivered, img.gaps, img.duplicates) == (n_img, 0, 0)
    # every valid sample and frame reached a window, with its own values
    values = np.concatenate([x.samples["seq_a"].values for x in windows])
    assert np.array_equal(np.sort(values), np.repeat(np.arange(n_rad, dtype=np.float32), 10))
    assert sum(len(x.frames["image_a"]) for x in windows) == n_img
