"""Wire protocol v1: the one place that knows how a sensor message looks on the wire.

The normative description for third parties is docs/protocol.md; this module is its executable form.
Both directions live here (``encode_*`` for publishers, ``decode`` for subscribers) so that a change
to the format cannot update one side and forget the other.

``decode`` is on the hot path of every subscriber (tens of thousands of messages per second on one
core), so it validates with set comparisons and a handful of ``type`` checks instead of a schema
library, and it never copies a payload: the returned array is a read-only view of the ZeroMQ frame.
Every way a message can be wrong maps to exactly one reason from ``REJECT_REASONS``; the subscriber
counts rejections by that reason, so the set is fixed (bounded Prometheus label values).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

VERSION = 1
KINDS = ("img", "rad", "hb")
DATA_KINDS = ("img", "rad")
IMG_DTYPES = ("uint8", "uint16", "float32")
RAD_DTYPES = ("float32", "float64", "uint16", "uint32")
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")
MAX_META_BYTES = 4096
MAX_META_DEPTH = 32  # maps and arrays inside meta (meta itself is level 1)
UINT64_MAX = 2**64 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# Little-endian numpy dtypes, whatever the host's byte order.
_NP_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in set(IMG_DTYPES) | set(RAD_DTYPES)}

_unpackb = msgpack.unpackb
_COMMON = frozenset({"v", "kind", "group", "sensor", "session", "t_ns"})
REQUIRED = {
    "img": _COMMON | {"seq", "exp_ns", "shape", "dtype"},
    "rad": _COMMON | {"seq", "dt_ns", "n", "dtype"},
    "hb": _COMMON | {"last_seq"},
}
OPTIONAL = frozenset({"meta"})

# Why a message was rejected. Fixed: these are Prometheus label values and dead-letter tags.
REJECT_REASONS = (
    "frame_count",  # not 3 frames for img/rad, not 2 for hb, or no topic at all
    "topic",  # not UTF-8, not <kind>/<group>/<sensor>, unknown kind or bad name
    "msgpack",  # header is not a msgpack map with string keys
    "version",  # v != 1
    "missing_field",
    "unknown_field",
    "field_type",  # wrong type or out of range (negative seq, shape rank, ...)
    "topic_mismatch",  # kind/group/sensor in the header differ from the topic
    "dtype",  # dtype not allowed for the kind
    "too_large",  # declared payload larger than the configured maximum message size
    "payload_size",  # payload length differs from what the header declares
    "non_finite",  # NaN/Inf in a float payload while the policy is "reject"
    "meta_too_large",  # meta over MAX_META_BYTES or nested deeper than MAX_META_DEPTH
    "unknown_group",  # group not configured (for this replica)
    "unknown_sensor",  # sensor not configured in its group
    "wrong_kind",  # a configured sensor sent a kind that its role does not take
    "rate_limited",  # the sensor is over its configured rate limit (dropped before decoding)
    "unauthorised_group",  # the authenticated CURVE key may not publish into the topic's group
    "future_time",  # live: the data's event time is further ahead of its receive time than allowed
)


class ProtocolError(ValueError):
    """A message that breaks protocol v1. ``reason`` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class Message:
    """A validated message. ``data`` is a read-only view of the payload frame (None for heartbeats)."""

    kind: str
    group: str
    sensor: str
    session: int
    t_ns: int
    seq: int | None = None  # data messages
    last_seq: int | None = None  # heartbeats
    exp_ns: int = 0  # img
    dt_ns: int = 0  # rad
    data: np.ndarray | None = None  # img: shape (H, W[, C]); rad: shape (n,)
    meta: dict | None = None
    nbytes: int = 0  # total bytes on the wire, for accounting


@dataclass(frozen=True, slots=True)
class Limits:
    """Validation policy that is configuration, not protocol."""

    max_message_bytes: int = 64 * 2**20
    reject_non_finite: bool = True
    max_image_side: int = 16384


