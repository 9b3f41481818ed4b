"""Coverage-guided fuzzing (atheris / libFuzzer) of the wire decoder and the ingest worker behind it.

    python tests/fuzz/fuzz_decode.py -atheris_runs=200000          # a fixed number of inputs
    python tests/fuzz/fuzz_decode.py -max_total_time=600 CORPUS/   # ten minutes, keeping what it learns

Why both layers: ``ingest.protocol.decode`` is the first code that touches untrusted bytes, but a message
it accepts goes straight on to the worker's routing checks, the loss accounting and the event-time
windows, where a well-formed but extreme value (a sample period of centuries, a seq above 2^63) can still
hurt. So each fuzz input is a short sequence of messages fed to a fresh ``IngestWorker`` exactly as its
receive loop would, and the properties checked are:

* ``decode`` returns a ``Message`` whose fields satisfy protocol v1 (names, integer ranges, shape and
  dtype consistent with the payload bytes, finite values under the reject policy, bounded ``meta``) and
  that re-encodes to an equal message, or raises ``ProtocolError`` with one of the decoder's reasons;
* the worker counts every message exactly once: rejected under the decoder's reason (or a routing reason
  for a valid message of an unconfigured group or sensor), else as a valid message of its sensor;
* ``handle`` and ``flush`` never raise, and every emitted window holds only samples and frames of its own
  ``[start, end)``.

Anything else (an exception, a failed assertion, or libFuzzer's ``-timeout`` for one input: a stall) is a
bug, and libFuzzer writes the input as ``crash-*``/``timeout-*``. Defaults added unless given:
``-timeout=10 -max_len=8192 -dict=<generated>``, and a seed corpus of valid messages (written by code into
the first corpus directory given, or a temporary one removed at exit: give a directory to keep what the
fuzzer learns).

Input layout (the fuzzer needs one byte string for a multipart message, and several messages per input):
byte 0 is a flags byte (``FLAG_*``); then messages, each ``[u8 frame count % 8]`` followed by that many
``[u16 little-endian length][bytes]`` frames. A length running past the end takes what is left.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script: the repository's packages come first
    sys.path.insert(0, str(ROOT))

try:
    import atheris
except ImportError:  # the in-process checks (tests/test_fuzz_decode.py) work without it
    atheris = None


def _instrumented() -> contextlib.AbstractContextManager:
    """Coverage instrumentation of our own code, only when this file runs as the fuzzer."""
    if atheris is not None and __name__ == "__main__":
        return atheris.instrument_imports(include=["ingest"])
    return contextlib.nullcontext()


with _instrumented():
    import msgpack  # noqa: E402  (not instrumented: only the ``ingest`` package is)
    import numpy as np  # noqa: E402
    import zmq  # noqa: E402

    from ingest import fuzzcases, protocol  # noqa: E402
    from ingest.settings import GroupSettings, IngestSettings  # noqa: E402
    from ingest.subscriber import IngestWorker, RateLimitedLog  # noqa: E402
    from ingest.windowing import Window, WindowSpec  # noqa: E402

FLAG_KEEP_NON_FINITE = 1  # [ingest] non_finite = "keep"
FLAG_SMALL_LIMITS = 2  # max_message_bytes = 512, max_image_side = 16
FLAG_LIVE = 4  # live windowing (receive-time idleness, max_wait) instead of replay
FLAG_SLIDING = 8  # sliding windows (hop = size / 4) instead of tumbling
MAX_MESSAGES = 16
SEC = 1_000_000_000
T0 = 1_800_000_000 * SEC
GROUP = "g1"
SENSORS = {"cam_vis": "image_a", "cam_ir": "image_b", "rad_vis": "seq_a", "rad_ir": "seq_b"}
# reasons only the worker gives (routing, rate limits, CURVE grants): the decoder alone never may
WORKER_REASONS = frozenset(
    {"unknown_group", "unknown_sensor", "wrong_kind", "rate_limited", "unauthorised_group", "future_time"}
)
DECODE_REASONS = frozenset(protocol.REJECT_REASONS) - WORKER_REASONS
INT64_MIN, INT64_MAX, UINT64_MAX = protocol.INT64_MIN, protocol.INT64_MAX, protocol.UINT64_MAX


# ---------------------------------------------------------------- framing


def pack_input(messages: Sequence[Sequence[bytes]], flags: int = 0) -> bytes:
    """Serialise messages (lists of frames) into one fuzz input; the inverse of ``unpack_input``."""
    out = bytearray([flags & 0xFF])
    for frames in messages:
        if len(frames) > 7:
            raise ValueError("at most 7 frames per message in the fuzz framing")
        out.append(len(frames))
        for f in frames:
            if len(f) > 0xFFFF:
                raise ValueError("frames of at most 65535 bytes in the fuzz framing")
            out += struct.pack("<H", len(f)) + f
    return bytes(out)


def unpack_input(data: bytes) -> tuple[int, list[list[bytes]]]:
    """(flags, messages) of any byte string: every input means something, however it was mutated."""
    if not data:
        return 0, []
    flags, pos, messages = data[0], 1, []
    while pos < len(data) and len(messages) < MAX_MESSAGES:
        count = data[pos] % 8
        pos += 1
        frames = []
        for _ in range(count):
            size = int.from_bytes(data[pos : pos + 2], "little")
            pos += 2
            frames.append(data[pos : pos + size])
            pos += size
        messages.append(frames)
    return flags, messages


# ---------------------------------------------------------------- the system under test


def limits_for(flags: int) -> protocol.Limits:
    """The validation policy an input asks for: both non-finite policies, and limits small enough to reach."""
    small = bool(flags & FLAG_SMALL_LIMITS)
    return protocol.Limits(
        max_message_bytes=512 if small else 64 * 2**20,
        reject_non_finite=not flags & FLAG_KEEP_NON_FINITE,
        max_image_side=16 if small else 16384,
    )


_reject_log = RateLimitedLog(3600.0)  # shared by the per-input workers: one line per reason per run


class _NoSocket:
    """Stands in for the worker's ZeroMQ socket: the harness calls ``handle`` as the receive loop would."""

    def close(self, linger: int | None = None) -> None:
        pass


