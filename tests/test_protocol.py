"""Wire protocol v1: encoding, decoding and every rejection reason."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest import protocol
from ingest.protocol import Limits, ProtocolError, decode


def img_msg(image: np.ndarray, **over) -> list[bytes]:
    h = {"v": 1, "kind": "img", "group": "g1", "sensor": "cam", "session": 7, "seq": 3, "t_ns": 10**18,
         "exp_ns": 5_000_000, "shape": list(image.shape), "dtype": image.dtype.name}  # fmt: skip
    h.update(over)
    h = {k: v for k, v in h.items() if v is not ...}
    topic = f"{h.get('kind', 'img')}/{h.get('group', 'g1')}/{h.get('sensor', 'cam')}".encode()
    return [topic, msgpack.packb(h), image.tobytes()]


def rad_msg(values: np.ndarray, **over) -> list[bytes]:
    h = {"v": 1, "kind": "rad", "group": "g1", "sensor": "rad", "session": 7, "seq": 0, "t_ns": -5,
         "dt_ns": 1000, "n": len(values), "dtype": values.dtype.name}  # fmt: skip
    h.update(over)
    return [b"rad/g1/rad", msgpack.packb(h), values.tobytes()]


def reason_of(frames, limits: Limits | None = None) -> str:
    with pytest.raises(ProtocolError) as exc:
        decode(frames, limits or Limits())
    assert exc.value.reason in protocol.REJECT_REASONS
    return exc.value.reason


@pytest.mark.parametrize("dtype", protocol.IMG_DTYPES)
@pytest.mark.parametrize("shape", [(4, 6), (4, 6, 1), (3, 5, 3), (2, 2, 4)])
def test_image_round_trip(dtype, shape):
    rng = np.random.default_rng(0)
    image = (rng.random(shape) * 200).astype(dtype)
    header = protocol.encode_image_header("g1", "cam", 2**64 - 1, 5, -(2**63), 7, image, meta={"a": 1})
    m = decode([protocol.topic("img", "g1", "cam"), header, image.tobytes()])
    assert (m.kind, m.group, m.sensor, m.session, m.seq, m.t_ns, m.exp_ns) == (
        "img",
        "g1",
        "cam",
        2**64 - 1,
        5,
        -(2**63),
        7,
    )
    assert m.meta == {"a": 1}
    np.testing.assert_array_equal(m.data, image)
    assert m.data.dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", protocol.RAD_DTYPES)
def test_rad_round_trip(dtype):
    values = np.arange(17).astype(dtype)
    header = protocol.encode_rad_header("g1", "rad", 1, 0, 123, 250, values)
    m = decode([b"rad/g1/rad", header, values.tobytes()])
    assert (m.seq, m.t_ns, m.dt_ns) == (0, 123, 250)
    np.testing.assert_array_equal(m.data, values)


def test_heartbeat_round_trip():
    m = decode([b"hb/g1/rad", protocol.encode_heartbeat("g1", "rad", 9, 55, None)])
    assert m.kind == "hb" and m.last_seq is None and m.data is None
    m = decode([b"hb/g1/rad", protocol.encode_heartbeat("g1", "rad", 9, 55, 41)])
    assert m.last_seq == 41


def test_big_endian_input_is_sent_little_endian():
    values = np.arange(4, dtype=">u4")
    wire = protocol.payload(values)
    assert wire.dtype.byteorder in "<=" and wire.tobytes() == np.arange(4, dtype="<u4").tobytes()


def test_payload_is_a_view_of_the_zmq_frame(ctx):
    """Large frames must not be copied on receive: the array must live in the ZeroMQ frame's buffer."""
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://zc")
    b.connect("inproc://zc")
    image = np.random.default_rng(1).integers(0, 255, (256, 256), dtype=np.uint8)
    a.send_multipart(img_msg(image), copy=False)
    frames = b.recv_multipart(copy=False)
    m = decode(frames)
    assert not m.data.flags.owndata and not m.data.flags.writeable
    assert np.shares_memory(m.data, np.frombuffer(frames[2].buffer, np.uint8))
    np.testing.assert_array_equal(m.data, image)
    a.close()
    b.close()


def _nested(levels: int) -> list:
    x: list = [1]
    for _ in range(levels - 1):
        x = [x]
    return x


IMG = np.zeros((4, 4), np.uint8)
CASES = {
    "frame_count": [b"img/g1/cam", msgpack.packb({})],
    "topic": [b"img/g1", msgpack.packb({}), b""],
    "topic_kind": [b"vid/g1/cam", msgpack.packb({}), b""],
    "topic_name": [b"img/g 1/cam", msgpack.packb({}), b""],
    "topic_utf8": [b"img/\xff/cam", msgpack.packb({}), b""],
    "msgpack": [b"img/g1/cam", b"\x93\x01", b""],
    "msgpack_not_map": [b"img/g1/cam", msgpack.packb([1, 2]), b""],
    "version": img_msg(IMG, v=2),
    "missing_field": img_msg(IMG, exp_ns=...),
    "unknown_field": img_msg(IMG, extra=1),
    "field_type": img_msg(IMG, seq=-1),
    "field_type_bool": img_msg(IMG, seq=True),
    "field_type_shape": img_msg(IMG, shape=[4]),
    "field_type_channels": img_msg(IMG, shape=[2, 2, 5]),
    "field_type_session": img_msg(IMG, session=-1),
    "field_type_t": img_msg(IMG, t_ns=2**63),
    "topic_mismatch": [b"img/g1/cam", img_msg(IMG, sensor="other")[1], IMG.tobytes()],
    "dtype": img_msg(IMG, dtype="float64"),
    "too_large": img_msg(IMG, shape=[16000, 16000, 4], dtype="float32"),
    "payload_size": img_msg(IMG, shape=[4, 5]),
    "non_finite": img_msg(np.array([[0, np.nan]], np.float32)),
    "meta_too_large": img_msg(IMG, meta={"x": "a" * 5000}),
    # 606 bytes, 505 levels: small, but its frame could not be pickled on to the model (the window was lost)
    "meta_too_large_deep": img_msg(IMG, meta={"x": _nested(504)}),
}