def _shallow(value: Any, limit: int = MAX_META_DEPTH) -> bool:
    """Whether maps and arrays in ``value`` nest at most ``limit`` deep. A 606-byte header can nest 505
    levels: the frame carries its meta on to the main process by pickle, which fails from about 500, and
    the whole window was lost."""
    level = [value]
    for _ in range(limit):
        level = [v for x in level if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)]
        if not level:
            return True
    return not any(isinstance(x, (dict, list)) for x in level)


def _string_keys(value: Any) -> bool:
    """Whether every map in ``value`` (already known to be shallow) has only string keys."""
    level = [value]
    while level:
        if any(type(k) is not str for x in level if isinstance(x, dict) for k in x):
            return False
        level = [v for x in level if isinstance(x, (dict, list)) for v in (x.values() if isinstance(x, dict) else x)]
    return True


def _is_int(x: Any) -> bool:
    return type(x) is int  # excludes bool, which is an int subclass


def _buffer(frame: Any) -> memoryview | bytes:
    """Bytes of a frame from ``recv_multipart(copy=False)`` (zmq.Frame) or ``copy=True`` (bytes)."""
    return frame if isinstance(frame, bytes | bytearray | memoryview) else frame.buffer


_topic_cache: dict[bytes, tuple[str, str, str]] = {}
_TOPIC_CACHE_MAX = 4096  # valid topics are few (bounded by config); the cache only skips re-parsing them


def parse_topic(raw: Any) -> tuple[str, str, str]:
    key = raw if type(raw) is bytes else bytes(_buffer(raw))
    hit = _topic_cache.get(key)
    if hit is not None:
        return hit
    try:
        topic = key.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("topic", "topic is not UTF-8") from exc
    parts = topic.split("/")
    if len(parts) != 3:
        raise ProtocolError("topic", f"topic {topic[:80]!r} is not <kind>/<group>/<sensor>")
    kind, group, sensor = parts
    if kind not in KINDS:
        raise ProtocolError("topic", f"unknown kind {kind[:16]!r} in topic")
    if not NAME_RE.match(group) or not NAME_RE.match(sensor):
        raise ProtocolError("topic", f"group/sensor in {topic[:140]!r} must match [A-Za-z0-9_.-]{{1,64}}")
    if len(_topic_cache) < _TOPIC_CACHE_MAX:
        _topic_cache[key] = (kind, group, sensor)
    return kind, group, sensor


_SMALL = 256  # below this many elements a Python-level sum beats a numpy call (about 1k vs 8k instructions)


def all_finite(data: np.ndarray) -> bool:
    """True if no NaN/Inf, at the least cost per message.

    Small payloads (the common radiation message): ``math.fsum`` over a list, about 1k instructions
    against 8k+ for any numpy call; a non-finite sum means a non-finite element or an overflow (or
    inf - inf, which fsum raises for), and those fall back to the exact test, so a valid payload is never
    rejected. Large payloads: one isfinite pass (not np.dot, whose BLAS threads spin on the other core;
    not a sum under np.errstate, whose context manager costs more than the pass itself).
    """
    if data.size <= _SMALL:
        try:
            if math.isfinite(math.fsum((data if data.ndim == 1 else data.reshape(-1)).tolist())):
                return True
        except (OverflowError, ValueError):
            pass
    return bool(np.isfinite(data).all())


