"""Record raw input messages and results to MCAP, and read them back for replay (docs/results.md §5).

Why MCAP (daemon.md §7): an append-only, chunked, indexed container that standard tools (the ``mcap``
CLI, Foxglove) open, with per-message ``log_time``/``publish_time``/``sequence``, and that stays
readable by a linear scan when the writer dies before writing its summary.

Layout: one schemaless channel (schema id 0) per topic, ``message_encoding="msgpack"``; the channel
metadata ``{"sacmf": "input" | "result" | "late"}`` says how to decode it.

* Input messages (channel = the ZeroMQ topic, ``log_time`` = receive time, ``publish_time`` = the
  header's ``t_ns``, ``sequence`` = ``seq mod 2**32``) are stored as one msgpack map
  ``{"header": <header>, "payload": <bin>}``. The header frame is spliced in **verbatim** (it already
  is one msgpack object), so a viewer sees it as a map while the reader recovers its exact bytes
  from the value's byte range - nothing is re-encoded, so replayed frames are bit-identical even
  for publishers whose msgpack encoder makes different (valid) choices than ours. A header frame
  that is not exactly one decodable msgpack object is kept as ``"header_bin": <bin>``, frames after
  the third as ``"extra": [<bin>...]``, and a topic that is not UTF-8 (or beyond ``max_channels``
  distinct topics) goes to channel ``_other`` with ``"topic": <bin>``. So every message the daemon
  received, valid or not, replays as it came.
* Results (channel ``det/<group>``, ``log_time`` = when recorded, ``publish_time`` = window end,
  ``sequence`` = per-channel count) and late records (``late/<group>``, ``log_time`` = receive
  time, ``publish_time`` = event time) are ``msgpack(to_wire(record))``, the same bytes a ZeroMQ
  subscriber gets.

Crash safety: the writer buffers a chunk in memory; ``flush_interval_s`` bounds how much a crash can
lose by closing the chunk at least that often, with or without new messages (and ``fsync=True``
makes it durable on power loss). ``read_recording`` scans linearly and stops at the first incomplete
record, yielding everything before it.

A full disk (or any failed write) never leaves a torn chunk in the file: the writer's output reaches
the file through :class:`_FileTail`, which cuts the file back to its last whole write and keeps the
bytes for the next attempt. The message that was being recorded when the write failed is kept
(in memory); later messages are refused with the error until the bytes are out, so a supervisor's
retry neither duplicates nor loses a message, and every refusal is counted there.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import structlog
from mcap.exceptions import McapError
from mcap.reader import make_reader
from mcap.records import Channel, Chunk, Message, MessageIndex
from mcap.stream_reader import StreamReader, breakup_chunk
from mcap.well_known import MessageEncoding
from mcap.writer import CompressionType, Writer

from sinks.record import SCHEMA_VERSION, LateRecord, ResultRecord, from_wire, to_wire

log = structlog.get_logger("sacmf.sinks")

RAW_LAYOUT_VERSION = 1
OTHER_TOPIC = "_other"
CONTENT_KEY = "sacmf"
CONTENT_INPUT, CONTENT_RESULT, CONTENT_LATE = "input", "result", "late"
COMPRESSIONS = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "none": CompressionType.NONE}
_U32 = 2**32
_U64 = 2**64


class RecordingTruncated(McapError):
    """The recording ends inside a record (the writer stopped uncleanly); raised only when strict."""


class NotARecording(McapError):
    """The file is empty or not MCAP at all: nothing to replay, whatever ``strict`` says."""


@dataclass(slots=True)
class RawMessage:
    """One ZeroMQ multipart message exactly as received, for the recorder."""

    frames: list[bytes]  # [topic, header, payload...]; any bytes-like (bytes, memoryview, zmq.Frame.buffer)
    recv_ns: int  # wall clock at receipt, ns since the Unix epoch -> MCAP log_time
    t_ns: int | None = None  # override of publish_time; default: the header's t_ns
    seq: int | None = None  # override of sequence; default: the header's seq


class Recorded(NamedTuple):
    """One message read back: ``body`` is the frame list of an input, or the decoded record."""

    topic: str  # the original topic (for ``_other`` channel messages: decoded with replacement)
    log_time: int
    publish_time: int
    body: list[bytes] | ResultRecord | LateRecord


# ---------------------------------------------------------------- raw message codec


def _decoded_header(frame: bytes) -> tuple[bool, Any]:
    """(is exactly one msgpack object readable by a default msgpack reader, that object)."""
    if not frame:
        return False, None
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(frame))
    try:
        unpacker.feed(frame)
        obj = unpacker.unpack()
    except (msgpack.OutOfData, msgpack.FormatError, msgpack.StackError, ValueError, TypeError):
        return False, None
    return unpacker.tell() == len(frame), obj


def _bin_header(n: int) -> bytes:
    """msgpack bin 8/16/32 prefix, so a large payload is copied once (into the record) and not twice."""
    if n < 2**8:
        return struct.pack(">BB", 0xC4, n)
    if n < 2**16:
        return struct.pack(">BH", 0xC5, n)
    if n < 2**32:
        return struct.pack(">BI", 0xC6, n)
    raise ValueError(f"a frame of {n} bytes does not fit a msgpack bin")


def encode_raw(frames: list[bytes], topic_channel: bool = True) -> tuple[str, bytes, Any]:
    """(channel topic, MCAP message bytes, decoded header or None) for one multipart message."""
    if not frames:
        raise ValueError("a ZeroMQ message has at least one frame")
    topic_b = bytes(frames[0])
    try:
        topic = topic_b.decode("utf-8") if topic_channel else None
    except UnicodeDecodeError:
        topic = None
    packer = msgpack.Packer(use_bin_type=True)  # per call: a Packer is not thread-safe
    parts: list[bytes] = []
    n_keys = 0
    if topic is None:
        parts += [packer.pack("topic"), packer.pack(topic_b)]
        n_keys += 1
    header = None
    if len(frames) >= 2:
        hdr_b = bytes(frames[1])
        ok, header = _decoded_header(hdr_b)
        parts += [packer.pack("header"), hdr_b] if ok else [packer.pack("header_bin"), packer.pack(hdr_b)]
        n_keys += 1
        if not ok:
            header = None
    if len(frames) >= 3:
        payload = memoryview(frames[2]).cast("B")
        parts += [packer.pack("payload"), _bin_header(len(payload)), payload]
        n_keys += 1
    if len(frames) >= 4:
        parts += [packer.pack("extra"), packer.pack_array_header(len(frames) - 3)]
        parts += [packer.pack(bytes(f)) for f in frames[3:]]
        n_keys += 1
    data = b"".join([packer.pack_map_header(n_keys), *parts])
    return (OTHER_TOPIC if topic is None else topic), data, header


def decode_raw(channel_topic: str, data: bytes) -> list[bytes]:
    """The original frames of an input message (inverse of ``encode_raw``, byte for byte)."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(data), 1))
    unpacker.feed(data)
    spans: dict[str, tuple[int, int]] = {}
    for _ in range(unpacker.read_map_header()):
        key = unpacker.unpack()
        start = unpacker.tell()
        unpacker.skip()
        spans[key] = (start, unpacker.tell())

    def value(key: str) -> Any:
        a, b = spans[key]
        return msgpack.unpackb(data[a:b], raw=False)

    frames = [value("topic") if "topic" in spans else channel_topic.encode()]
    if "header" in spans:
        a, b = spans["header"]
        frames.append(bytes(data[a:b]))
    elif "header_bin" in spans:
        frames.append(value("header_bin"))
    if "payload" in spans:
        frames.append(value("payload"))
    if "extra" in spans:
        frames.extend(value("extra"))
    return frames