@pytest.mark.parametrize("name", CASES)
def test_each_bad_message_gets_its_reason(name):
    expected = max((r for r in protocol.REJECT_REASONS if name.startswith(r)), key=len)
    assert reason_of(CASES[name]) == expected


def test_non_finite_keep_policy_and_rad_dtype():
    frames = rad_msg(np.array([1.0, math.inf]))
    assert reason_of(frames) == "non_finite"
    assert decode(frames, Limits(reject_non_finite=False)).data[1] == math.inf
    assert reason_of(rad_msg(np.arange(3, dtype=np.int8))) == "dtype"
    assert reason_of(rad_msg(np.arange(3.0), dt_ns=0)) == "field_type"
    assert reason_of(rad_msg(np.arange(3.0), n=0)) == "field_type"


def test_meta_may_nest_32_levels_and_its_frame_reaches_the_model_process():
    import pickle

    ok = decode(img_msg(IMG, meta={"x": _nested(31)}), Limits())  # meta + 31 lists = 32 levels
    assert pickle.loads(pickle.dumps(ok.meta)) == ok.meta
    assert reason_of(img_msg(IMG, meta={"x": _nested(32)})) == "meta_too_large"


def test_meta_keys_the_cap_as_re_encoded_and_header_keys_follow_the_docs():
    """Three places where behaviour left the documented rules: a header with bin keys was missing_field (docs:
    msgpack), meta with bin keys was accepted (docs: string keys), and meta re-encoding to more than 4096
    bytes passed whenever the whole header was under 4096 bytes on the wire."""
    frames = img_msg(IMG)
    header = msgpack.unpackb(frames[1])
    frames[1] = msgpack.packb({k.encode(): v for k, v in header.items()})
    assert reason_of(frames) == "msgpack"
    assert reason_of(img_msg(IMG, meta={b"k": 1})) == "field_type"
    assert reason_of(img_msg(IMG, meta={"a": [{b"k": 1}]})) == "field_type"  # nested maps too
    floats = np.arange(780, dtype=np.float32).tolist()  # 5 bytes each on the wire as float32, 9 re-encoded
    big = img_msg(IMG)
    h = msgpack.unpackb(big[1])
    h["meta"] = {"f": floats}
    packer = msgpack.Packer(use_single_float=True)
    big[1] = packer.pack(h)
    assert len(big[1]) < 4096 < len(msgpack.packb(h["meta"]))
    assert reason_of(big) == "meta_too_large"
    assert decode(img_msg(IMG, meta=None), Limits()).meta is None  # nil: no meta, as documented


def test_configured_size_limits():
    image = np.zeros((64, 64), np.uint8)
    assert reason_of(img_msg(image), Limits(max_message_bytes=1000)) == "too_large"
    assert reason_of(img_msg(image), Limits(max_image_side=32)) == "too_large"
    assert decode(img_msg(image), Limits(max_message_bytes=4096)).data.shape == (64, 64)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=8),
                     st.binary(max_size=8))  # fmt: skip
_values = st.recursive(
    _scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=10
)
_field_names = st.sampled_from(["v", "kind", "group", "sensor", "session", "seq", "t_ns", "exp_ns", "shape", "dtype",
                                "dt_ns", "n", "last_seq", "meta", "x"])  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(
    topic=st.sampled_from([b"img/g1/cam", b"rad/g1/rad", b"hb/g1/rad"]) | st.binary(max_size=20),
    header=st.dictionaries(_field_names, _values, max_size=12),
    payload=st.binary(max_size=64),
    nframes=st.integers(0, 5),
)
def test_decode_never_fails_other_than_protocol_error(topic, header, payload, nframes):
    frames = [topic, msgpack.packb(header, use_bin_type=True), payload, b"x", b"y"][:nframes]
    try:
        m = decode(frames)
    except ProtocolError as exc:
        assert exc.reason in protocol.REJECT_REASONS
    else:  # anything accepted must be self-consistent
        assert m.kind in protocol.KINDS
        if m.data is not None:
            assert m.data.nbytes == len(frames[2])


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_header_bytes(data):
    try:
        decode([b"img/g1/cam", data, b""])
    except ProtocolError as exc:
        assert exc.reason in protocol.REJECT_REASONS


@pytest.mark.parametrize("n", [1, 7, 256, 257, 5000])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_finite_matches_numpy(n, dtype):
    rng = np.random.default_rng(n)
    big = np.finfo(dtype).max
    cases = [rng.normal(size=n), np.full(n, big), np.full(n, -big)]  # the last two overflow a sum
    for bad in (np.nan, np.inf, -np.inf):
        x = rng.normal(size=n)
        x[rng.integers(0, n)] = bad
        cases.append(x)
    mixed = np.full(n, big)
    mixed[0] = -np.inf
    cases.append(mixed)
    for x in cases:
        x = x.astype(dtype)
        assert protocol.all_finite(x) == bool(np.isfinite(x).all())
        assert protocol.all_finite(x.reshape(1, -1)) == bool(np.isfinite(x).all())