def _check_header(h: dict, kind: str, group: str, sensor: str, limits: Limits) -> None:
    keys = h.keys()
    required = REQUIRED[kind]
    if keys != required:
        if any(type(k) is not str for k in keys):  # strict_map_key lets bin keys through
            raise ProtocolError("msgpack", "header map keys must be strings")
        missing = required - keys
        if missing:
            raise ProtocolError("missing_field", f"{kind} header lacks {sorted(missing)}")
        unknown = keys - required - OPTIONAL
        if unknown:
            raise ProtocolError("unknown_field", f"{kind} header has unknown {sorted(map(str, unknown))[:8]}")
    if h["v"] != VERSION or type(h["v"]) is not int:
        raise ProtocolError("version", f"v={h['v']!r}, this subscriber speaks v{VERSION}")
    if h["kind"] != kind or h["group"] != group or h["sensor"] != sensor:
        raise ProtocolError("topic_mismatch", "kind/group/sensor in header differ from topic")
    session, t_ns = h["session"], h["t_ns"]
    if type(session) is not int or not 0 <= session <= UINT64_MAX:
        raise ProtocolError("field_type", "session must be an unsigned 64-bit integer")
    if type(t_ns) is not int or not INT64_MIN <= t_ns <= INT64_MAX:
        raise ProtocolError("field_type", "t_ns must be an int64")
    if kind == "hb":
        last = h["last_seq"]
        if last is not None and (type(last) is not int or not 0 <= last <= UINT64_MAX):
            raise ProtocolError("field_type", "last_seq must be an unsigned integer or nil")
    else:
        seq = h["seq"]
        if type(seq) is not int or not 0 <= seq <= UINT64_MAX:
            raise ProtocolError("field_type", "seq must be an unsigned integer")
    meta = h.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise ProtocolError("field_type", "meta must be a map")


def _image_layout(h: dict, limits: Limits) -> tuple[tuple[int, ...], np.dtype, int]:
    exp_ns, shape, dtype = h["exp_ns"], h["shape"], h["dtype"]
    if type(exp_ns) is not int or not 0 <= exp_ns <= INT64_MAX:
        raise ProtocolError("field_type", "exp_ns must be an integer >= 0")
    if dtype not in IMG_DTYPES:
        raise ProtocolError("dtype", f"img dtype {str(dtype)[:16]!r} not in {IMG_DTYPES}")
    if not isinstance(shape, list | tuple) or len(shape) not in (2, 3) or not all(_is_int(s) and s >= 1 for s in shape):
        raise ProtocolError("field_type", "shape must be [H, W] or [H, W, C] of positive integers")
    if len(shape) == 3 and not 1 <= shape[2] <= 4:
        raise ProtocolError("field_type", f"channel count {shape[2]} not in 1..4")
    if shape[0] > limits.max_image_side or shape[1] > limits.max_image_side:
        raise ProtocolError("too_large", f"image side {max(shape[:2])} > {limits.max_image_side}")
    dt = _NP_DTYPES[dtype]
    size = dt.itemsize
    for s in shape:
        size *= s
    return tuple(shape), dt, size


def _rad_layout(h: dict) -> tuple[tuple[int, ...], np.dtype, int]:
    dt_ns, n, dtype = h["dt_ns"], h["n"], h["dtype"]
    if type(dt_ns) is not int or not 0 < dt_ns <= INT64_MAX:
        raise ProtocolError("field_type", "dt_ns must be an integer > 0")
    if type(n) is not int or n < 1:
        raise ProtocolError("field_type", "n must be an integer >= 1")
    if dtype not in RAD_DTYPES:
        raise ProtocolError("dtype", f"rad dtype {str(dtype)[:16]!r} not in {RAD_DTYPES}")
    if h["t_ns"] + (n - 1) * dt_ns > INT64_MAX:  # windows keep sample times in int64 arrays: no silent wrap
        raise ProtocolError("field_type", "the last sample's time t_ns + (n - 1) * dt_ns must be an int64")
    dt = _NP_DTYPES[dtype]
    return (n,), dt, n * dt.itemsize


