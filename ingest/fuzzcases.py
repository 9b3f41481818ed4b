"""Malformed protocol-v1 messages, each of a named family with the one rejection reason it must get.

Why a module of the library rather than of the tests: the socket-level fuzz test (tests/test_fuzz_live.py),
the coverage-guided harness (tests/fuzz/fuzz_decode.py) and the load command (`sacmf fuzz-load`,
daemon/fuzz_load.py) must throw the same families at the decoder, and the load command checks the live
daemon's per-reason counters against what it sent. So every family here is built so that its reason is
known exactly by construction (``MalformedFactory.make`` returns it with the message), given a receiver
configured as the factory assumes:

* the group ``group`` exists with ``rad_sensor`` and ``other_rad_sensor`` as radiometers and ``cam_sensor``
  as a camera; ``ghost`` is not one of its sensors and ``nogroup`` is not a configured group;
* ``[ingest] non_finite = "reject"``, ``max_image_side`` below 20000 and ``max_message_bytes`` above a few KiB
  (the defaults);
* a transport that does not filter by topic (PULL), or a SUB subscribed to ``nogroup`` as well: a SUB
  socket drops ``unknown_group`` and bad-topic messages before the worker can count them.

Messages are built from one valid radiation message with a sequence number far beyond any real stream, so
that a receiver that wrongly accepted one would corrupt real accounting, and they never carry a sensor's
real data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgpack
import numpy as np

from ingest import protocol

# family -> the reason the decoder or the ingest worker must give it. A family maps to one reason,
# except where the generator picks a variant; those are listed with every reason they can get and the
# generator reports the one it built.
FAMILIES: dict[str, tuple[str, ...]] = {
    "random": ("topic", "frame_count"),  # random bytes (the topic is never UTF-8), 1..5 frames
    "truncated": ("msgpack",),  # the header cut short
    "wrong_type": ("field_type", "version", "dtype"),  # one field of a wrong type or out of range
    "lying_shape": ("payload_size",),  # n declares more samples than the payload holds
    "huge": ("too_large",),  # an image side beyond max_image_side
    "non_finite": ("non_finite",),  # NaN/Inf samples
    "mismatch": ("topic_mismatch",),  # the header names another sensor than the topic
    "extra_frames": ("frame_count",),  # 1..79 frames after a complete message
    "fields": ("missing_field", "unknown_field"),  # a required key removed, or an unknown one added
    "topic": ("topic",),  # a topic that is not <kind>/<group>/<sensor>
    "unknown_sensor": ("unknown_sensor",),
    "dtype": ("dtype",),  # a dtype the kind does not allow
    "unknown_group": ("unknown_group",),
    "wrong_kind": ("wrong_kind",),  # a camera frame on a radiometer's topic
    "meta_too_large": ("meta_too_large",),
    "no_payload": ("frame_count",),  # a data message without its payload frame
    "bad_heartbeat": ("field_type",),  # a heartbeat whose last_seq is negative
}
WRONG_VALUES = (None, "x", -1, 1.5, [1], {"a": 1}, True)
WRONG_KEYS = ("seq", "t_ns", "dt_ns", "n", "session", "v", "dtype")
BAD_TOPICS = (b"\xff\xfe/g1/x", b"rad/g1", b"rad/g1/a/b", b"zzz/g1/rad_vis", b"rad/g 1/x", b"")


@dataclass(frozen=True, slots=True)
class Case:
    """One malformed message: its family, the reason it must be rejected with, and its frames."""

    family: str
    reason: str
    frames: list[bytes]


class MalformedFactory:
    """Builds malformed messages of every family for one configured group (see the module docstring)."""

    def __init__(
        self,
        group: str = "g1",
        rad_sensor: str = "rad_vis",
        other_rad_sensor: str = "rad_ir",
        cam_sensor: str = "cam_vis",
        session: int = 0xDEADBEEF,
        t0_ns: int = 1_800_000_000 * 10**9,
    ) -> None:
        self.group, self.rad_sensor, self.other_rad_sensor, self.cam_sensor = (
            group, rad_sensor, other_rad_sensor, cam_sensor,
        )  # fmt: skip
        self.values = np.arange(10, dtype=np.float32)
        self.payload = self.values.tobytes()
        self.topic = protocol.topic("rad", group, rad_sensor)
        seq = 10**12  # far beyond any real stream: an accepted one would show up as a huge gap
        self.header = msgpack.unpackb(
            protocol.encode_rad_header(group, rad_sensor, session, seq, t0_ns, 1_000_000, self.values)
        )
        self.packed = msgpack.packb(self.header)
        image = np.zeros((8, 8), np.uint8)
        self.image = image.tobytes()
        self.img_header = msgpack.unpackb(
            protocol.encode_image_header(group, cam_sensor, session, seq, t0_ns, 0, image)
        )
        self.hb_header = msgpack.unpackb(protocol.encode_heartbeat(group, rad_sensor, session, t0_ns, None))
        self._builders: dict[str, Callable[[np.random.Generator], tuple[str, list[bytes]]]] = {
            name: getattr(self, f"_{name}") for name in FAMILIES
        }
        self.families = tuple(FAMILIES)

    def make(self, rng: np.random.Generator, family: str | None = None) -> Case:
        """One malformed message of ``family`` (by default a uniformly drawn one)."""
        if family is None:
            family = self.families[int(rng.integers(0, len(self.families)))]
        reason, frames = self._builders[family](rng)
        return Case(family, reason, frames)

    # -- families: each returns (reason, frames) -------------------------------------------------

    def _random(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        n = int(rng.integers(1, 6))
        # b"\xff" never starts UTF-8: the topic is always invalid, so only the frame count decides
        frames = [b"\xff" + rng.bytes(int(rng.integers(0, 40)))]
        frames += [rng.bytes(int(rng.integers(0, 40))) for _ in range(n - 1)]
        return ("frame_count" if n > 3 else "topic"), frames

    def _truncated(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        # any strict prefix of a msgpack map is incomplete: never a complete object
        return "msgpack", [self.topic, self.packed[: int(rng.integers(0, len(self.packed)))], self.payload]

    def _wrong_type(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        key = WRONG_KEYS[int(rng.integers(0, len(WRONG_KEYS)))]
        value = WRONG_VALUES[int(rng.integers(0, len(WRONG_VALUES)))]
        if key == "t_ns" and value == -1:  # -1 ns is a valid event time
            value = 2**63
        header = {**self.header, key: value}
        reason = {"v": "version", "dtype": "dtype"}.get(key, "field_type")
        return reason, [self.topic, msgpack.packb(header), self.payload]

    def _lying_shape(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        header = {**self.header, "n": self.header["n"] + int(rng.integers(1, 50))}
        return "payload_size", [self.topic, msgpack.packb(header), self.payload]

    def _huge(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        shape = [int(rng.integers(20000, 2**31)), int(rng.integers(20000, 2**31)), 4]
        header = {**self.img_header, "shape": shape}
        return "too_large", [protocol.topic("img", self.group, self.cam_sensor), msgpack.packb(header), self.image]

    def _non_finite(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        values = self.values.copy()
        values[int(rng.integers(0, len(values)))] = (np.nan, np.inf, -np.inf)[int(rng.integers(0, 3))]
        return "non_finite", [self.topic, self.packed, values.tobytes()]

    def _mismatch(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        return "topic_mismatch", [protocol.topic("rad", self.group, self.other_rad_sensor), self.packed, self.payload]

    def _extra_frames(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        return "frame_count", [self.topic, self.packed, self.payload, *(b"x" for _ in range(int(rng.integers(1, 80))))]

    def _fields(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        header = dict(self.header)
        if rng.random() < 0.5:
            keys = sorted(header)
            del header[keys[int(rng.integers(0, len(keys)))]]
            reason = "missing_field"
        else:
            header["bogus"] = 1
            reason = "unknown_field"
        return reason, [self.topic, msgpack.packb(header), self.payload]

    def _topic(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        return "topic", [BAD_TOPICS[int(rng.integers(0, len(BAD_TOPICS)))], self.packed, self.payload]

    def _unknown_sensor(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        header = {**self.header, "sensor": "ghost"}
        return "unknown_sensor", [protocol.topic("rad", self.group, "ghost"), msgpack.packb(header), self.payload]

    def _dtype(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        header = {**self.header, "dtype": ("int64", "int8", "float16", "complex64")[int(rng.integers(0, 4))]}
        return "dtype", [self.topic, msgpack.packb(header), self.payload]

    def _unknown_group(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        header = {**self.header, "group": "nogroup"}
        return "unknown_group", [protocol.topic("rad", "nogroup", self.rad_sensor), msgpack.packb(header), self.payload]

    def _wrong_kind(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        header = {**self.img_header, "sensor": self.rad_sensor}
        return "wrong_kind", [protocol.topic("img", self.group, self.rad_sensor), msgpack.packb(header), self.image]

    def _meta_too_large(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        meta = {"note": "m" * int(rng.integers(protocol.MAX_META_BYTES, protocol.MAX_META_BYTES + 2000))}
        return "meta_too_large", [self.topic, msgpack.packb({**self.header, "meta": meta}), self.payload]

    def _no_payload(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        return "frame_count", [self.topic, self.packed]

    def _bad_heartbeat(self, rng: np.random.Generator) -> tuple[str, list[bytes]]:
        header = {**self.hb_header, "last_seq": -int(rng.integers(1, 2**40))}
        return "field_type", [protocol.topic("hb", self.group, self.rad_sensor), msgpack.packb(header)]