class HarnessWorker(IngestWorker):
    """The real worker without its socket (one per input would exhaust a ZeroMQ context's sockets)."""

    def _open_socket(self) -> zmq.Socket:
        return _NoSocket()  # type: ignore[return-value]


def make_worker(flags: int, windows: list[Window]) -> IngestWorker:
    """A fresh worker per input, so that every crash reproduces from its input alone; fixed receive times
    (passed to ``handle``) keep runs deterministic."""
    live = bool(flags & FLAG_LIVE)
    spec = WindowSpec(
        size_ns=SEC,
        hop_ns=SEC // 4 if flags & FLAG_SLIDING else None,
        allowed_lateness_ns=100_000_000,
        idle_timeout_ns=2 * SEC,
        max_wait_ns=SEC if live else 0,
        mode="live" if live else "replay",
        max_open_windows=16,
        max_buffered_bytes=2**20,
    )
    settings = IngestSettings(
        endpoints=("inproc://sacmf-fuzz",),
        groups={GROUP: GroupSettings(GROUP, dict(SENSORS), spec)},
        transport="sub" if live else "pull",
        limits=limits_for(flags),
    )
    worker = HarnessWorker(settings, windows.append, clock=lambda: T0)
    worker._reject_log = _reject_log  # a fresh log per worker would print a line per rejected input
    return worker


def _is_int(x: object, lo: int, hi: int) -> bool:
    return type(x) is int and lo <= x <= hi