def decode(frames: list[Any], limits: Limits = Limits()) -> Message:
    """Validate one multipart message and return it, or raise ProtocolError with a fixed reason."""
    if not frames or len(frames) > 3:
        raise ProtocolError("frame_count", f"{len(frames)} frames")
    kind, group, sensor = parse_topic(frames[0])
    expected = 2 if kind == "hb" else 3
    if len(frames) != expected:
        raise ProtocolError("frame_count", f"{kind} needs {expected} frames, got {len(frames)}")
    header = frames[1] if type(frames[1]) is bytes else _buffer(frames[1])
    try:
        h = _unpackb(header, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError("msgpack", f"header does not decode: {type(exc).__name__}") from exc
    if type(h) is not dict:
        raise ProtocolError("msgpack", "header is not a map")
    _check_header(h, kind, group, sensor, limits)
    meta = h.get("meta")
    header_bytes = len(header)
    # re-encoding can grow meta by up to 9/5 (a float32 becomes a float64): smaller headers cannot exceed the cap
    if meta is not None and header_bytes * 9 > MAX_META_BYTES * 5 and len(msgpack.packb(meta)) > MAX_META_BYTES:
        raise ProtocolError("meta_too_large", f"meta exceeds {MAX_META_BYTES} bytes")
    if meta and not _shallow(meta):
        raise ProtocolError("meta_too_large", f"meta nested deeper than {MAX_META_DEPTH} levels")
    if meta and not _string_keys(meta):
        raise ProtocolError("field_type", "meta map keys must be strings (nested maps included)")
    nbytes = len(frames[0]) + header_bytes
    if kind == "hb":
        return Message(kind, group, sensor, h["session"], h["t_ns"], None, h["last_seq"], 0, 0, None, meta, nbytes)
    shape, dt, size = _image_layout(h, limits) if kind == "img" else _rad_layout(h)
    if size > limits.max_message_bytes:
        raise ProtocolError("too_large", f"declared payload {size} B > {limits.max_message_bytes} B")
    buf = frames[2] if type(frames[2]) is bytes else _buffer(frames[2])
    if len(buf) != size:
        raise ProtocolError("payload_size", f"payload is {len(buf)} B, header declares {size} B")
    data = np.frombuffer(buf, dtype=dt)
    if kind == "img":
        data = data.reshape(shape)
    if type(buf) is not bytes:  # a ZeroMQ frame's buffer: shared by every holder of this message
        data.flags.writeable = False
    if limits.reject_non_finite and dt.kind == "f" and not all_finite(data):
        raise ProtocolError("non_finite", "NaN or Inf in payload")
    return Message(
        kind, group, sensor, h["session"], h["t_ns"], h["seq"], None, h.get("exp_ns", 0), h.get("dt_ns", 0), data, meta,
        nbytes + size,
    )  # fmt: skip


# --- encoding (publishers) ---------------------------------------------------------------------------


def topic(kind: str, group: str, sensor: str) -> bytes:
    return f"{kind}/{group}/{sensor}".encode()


def encode_image_header(
    group: str, sensor: str, session: int, seq: int, t_ns: int, exp_ns: int, image: np.ndarray,
    meta: dict | None = None,
) -> bytes:  # fmt: skip
    h = {"v": VERSION, "kind": "img", "group": group, "sensor": sensor, "session": session, "seq": seq,
         "t_ns": t_ns, "exp_ns": exp_ns, "shape": list(image.shape), "dtype": image.dtype.name}  # fmt: skip
    if meta:
        h["meta"] = meta
    return msgpack.packb(h)


def encode_rad_header(
    group: str, sensor: str, session: int, seq: int, t_ns: int, dt_ns: int, values: np.ndarray,
    meta: dict | None = None,
) -> bytes:  # fmt: skip
    h = {"v": VERSION, "kind": "rad", "group": group, "sensor": sensor, "session": session, "seq": seq,
         "t_ns": t_ns, "dt_ns": dt_ns, "n": int(values.shape[0]), "dtype": values.dtype.name}  # fmt: skip
    if meta:
        h["meta"] = meta
    return msgpack.packb(h)


def encode_heartbeat(group: str, sensor: str, session: int, t_ns: int, last_seq: int | None) -> bytes:
    return msgpack.packb(
        {
            "v": VERSION,
            "kind": "hb",
            "group": group,
            "sensor": sensor,
            "session": session,
            "t_ns": t_ns,
            "last_seq": last_seq,
        }  # fmt: skip
    )


def payload(array: np.ndarray) -> np.ndarray:
    """The array as protocol payload: little-endian and C-contiguous (a no-op for the usual case)."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return np.ascontiguousarray(array)
