"""10,000+ malformed messages, interleaved with valid ones, against a running worker on a real socket.

The worker must stay up, reject every bad message with the reason its family deserves, and deliver every
valid one. The malformed families live in ingest/fuzzcases.py, shared with the coverage-guided harness
(tests/fuzz/fuzz_decode.py) and the daemon-level flood (`sacmf fuzz-load`).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import zmq

from ingest import fuzzcases, protocol
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


def test_fuzz_live_worker(ctx):
    n_bad, n_rad, n_img = 10_000, 1_000, 100
    w = WorkerThread(settings("tcp://127.0.0.1:*", lateness_ns=10 * SEC), ctx).start()
    push = ctx.socket(zmq.PUSH)
    push.connect(w.endpoint)
    rng = np.random.default_rng(2026)
    factory = fuzzcases.MalformedFactory("g1", "rad_vis", "rad_ir", "cam_vis", SESSION, T0)
    families: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    bad_at = set(rng.choice(n_bad + n_rad + n_img, n_bad, replace=False).tolist())
    rad_seq = img_seq = 0
    for k in range(n_bad + n_rad + n_img):
        if k in bad_at:
            case = factory.make(rng)
            frames = case.frames
            families[case.family] += 1
            reasons[case.reason] += 1
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

    assert set(families) == set(fuzzcases.FAMILIES) and min(families.values()) > n_bad / len(families) / 2
    assert set(worker.stats.rejected) <= set(protocol.REJECT_REASONS)
    assert dict(worker.stats.rejected) == dict(reasons)  # each message under the reason its family deserves
    assert len(worker.stats.rejected) >= 16  # the families map onto many distinct reasons
    rad, img = worker.tracker.stats("g1/rad_vis"), worker.tracker.stats("g1/cam_vis")
    assert (rad.delivered, rad.gaps, rad.duplicates) == (n_rad, 0, 0)
    assert (img.delivered, img.gaps, img.duplicates) == (n_img, 0, 0)
    # every valid sample and frame reached a window, with its own values
    values = np.concatenate([x.samples["seq_a"].values for x in windows])
    assert np.array_equal(np.sort(values), np.repeat(np.arange(n_rad, dtype=np.float32), 10))
    assert sum(len(x.frames["image_a"]) for x in windows) == n_img
