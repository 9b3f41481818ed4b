"""The ingest path over real ZeroMQ sockets: PUB/SUB and PUSH/PULL, tcp loopback and ipc."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ingest.metrics import IngestCollector
from ingest.protocol import encode_rad_header
from ingest.publisher import SensorPublisher
from ingest.subscriber import IngestWorker, read_dead_letters
from tests.ingest_helpers import KINDS, SEC, T0, WorkerThread, settings, signature, wait_for


def publish_scene(pub: SensorPublisher, seconds: int, *, fps: int = 5, chunk: int = 50, dt_ns: int = 2_000_000,
                  pace_s: float = 0.0) -> dict:  # fmt: skip
    """Frames at ``fps`` on both cameras, radiation in chunks of ``chunk`` samples, all in event time."""
    rng = np.random.default_rng(42)
    sent = {"frames": 0, "samples": 0}
    chunk_ns = chunk * dt_ns
    t_frame, t_rad = T0, T0
    end = T0 + seconds * SEC
    while t_frame < end or t_rad < end:
        if t_frame <= t_rad and t_frame < end:
            for cam in ("cam_vis", "cam_ir"):
                pub.send_image(cam, rng.integers(0, 4000, (16, 16), dtype=np.uint16), t_frame, 1_000_000)
                sent["frames"] += 1
            t_frame += SEC // fps
        else:
            for rad in ("rad_vis", "rad_ir"):
                pub.send_samples(rad, rng.normal(size=chunk).astype(np.float32), t_rad, dt_ns)
                sent["samples"] += chunk
            t_rad += chunk_ns
        if pace_s:
            time.sleep(pace_s)
    return sent


def test_push_pull_replay_is_lossless_and_windows_are_complete(ctx, endpoint):
    w = WorkerThread(settings(endpoint), ctx).start()
    with SensorPublisher(w.endpoint, "g1", KINDS, bind=False, socket_type="push", context=ctx) as pub:
        sent = publish_scene(pub, seconds=4)
    wait_for(lambda: w.worker.tracker.stats("g1/rad_ir").delivered == 4 * SEC // (50 * 2_000_000), what="all data")
    windows = w.finish()
    assert [x.start_ns for x in windows] == [T0 + i * SEC for i in range(4)]
    assert all(x.completeness in ("full", "flushed") for x in windows)
    assert sum(len(fs) for x in windows for fs in x.frames.values()) == sent["frames"]
    assert sum(len(s.t_ns) for x in windows for s in x.samples.values()) == sent["samples"]
    for x in windows[:-1]:  # closed by the watermark, not by the final flush
        assert x.completeness == "full" and all(x.presence.values())
        assert len(x.frames["image_a"]) == 5 and len(x.samples["seq_b"].t_ns) == 500
        assert np.all(np.diff(x.samples["seq_a"].t_ns) == 2_000_000)
        assert x.samples["seq_a"].t_ns[0] == x.start_ns
    assert sum(w.worker.stats.rejected.values()) == 0
    for sensor in KINDS:
        s = w.worker.tracker.stats(f"g1/{sensor}")
        assert s.gaps == 0 and s.duplicates == 0 and s.restarts == 0


def test_pub_sub_live_delivers_windows(ctx, endpoint):
    pub = SensorPublisher(endpoint, "g1", KINDS, context=ctx)
    windows = []
    worker = IngestWorker(settings(pub.endpoints[0], mode="live", bind=False), windows.append, context=ctx)
    # slow joiner: wait until the subscription has reached the publisher (heartbeats get through)
    wait_for(lambda: (worker.poll(20), worker.messages()["g1", "rad_vis", "hb"] > 0)[1], what="subscription")
    publish_scene(pub, seconds=3, pace_s=0.0005)
    wait_for(lambda: (worker.poll(20), worker.tracker.stats("g1/rad_ir").delivered == 30)[1], what="data")
    pub.close()
    assert [x.start_ns for x in windows] == [T0, T0 + SEC]  # the third is still open: its end is not passed
    worker.flush()
    assert len(windows) == 3 and windows[-1].completeness == "flushed"
    worker.close()


def test_publisher_restart_is_not_a_gap(ctx, endpoint):
    """Three sessions one after another; the message that reveals each restart is delivered like the rest."""
    w = WorkerThread(settings(endpoint), ctx).start()
    sessions = []
    for run in range(3):
        with SensorPublisher(w.endpoint, "g1", {"rad_vis": "rad"}, bind=False, socket_type="push", context=ctx) as pub:
            sessions.append(pub.session)
            for i in range(10):
                pub.send_samples("rad_vis", np.full(4, 100 * run + i, np.float32), T0 + run * SEC + i * SEC // 10, 1000)
        # close() hands the messages to the shared context, not to the worker, whose socket takes its
        # peers' pipes in turn: unless a session is in before the next starts, two restarts can come
        # first and retire it (its rest then stale). A restarting sensor is seconds behind its old self.
        wait_for(lambda run=run: w.worker.tracker.stats("g1/rad_vis").delivered == 10 * (run + 1), what="a session")
    w.finish()
    s = w.worker.tracker.stats("g1/rad_vis")
    assert len(set(sessions)) == 3
    assert (s.delivered, s.restarts, s.gaps, s.duplicates) == (30, 2, 0, 0)
    windowed = {int(v) for x in w.windows for v in x.samples["seq_a"].values}
    late = {int(v) for *_, item, _ in w.late for v in item.values}  # a run's tail can arrive after the next
    assert windowed | late == {100 * run + i for run in range(3) for i in range(10)}


def test_slow_consumer_losses_are_counted_exactly(ctx):
    """PUB drops for a slow subscriber; the sequence numbers and the heartbeat reveal every lost message."""
    pub = SensorPublisher("tcp://127.0.0.1:*", "g1", {"rad_vis": "rad"}, context=ctx, sndhwm=50)
    worker = IngestWorker(settings(pub.endpoints[0], mode="live", bind=False, rcvhwm=50), lambda w: None, context=ctx)
    wait_for(lambda: (worker.poll(20), worker.messages()["g1", "rad_vis", "hb"] > 0)[1], what="subscription")
    n = 20000
    for i in range(n):  # the worker does not read meanwhile: the queues overflow
        pub.send_samples("rad_vis", np.ones(8, np.float32), T0 + i * 8000, 1000)

    # keep reading until a heartbeat has told us the last seq (tail loss is only visible that way)
    def accounted() -> int:
        worker.poll(20)
        s = worker.tracker.stats("g1/rad_vis")
        return s.gaps + s.delivered

    wait_for(lambda: accounted() == n, what="heartbeat revealing the tail")
    s = worker.tracker.stats("g1/rad_vis")
    pub.close()
    worker.close()
    assert s.gaps > 0, "the test did not overflow the queues"
    assert s.delivered + s.gaps == n and s.duplicates == 0


def test_replay_speed_does_not_change_windows(ctx, endpoint):
    results = []
    for pace in (0.0, 0.002):
        w = WorkerThread(settings(endpoint, lateness_ns=300_000_000), ctx).start()
        with SensorPublisher(w.endpoint, "g1", KINDS, bind=False, socket_type="push", context=ctx) as pub:
            publish_scene(pub, seconds=2, fps=4, chunk=100, pace_s=pace)
        wait_for(lambda w=w: w.worker.tracker.stats("g1/rad_ir").delivered == 10, what="all data")  # noqa: B023
        results.append([signature(x) for x in w.finish()])
    assert len(results[0]) == 2 and results[0] == results[1]


def test_unconfigured_sensors_are_rejected_counted_and_dead_lettered(ctx, tmp_path):
    dl = tmp_path / "dead" / "letters.msgpack"
    w = WorkerThread(settings("tcp://127.0.0.1:*", dead_letter_path=dl), ctx).start()
    with SensorPublisher(w.endpoint, "g1", {"rad_vis": "rad", "intruder": "rad", "cam_vis": "rad"}, bind=False,
                         socket_type="push", context=ctx) as pub:  # fmt: skip
        for i in range(5):
            pub.send_samples("intruder", np.ones(3, np.float32), T0 + i, 1)
            pub.send_samples("cam_vis", np.ones(3, np.float32), T0 + i, 1)  # a camera sending radiation
            pub.send_samples("rad_vis", np.ones(3, np.float32), T0 + i, 1)
    with SensorPublisher(w.endpoint, "g9", {"rad_vis": "rad"}, bind=False, socket_type="push", context=ctx) as other:
        other.send_samples("rad_vis", np.ones(3, np.float32), T0, 1)
    wait_for(lambda: w.worker.stats.rejected["unknown_group"] >= 2, what="rejections")
    w.finish()
    st = w.worker.stats
    assert st.rejected["unknown_sensor"] >= 5 + 1  # data plus at least the final heartbeat
    assert st.rejected["wrong_kind"] == 5
    assert w.worker.tracker.stats("g1/rad_vis").delivered == 5
    letters = read_dead_letters(dl)
    assert {r["reason"] for r in letters} == {"unknown_sensor", "wrong_kind", "unknown_group"}
    assert all(len(r["frames"]) in (2, 3) and r["frames"][0].startswith((b"rad/", b"hb/")) for r in letters)


def test_metrics_exposition(ctx):
    w = WorkerThread(settings("ipc:///tmp/sacmf-metrics-test.ipc"), ctx).start()
    with SensorPublisher(w.endpoint, "g1", KINDS, bind=False, socket_type="push", context=ctx) as pub:
        one = np.zeros(1, np.float32)  # first heard of rad_ir at seq 5 of another session: 0..4 joined late
        pub._sock.send_multipart([b"rad/g1/rad_ir", encode_rad_header("g1", "rad_ir", 7, 5, T0, 1000, one), one])
        publish_scene(pub, seconds=2)
        pub._sock.send_multipart([b"rad/g1/rad_vis", b"\xc1", b""])  # a message that is not msgpack
    wait_for(lambda: w.worker.stats.rejected["msgpack"] == 1, what="rejection")
    w.finish()
    reg = CollectorRegistry()
    reg.register(IngestCollector([w.worker]))
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    val = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert val["sacmf_ingest_messages_total", (("group", "g1"), ("kind", "img"), ("sensor", "cam_vis"))] == 10
    assert val["sacmf_ingest_rejected_messages_total", (("reason", "msgpack"),)] == 1
    assert val["sacmf_windows_emitted_total", (("completeness", "full"), ("group", "g1"))] == 1
    assert val["sacmf_windows_emitted_total", (("completeness", "flushed"), ("group", "g1"))] == 1
    assert val["sacmf_ingest_gap_messages_total", (("group", "g1"), ("sensor", "rad_vis"))] == 0
    assert val["sacmf_ingest_joined_late_messages", (("group", "g1"), ("sensor", "rad_ir"))] == 5
    assert val["sacmf_ingest_joined_late_messages", (("group", "g1"), ("sensor", "rad_vis"))] == 0
    assert ("sacmf_sensor_clock_offset_seconds", (("group", "g1"), ("sensor", "cam_ir"))) in val
    assert families["sacmf_watermark_lag_seconds"].type == "gauge"
    for f in families.values():
        assert f.name.startswith("sacmf_") and f.documentation


@pytest.mark.parametrize("nbytes", [10, 200])
def test_oversized_frames_are_rejected_without_losing_neighbours(ctx, nbytes):
    from ingest.protocol import Limits

    w = WorkerThread(settings("tcp://127.0.0.1:*", limits=Limits(max_message_bytes=100)), ctx).start()
    with SensorPublisher(w.endpoint, "g1", {"rad_vis": "rad"}, bind=False, socket_type="push", context=ctx) as pub:
        pub.send_samples("rad_vis", np.ones(nbytes // 4, np.float32), T0, 1)
        pub.send_samples("rad_vis", np.ones(2, np.float32), T0 + 100, 1)
    wait_for(lambda: w.worker.tracker.stats("g1/rad_vis").delivered + w.worker.stats.rejected["too_large"] == 2)
    w.finish()
    assert w.worker.stats.rejected["too_large"] == (1 if nbytes > 100 else 0)


_SENSOR_SCRIPT = """
import sys, numpy as np
from ingest.publisher import SensorPublisher
pub = SensorPublisher(sys.argv[1], "g1", {"cam": "img"}, bind=False, socket_type="push")
frame = np.zeros((1024, 1024), np.uint8)
for i in range(int(sys.argv[2])):
    pub.send_image("cam", frame, 1_800_000_000_000_000_000 + i)
