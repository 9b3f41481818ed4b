"""Per-sensor rate limits: the token bucket's arithmetic, the worker's accounting, and a real flood.

The property that matters: a sensor that floods is held to its configured rate, and its neighbours on
the same socket lose nothing. Counts are exact wherever the transport is lossless.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import zmq
from prometheus_client import CollectorRegistry, generate_latest

from daemon import config as config_mod
from ingest import protocol
from ingest.metrics import IngestCollector
from ingest.publisher import SensorPublisher
from ingest.security import RateLimit, RateLimitCollector, RateLimiter, TokenBucket
from ingest.settings import GroupSettings, IngestSettings
from ingest.subscriber import IngestWorker, read_dead_letters
from ingest.windowing import WindowSpec
from tests.ingest_helpers import SEC, T0, WorkerThread, wait_for

ROOT = Path(__file__).resolve().parents[1]
MS = 1_000_000
SAMPLES = np.arange(10, dtype=np.float32)


def _rad(sensor: str, seq: int, group: str = "g1") -> list[bytes]:
    header = protocol.encode_rad_header(group, sensor, 9, seq, T0 + seq * 10 * MS, MS, SAMPLES, None)
    return [protocol.topic("rad", group, sensor), header, SAMPLES.tobytes()]


def _settings(endpoint: str, limits: dict[str, RateLimit], transport: str = "pull") -> IngestSettings:
    mode = "replay" if transport == "pull" else "live"
    spec = WindowSpec(size_ns=SEC, allowed_lateness_ns=100 * SEC, idle_timeout_ns=600 * SEC, mode=mode)
    group = GroupSettings("g1", {"rad_vis": "seq_a", "rad_ir": "seq_b"}, spec)
    return IngestSettings((endpoint,), {"g1": group}, bind=True, transport=transport, rate_limits=limits)


# ----------------------------------------------------------------------------------------------------
# The bucket
# ----------------------------------------------------------------------------------------------------


def test_message_bucket_allows_the_burst_then_the_rate_and_never_more_than_the_burst() -> None:
    b = TokenBucket(RateLimit(messages_per_s=10, burst_s=1.0), now_ns=0)
    assert [b.admit(1, 0) for _ in range(11)] == [True] * 10 + [False]
    assert b.admit(1, 99 * MS) is False  # 0.99 tokens after 99 ms: not yet
    assert b.admit(1, 100 * MS) is True and b.admit(1, 100 * MS) is False
    assert sum(b.admit(1, 60 * SEC) for _ in range(50)) == 10  # a long pause refills to the burst, not beyond
    assert (b.dropped, b.dropped_bytes) == (1 + 1 + 1 + 40, 43)


def test_byte_bucket_charges_sizes_and_lets_one_large_message_through_on_credit() -> None:
    b = TokenBucket(RateLimit(bytes_per_s=1000, burst_s=1.0), now_ns=0)
    assert b.admit(600, 0) and b.admit(600, 0)  # 1000 -> 400 -> -200: admitted while not in debt
    assert not b.admit(1, 0) and not b.admit(1, 199 * MS)  # -200 + 199 < 0
    assert b.admit(5000, 200 * MS)  # larger than the burst: still admitted once the debt is paid
    assert not b.admit(1, 5 * SEC) and b.admit(1, 5200 * MS)  # ... and it pays back 5 s of rate
    assert b.dropped_bytes == 1 + 1 + 1


def test_bucket_ignores_a_clock_step_backwards_and_zero_means_unlimited() -> None:
    b = TokenBucket(RateLimit(messages_per_s=2, burst_s=1.0), now_ns=10 * SEC)
    assert b.admit(1, 10 * SEC) and b.admit(1, 10 * SEC) and not b.admit(1, 10 * SEC)
    assert not b.admit(1, 5 * SEC)  # the clock went back: no refill from it
    assert b.admit(1, 10 * SEC + 500 * MS)  # counted from the latest time seen
    unlimited = RateLimit()
    assert not unlimited.enabled and not RateLimiter({"g1/rad_vis": unlimited}, protocol.KINDS, 0)
    with pytest.raises(ValueError):
        RateLimit(messages_per_s=-1)
    with pytest.raises(ValueError):
        RateLimit(messages_per_s=1, burst_s=0)


def test_limiter_shares_one_bucket_per_sensor_across_kinds_and_passes_unknown_topics() -> None:
    lim = RateLimiter({"g1/rad_vis": RateLimit(messages_per_s=2)}, protocol.KINDS, now_ns=0)
    assert lim.admit(_rad("rad_vis", 0), 0)
    assert lim.admit([b"hb/g1/rad_vis", b"x"], 0)  # a heartbeat spends the same bucket
    assert not lim.admit(_rad("rad_vis", 1), 0)
    assert all(lim.admit(_rad("rad_ir", i), 0) for i in range(10))  # no limit configured for it
    assert lim.admit([b"rad/g1/nope", b"x"], 0) and lim.admit([], 0)  # validation rejects these later
    assert lim.buckets["g1/rad_vis"].dropped == 1


# ----------------------------------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------------------------------


def test_worker_drops_a_flooding_sensors_excess_before_decoding_and_counts_it(ctx: zmq.Context) -> None:
    limits = {"g1/rad_ir": RateLimit(messages_per_s=5, burst_s=1.0)}
    clock = [T0]
    settings = _settings("inproc://rl-worker", limits)
    w = IngestWorker(settings, lambda win: None, context=ctx, clock=lambda: clock[0], monotonic=lambda: clock[0])
    try:
        for i in range(100):  # a burst at one instant: the burst (5) passes, 95 are dropped
            w.handle(_rad("rad_ir", i))
            if i < 20:
                w.handle(_rad("rad_vis", i))
        clock[0] += SEC  # one second later: 5 more tokens, so 5 of these 10 pass
        for i in range(100, 110):
            w.handle(_rad("rad_ir", i))
        garbage = [b"rad/g1/rad_ir", b"\xc1 not msgpack", b""]
        w.handle(garbage)  # over the limit: dropped before it could be rejected as msgpack
        msgs = w.messages()
        assert msgs["g1", "rad_ir", "rad"] == 10 and msgs["g1", "rad_vis", "rad"] == 20
        assert dict(+w.stats.rejected) == {"rate_limited": 101}  # 95 + 5 + the garbage, never decoded
        assert w.rate_limiter is not None and w.rate_limiter.buckets["g1/rad_ir"].dropped == 101

        registry = CollectorRegistry()
        registry.register(IngestCollector([w]))
        registry.register(RateLimitCollector(lambda: [w.rate_limiter]))
        text = generate_latest(registry).decode()
        assert 'sacmf_ingest_rate_limited_messages_total{group="g1",sensor="rad_ir"} 101.0' in text
        assert 'sacmf_ingest_rejected_messages_total{reason="rate_limited"} 101.0' in text
        assert 'sensor="rad_vis"' not in text.split("sacmf_ingest_rate_limited_messages_total")[1].split("#")[0]
    finally:
        w.close()


def test_buckets_run_on_the_monotonic_clock_so_a_wall_clock_step_back_starves_nobody(ctx: zmq.Context) -> None:
    """NTP stepping the wall clock back, or a VM resumed, must not stop the refill: on the wall clock a
    bucket saw no time pass until the clock caught up again (300 s of silence for a 300 s step). Receive
    times (and so the windows) stay on the wall clock; only the buckets moved."""
    limits = {"g1/rad_ir": RateLimit(messages_per_s=100, burst_s=0.1)}  # 10 tokens, refilled in 0.1 s
    wall, mono = [T0], [10**12]  # both clocks in the test's hands: a loaded machine cannot refill early
    w = IngestWorker(_settings("inproc://rl-step", limits), lambda win: None, context=ctx,
                     clock=lambda: wall[0], monotonic=lambda: mono[0])  # fmt: skip
    try:
        for i in range(11):
            w.handle(_rad("rad_ir", i))
        assert w.messages()["g1", "rad_ir", "rad"] == 10 and w.stats.rejected["rate_limited"] == 1
        wall[0] -= 300 * SEC  # the wall clock steps back five minutes
        mono[0] += 150 * MS  # while 0.15 s really pass: the bucket refills to its burst
        for i in range(11, 21):
            w.handle(_rad("rad_ir", i))
        assert w.messages()["g1", "rad_ir", "rad"] == 20 and w.stats.rejected["rate_limited"] == 1
    finally:
        w.close()


def test_an_unconfigured_sensor_name_is_refused_by_topic_before_decoding(ctx: zmq.Context, tmp_path: Path) -> None:
    """Renaming a limited sensor (rad_ir -> rad_irX) must not buy a flooder decoding and disk.

    Before, a topic of no configured sensor passed the rate limit and was decoded and NaN-checked
    across its whole payload before the route lookup refused it, and every copy was written whole to
    the dead-letter file (50 x 4 MB: 0.4 s and 200 MB). Now it is refused by its topic: counted under
    its reason as before, never decoded (a broken header or a NaN payload still reads unknown_sensor),
    and dead-lettered cut to a few KiB and only within a bucket of its own per group, so a renamed
    flood writes a burst of records, not its payload. The valid neighbour loses nothing."""
    dead = tmp_path / "dead.msgpack"
    limits = {"g1/rad_ir": RateLimit(messages_per_s=5, burst_s=1.0)}
    settings = dataclasses.replace(_settings("inproc://rl-unrouted", limits), dead_letter_path=dead)
    w = IngestWorker(settings, lambda win: None, context=ctx)
    big = np.full(1 << 18, np.nan, dtype=np.float32)  # 1 MiB of NaN: decoding would reject it non_finite
    header = protocol.encode_rad_header("g1", "rad_irX", 9, 0, T0, MS, big, None)
    renamed = [b"rad/g1/rad_irX", header, big.tobytes()]
    try:
        w.handle([b"rad/g1/rad_irX", b"\xc1 not msgpack", b""])  # decoded, this would be "msgpack"
        n = 50
        for i in range(n):
            w.handle(renamed)
            w.handle(_rad("rad_vis", i))  # a configured neighbour, interleaved
        w.handle(_rad("rad_vis", 0, group="g9"))  # an unknown group: its own shared bucket
        assert dict(+w.stats.rejected) == {"unknown_sensor": n + 1, "unknown_group": 1}
        assert w.messages()["g1", "rad_vis", "rad"] == n
    finally:
        w.close()  # flushes the dead-letter file
    letters = read_dead_letters(dead)
    assert 11 <= len(letters) <= 14  # g1's burst (10/s) plus what real time refilled meanwhile, and g9's one
    assert {r["reason"] for r in letters} == {"unknown_sensor", "unknown_group"}
    assert all(r["truncated"] and all(len(f) <= 4096 for f in r["frames"]) for r in letters)
    assert letters[1]["frames"][:2] == [renamed[0], renamed[1]]  # topic and header: who sent it
    assert dead.stat().st_size < 200_000  # not 50 MiB
    unrouted = w.unrouted_limiter.buckets
    assert unrouted["g1/*"].dropped == n + 1 - (len(letters) - 1) and unrouted["*/*"].dropped == 0


def test_frames_beyond_the_kept_ones_are_charged_to_the_byte_bucket(ctx: zmq.Context) -> None:
    """A message of many frames keeps 64 and drains the rest, but every byte was received: charging only
    the kept frames let a sender pass ``bytes_per_s`` by splitting its bytes across frames."""
    limits = {"g1/rad_vis": RateLimit(bytes_per_s=100_000, burst_s=1.0)}
    w = IngestWorker(_settings("tcp://127.0.0.1:*", limits), lambda win: None, context=ctx)
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    try:
        push.connect(w.bound_endpoints[0])
        chunk = b"\0" * 1000
        many = [b"rad/g1/rad_vis"] + [chunk] * 1000  # 1 MB: 64 KB in the kept frames, the rest drained
        for _ in range(2):
            push.send_multipart(many)
        deadline = time.monotonic() + 10
        while sum(w.stats.rejected.values()) < 2 and time.monotonic() < deadline:
            w.poll(50)
        # the first is admitted on credit and pays for all of its 1 MB: the second finds the bucket in debt
        assert dict(+w.stats.rejected) == {"frame_count": 1, "rate_limited": 1}
        assert w.rate_limiter is not None and w.rate_limiter.buckets["g1/rad_vis"].bytes < -800_000
    finally:
        push.close(linger=0)
        w.close()


def test_no_limit_configured_means_no_limiter_on_the_hot_path(ctx: zmq.Context) -> None:
    w = IngestWorker(_settings("inproc://rl-none", {}), lambda win: None, context=ctx)
    try:
        assert w.rate_limiter is None
        for i in range(50):
            w.handle(_rad("rad_ir", i))
        assert w.messages()["g1", "rad_ir", "rad"] == 50 and not w.stats.rejected
    finally:
        w.close()


@pytest.mark.parametrize("transport", ["pull", "sub"])
def test_a_flooding_publisher_is_held_to_its_rate_while_its_neighbour_loses_nothing(
    ctx: zmq.Context, transport: str
) -> None:
    """Lossless PUSH/PULL: every flood message is either accepted or rate-limited (exact). Live PUB/SUB:
    the flood may also overflow its own pipe, but the neighbour, on a pipe of its own, loses nothing."""
    rate, burst_s = 200.0, 0.5
    settings = _settings("tcp://127.0.0.1:*", {"g1/rad_ir": RateLimit(rate, burst_s=burst_s)}, transport=transport)
    wt = WorkerThread(settings, ctx)
    started = time.monotonic()
    wt.start()
    w = wt.worker
    flood_n, neighbour_n = 6000, 150
    others = zmq.Context()
    flooder = others.socket(zmq.PUSH if transport == "pull" else zmq.PUB)  # raw: no heartbeats to count
    flooder.setsockopt(zmq.LINGER, 0)
    flooder.connect(wt.endpoint)
    flood_frames = [_rad("rad_ir", i) for i in range(flood_n)]
    flood = threading.Thread(target=lambda: [flooder.send_multipart(f) for f in flood_frames], daemon=True)
    kind = "push" if transport == "pull" else "pub"
    neighbour = SensorPublisher(wt.endpoint, "g1", {"rad_vis": "rad"}, bind=False, socket_type=kind, context=others)
    try:
        deadline = time.monotonic() + 20
        while w.messages()["g1", "rad_vis", "hb"] == 0:  # PUB drops until the subscription arrives
            assert time.monotonic() < deadline, "the neighbour never got through"
            neighbour.heartbeat()
            time.sleep(0.01)
        flood.start()
        for i in range(neighbour_n):  # a well-behaved sensor at 300 msg/s, alongside the flood
            neighbour.send_samples("rad_vis", SAMPLES, T0 + i * 10 * MS, MS)
            time.sleep(1 / 300)
        flood.join(30)
        wait_for(lambda: w.messages()["g1", "rad_vis", "rad"] >= neighbour_n)
        if transport == "pull":
            wait_for(lambda: w.messages()["g1", "rad_ir", "rad"] + w.stats.rejected["rate_limited"] >= flood_n, 30)
        else:
            time.sleep(0.5)  # what the PUB did not drop arrives
        elapsed = time.monotonic() - started
        accepted = w.messages()["g1", "rad_ir", "rad"]
        limited = w.stats.rejected["rate_limited"]
        assert accepted <= rate * burst_s + rate * elapsed + 1, (accepted, elapsed)
        if transport == "pull":
            assert accepted + limited == flood_n  # each message is one or the other
        else:
            assert accepted + limited <= flood_n and limited > 0
        assert w.messages()["g1", "rad_vis", "rad"] == neighbour_n  # the neighbour lost nothing
        assert w.tracker.snapshot()["g1/rad_vis"].gaps_detected == 0
        assert dict(+w.stats.rejected) == {"rate_limited": limited}
    finally:
        neighbour.close()
        flooder.close(linger=0)
        wt.finish()
        others.destroy(linger=0)


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


def _parse(rate_limit: dict) -> config_mod.Config:
    raw = tomllib.loads((ROOT / "config.toml").read_text())
    raw["rate_limit"] = rate_limit
    return config_mod.parse(raw)


def test_config_resolves_defaults_then_group_then_sensor_overrides() -> None:
    cfg = _parse(
        {
            "messages_per_s": 50,
            "groups": {"g1": {"messages_per_s": 100, "burst_s": 2.0}},
            "sensors": {"g1/cam_vis": {"bytes_per_s": 5e6}, "g1/rad_ir": {"messages_per_s": 0}},
        }
    )
    limits = cfg.ingest.rate_limits
    assert limits["g1/cam_vis"] == RateLimit(100.0, 5e6, 2.0)
    assert limits["g1/rad_vis"] == limits["g1/cam_ir"] == RateLimit(100.0, 0.0, 2.0)
    assert "g1/rad_ir" not in limits  # its override switched the limit off
    assert _parse({}).ingest.rate_limits == {}


@pytest.mark.parametrize(
    ("rate_limit", "message"),
    [
        ({"groups": {"g9": {"messages_per_s": 1}}}, "rate_limit.groups.g9: not a configured group"),
        ({"sensors": {"g1/nope": {"messages_per_s": 1}}}, 'rate_limit.sensors."g1/nope": not a configured'),
        ({"groups": {"g1": {"messages_per_sec": 1}}}, "rate_limit.groups.g1.messages_per_sec: unknown key"),
        ({"sensors": {"g1/cam_vis": {"bytes_per_s": -1}}}, 'rate_limit.sensors."g1/cam_vis".bytes_per_s: must be'),
        ({"burst_s": 0}, "rate_limit.burst_s: must be > 0"),
        ({"messages_per_s": "fast"}, "rate_limit.messages_per_s: expected"),
    ],
)
def test_config_errors_name_the_key(rate_limit: dict, message: str) -> None:
    with pytest.raises(config_mod.ConfigError, match=message.replace(".", r"\.")):
        _parse(rate_limit)