def _u64_or(value: Any, default: int) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _U64:
        return value
    return default


# ---------------------------------------------------------------- recorder


class _FileTail:
    """The MCAP writer's output stream: bytes reach the file only whole, in order, at the right offset.

    Why not a buffered file: when the disk fills, a buffered write can put part of a chunk on disk
    and raise after the writer has moved on; a retry then appends after the torn bytes and the file
    is unreadable from there. Here ``drain`` writes at the known end with ``pwrite``; if that fails,
    the file is cut back to its last whole write and the bytes stay pending for the next attempt.
    ``tell`` counts pending bytes too: the writer's index offsets are those the bytes will have.
    """

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        self.size = 0  # bytes in the file, all of them whole writer output
        self.pending = bytearray()

    def write(self, data: bytes) -> int:
        self.pending += data
        return len(data)

    def tell(self) -> int:
        return self.size + len(self.pending)

    def flush(self) -> None:  # the writer's flush() ends with this
        self.drain()

    def drain(self) -> None:
        done = 0
        with memoryview(self.pending) as view:
            try:
                while done < len(view):
                    done += os.pwrite(self.fd, view[done:], self.size + done)
            except OSError:
                os.ftruncate(self.fd, self.size)  # nothing torn stays behind
                raise
        self.size += done
        self.pending.clear()