pub.close()
"""


def test_a_sensor_script_that_closes_and_exits_delivers_every_frame(ctx):
    """close() then exit: with the shared global context the queued frames died with the process."""
    import subprocess
    import sys

    from ingest import protocol

    pull = ctx.socket(zmq.PULL)
    pull.bind("tcp://127.0.0.1:*")
    endpoint = pull.getsockopt_string(zmq.LAST_ENDPOINT)
    run = subprocess.run([sys.executable, "-c", _SENSOR_SCRIPT, endpoint, "60"], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    frames, last_heartbeat = [], None
    while pull.poll(2000):
        m = protocol.decode(pull.recv_multipart())
        if m.kind == "img":
            frames.append(m.seq)
        else:
            last_heartbeat = m.last_seq
    pull.close(0)
    assert frames == list(range(60)) and last_heartbeat == 59  # was 9-13 frames and no final heartbeat


def test_the_publisher_refuses_what_the_daemon_would_reject_before_using_a_seq(ctx):
    with SensorPublisher("inproc://refuse", "g1", KINDS, context=ctx) as pub:
        img, rad = np.zeros((4, 4), np.uint16), np.zeros(8, np.float32)
        for call, message in (
            (lambda: pub.send_image("cam_vis", img, 1.8e18), "t_ns must be an integer"),
            (lambda: pub.send_image("cam_vis", img, T0, exp_ns=-1), "would reject"),
            (lambda: pub.send_image("cam_vis", np.zeros((4, 4, 5), np.uint8), T0), "would reject"),
            (lambda: pub.send_image("cam_vis", img, T0, meta=["a"]), "meta must be a dict"),
            (lambda: pub.send_image("cam_vis", img, T0, meta={"x": np.float32(1)}), "cannot encode the header"),
            (lambda: pub.send_samples("rad_vis", rad, 2**63 - 5, 1), "would reject"),  # the last sample's time
        ):
            with pytest.raises(ValueError, match=message):
                call()
        assert pub.next_seq["cam_vis"] == 0 and pub.next_seq["rad_vis"] == 0  # no seq spent on them
        assert pub.send_samples("rad_vis", rad, np.int64(T0), np.int64(1000)) == 0  # numpy integers are fine
    with pytest.raises(RuntimeError, match="closed"):
        pub.send_image("cam_vis", img, T0)


def test_a_send_timeout_raises_without_using_a_seq_and_a_retry_is_gapless(ctx):
    """A PUSH sensor whose daemon is gone: without send_timeout_ms the send blocks for ever (and with it
    the heartbeat thread and close()); with it the send raises, and a retry once the daemon is back
    continues the numbering with no gap."""
    import socket

    from ingest import protocol

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match="send_timeout_ms"):
        SensorPublisher(f"tcp://127.0.0.1:{port}", "g1", KINDS, bind=False, socket_type="push", send_timeout_ms=0)
    pub = SensorPublisher(f"tcp://127.0.0.1:{port}", "g1", KINDS, bind=False, socket_type="push", context=ctx,
                          sndhwm=1, send_timeout_ms=100)  # fmt: skip
    img = np.zeros((4, 4), np.uint16)
    sent = []
    with pytest.raises(TimeoutError, match="seq not used"):
        for i in range(10_000):  # the first one queues (high-water mark 1); a later one must time out
            sent.append(pub.send_image("cam_vis", img, T0 + i))
    assert sent and pub.next_seq["cam_vis"] == len(sent)
    pull = ctx.socket(zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{port}")
    assert pub.send_image("cam_vis", img, T0 + len(sent)) == len(sent)  # the retry, now that a peer is back
    pub.close()
    seqs = []
    while pull.poll(2000):
        m = protocol.decode(pull.recv_multipart())
        if m.kind == "img":
            seqs.append(m.seq)
    pull.close(0)
    assert seqs == list(range(len(sent) + 1))


class TwoCameras:
    """A live-mode worker for two cameras on an injected clock, and a sender of tiny frames to it."""

    def __init__(self, name: str, **settings_kw) -> None:
        self.now = 0
        st = settings(f"inproc://{name}", mode="live", roles={"cam_vis": "image_a", "cam_ir": "image_b"}, **settings_kw)
        self.ctx = zmq.Context()
        self.windows: list = []
        self.late: list = []
        self.worker = IngestWorker(
            st, self.windows.append, on_late=lambda *a: self.late.append(a), context=self.ctx, clock=lambda: self.now
        )
        self.img = np.zeros((2, 2), np.uint8)
        self.seqs = {"cam_vis": 0, "cam_ir": 0}

    def send(self, sensor: str, t_ns: int) -> None:
        from ingest import protocol

        header = protocol.encode_image_header("g1", sensor, 7, self.seqs[sensor], t_ns, 0, self.img)
        self.seqs[sensor] += 1
        self.worker.handle([protocol.topic("img", "g1", sensor), header, self.img.tobytes()], recv_ns=self.now)

    def close(self) -> None:
        self.worker.close()
        self.ctx.term()


@pytest.mark.parametrize("max_future_s", [10, 0])
def test_one_frame_stamped_far_in_the_future_is_refused_not_made_the_watermark(max_future_s: int):
    """A camera whose clock said 2100 for one frame (a bad RTC after a reboot), while the group's other
    camera was briefly silent: the watermark followed that frame to 2100, and from then on every message
    of every sensor of the group was late and no window was ever emitted again. With max_future_ns
    (the default [ingest] max_future_ms = 10 s) the frame is refused as future_time and counted as a
    gap of its sensor; windows go on. With the check off (0) the test shows the damage it prevents."""
    g = TwoCameras("future", idle_ns=2 * SEC, max_wait_ns=SEC, max_future_ns=max_future_s * SEC)
    try:
        for i in range(200):  # 20 s at 10 frames/s, the daemon's clock in step with the cameras
            g.now = t = T0 + i * SEC // 10
            g.send("cam_ir", 4_102_444_800 * SEC if i == 20 else t)  # one frame stamped 2100-01-01
            if not 50 <= i < 80:  # cam_vis silent for 3 s (its publisher restarts)
                g.send("cam_vis", t)
            g.worker.poll(0)
        if max_future_s:
            assert g.worker.stats.rejected == {"future_time": 1}
            assert not g.late and len(g.windows) >= 17  # every second up to the last few, none lost
            assert g.worker.tracker.stats("g1/cam_ir").gaps == 1  # its seq: lost to the pipeline, counted
        else:  # the failure the check prevents
            assert len(g.late) > 100 and len(g.windows) < 8
    finally:
        g.close()


def test_future_time_check_is_live_only_and_follows_clock_offsets():
    """Replay-mode windows run on event time alone (a recording's times are not today's), and a sensor
    whose known offset is configured is judged after the correction."""
    from ingest import protocol

    img = np.zeros((2, 2), np.uint8)
    ctx = zmq.Context()
    for mode, offset_s, t_ahead_s, refused in (("replay", 0, 3600, False), ("live", -60, 55, False),
                                                ("live", 0, 55, True)):  # fmt: skip
        st = settings(f"inproc://future-{mode}-{offset_s}", mode=mode, roles={"cam_vis": "image_a"},
                      max_future_ns=10 * SEC)  # fmt: skip
        if offset_s:
            g = st.groups["g1"]
            st.groups["g1"] = type(g)(g.name, g.sensors, g.window, offsets_ns={"cam_vis": offset_s * SEC})
        worker = IngestWorker(st, lambda w: None, context=ctx, clock=lambda: T0)
        header = protocol.encode_image_header("g1", "cam_vis", 7, 0, T0 + t_ahead_s * SEC, 0, img)
        worker.handle([protocol.topic("img", "g1", "cam_vis"), header, img.tobytes()], recv_ns=T0)
        assert (worker.stats.rejected["future_time"] == 1) is refused, (mode, offset_s)
        worker.close()
    ctx.term()


def test_event_times_whose_windows_leave_int64_are_refused_and_the_stream_goes_on():
    """A radiation clock reading 1677 (int64's floor) gave a window starting below int64: it failed in
    resampling and its window got no result. Such data is refused as field_type; valid data goes on."""
    from ingest import protocol

    ctx = zmq.Context()
    windows: list = []
    st = settings("inproc://int64-edges", mode="replay", roles={"rad_a": "seq_a"})
    worker = IngestWorker(st, windows.append, context=ctx, clock=lambda: T0)
    size = st.groups["g1"].window.size_ns
    values = np.arange(10, dtype=np.float32)
    for seq, t0 in enumerate((protocol.INT64_MIN + 5, protocol.INT64_MAX - 95, protocol.INT64_MIN + size, T0)):
        header = protocol.encode_rad_header("g1", "rad_a", 7, seq, t0, 10, values)
        worker.handle([protocol.topic("rad", "g1", "rad_a"), header, values.tobytes()], recv_ns=T0)
    worker.flush()
    assert worker.stats.rejected == {"field_type": 2}
    assert [w.start_ns for w in windows] == [protocol.INT64_MIN + size - (protocol.INT64_MIN + size) % size,
                                             T0 - T0 % size]  # fmt: skip
    assert all(w.start_ns >= protocol.INT64_MIN and w.end_ns <= protocol.INT64_MAX for w in windows)
    worker.close()
    ctx.term()


@pytest.mark.parametrize("step_s", [0, 30])
def test_a_host_clock_stepped_back_does_not_freeze_idle_detection(step_s: int):
    """The daemon's wall clock steps back 30 s (an NTP step, a VM restored) while the sensors' clocks
    are right, then the infrared camera dies. idle_timeout (2 s) must take it out of the watermark as
    without the step; receive times only moved forward, so its silence went unmeasured for 30 s and
    no window came out (and the timer checks stopped: their interval was on the same clock)."""
    g = TwoCameras(f"step-{step_s}", idle_ns=2 * SEC, max_wait_ns=SEC)
    try:
        for i in range(100):  # 10 s at 10 frames/s; the host clock steps back at 5 s, cam_ir dies at 5.5 s
            t = T0 + i * SEC // 10
            g.now = t - (step_s * SEC if i >= 50 else 0)
            g.send("cam_vis", t)
            if i < 55:
                g.send("cam_ir", t)
            g.worker.poll(0)
            time.sleep(0.001)  # the timer checks run on the monotonic clock: let it move
        assert [w.start_ns - T0 for w in g.windows][-1] == 8 * SEC  # as without a step
        assert g.worker.windowers["g1"].clock_steps_back == (1 if step_s else 0)
    finally:
        g.close()


def test_the_clock_offset_estimate_of_synchronised_sensors_is_their_transport_delay():
    """With the sensors' clocks right and 1 ms on the wire, the estimate was 0.1 s for a radiometer
    sending 100 ms chunks and 0.021 s for a camera with 20 ms exposures: it measured from a chunk's
    first sample and a frame's exposure start, so an operator reading the gauge would have shifted a
    correct radiometer by 100 ms with clock_offset_ms."""
    from ingest import protocol

    ctx = zmq.Context()
    worker = IngestWorker(settings("inproc://skew", mode="live"), lambda w: None, context=ctx)
    img = np.zeros((2, 2), np.uint8)
    samples = np.ones(100, np.float32)
    for i in range(20):  # 2 s: frames of 20 ms exposures, radiation in 100-sample chunks at 1 kHz
        t = T0 + i * SEC // 10
        header = protocol.encode_image_header("g1", "cam_vis", 7, i, t, 20_000_000, img)
        worker.handle([protocol.topic("img", "g1", "cam_vis"), header, img.tobytes()], recv_ns=t + 21_000_000)
        header = encode_rad_header("g1", "rad_vis", 7, i, t, 1_000_000, samples)
        worker.handle([protocol.topic("rad", "g1", "rad_vis"), header, samples.tobytes()], recv_ns=t + 100_000_000)
    for sensor in ("cam_vis", "rad_vis"):
        assert worker.routes["g1", sensor].skew.offset_ns == 1_000_000, sensor
    worker.close()
    ctx.term()


def test_a_sensor_never_heard_from_has_a_last_message_age_from_the_start():
    """The age gauge existed only for sensors that had sent something, so SacmfSensorStalled could not fire
    for a sensor (or a whole group) that was silent from start-up: a topic routed nowhere, a shard left
    out of the proxy. Its age now counts from when ingest started listening."""
    now = {"t": T0}
    ctx = zmq.Context()
    worker = IngestWorker(settings("inproc://age", mode="live"), lambda w: None, context=ctx, clock=lambda: now["t"])
    reg = CollectorRegistry()
    reg.register(IngestCollector([worker], clock=lambda: now["t"]))
    samples = np.ones(10, np.float32)
    header = encode_rad_header("g1", "rad_vis", 7, 0, T0, 1_000_000, samples)
    worker.handle([b"rad/g1/rad_vis", header, samples.tobytes()], recv_ns=T0 + 2 * SEC)
    now["t"] = T0 + 9 * SEC
    ages = {
        s.labels["sensor"]: s.value
        for fam in text_string_to_metric_families(generate_latest(reg).decode())
        for s in fam.samples
        if s.name == "sacmf_sensor_last_message_age_seconds"
    }
    assert ages == {"rad_vis": 7.0, "cam_vis": 9.0, "cam_ir": 9.0, "rad_ir": 9.0}
    worker.close()
    ctx.term()


def test_a_frame_over_the_size_limit_does_not_cut_a_connected_publisher_off():
    """libzmq drops a connection that brings a frame over ZMQ_MAXMSGSIZE and never connects it again: with
    the default topology (sacmf connects to publishers that bind), one oversized frame silenced every
    sensor of that publisher until sacmf restarted. The drop is now counted and the endpoint reconnected."""
    from ingest.protocol import Limits

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    endpoint = f"tcp://127.0.0.1:{pub.bind_to_random_port('tcp://127.0.0.1')}"
    st = settings(endpoint, mode="live", bind=False, limits=Limits(max_message_bytes=4096))
    worker = IngestWorker(st, lambda w: None, context=ctx)
    seq = iter(range(10**6))

    def send(n: int) -> None:
        values = np.ones(n, np.float32)
        header = encode_rad_header("g1", "rad_vis", 7, next(seq), time.time_ns(), 1_000_000, values)
        pub.send_multipart([b"rad/g1/rad_vis", header, values.tobytes()])

    def delivered() -> int:
        return worker.messages()["g1", "rad_vis", "rad"]

    try:
        deadline = time.monotonic() + 10
        while delivered() == 0 and time.monotonic() < deadline:  # the subscription reaches the publisher
            send(4)
            worker.poll(20)
        assert delivered() > 0
        send(100_000)  # 400 kB: over 4096 + 64 KiB, libzmq drops the connection
        before = delivered()
        deadline = time.monotonic() + 10
        while delivered() == before and time.monotonic() < deadline:
            send(4)
            worker.poll(20)
        assert delivered() > before, "the publisher stayed cut off"
        assert worker.stats.disconnects[endpoint] == 1
    finally:
        worker.close()
        pub.close(0)
        ctx.term()
