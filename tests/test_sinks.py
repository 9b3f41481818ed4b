"""Result sinks against real sockets, files and MCAP recordings (docs/results.md)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import resource
import shutil
import signal
import struct
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import structlog
import zmq
from mcap.exceptions import McapError
from mcap.reader import NonSeekingReader, make_reader

from ingest.windowing import GroupWindower, RadChunk, WindowSpec
from sinks.jsonl import JsonlSink, encode_line, read_jsonl, rotated_paths
from sinks.late import LateSink, late_record
from sinks.mcap_recorder import (
    Damage,
    McapRecorder,
    RawMessage,
    RecordingTruncated,
    decode_raw,
    encode_raw,
    read_recording,
)
from sinks.record import (
    Detection,
    FusionWeights,
    LateRecord,
    RecordError,
    ResultRecord,
    TokenStats,
    final_revisions,
    from_wire,
    to_wire,
)
from sinks.supervisor import RetryPolicy, SinkSupervisor
from sinks.zmq_pub import ZmqResultPublisher

DOCS = Path(__file__).resolve().parents[1] / "docs" / "results.md"
CLASSES = ["star", "stable_satellite", "debris"]
T0 = 1_795_000_000_000_000_000


def make_result(i: int = 0, group: str = "g1", mi: float | None = 0.25) -> ResultRecord:
    """A record whose every field depends on i, so records are distinguishable after a round trip."""
    p = [0.1, 0.7 - 0.001 * (i % 100), 0.2 + 0.001 * (i % 100)]
    return ResultRecord(
        group=group,
        start_ns=T0 + i * 1_000_000_000,
        end_ns=T0 + (i + 1) * 1_000_000_000,
        presence={"image_a": True, "image_b": i % 2 == 0, "seq_a": True, "seq_b": False},
        class_names=list(CLASSES),
        target_probs=p,
        fusion=FusionWeights(
            0.6,
            0.4,
            {"image": TokenStats(1.0, 0.5, 1.5, 8), "sequence": TokenStats(1.0, 0.9, 1.1, 4)},
        ),
        detections=[Detection([10.0 + i, 20.0, 30.5 + i, 41.0], "debris", 0.875, [0.05, 0.15, 0.8])],
        mi_nats=mi,
        latency_s=0.125 + i,
        model_version=f"v{i}",
        revision=i % 3,
        flushed=i % 5 == 4,
    )


# ---------------------------------------------------------------- record


def test_wire_round_trip_through_msgpack_and_json():
    records = [
        make_result(3),
        make_result(4, mi=None),
        LateRecord("g1", "rad_vis", T0 + 5, 7, "closed", T0 + 9, 42),
    ]
    for rec in records:
        wire = to_wire(rec)
        assert from_wire(msgpack.unpackb(msgpack.packb(wire), raw=False)) == rec
        assert from_wire(json.loads(json.dumps(wire, allow_nan=False))) == rec


def test_final_revisions_keep_each_windows_last_revision_in_first_emission_order():
    def rec(i: int, revision: int) -> ResultRecord:
        return dataclasses.replace(make_result(i), revision=revision, model_version=f"v{i}.{revision}")

    stream = [rec(0, 0), rec(1, 0), rec(0, 1), rec(2, 0), rec(1, 1), rec(0, 2), rec(2, 0)]
    got = final_revisions(stream)
    assert [(r.start_ns - T0) // 1_000_000_000 for r in got] == [0, 1, 2]
    assert [r.model_version for r in got] == ["v0.2", "v1.1", "v2.0"]
    # a stale revision arriving after a newer one (another subscriber's replay) does not win
    assert final_revisions([rec(0, 1), rec(0, 0)])[0].revision == 1
    assert final_revisions([]) == []


def test_numpy_scalars_become_plain_python_numbers():
    box = np.array([1, 2, 3, 4], dtype=np.float32)
    det = Detection(box, "star", np.float32(0.5), np.array([0.5, 0.25, 0.25]))
    stats = TokenStats.of(np.array([0.5, 1.0, 1.5], dtype=np.float32))
    assert (stats.mean, stats.min, stats.max, stats.n) == (1.0, 0.5, 1.5, 3)
    flat = TokenStats.of([0.1] * 3)  # a plain mean is 0.10000000000000002 here, above the max
    assert (flat.mean, flat.min, flat.max) == (0.1, 0.1, 0.1)
    rec = ResultRecord(
        "g1", np.int64(T0), np.int64(T0 + 10), {"image_a": True}, CLASSES, np.array([0.2, 0.3, 0.5]),
        FusionWeights(np.float64(0.5), np.float32(0.5), {"image": stats}), [det], np.float32(0.1),
    )  # fmt: skip
    assert type(rec.start_ns) is int and type(rec.fusion.sequence) is float and type(det.score) is float
    assert all(type(x) is float for x in rec.target_probs + det.box + det.class_probs)
    msgpack.packb(to_wire(rec))  # would raise on a numpy scalar


@pytest.mark.parametrize(
    "change, message",
    [
        ({"target_probs": [0.5, 0.5]}, "target_probs has 2 entries"),
        ({"target_probs": [0.5, math.nan, 0.5]}, "must be finite"),
        ({"target_probs": [0.5, 1.5, 0.0]}, r"must be in \[0.0, 1.0\]"),
        ({"end_ns": T0}, "must be > start_ns"),
        ({"revision": True}, "revision must be an int"),
        ({"start_ns": 1.5}, "start_ns must be an int"),
        ({"presence": {"image_a": 1}}, "presence must map str -> bool"),
        ({"detections": [Detection([0, 0, 1, 1], "comet", 0.5, [0.3, 0.3, 0.4])]}, "not in class_names"),
        ({"detections": [Detection([0, 0, 1, 1], "star", 0.5, [1.0])]}, "class_probs has 1 entries"),
        ({"mi_nats": -0.1}, "mi_nats must be in"),
    ],
)
def test_result_record_rejects_bad_values(change, message):
    fields = {f: getattr(make_result(), f) for f in ResultRecord.__dataclass_fields__}
    with pytest.raises(RecordError, match=message):
        ResultRecord(**{**fields, **change})


def test_parts_reject_bad_values():
    with pytest.raises(RecordError, match="x0 <= x1"):
        Detection([5, 0, 1, 1], "star", 0.5, [1.0])
    with pytest.raises(RecordError, match="min <= mean <= max"):
        TokenStats(2.0, 0.5, 1.5, 3)
    with pytest.raises(RecordError, match="unknown modality"):
        FusionWeights(0.5, 0.5, {"audio": TokenStats(1, 1, 1, 1)})
    with pytest.raises(RecordError, match="reason must be one of"):
        LateRecord("g1", "s", 1, 1, "early", 2)


def test_from_wire_rejects_other_schemas_and_missing_fields_but_ignores_extra_keys():
    wire = to_wire(make_result(1))
    assert from_wire({**wire, "future_field": [1, 2]}) == make_result(1)
    with pytest.raises(RecordError, match="unsupported schema 2"):
        from_wire({**wire, "schema": 2})
    with pytest.raises(RecordError, match="missing field 'latency_s'"):
        from_wire({k: v for k, v in wire.items() if k != "latency_s"})
    with pytest.raises(RecordError, match="unknown record kind"):
        from_wire({**wire, "kind": "weather"})


# ---------------------------------------------------------------- documented schema


def _documented_fields() -> dict[str, dict[str, str]]:
    """Section title -> {field path: type} from the tables of docs/results.md §3 and §4."""
    out: dict[str, dict[str, str]] = {}
    section = ""
    for line in DOCS.read_text().splitlines():
        if line.startswith("## "):
            section = line[3:].strip()
            out[section] = {}
        m = re.match(r"^\| `([^`]+)` \| ([a-z|\\]+) \|", line)
        if m:
            out[section][m.group(1)] = m.group(2).replace("\\", "")
    return out


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "map": dict, "array": list, "nil": type(None)}


def _flatten(value: object, path: str, doc: dict[str, str], out: dict[str, set[type]]) -> None:
    out.setdefault(path, set()).add(type(value))
    if isinstance(value, dict):
        for key, child in value.items():
            named = f"{path}.{key}" if path else key
            if named not in doc:  # a map with free keys: its documented child is a <placeholder>
                holders = [d for d in doc if re.fullmatch(re.escape(path) + r"\.<[a-z]+>", d)]
                named = holders[0] if holders else named
            _flatten(child, named, doc, out)
    elif isinstance(value, list):
        for child in value:
            _flatten(child, f"{path}[]", doc, out)


def _assert_documented(wire: dict, doc: dict[str, str]) -> None:
    seen: dict[str, set[type]] = {}
    _flatten(wire, "", doc, seen)
    seen.pop("")
    assert set(seen) == set(doc), f"undocumented: {set(seen) - set(doc)}, never seen: {set(doc) - set(seen)}"
    for path, types in seen.items():
        allowed = {_TYPES[t] for t in doc[path].split("|")}
        assert types <= allowed, f"{path}: got {types}, documented {doc[path]}"


def test_docs_example_is_a_valid_record_with_every_documented_field():
    example = re.search(r"```json\n(.*?)```", DOCS.read_text(), re.S).group(1)
    wire = json.loads(example)
    _assert_documented(wire, _documented_fields()["3. Result record"])
    rec = from_wire(wire)
    assert isinstance(rec, ResultRecord) and to_wire(rec) == wire


def test_docs_list_every_late_field_with_its_type():
    doc = _documented_fields()["4. Late record"]
    _assert_documented(to_wire(LateRecord("g1", "cam_ir", T0, 1, "expired", T0 + 3, 9)), doc)
    _assert_documented(to_wire(LateRecord("g1", "cam_ir", T0, 1, "expired", T0 + 3)), doc)


# ---------------------------------------------------------------- ZeroMQ


def _recv_all(sub: zmq.Socket, n: int, timeout_s: float = 10.0) -> list[list[bytes]]:
    out = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        if sub.poll(100):
            out.append(sub.recv_multipart())
    return out


def test_subscriber_receives_records_with_the_documented_schema(ctx, endpoint):
    pub = ZmqResultPublisher(endpoint, bind=True, context=ctx, sndhwm=100, linger_ms=100)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"det/g1")
    sub.connect(pub.endpoint)
    # Slow joiner: repeat a probe until the subscription has reached the publisher.
    probe = make_result(0)
    while not sub.poll(20):
        pub.write(probe)
    while sub.poll(50):
        sub.recv_multipart()
    records = [make_result(i, mi=None if i == 2 else 0.3) for i in range(1, 6)]
    for rec in records:
        pub.write(rec)
        pub.write(make_result(i=99, group="g2"))  # filtered out by the publisher
    got = _recv_all(sub, len(records))
    assert not sub.poll(100), "a det/g2 message leaked through the det/g1 subscription"
    doc = _documented_fields()["3. Result record"]
    assert len(got) == len(records)
    for frames, rec in zip(got, records, strict=True):
        assert len(frames) == 2 and frames[0] == b"det/g1"
        wire = msgpack.unpackb(frames[1], raw=False)  # what a third party decodes, no sacmf code
        _assert_documented(wire, doc)
        assert (wire["group"], wire["start_ns"], wire["end_ns"]) == ("g1", rec.start_ns, rec.end_ns)
        assert from_wire(wire) == rec
    pub.close()
    sub.close()


def test_publisher_never_blocks_and_closes_promptly_with_an_unreachable_peer():
    with zmq.Context() as probe_ctx:  # find a port nobody listens on
        s = probe_ctx.socket(zmq.REP)
        port = s.bind_to_random_port("tcp://127.0.0.1")
        s.close(linger=0)
    pub = ZmqResultPublisher(f"tcp://127.0.0.1:{port}", bind=False, sndhwm=10, linger_ms=200)
    t = time.monotonic()
    for i in range(2000):
        pub.write(make_result(i))
    write_s = time.monotonic() - t
    t = time.monotonic()
    pub.close()
    close_s = time.monotonic() - t
    assert pub.sent == 2000
    assert write_s < 5.0 and close_s < 3.0, (write_s, close_s)
    with pytest.raises(RuntimeError, match="closed"):
        pub.write(make_result(0))


# ---------------------------------------------------------------- JSONL


def test_jsonl_rotation_keeps_every_record_in_order(tmp_path):
    path = tmp_path / "results.jsonl"
    sink = JsonlSink(path, max_bytes=4096, backups=100, fsync="never")
    records = [make_result(i) for i in range(120)]
    for rec in records:
        sink.write(rec)
    sink.close()
    assert sink.rotations >= 10
    files = [p for p in rotated_paths(path, 100) if p.exists()]
    assert len(files) == sink.rotations + 1
    for p in files:
        assert p.stat().st_size <= 4096
        assert p.read_bytes().endswith(b"\n")
    assert [from_wire(d) for d in read_jsonl(path, backups=100)] == records


def test_jsonl_rotation_caps_the_number_of_files_and_keeps_the_newest(tmp_path):
    path = tmp_path / "results.jsonl"
    sink = JsonlSink(path, max_bytes=2048, backups=2, fsync="always")
    for i in range(100):
        sink.write(make_result(i))
    sink.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "results.jsonl",
        "results.jsonl.1",
        "results.jsonl.2",
    ]
    kept = [d["latency_s"] for d in read_jsonl(path, backups=5)]
    n = len(kept)
    assert 3 <= n < 100
    assert kept == [make_result(i).latency_s for i in range(100 - n, 100)]  # a contiguous newest suffix


def test_jsonl_reopens_when_the_file_is_moved_away(tmp_path):
    path = tmp_path / "results.jsonl"
    sink = JsonlSink(path, max_bytes=10**6)
    sink.write(make_result(0))
    os.rename(path, tmp_path / "moved.jsonl")  # an external logrotate
    sink.write(make_result(1))
    sink.close()
    assert [d["model_version"] for d in read_jsonl(tmp_path / "moved.jsonl")] == ["v0"]
    assert [d["model_version"] for d in read_jsonl(path)] == ["v1"]


def test_jsonl_write_that_fails_half_way_leaves_no_partial_line(tmp_path):
    path = tmp_path / "results.jsonl"
    sink = JsonlSink(path, max_bytes=10**6, fsync="never")
    sink.write(make_result(0))
    size = path.stat().st_size
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 100, hard))  # "disk full" 100 bytes further
        with pytest.raises(OSError):
            sink.write(make_result(1))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.stat().st_size == size
    sink.write(make_result(2))
    sink.close()
    assert [d["model_version"] for d in read_jsonl(path)] == ["v0", "v2"]


def test_jsonl_cuts_a_torn_last_line_when_it_reopens_the_file(tmp_path):
    """Power loss under fsync "rotate" can leave half a line: the next record must not be glued to it."""
    path = tmp_path / "results.jsonl"
    sink = JsonlSink(path, max_bytes=10**6)
    for i in range(2):
        sink.write(make_result(i))
    sink.close()
    os.truncate(path, path.stat().st_size - 40)
    assert [d["model_version"] for d in read_jsonl(path)] == ["v0"]  # the torn line is skipped, not fatal
    with structlog.testing.capture_logs() as logs:
        sink = JsonlSink(path, max_bytes=10**6)
    for i in (2, 3):
        sink.write(make_result(i))
    sink.close()
    assert [d["model_version"] for d in read_jsonl(path)] == ["v0", "v2", "v3"]
    assert sink.torn_bytes_dropped > 0
    assert [e["bytes"] for e in logs if e["event"] == "jsonl_torn_tail_dropped"] == [sink.torn_bytes_dropped]


def test_jsonl_follows_a_file_truncated_in_place(tmp_path):
    """logrotate's copytruncate empties the file under the open descriptor: the next write must not
    rotate an empty file into the backups, and a failed write must not grow the file back with zeros."""
    path = tmp_path / "results.jsonl"
    line = min(len(encode_line(make_result(i))) for i in range(18))
    sink = JsonlSink(path, max_bytes=20 * line, backups=2, fsync="never")
    for i in range(15):
        sink.write(make_result(i))
    os.truncate(path, 0)
    sink.write(make_result(15))
    assert sink.rotations == 0 and not path.with_name("results.jsonl.1").exists()
    os.truncate(path, 0)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (line // 2, hard))  # "disk full" mid-line
        with pytest.raises(OSError):
            sink.write(make_result(16))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.stat().st_size == 0  # cut back to where the file really ended
    sink.write(make_result(17))
    sink.close()
    assert [d["model_version"] for d in read_jsonl(path)] == ["v17"]


def test_jsonl_fsyncs_the_directory_after_creating_or_rotating_a_file(tmp_path, monkeypatch):
    """A rename or a new file is durable only once its directory is flushed."""
    real_fsync, dirs = os.fsync, []

    def spy(fd: int) -> None:
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            dirs.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "results.jsonl"
    line = max(len(encode_line(make_result(i))) for i in range(5))
    sink = JsonlSink(path, max_bytes=2 * line, backups=1, fsync="rotate")  # two records per file
    assert dirs == [str(tmp_path)]  # created
    for i in range(5):
        sink.write(make_result(i))
    sink.close()
    assert sink.rotations == 2 and dirs == [str(tmp_path)] * 3
    JsonlSink(tmp_path / "never.jsonl", fsync="never").close()
    assert len(dirs) == 3


def test_jsonl_rejects_bad_options(tmp_path):
    with pytest.raises(ValueError, match="fsync"):
        JsonlSink(tmp_path / "a", fsync="sometimes")
    with pytest.raises(ValueError, match="max_bytes"):
        JsonlSink(tmp_path / "a", max_bytes=0)
    with pytest.raises(FileNotFoundError):
        JsonlSink(tmp_path / "missing_dir" / "a")


# ---------------------------------------------------------------- late data


def test_late_sink_records_what_the_windower_reports_late(tmp_path):
    sink = LateSink(tmp_path / "late.jsonl")
    spec = WindowSpec(size_ns=1000, mode="replay")
    recv = [T0]

    def on_late(group, sensor, item, reason):
        sink.write(late_record(group, sensor, item, reason, recv[0]))

    win = GroupWindower("g1", {"rad_vis": "seq_a"}, spec, on_late=on_late)
    ones = np.ones(5, dtype=np.float32)
    win.add_samples(RadChunk("rad_vis", 0, 0, 10, ones), T0)
    fired = win.add_samples(RadChunk("rad_vis", 1, 5000, 10, ones), T0)
    assert [w.start_ns for w in fired] == [0]
    recv[0] = T0 + 77
    win.add_samples(RadChunk("rad_vis", 2, 100, 10, ones[:3]), T0 + 77)  # its window [0, 1000) has fired
    win.add_samples(RadChunk("rad_vis", 3, 2000, 10, ones[:2]), T0 + 77)  # [2000, 3000) never opened
    with pytest.raises(TypeError, match="LateRecord"):
        sink.write(make_result(0))
    sink.close()
    got = [from_wire(d) for d in read_jsonl(tmp_path / "late.jsonl")]
    assert got == [
        LateRecord("g1", "rad_vis", 100, 3, "closed", T0 + 77, 2),
        LateRecord("g1", "rad_vis", 2000, 2, "expired", T0 + 77, 3),
    ]


# ---------------------------------------------------------------- MCAP


def _header(kind: str, sensor: str, seq: int | None, t_ns: int, **extra: object) -> bytes:
    h = {"v": 1, "kind": kind, "group": "g1", "sensor": sensor, "session": 2**63 + 5, "t_ns": t_ns, **extra}
    if seq is not None:
        h["seq"] = seq
    return msgpack.packb(h)


def _inputs() -> list[tuple[list[bytes], int, int, int]]:
    """(frames, recv_ns, expected publish_time, expected sequence) for valid and malformed messages."""
    rng = np.random.default_rng(7)
    img = rng.integers(0, 65535, size=(16, 24), dtype=np.uint16).tobytes()
    rad = rng.normal(size=100).astype(np.float32).tobytes()
    seq_big = 2**32 + 17
    # A valid header that our msgpack would encode differently (seq as uint64 although it fits a byte):
    odd_header = b"\x82\xa4t_ns\xcf" + (T0 + 9).to_bytes(8, "big") + b"\xa3seq\xcf" + (3).to_bytes(8, "big")
    img_header = _header("img", "cam_vis", 0, T0 + 1, exp_ns=5, shape=[16, 24], dtype="uint16")
    rad_header = _header("rad", "rad_vis", seq_big, T0 + 2, dt_ns=10, n=100, dtype="float32")
    return [
        ([b"img/g1/cam_vis", img_header, img], T0 + 100, T0 + 1, 0),
        ([b"rad/g1/rad_vis", rad_header, rad], T0 + 101, T0 + 2, 17),  # sequence = seq mod 2**32
        ([b"hb/g1/cam_vis", _header("hb", "cam_vis", None, T0 + 3, last_seq=0)], T0 + 102, T0 + 3, 0),
        ([b"img/g1/cam_ir", odd_header, b""], T0 + 103, T0 + 9, 3),
        ([b"\xff\xfeimg", b"\x93\x01", b"a", b"b", b"c"], T0 + 104, T0 + 104, 0),  # bad topic, bad header
        ([b"rad/g1/rad_ir"], T0 + 105, T0 + 105, 0),  # topic only
        ([b"rad/g1/rad_ir", b"\xc1"], T0 + 106, T0 + 106, 0),  # 0xc1 is never valid msgpack
    ]  # fmt: skip


def test_raw_codec_reproduces_frames_byte_for_byte_and_splices_the_header():
    for frames, *_ in _inputs():
        topic, data, _ = encode_raw(frames)
        assert decode_raw(topic, data) == frames
    frames = _inputs()[0][0]
    _, data, _ = encode_raw(frames)
    plain = msgpack.unpackb(data, raw=False)  # a generic reader sees the header as a map
    assert plain["header"] == msgpack.unpackb(frames[1], raw=False) and plain["payload"] == frames[2]
    assert data.count(frames[1]) == 1  # spliced verbatim, not re-encoded


def test_mcap_round_trip_reproduces_frames_and_times_and_opens_with_the_standard_reader(tmp_path):
    path = tmp_path / "rec.mcap"
    inputs = _inputs()
    results = [make_result(i) for i in range(3)]
    late = LateRecord("g1", "rad_vis", T0 + 5, 4, "closed", T0 + 200, 2**32 + 1)
    rec = McapRecorder(path, chunk_size=4096)
    for frames, recv_ns, _, _ in inputs:
        rec.write(RawMessage([memoryview(f) for f in frames], recv_ns))  # zero-copy frames are accepted
    for i, r in enumerate(results):
        rec.record_result(r, log_time_ns=T0 + 300 + i)
    rec.write(late)
    rec.close()
    rec.close()  # idempotent

    got = list(read_recording(path))
    expected_inputs = [(f[0].decode("utf-8", "replace"), recv, pub, f) for f, recv, pub, _ in inputs]
    assert got[: len(inputs)] == expected_inputs
    assert got[len(inputs) : -1] == [("det/g1", T0 + 300 + i, r.end_ns, r) for i, r in enumerate(results)]
    assert got[-1] == ("late/g1", T0 + 200, T0 + 5, late)

    with open(path, "rb") as fh:
        reader = make_reader(fh)
        summary = reader.get_summary()
        assert summary is not None and summary.statistics.message_count == len(inputs) + len(results) + 1
        msgs = list(reader.iter_messages(log_time_order=False))
    assert all(ch.message_encoding == "msgpack" and ch.schema_id == 0 and s is None for s, ch, _ in msgs)
    std = [(ch.topic, m.log_time, m.publish_time, m.sequence) for _, ch, m in msgs]
    topics = ["_other" if i == 4 else f[0].decode() for i, (f, *_) in enumerate(inputs)]
    expected = [(t, recv, pub, seq) for t, (_, recv, pub, seq) in zip(topics, inputs, strict=True)]
    assert std[: len(inputs)] == expected
    assert std[len(inputs) :] == [("det/g1", T0 + 300 + i, r.end_ns, i) for i, r in enumerate(results)] + [
        ("late/g1", T0 + 200, T0 + 5, 1)
    ]
    det = msgpack.unpackb(msgs[len(inputs)][2].data, raw=False)
    assert det == msgpack.unpackb(msgpack.packb(to_wire(results[0])), raw=False)


def test_a_new_recorder_keeps_the_earlier_recording_at_its_path(tmp_path):
    """A daemon restarted after a crash opens the same mcap_path: it truncated the crash's recording, the
    one file that shows what led to it. The earlier file is kept, named by its last write; an empty one
    (a recorder that died at once) is reused."""
    path = tmp_path / "rec.mcap"
    crashed = McapRecorder(path, flush_interval_s=0.0)
    crashed.record_input([b"rad/g1/rad_vis", _header("rad", "rad_vis", 0, T0, dt_ns=1, n=2, dtype="float32"),
                          bytes(8)], T0)  # fmt: skip
    before = path.read_bytes()  # the writer never finished: no footer, as after a kill -9
    os.utime(path, (1_796_000_000, 1_796_000_000))
    second = McapRecorder(path)
    assert second.earlier == tmp_path / "rec.20261130T005320Z.mcap"
    assert second.earlier.read_bytes() == before and len(list(read_recording(second.earlier))) == 1
    second.close()
    os.utime(path, (1_796_000_000, 1_796_000_000))  # the same second: a second name, nothing replaced
    third = McapRecorder(path)
    assert third.earlier == tmp_path / "rec.20261130T005320Z-1.mcap"
    third.close()
    crashed.close()
    path.write_bytes(b"")
    assert McapRecorder(path).earlier is None and sorted(p.name for p in tmp_path.iterdir()) == [
        "rec.20261130T005320Z-1.mcap", "rec.20261130T005320Z.mcap", "rec.mcap"]  # fmt: skip


def _chunk_offsets(data: bytes) -> list[int]:
    """Byte offsets of the top-level chunk records of an MCAP file (opcode 6), by its length framing."""
    out, pos = [], 8
    while pos + 9 <= len(data):
        opcode, length = struct.unpack_from("<BQ", data, pos)
        if opcode == 6:
            out.append(pos)
        if opcode == 2:  # footer
            break
        pos += 9 + length
    return out


def _write_rad(rec: McapRecorder, n: int) -> list[bytes]:
    payloads = [os.urandom(64) for _ in range(n)]
    for i, p in enumerate(payloads):
        rec.record_input([b"rad/g1/rad_vis", _header("rad", "rad_vis", i, T0 + i, dt_ns=1, n=16, dtype="float32"), p],
                         T0 + 1000 + i)  # fmt: skip
    return payloads


def test_a_corrupt_chunk_mid_file_costs_only_its_own_messages_and_is_reported(tmp_path):
    """One flipped bit in chunk 2 of 6 of a cleanly closed recording: the reader stopped there as at a
    crash's torn tail, with a warning, and a replay of the rest exited 0. The other chunks are read,
    the damage is counted (chunks, messages by the indexes after them) and logged as an error."""
    path = tmp_path / "rec.mcap"
    rec = McapRecorder(path, flush_interval_s=0.0)  # one chunk per message
    payloads = _write_rad(rec, 6)
    rec.close()
    data = bytearray(path.read_bytes())
    chunks = _chunk_offsets(bytes(data))
    assert len(chunks) == 6
    data[chunks[1] + 120] ^= 0x10  # inside the compressed records of the second chunk
    path.write_bytes(bytes(data))
    damage = Damage()
    got = [r.body[2] for r in read_recording(path, damage=damage)]
    assert got == payloads[:1] + payloads[2:]
    assert (damage.chunks, damage.messages, damage.tail_from, damage.truncated) == (1, 1, None, False)
    assert damage.lost and "1 corrupt chunk(s) skipped, 1 message(s)" in damage.describe()


@pytest.mark.parametrize("finished", [True, False])
def test_a_corrupt_chunk_holding_a_channels_definition_costs_only_its_messages(tmp_path, finished: bool):
    """The recorder defines each channel in the chunk where it is first used: skipping that chunk left the
    channel unknown, and the next message on it ended the whole read ("message on unknown channel")."""
    path = tmp_path / "rec.mcap"
    rec = McapRecorder(path, flush_interval_s=0.0)  # one chunk per message; the first defines the channel
    payloads = _write_rad(rec, 6)
    unfinished = path.read_bytes()
    rec.close()
    data = bytearray(path.read_bytes() if finished else unfinished)
    data[_chunk_offsets(bytes(data))[0] + 120] ^= 0x10
    path.write_bytes(bytes(data))
    damage = Damage()
    got = [r.body[2] for r in read_recording(path, damage=damage)]
    if finished:  # the summary names every channel: only the corrupt chunk's message is lost
        assert got == payloads[1:] and (damage.chunks, damage.messages) == (1, 1)
    else:  # no summary: the channel stays unknown; its messages are counted lost, not an error
        assert got == [] and damage.chunks == 1 and damage.messages == 6 and damage.lost


def test_recordings_sacmf_cannot_decode_are_clear_errors_and_inputs_need_no_results(tmp_path):
    """Results of a newer schema stopped a replay, which needs only the inputs; and a channel that is
    not sacmf's was accepted when it held no message."""
    from mcap.writer import Writer

    path = tmp_path / "newer.mcap"
    rec = McapRecorder(path)
    payloads = _write_rad(rec, 3)
    rec.close()
    newer = tmp_path / "newer2.mcap"
    with newer.open("wb") as fh:  # the same inputs plus a result from a future schema
        w = Writer(fh)
        w.start()
        inputs = w.register_channel("rad/g1/rad_vis", "msgpack", 0, {"sacmf": "input"})
        for r in read_recording(path):
            w.add_message(inputs, log_time=r.log_time, data=encode_raw(r.body)[1], publish_time=r.publish_time)
        det = w.register_channel("det/g1", "msgpack", 0, {"sacmf": "result"})
        w.add_message(det, log_time=T0, data=msgpack.packb({"kind": "result", "schema": 2}), publish_time=T0)
        w.finish()
    assert [r.body[2] for r in read_recording(newer, contents=("input",))] == payloads
    with pytest.raises(McapError, match="cannot decode a message on channel 'det/g1'.*schema 2"):
        list(read_recording(newer))
    for name, encoding, metadata, message in (("json.mcap", "json", {"sacmf": "result"}, True),
                                              ("foreign.mcap", "msgpack", {}, False)):  # fmt: skip
        with (tmp_path / name).open("wb") as fh:
            w = Writer(fh)
            w.start()
            ch = w.register_channel("det/g1", encoding, 0, metadata)
            if message:
                w.add_message(ch, log_time=1, data=b"{}", publish_time=1)
            w.finish()
        with pytest.raises(McapError, match="not msgpack" if message else "not a sacmf channel"):
            list(read_recording(tmp_path / name))