def check_message(m: protocol.Message, frames: list[bytes], limits: protocol.Limits) -> None:
    """A decoded message satisfies protocol v1 and re-encodes to itself."""
    assert m.kind in protocol.KINDS
    assert protocol.NAME_RE.match(m.group) and protocol.NAME_RE.match(m.sensor)
    assert protocol.topic(m.kind, m.group, m.sensor) == bytes(frames[0])
    assert _is_int(m.session, 0, UINT64_MAX) and _is_int(m.t_ns, INT64_MIN, INT64_MAX)
    assert m.meta is None or (isinstance(m.meta, dict) and len(msgpack.packb(m.meta)) <= protocol.MAX_META_BYTES)
    if m.kind == "hb":
        assert len(frames) == 2 and m.data is None and m.seq is None and m.exp_ns == m.dt_ns == 0
        assert m.last_seq is None or _is_int(m.last_seq, 0, UINT64_MAX)
        assert m.nbytes == len(frames[0]) + len(frames[1])
        again = protocol.encode_heartbeat(m.group, m.sensor, m.session, m.t_ns, m.last_seq)
        back = protocol.decode([frames[0], again], limits)
        assert (back.session, back.t_ns, back.last_seq) == (m.session, m.t_ns, m.last_seq)
        return
    assert len(frames) == 3 and m.data is not None and m.last_seq is None
    assert _is_int(m.seq, 0, UINT64_MAX)
    data = m.data
    assert data.size >= 1 and data.dtype.byteorder in "<|="
    assert data.nbytes == len(frames[2]) <= limits.max_message_bytes
    assert data.tobytes() == bytes(frames[2])
    assert m.nbytes == len(frames[0]) + len(frames[1]) + len(frames[2])
    if limits.reject_non_finite and data.dtype.kind == "f":
        assert bool(np.isfinite(data).all())
    if m.kind == "img":
        assert data.dtype.name in protocol.IMG_DTYPES and data.ndim in (2, 3) and m.dt_ns == 0
        assert 1 <= data.shape[0] <= limits.max_image_side and 1 <= data.shape[1] <= limits.max_image_side
        assert data.ndim == 2 or 1 <= data.shape[2] <= 4
        assert _is_int(m.exp_ns, 0, INT64_MAX)
        again = protocol.encode_image_header(m.group, m.sensor, m.session, m.seq, m.t_ns, m.exp_ns, data, m.meta)
    else:
        assert data.dtype.name in protocol.RAD_DTYPES and data.ndim == 1 and m.exp_ns == 0
        assert _is_int(m.dt_ns, 1, INT64_MAX)
        # every sample time t_ns + i * dt_ns is an int64 (protocol §3): windows keep them in int64 arrays
        assert m.t_ns + (data.shape[0] - 1) * m.dt_ns <= INT64_MAX
        again = protocol.encode_rad_header(m.group, m.sensor, m.session, m.seq, m.t_ns, m.dt_ns, data, m.meta)
    back = protocol.decode([frames[0], again, frames[2]], limits)
    assert (back.session, back.seq, back.t_ns, back.exp_ns, back.dt_ns) == (m.session, m.seq, m.t_ns, m.exp_ns, m.dt_ns)
    assert (back.meta or None) == (m.meta or None)
    assert back.data is not None and back.data.shape == data.shape and back.data.dtype == data.dtype


def check_window(w: Window) -> None:
    """Every item of a window lies in its half-open span, with one timestamp per sample."""
    assert w.group == GROUP and w.start_ns < w.end_ns
    for frames in w.frames.values():
        for f in frames:
            assert w.start_ns <= f.t_ns < w.end_ns, (f.t_ns, w.start_ns, w.end_ns)
    for samples in w.samples.values():
        t = samples.t_ns
        assert t.shape[0] == samples.values.shape[0]
        if t.shape[0]:
            assert w.start_ns <= int(t.min()) and int(t.max()) < w.end_ns, (int(t.min()), int(t.max()), w.start_ns)
            assert bool(np.all(t[1:] >= t[:-1])), "samples out of time order"


def _windows_leave_int64(m: protocol.Message, size_ns: int) -> bool:
    """The worker refuses data within a window size of the int64 limits: its windows would leave int64."""
    t_end = m.t_ns + (m.exp_ns if m.kind == "img" else max(len(m.data) - 1, 0) * m.dt_ns)
    return m.t_ns < protocol.INT64_MIN + size_ns or t_end > protocol.INT64_MAX - size_ns


def _accepted(worker: IngestWorker) -> int:
    return sum(r.data_messages + r.heartbeats for r in worker.routes.values())


def _unrouted_reason(worker: IngestWorker, frames: list) -> str | None:
    """The worker refuses a message with the right number of frames for its topic's kind, whose topic
    names no configured (group, sensor), by that topic alone: its header and payload are never decoded."""
    if not frames:
        return None
    try:
        kind, group, sensor = protocol.parse_topic(frames[0])
    except protocol.ProtocolError:
        return None
    if len(frames) != (2 if kind == "hb" else 3) or (group, sensor) in worker.routes:
        return None
    return "unknown_sensor" if group in worker.windowers else "unknown_group"