def keep_earlier(path: Path) -> Path | None:
    """Move an earlier recording at ``path`` aside, to ``<stem>.<its mtime, UTC>.mcap``; its new path.

    Why: a daemon restarted by its supervisor after a crash opens the same ``mcap_path``; truncating it
    destroyed the one recording that shows what led to the crash. An empty file holds nothing and is
    simply reused. Raises OSError when the file cannot be moved (then nothing may overwrite it).
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    if st.st_size == 0 or not path.is_file():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(st.st_mtime))
    suffix = path.suffix or ".mcap"
    for n in range(1000):
        target = path.with_name(f"{path.stem}.{stamp}{f'-{n}' if n else ''}{suffix}")
        try:
            os.link(path, target)  # never replaces an existing file, unlike rename
        except FileExistsError:
            continue
        except OSError:  # a file system without hard links (FAT, some network mounts): rename a free name
            if target.exists():
                continue
            os.rename(path, target)
            return target
        path.unlink()
        return target
    raise OSError(f"cannot move the earlier recording {path} aside: 1000 names taken")


class McapRecorder:
    """A sink (``name``/``write``/``close``) recording RawMessage, ResultRecord and LateRecord items.

    Thread-safe: the ingest path may record inputs while a supervisor worker records results. A
    non-empty file already at ``path`` is kept (:func:`keep_earlier`; ``earlier`` says where it went).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        compression: str = "zstd",
        chunk_size: int = 1024 * 1024,
        flush_interval_s: float = 1.0,
        fsync: bool = False,
        max_channels: int = 1024,
        name: str = "mcap",
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {sorted(COMPRESSIONS)}, got {compression!r}")
        if flush_interval_s < 0:
            raise ValueError(f"flush_interval_s must be >= 0, got {flush_interval_s}")
        self.name = name
        self.path = Path(path)
        self.flush_interval_s = flush_interval_s
        self.fsync = fsync
        self.max_channels = max_channels
        self._lock = threading.Lock()
        self.earlier = keep_earlier(self.path)
        self._out = _FileTail(self.path)  # owned until close()
        self._writer = Writer(self._out, chunk_size=chunk_size, compression=COMPRESSIONS[compression])  # type: ignore[arg-type]
        self._writer.start(profile="", library="sacmf")
        self._writer.add_metadata(
            "sacmf", {"raw_layout": str(RAW_LAYOUT_VERSION), "result_schema": str(SCHEMA_VERSION)}
        )
        self._out.drain()  # a valid (empty) MCAP from the start, even if we die before the first chunk
        self._channels: dict[tuple[str, str], int] = {}  # (topic, content) -> channel id
        self._det_seq: dict[str, int] = {}
        self._last_flush = time.monotonic()
        self._unflushed = 0  # messages added since the last flush
        self._stalled: OSError | None = None  # the last failed write-out, until one succeeds
        self._closed = False
        self.messages = 0
        self._stop = threading.Event()
        self._flusher: threading.Thread | None = None
        if flush_interval_s > 0:  # a quiet stream must not keep its last results in memory indefinitely
            self._flusher = threading.Thread(target=self._flush_when_quiet, name=f"{name}-flush", daemon=True)
            self._flusher.start()

    def write(self, item: RawMessage | ResultRecord | LateRecord) -> None:
        if isinstance(item, RawMessage):
            self.record_input(item.frames, item.recv_ns, t_ns=item.t_ns, seq=item.seq)
        elif isinstance(item, ResultRecord):
            self.record_result(item)
        elif isinstance(item, LateRecord):
            self.record_late(item)
        else:
            raise TypeError(f"sink {self.name!r} cannot record {type(item).__name__}")

    def record_input(
        self, frames: list[bytes], recv_ns: int, *, t_ns: int | None = None, seq: int | None = None
    ) -> None:
        """Record one received multipart message; header t_ns/seq are used unless overridden."""
        try:
            name: str | None = bytes(frames[0]).decode("utf-8") if frames else None
        except UnicodeDecodeError:
            name = None
        with self._lock:
            own = (name, CONTENT_INPUT) in self._channels or len(self._channels) < self.max_channels
            topic, data, header = encode_raw(frames, topic_channel=own)
            hdr = header if isinstance(header, dict) else {}
            publish = _u64_or(hdr.get("t_ns") if t_ns is None else t_ns, recv_ns)
            sequence = _u64_or(hdr.get("seq") if seq is None else seq, 0) % _U32
            self._add(topic, CONTENT_INPUT, recv_ns, publish, sequence, data)

    def record_result(self, record: ResultRecord, log_time_ns: int | None = None) -> None:
        data = msgpack.packb(to_wire(record), use_bin_type=True)
        log_time = time.time_ns() if log_time_ns is None else log_time_ns
        with self._lock:
            topic = record.topic
            sequence = self._det_seq.get(topic, 0)
            publish = _u64_or(record.end_ns, log_time)
            self._add(topic, CONTENT_RESULT, log_time, publish, sequence % _U32, data)
            self._det_seq[topic] = sequence + 1  # only once recorded: a refused record leaves no gap

    def record_late(self, record: LateRecord) -> None:
        data = msgpack.packb(to_wire(record), use_bin_type=True)
        with self._lock:
            publish = _u64_or(record.t_ns, record.recv_ns)
            seq = 0 if record.seq is None else record.seq % _U32
            self._add(f"late/{record.group}", CONTENT_LATE, record.recv_ns, publish, seq, data)

    def flush(self) -> None:
        """Close the current chunk and push it to the OS (and to disk with ``fsync=True``)."""
        with self._lock:
            self._flush_locked()

    def close(self) -> None:
        """Write the summary and index (the file then opens with the seeking reader) and close.

        Raises the write error if the bytes cannot reach the file; the file keeps every whole chunk
        written before, readable by a linear scan (``read_recording``)."""
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._writer.finish()
                self._out.drain()
                if self.fsync:
                    os.fsync(self._out.fd)
            finally:
                os.close(self._out.fd)
        if self._flusher is not None:
            self._flusher.join(5)

    # ------------------------------------------------------------------ internals
    def _add(self, topic: str, content: str, log_time: int, publish: int, sequence: int, data: bytes) -> None:
        if self._closed:
            raise RuntimeError(f"sink {self.name!r} is closed")
        if self._stalled is not None:  # the last write-out failed: retry it; while it fails, refuse this
            self._flush_locked(close_chunk=False)
        channel = self._channels.get((topic, content))
        if channel is None:
            channel = self._writer.register_channel(
                topic=topic,
                message_encoding=MessageEncoding.MessagePack,
                schema_id=0,
                metadata={CONTENT_KEY: content},
            )
            self._channels[(topic, content)] = channel
        self._writer.add_message(
            channel_id=channel, log_time=log_time, data=data, publish_time=publish, sequence=sequence
        )
        self.messages += 1
        self._unflushed += 1
        due = time.monotonic() - self._last_flush >= self.flush_interval_s
        if due or self._out.pending:  # due, or a chunk filled up and waits in _out
            with contextlib.suppress(OSError):  # this message is taken (it waits in memory); the next _add retries
                self._flush_locked(close_chunk=due)

    def _flush_locked(self, close_chunk: bool = True) -> None:
        """Write out what the writer produced; with ``close_chunk`` also the chunk in progress (and fsync).
        On failure: logged once per outage, remembered in ``_stalled``, raised."""
        if self._closed:
            return
        try:
            if close_chunk:
                self._writer.flush()  # closes the chunk into _out and drains it
                if self.fsync:
                    os.fsync(self._out.fd)
            else:
                self._out.drain()
        except OSError as exc:
            if self._stalled is None:
                log.warning(
                    "recording_write_failed", path=str(self.path), error=repr(exc), pending=len(self._out.pending)
                )
            self._stalled = exc
            raise
        if self._stalled is not None:
            log.info("recording_write_recovered", path=str(self.path))
            self._stalled = None
        if close_chunk:
            self._last_flush = time.monotonic()
            self._unflushed = 0

    def _flush_when_quiet(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            with self._lock:
                if self._closed:
                    return
                if self._unflushed or self._stalled is not None:
                    with contextlib.suppress(OSError):  # logged; the next message or tick retries
                        self._flush_locked()


# ---------------------------------------------------------------- reader


@dataclass
class Damage:
    """Parts of a recording that could not be read, for the caller to report (``read_recording``)."""

    chunks: int = 0  # whole chunks skipped: present, but corrupt inside (checksum, compression, records)
    messages: int = 0  # messages they held, by the message indexes that follow them (when readable)
    tail_from: int | None = None  # byte offset from which a finished (footer-ended) file was unreadable
    truncated: bool = False  # an unfinished file ended inside a record: the expected torn tail of a crash

    @property
    def lost(self) -> bool:
        """Whether readable-looking data was lost (the torn tail of a crash is not counted as such)."""
        return bool(self.chunks or self.tail_from is not None)

    def describe(self) -> str:
        parts = []
        if self.chunks:
            parts.append(f"{self.chunks} corrupt chunk(s) skipped, {self.messages} message(s) in them lost")
        if self.tail_from is not None:
            parts.append(f"unreadable from byte {self.tail_from} to the end")
        return "; ".join(parts) or "intact"


def read_recording(
    path: str | os.PathLike[str],
    *,
    strict: bool = False,
    contents: tuple[str, ...] = (CONTENT_INPUT, CONTENT_RESULT, CONTENT_LATE),
    damage: Damage | None = None,
) -> Iterator[Recorded]:
    """Every message in file (= recording) order, decoded; tolerant of an unfinished or damaged file.

    A linear scan rather than the index: it works on files whose writer crashed (no summary), and
    file order is arrival order, which is what a replayer re-publishes. Chunks are framed by their
    length, so a chunk that is corrupt inside (a flipped bit fails its checksum) is skipped and the
    scan goes on; ``damage`` (when given) counts what was lost and an error is logged. At a truncated
    tail it stops (``strict=True``: raises RecordingTruncated after yielding the readable prefix).
    Only channels whose content is in ``contents`` are decoded (a replay needs the inputs alone, so
    results of a newer schema do not stop it); a message that cannot be decoded, a channel that is
    not sacmf's, or one not in MessagePack is an error (McapError).
    """
    damage = damage if damage is not None else Damage()
    channels: dict[int, Channel] = {}
    count = 0
    started = False  # the magic and a first record were read: from here on, a bad tail is a truncation
    lost_chunk = False  # the message indexes right after a skipped chunk say how many messages it held
    with open(path, "rb") as fh:
        finished = _finished(fh, os.fstat(fh.fileno()).st_size)  # closed by its writer: footer and summary
        if finished:
            channels.update(_summary_channels(fh))  # a channel defined in a corrupt chunk is known there too
        fh.seek(0)
        records = StreamReader(fh, emit_chunks=True).records
        while True:
            at = fh.tell()
            try:
                rec = next(records)
            except StopIteration:
                return
            except Exception as exc:  # McapError, struct/EOF errors: the framing itself is broken
                if not started:
                    raise NotARecording(f"{path}: not an MCAP recording ({exc!r})") from exc
                if finished:  # the file was closed cleanly: this is damage, not a crash's tail
                    damage.tail_from = at
                    log.error("recording_damaged", path=str(path), messages=count, error=repr(exc), offset=at)
                    if strict:
                        raise RecordingTruncated(f"{path}: unreadable from byte {at}: {exc!r}") from exc
                    return
                damage.truncated = True
                if strict:
                    raise RecordingTruncated(f"{path}: unreadable after {count} messages: {exc!r}") from exc
                log.warning("recording_truncated", path=str(path), messages=count, error=repr(exc))
                return
            started = True
            if isinstance(rec, MessageIndex):
                if lost_chunk:
                    damage.messages += len(rec.records)
                continue
            lost_chunk = False
            if isinstance(rec, Chunk):
                try:
                    inner = breakup_chunk(rec, validate_crc=True)
                except Exception as exc:
                    damage.chunks += 1
                    lost_chunk = True
                    log.error("recording_chunk_skipped", path=str(path), error=repr(exc), offset=at)
                    continue
            else:
                inner = [rec]
            for r in inner:
                if isinstance(r, Channel):
                    _check_channel(path, r)
                    channels[r.id] = r
                elif isinstance(r, Message):
                    channel = channels.get(r.channel_id)
                    if channel is None and damage.chunks:  # defined in a chunk that was skipped: lost too
                        damage.messages += 1
                        continue
                    if channel is None:
                        raise McapError(f"{path}: message on unknown channel {r.channel_id}")
                    count += 1
                    if channel.metadata.get(CONTENT_KEY) in contents:
                        yield _decode_message(path, channel, r)


def _summary_channels(fh: Any) -> dict[int, Channel]:
    """The channels listed in a finished file's summary ({} for a damaged one)."""
    try:
        fh.seek(0)
        summary = make_reader(fh).get_summary()
    except Exception:  # a damaged summary: the scan finds the channels where they were written
        return {}
    return dict(summary.channels) if summary is not None else {}


def _finished(fh: Any, size: int) -> bool:
    """Whether the file ends with the MCAP magic, i.e. its writer closed it (footer and all)."""
    if size < 8:
        return False
    fh.seek(size - 8)
    return fh.read(8) == b"\x89MCAP0\r\n"


def _check_channel(path: Any, channel: Channel) -> None:
    content = channel.metadata.get(CONTENT_KEY)
    if content not in (CONTENT_INPUT, CONTENT_RESULT, CONTENT_LATE):
        raise McapError(f"{path}: channel {channel.topic!r} is not a sacmf channel (metadata {channel.metadata})")
    if channel.message_encoding != MessageEncoding.MessagePack:
        raise McapError(
            f"{path}: sacmf channel {channel.topic!r} has message encoding {channel.message_encoding!r}, not msgpack"
        )


class UnreadableMessage(McapError):
    """A message on a sacmf channel that this version cannot decode (a newer schema, damaged bytes)."""


def _decode_message(path: Any, channel: Channel, msg: Message) -> Recorded:
    try:
        if channel.metadata.get(CONTENT_KEY) == CONTENT_INPUT:
            frames = decode_raw(channel.topic, msg.data)
            topic = channel.topic if channel.topic != OTHER_TOPIC else frames[0].decode("utf-8", "replace")
            return Recorded(topic, msg.log_time, msg.publish_time, frames)
        record = from_wire(msgpack.unpackb(msg.data, raw=False))
    except Exception as exc:  # RecordError (e.g. a newer schema), msgpack's errors, a malformed input map
        raise UnreadableMessage(
            f"{path}: cannot decode a message on channel {channel.topic!r} (log time {msg.log_time}): {exc}"
        ) from exc
    return Recorded(channel.topic, msg.log_time, msg.publish_time, record)