def test_unfinished_mcap_yields_every_message_before_the_cut(tmp_path):
    path = tmp_path / "crash.mcap"
    rec = McapRecorder(path, flush_interval_s=0.0)  # every message closes its chunk
    payloads = [os.urandom(200 + 13 * i) for i in range(30)]
    ends = []  # file size once message i is on disk (chunk + its message index)
    for i, p in enumerate(payloads):
        header = _header("rad", "rad_vis", i, T0 + i, dt_ns=1, n=50, dtype="float32")
        rec.record_input([b"rad/g1/rad_vis", header, p], T0 + 1000 + i)
        ends.append(path.stat().st_size)
    crashed = path.read_bytes()  # the writer never finished: no summary, no footer
    rec.close()
    for cut in (len(crashed), ends[20] - 1, ends[9] + 7, ends[0] - 1, 30):
        cut_path = tmp_path / f"cut{cut}.mcap"
        cut_path.write_bytes(crashed[:cut])
        got = list(read_recording(cut_path))
        complete = sum(e <= cut for e in ends)
        # A message whose chunk is complete but whose index was cut is recovered too.
        assert complete <= len(got) <= complete + 1, (cut, complete, len(got))
        assert [g.body[2] for g in got] == payloads[: len(got)]
        assert [g.log_time for g in got] == [T0 + 1000 + i for i in range(len(got))]
        with pytest.raises(RecordingTruncated):  # every cut, even the whole file, lacks the footer
            list(read_recording(cut_path, strict=True))
        # mcap's own linear scan recovers the same prefix before it reports the damaged tail.
        std = []
        with open(cut_path, "rb") as fh:
            try:
                for _, _, m in NonSeekingReader(fh).iter_messages(log_time_order=False):
                    std.append(m.log_time)
            except (McapError, struct.error):
                pass
            else:
                pytest.fail("mcap read an unfinished file without noticing")
        assert std == [g.log_time for g in got]