def run_input(data: bytes) -> None:
    """The fuzz target: decode each message, feed it to the worker, check every property."""
    flags, messages = unpack_input(data)
    limits = limits_for(flags)
    windows: list[Window] = []
    worker = make_worker(flags, windows)
    try:
        for k, frames in enumerate(messages):
            expected: str | None = None
            try:
                m = protocol.decode(frames, limits)
            except protocol.ProtocolError as exc:
                assert exc.reason in DECODE_REASONS, exc.reason
                expected = exc.reason
            else:
                check_message(m, frames, limits)
                if (m.group, m.sensor) not in worker.routes:
                    expected = "unknown_group" if m.group != GROUP else "unknown_sensor"
                elif m.kind != "hb" and m.kind != worker.routes[m.group, m.sensor].kind:
                    expected = "wrong_kind"
                elif m.kind != "hb" and _windows_leave_int64(m, SEC):
                    expected = "field_type"
            expected = _unrouted_reason(worker, frames) or expected  # refused by its topic, before decoding
            rejected, accepted = sum(worker.stats.rejected.values()), _accepted(worker)
            before = worker.stats.rejected[expected] if expected else None
            worker.handle(frames, 0, T0 + k * 1_000_000)  # raises only on a bug of ours: the fuzzer's crash
            assert sum(worker.stats.rejected.values()) + _accepted(worker) == rejected + accepted + 1
            if expected is None:
                assert _accepted(worker) == accepted + 1
            else:
                assert worker.stats.rejected[expected] == before + 1, (expected, dict(worker.stats.rejected))
        assert worker.stats.internal_errors == 0 and worker.stats.window_callback_errors == 0
        worker.flush()
        for w in windows:
            check_window(w)
    finally:
        worker.close()


# ---------------------------------------------------------------- seeds and dictionary


def _img(sensor: str, seq: int, t_ns: int, image: np.ndarray, meta: dict | None = None) -> list[bytes]:
    header = protocol.encode_image_header(GROUP, sensor, 7, seq, t_ns, 20_000_000, image, meta)
    return [protocol.topic("img", GROUP, sensor), header, image.tobytes()]


def _rad(sensor: str, seq: int, t_ns: int, values: np.ndarray, dt_ns: int = 1_000_000) -> list[bytes]:
    header = protocol.encode_rad_header(GROUP, sensor, 7, seq, t_ns, dt_ns, values)
    return [protocol.topic("rad", GROUP, sensor), header, values.tobytes()]


def _hb(sensor: str, last_seq: int | None) -> list[bytes]:
    return [protocol.topic("hb", GROUP, sensor), protocol.encode_heartbeat(GROUP, sensor, 7, T0, last_seq)]