def test_recorder_flush_interval_bounds_what_a_crash_loses(tmp_path):
    path = tmp_path / "slow.mcap"
    rec = McapRecorder(path, flush_interval_s=3600.0)
    rec.record_input([b"hb/g1/cam_vis", _header("hb", "cam_vis", None, T0, last_seq=None)], T0)
    (tmp_path / "a.mcap").write_bytes(path.read_bytes())
    assert list(read_recording(tmp_path / "a.mcap")) == []  # still in the writer's chunk buffer
    rec.flush()
    (tmp_path / "b.mcap").write_bytes(path.read_bytes())
    assert [g.log_time for g in read_recording(tmp_path / "b.mcap")] == [T0]
    rec.close()


def test_recorder_writes_out_a_quiet_stream_within_the_flush_interval(tmp_path):
    """No new message arrives to trigger the flush: the last results still reach the file in time."""
    path = tmp_path / "quiet.mcap"
    rec = McapRecorder(path, flush_interval_s=0.2)
    for i in range(3):
        rec.record_result(make_result(i))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(list(read_recording(path))) < 3:
        time.sleep(0.05)
    assert [g.body for g in read_recording(path)] == [make_result(i) for i in range(3)]  # before close
    rec.close()


def test_mcap_full_disk_leaves_no_torn_chunk_and_retries_neither_duplicate_nor_lose(tmp_path):
    """The disk fills in the middle of a chunk: the file is cut back to its last whole chunk, the message
    being recorded waits in memory, and later ones are refused (their sender retries them) until there is
    space again. Then every message is in the file exactly once, and the standard reader agrees."""
    path = tmp_path / "full.mcap"
    rec = McapRecorder(path, flush_interval_s=0.0, compression="none")  # every message closes its chunk
    payloads = [os.urandom(3000) for _ in range(25)]

    def record(i: int) -> None:
        header = _header("rad", "rad_vis", i, T0 + i, dt_ns=1, n=750, dtype="float32")
        rec.record_input([b"rad/g1/rad_vis", header, payloads[i]], T0 + 1000 + i)

    for i in range(10):
        record(i)
    size = path.stat().st_size
    refused = []
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 4500, hard))  # one more chunk fits, the next is cut
        for i in range(10, 20):
            try:
                record(i)
            except OSError:
                refused.append(i)
        assert refused and refused == list(range(refused[0], 20))  # the disk did fill, and stayed full
        during = [g.body[2] for g in read_recording(path)]  # a clean prefix: the torn chunk was cut away
        assert during == payloads[: refused[0] - 1]  # the message before the first refusal waits in memory
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    for i in refused:  # space again: the retries
        record(i)
    for i in range(20, 25):
        record(i)
    rec.close()
    order = [i for i in range(20) if i not in refused] + refused + list(range(20, 25))
    assert [g.body[2] for g in read_recording(path, strict=True)] == [payloads[i] for i in order]
    with open(path, "rb") as fh:
        std = [m.log_time for _, _, m in make_reader(fh).iter_messages(log_time_order=False)]
    assert std == [T0 + 1000 + i for i in order]