def seed_inputs() -> Iterator[bytes]:
    """Valid messages of every kind and dtype, short streams that fill and close windows, and one message
    of each malformed family: the starting points the fuzzer mutates."""
    rng = np.random.default_rng(0)
    for dtype in protocol.IMG_DTYPES:
        for shape in ((2, 3), (4, 4, 1), (3, 2, 3), (2, 2, 4)):
            image = (rng.random(shape) * 100).astype(dtype)
            yield pack_input([_img("cam_vis", 0, T0, image)])
    for dtype in protocol.RAD_DTYPES:
        yield pack_input([_rad("rad_vis", 0, T0, (rng.random(5) * 100).astype(dtype))])
    yield pack_input([_hb("rad_vis", None), _hb("cam_ir", 3)])
    yield pack_input([_img("cam_ir", 0, T0, np.zeros((2, 2), np.uint8), meta={"exposure": 1, "note": "x"})])
    stream = []  # 2.5 s of all four sensors: windows close, samples span window edges
    for i in range(5):
        t = T0 + i * 500_000_000
        stream.append(_rad("rad_vis", i, t, np.arange(4, dtype=np.float32), dt_ns=125_000_000))
        stream.append(_rad("rad_ir", i, t + 60_000_000, np.arange(3, dtype=np.uint16), dt_ns=170_000_000))
        if i % 2 == 0:
            stream.append(_img("cam_vis", i // 2, t, np.full((2, 2), i, np.uint8)))
            stream.append(_img("cam_ir", i // 2, t + 1, np.full((2, 2), i, np.uint16)))
    for flags in (0, FLAG_LIVE, FLAG_SLIDING, FLAG_LIVE | FLAG_SLIDING):
        yield pack_input(stream[:MAX_MESSAGES], flags)
    # a slow radiometer (a sample every 5 s: dt_ns needs a uint64), so sample periods of any size are a
    # mutation away, and two sensors' chunks that straddle windows
    yield pack_input([_rad("rad_vis", 0, T0, np.arange(3, dtype=np.uint32), dt_ns=5 * SEC),
                      _rad("rad_ir", 0, T0 + 3 * SEC, np.arange(2, dtype=np.float32), dt_ns=700_000_000)])  # fmt: skip
    # overlapping chunks of one sensor (reordering, duplicates, a restart): the windows' merge path
    values = np.arange(6, dtype=np.float64)
    yield pack_input([_rad("rad_vis", 0, T0, values), _rad("rad_vis", 2, T0 + 2_000_000, values),
                      _rad("rad_vis", 1, T0 + 1_000_000, values), _rad("rad_vis", 1, T0 + 1_000_000, values),
                      _hb("rad_vis", 5)])  # fmt: skip
    factory = fuzzcases.MalformedFactory(GROUP, "rad_vis", "rad_ir", "cam_vis", t0_ns=T0)
    for family in fuzzcases.FAMILIES:
        frames = factory.make(rng, family).frames
        if len(frames) <= 7:
            yield pack_input([frames], FLAG_SMALL_LIMITS if family == "huge" else 0)


def dictionary_tokens() -> list[bytes]:
    """libFuzzer dictionary: the msgpack encodings of every key, kind and dtype, and integer markers."""
    keys = ("v", "kind", "group", "sensor", "session", "t_ns", "seq", "exp_ns", "shape", "dtype", "dt_ns", "n")
    words = {*keys, "last_seq", "meta", GROUP, *SENSORS, *protocol.KINDS, *protocol.IMG_DTYPES, *protocol.RAD_DTYPES}
    tokens = [msgpack.packb(w) for w in sorted(words)]
    tokens += [f"{k}/{GROUP}/{s}".encode() for k in protocol.KINDS for s in SENSORS]
    tokens += [msgpack.packb(x) for x in (2**63, 2**64 - 1, -(2**63), INT64_MAX, 2**32, math.inf, math.nan)]
    return tokens


def _write_dict(path: Path) -> None:
    lines = ['"' + "".join(f"\\x{b:02x}" for b in t) + '"' for t in dictionary_tokens()]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> None:
    """libFuzzer's command line, plus defaults, a generated seed corpus and a generated dictionary."""
    if atheris is None:
        sys.exit("atheris is not installed: pip install -e '.[fuzz]'")
    flags = [a for a in argv[1:] if a.startswith("-")]
    dirs = [a for a in argv[1:] if not a.startswith("-")]
    scratch = Path(tempfile.mkdtemp(prefix="sacmf-fuzz-"))  # the dictionary, and the corpus unless one is given
    atexit.register(shutil.rmtree, scratch, True)  # libFuzzer exits through exit(): atexit runs
    if not dirs:
        dirs = [str(scratch / "corpus")]
    corpus = Path(dirs[0])
    corpus.mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seed_inputs()):
        (corpus / f"seed-{i:03d}").write_bytes(seed)
    given = {a.split("=", 1)[0] for a in flags}
    defaults = {"-timeout": "10", "-max_len": "8192"}
    if "-dict" not in given:
        _write_dict(scratch / "protocol.dict")
        defaults["-dict"] = str(scratch / "protocol.dict")
    flags += [f"{k}={v}" for k, v in defaults.items() if k not in given]
    print(f"fuzz_decode: corpus {corpus}, flags {' '.join(flags)}", file=sys.stderr, flush=True)
    atheris.Setup([argv[0], *flags, *dirs], lambda data: run_input(data))
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