# ---------------------------------------------------------------- supervisor


class ListSink:
    def __init__(self, name: str) -> None:
        self.name = name
        self.records: list = []
        self.closed_by: str | None = None

    def write(self, record) -> None:
        self.records.append(record)

    def close(self) -> None:
        self.closed_by = threading.current_thread().name


class RaisingSink:
    name = "raiser"

    def __init__(self) -> None:
        self.calls = 0

    def write(self, record) -> None:
        self.calls += 1
        raise RuntimeError("bug in a sink")

    def close(self) -> None:
        pass


class HungSink:
    """A peer that never answers: write blocks until released."""

    name = "hung"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, record) -> None:
        self.entered.set()
        self.release.wait(30)

    def close(self) -> None:
        pass


class FlakySink:
    """Fails until ``healthy`` is set; remembers when each attempt happened."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.healthy = threading.Event()
        self.attempts: list[float] = []
        self.records: list = []

    def write(self, record) -> None:
        self.attempts.append(time.monotonic())
        if not self.healthy.is_set():
            raise OSError(28, "No space left on device")
        self.records.append(record)

    def close(self) -> None:
        pass


def _wait_for(cond, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def test_retry_policy_grows_exponentially_and_is_capped():
    policy = RetryPolicy(base_s=0.1, cap_s=1.0, max_attempts=3)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5, 500)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    with pytest.raises(ValueError):
        RetryPolicy(base_s=0.5, cap_s=0.1)


def test_supervisor_keeps_feeding_healthy_sinks_while_others_fail(tmp_path):
    gone_dir = tmp_path / "mount"
    gone_dir.mkdir()
    dir_path = tmp_path / "as_dir.jsonl"
    healthy, raiser, hung = ListSink("healthy"), RaisingSink(), HungSink()
    vanishing = JsonlSink(gone_dir / "out.jsonl", name="vanishing", fsync="never")
    becomes_dir = JsonlSink(dir_path, name="becomes_dir", fsync="never")
    queue_size = 16
    sup = SinkSupervisor(
        [healthy, raiser, hung, vanishing, becomes_dir],
        queue_size=queue_size,
        retry=RetryPolicy(base_s=0.002, cap_s=0.02, max_attempts=3),
        log_interval_s=60.0,
    )
    records = [make_result(i) for i in range(120)]
    submit_s = []
    with structlog.testing.capture_logs() as logs:
        sup.submit(records[0])
        hung.entered.wait(5)
        for i, r in enumerate(records[1:20], start=2):  # paced: no queue overflow before the fault
            sup.submit(r)
            _wait_for(lambda i=i: sup.written["vanishing"] == i and sup.written["becomes_dir"] == i)

        shutil.rmtree(gone_dir)  # the mount disappears
        dir_path.unlink()
        dir_path.mkdir()  # the path now names a directory: every open fails with an OSError
        for i, r in enumerate(records[20:60], start=21):
            t = time.monotonic()
            sup.submit(r)
            submit_s.append(time.monotonic() - t)
            _wait_for(lambda i=i: len(healthy.records) == i)  # the healthy sink keeps up, record by record
        _wait_for(lambda: sup.failed["vanishing"] >= 3 and sup.failed["becomes_dir"] >= 3)
        assert sup.written["vanishing"] == 20 and sup.written["becomes_dir"] == 20

        gone_dir.mkdir()  # the faults clear
        dir_path.rmdir()
        for i, r in enumerate(records[60:], start=61):
            sup.submit(r)
            _wait_for(lambda i=i: len(healthy.records) == i)
        _wait_for(lambda: sup.written["vanishing"] > 20 and sup.written["becomes_dir"] > 20)
        assert healthy.records == records
        assert hung.entered.is_set() and sup.queue_depths()["hung"] == queue_size

        t = time.monotonic()
        clean = sup.close(timeout=1.5)
        close_s = time.monotonic() - t

    assert max(submit_s) < 0.5  # a hung sink and failing disks never block the caller
    assert not clean and close_s < 10.0  # the hung sink could not drain in time
    assert sup.dropped["hung"] == len(records) - 1 - queue_size
    # counted by close() while the worker is still stuck: the queue and the record inside write()
    assert sup.abandoned["hung"] == queue_size + 1
    assert sup.errors["raiser"] == raiser.calls and sup.failed["raiser"] >= 1
    assert sup.errors["vanishing"] >= 9 and sup.errors["becomes_dir"] >= 9

    def accounted(name: str) -> int:
        return sup.written[name] + sup.failed[name] + sup.dropped[name] + sup.abandoned[name]

    assert {name: accounted(name) for name in sup.names} == dict.fromkeys(sup.names, len(records))
    # After recovery the files hold whole records in order, the newest included (older ones were
    # written before the fault, into the file that vanished or was replaced).
    for path in (gone_dir / "out.jsonl", dir_path):
        got = [from_wire(d).start_ns for d in read_jsonl(path)]
        assert got and got[-1] == records[-1].start_ns and got == sorted(set(got))
        assert got[0] >= records[20].start_ns
    assert healthy.closed_by == "sink-healthy"
    hung.release.set()  # the write returns after all: the record was counted once already
    _wait_for(lambda: sup._lanes["hung"].done.is_set())
    assert sup.written["hung"] == 0 and accounted("hung") == len(records)
    failures = [e for e in logs if e["event"] == "sink_write_failed"]
    assert sorted(e["sink"] for e in failures) == ["becomes_dir", "raiser", "vanishing"]  # rate limited
    assert {e["sink"] for e in logs if e["event"] == "sink_recovered"} == {"becomes_dir", "vanishing"}


def test_supervisor_backs_off_exponentially_and_recovers_when_the_fault_clears():
    flaky = FlakySink("disk")
    base = 0.02
    sup = SinkSupervisor([flaky], retry=RetryPolicy(base_s=base, cap_s=0.08, max_attempts=100))
    sup.submit("r0")
    _wait_for(lambda: len(flaky.attempts) >= 6)
    flaky.healthy.set()
    sup.submit("r1")
    assert sup.close(timeout=10.0)
    assert flaky.records == ["r0", "r1"]
    gaps = np.diff(flaky.attempts[:6])
    expected = [min(0.08, base * 2**k) for k in range(5)]  # 0.02, 0.04, 0.08, 0.08, 0.08
    assert all(g >= 0.9 * e for g, e in zip(gaps, expected, strict=True)), (gaps, expected)
    assert sup.errors["disk"] == len(flaky.attempts) - 2 and sup.failed["disk"] == 0


def test_supervisor_close_drains_and_closes_every_sink_from_its_worker():
    sinks = [ListSink("a"), ListSink("b")]
    sup = SinkSupervisor(sinks, queue_size=1000)
    for i in range(500):
        sup.submit(i)
    assert sup.close(timeout=10.0)
    assert all(s.records == list(range(500)) and s.closed_by == f"sink-{s.name}" for s in sinks)
    with pytest.raises(RuntimeError, match="closed"):
        sup.submit(1)
    with pytest.raises(ValueError, match="unique"):
        SinkSupervisor([ListSink("x"), ListSink("x")])


def test_supervisor_close_cuts_a_running_backoff_wait_short_at_its_deadline():
    """A sink failing for a while waits seconds between attempts; a close that begins during such a
    wait ends the wait at its deadline and closes the sink, instead of sleeping the wait out."""
    flaky = FlakySink("disk")
    sup = SinkSupervisor([flaky], retry=RetryPolicy(base_s=0.4, cap_s=5.0, max_attempts=100))
    sup.submit("r0")
    _wait_for(lambda: len(flaky.attempts) >= 3)  # waited 0.4 s and 0.8 s; now waiting 1.6 s
    t = time.monotonic()
    clean = sup.close(timeout=0.5)
    took = time.monotonic() - t
    assert clean and took < 1.0 and sup._lanes["disk"].done.is_set()
    assert (sup.failed["disk"], sup.written["disk"], len(flaky.attempts)) == (1, 0, 3)


class SkippingSink(ListSink):
    """Writes every other record; the rest it skips on purpose (as the PNG sink's rate limit does)."""

    def write(self, record) -> bool | None:
        if record % 2:
            return False
        self.records.append(record)
        return None


def test_supervisor_counts_skipped_records_apart_and_logs_the_last_attempt_and_abandoned_ones():
    skipping = SkippingSink("skip")
    sup = SinkSupervisor([skipping, RaisingSink()], retry=RetryPolicy(base_s=0.01, cap_s=0.01, max_attempts=1))
    with structlog.testing.capture_logs() as logs:
        for i in range(10):
            sup.submit(i)
        assert sup.close(timeout=10.0)
    assert (sup.written["skip"], sup.skipped["skip"], skipping.records) == (5, 5, [0, 2, 4, 6, 8])
    assert (sup.written["raiser"], sup.skipped["raiser"], sup.failed["raiser"]) == (0, 0, 10)
    (failed,) = [e for e in logs if e["event"] == "sink_write_failed"]  # rate limited to one line
    assert failed["record_failed"] is True and "retry_in_s" not in failed  # max_attempts 1: no retry follows
    assert not [e for e in logs if e["event"] == "sink_recovered"]

    hung = HungSink()
    sup = SinkSupervisor([hung])
    with structlog.testing.capture_logs() as logs:
        for i in range(3):
            sup.submit(i)
        hung.entered.wait(5)
        assert not sup.close(timeout=0.2)
        assert not sup.close(timeout=0.2)  # a second close counts nothing again
    hung.release.set()
    assert sup.abandoned["hung"] == 3
    assert [(e["sink"], e["records"]) for e in logs if e["event"] == "sink_records_abandoned"] == [("hung", 3)]


def test_jsonl_rotation_that_fails_keeps_writing_into_the_live_file_and_retries(tmp_path, monkeypatch):
    """A backup name taken by a directory made every rotation, and with it every later record, fail."""
    from sinks import jsonl

    monkeypatch.setattr(jsonl, "ROTATE_RETRY_S", 0.0)  # retry at the next record instead of 30 s later
    path = tmp_path / "r.jsonl"
    (tmp_path / "r.jsonl.2").mkdir()
    (tmp_path / "r.jsonl.2" / "x").write_text("in the way")
    records = [make_result(i) for i in range(10)]
    sink = JsonlSink(path, max_bytes=sum(len(encode_line(r)) for r in records[:2]), backups=2, fsync="never")
    with structlog.testing.capture_logs() as logs:
        for rec in records[:6]:
            sink.write(rec)
        assert sink.rotation_failures == 4 and sink.rotations == 0
        assert [from_wire(d) for d in read_jsonl(path)] == records[:6]  # all in the live file, past max_bytes
        shutil.rmtree(tmp_path / "r.jsonl.2")  # the fault clears: the next rotation goes through
        for rec in records[6:]:
            sink.write(rec)
    sink.close()
    assert sink.rotations >= 1 and [e["event"] for e in logs].count("jsonl_rotation_failed") == 4
    got = [from_wire(d) for d in read_jsonl(path, backups=2)]  # files beyond backups=2 go, by design
    assert got == records[-len(got) :] and len(got) >= 3
