"""JSON Lines file sink with size-based rotation (``file``, ``file.1`` ... ``file.N``, newest first).

Why these choices:

* One ``os.write`` of a whole line per record on an ``O_APPEND`` descriptor, no Python buffering: a
  crash of the daemon loses nothing already written, and a reader tailing the file never sees half a
  record from us. If a write fails part-way (disk full), the file is truncated back to the last whole
  line before the error propagates, so a retry cannot leave a corrupt line behind.
* Rotation by rename, like logrotate: ``file.{N-1}`` -> ``file.N`` ... ``file`` -> ``file.1``, then a
  new ``file``. The record that triggered the rotation is written after the rename, into the new file,
  so rotation never drops or splits a record; only files beyond ``backups`` are deleted (by design).
  A rotation that fails (a backup name taken by a directory, a read-only backup) is logged, counted
  in ``rotation_failures`` and retried ``ROTATE_RETRY_S`` later; meanwhile records go on into the live
  file past ``max_bytes``: the size bound gives way before a record is lost.
* Before each write the path is checked against the open descriptor's inode (like the stdlib's
  ``WatchedFileHandler``): if someone moved or deleted the file, or its directory vanished, we reopen
  instead of writing into an unlinked inode where records would silently disappear. If the reopen
  fails the OSError reaches the supervisor, which counts it and retries with backoff.
* The size that decides rotation is the open file's own (``fstat`` before each write), not a count
  kept in memory: a file truncated in place (logrotate's ``copytruncate``, ``: > file``) is neither
  rotated at once as an empty backup nor, after a failed write, "truncated back" to its old length.
* A file whose last line is cut short (power loss under ``"rotate"``, or a failed write that could
  not be truncated back) is cut back to its last whole line when it is opened, with a warning giving
  the bytes dropped: the next record would otherwise be glued onto the fragment, and the file would
  stop parsing there.
* ``fsync``: ``"always"`` (each record durable on power loss; one disk flush per record),
  ``"rotate"`` (at rotation and close; the default: power loss can cost the tail of the current
  file, a process crash cannot), ``"never"`` (leave it to the kernel). Unless ``"never"``, the
  directory is flushed too after a rotation or a file creation, so the renames and the new file
  survive a power loss as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from sinks.record import LateRecord, ResultRecord, to_wire

log = structlog.get_logger("sacmf.sinks")

FSYNC_POLICIES = ("always", "rotate", "never")
ROTATE_RETRY_S = 30.0  # after a failed rotation, the live file grows this long before the next try


def encode_line(record: ResultRecord | LateRecord) -> bytes:
    """One compact JSON object and a newline; NaN cannot occur (records reject non-finite floats)."""
    return json.dumps(to_wire(record), separators=(",", ":"), allow_nan=False).encode() + b"\n"


def rotated_paths(path: str | os.PathLike[str], backups: int) -> list[Path]:
    """The files of a rotated log, oldest first: ``file.N`` ... ``file.1``, ``file``."""
    base = Path(path)
    return [base.with_name(f"{base.name}.{i}") for i in range(backups, 0, -1)] + [base]


def read_jsonl(path: str | os.PathLike[str], backups: int = 0) -> Iterator[dict]:
    """Every object in a rotated log, oldest first (missing files are skipped).

    A last line without its newline is a write cut short (a crash; the sink removes it when it next
    opens the file) and is skipped; a bad line anywhere else is corruption and raises.
    """
    for p in rotated_paths(path, backups):
        try:
            fh = open(p, "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            continue
        with fh:
            for line in fh:
                if not line.endswith(b"\n"):
                    break  # only the last line can lack it
                if line.strip():
                    yield json.loads(line)


class JsonlSink:
    """A sink (``name``/``write``/``close``) appending one JSON object per record to a rotated file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = 64 * 2**20,
        backups: int = 5,
        fsync: str = "rotate",
        name: str = "jsonl",
        encode: Callable[[ResultRecord | LateRecord], bytes] = encode_line,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if backups < 0:
            raise ValueError(f"backups must be >= 0, got {backups}")
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {FSYNC_POLICIES}, got {fsync!r}")
        self.name = name
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.fsync = fsync
        self._encode = encode
        self._fd: int | None = None
        self._size = 0
        self.written = 0
        self.rotations = 0
        self.rotation_failures = 0
        self._rotate_after = 0.0  # monotonic: no rotation attempt before it (set by a failed one)
        self.torn_bytes_dropped = 0  # fragments of a cut-short last line removed at open
        self._closed = False
        # Open eagerly so that a bad path is reported at start-up; the directory is not created:
        # a missing directory is a configuration error (or a vanished mount) that must be visible.
        self._open()

    # ------------------------------------------------------------------ public
    def write(self, record: ResultRecord | LateRecord) -> None:
        if self._closed:
            raise RuntimeError(f"sink {self.name!r} is closed")
        line = self._encode(record)
        self._ensure_open()
        if self._size > 0 and self._size + len(line) > self.max_bytes and time.monotonic() >= self._rotate_after:
            try:
                self._rotate()
            except OSError as exc:
                self.rotation_failures += 1
                self._rotate_after = time.monotonic() + ROTATE_RETRY_S
                log.warning("jsonl_rotation_failed", sink=self.name, path=str(self.path), error=repr(exc)[:300],
                            retry_in_s=ROTATE_RETRY_S, size=self._size, max_bytes=self.max_bytes)  # fmt: skip
            self._ensure_open()
        self._append(line)
        self.written += 1

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                if self.fsync != "never":
                    os.fsync(fd)
            finally:
                os.close(fd)

    # ------------------------------------------------------------------ internals
    def _open(self) -> None:
        created = not self.path.exists()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size = self._cut_torn_tail(fd)
            if created and self.fsync != "never":
                self._fsync_dir()
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._size = size

    def _cut_torn_tail(self, fd: int) -> int:
        """Truncate the file after its last newline when its last byte is not one; returns the size."""
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return size
        end = size
        while end > 0:  # scan back for the last newline, 64 KiB at a time
            start = max(0, end - 65536)
            chunk = os.pread(fd, end - start, start)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            end = start
        os.ftruncate(fd, end)
        self.torn_bytes_dropped += size - end
        log.warning("jsonl_torn_tail_dropped", sink=self.name, path=str(self.path), bytes=size - end)
        return end

    def _fsync_dir(self) -> None:
        dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _drop_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):  # the descriptor is gone either way
                os.close(fd)

    def _ensure_open(self) -> None:
        """Reopen when there is no descriptor or the path no longer names our file (moved/deleted)."""
        if self._fd is not None:
            try:
                on_disk, ours = os.stat(self.path), os.fstat(self._fd)
                same = on_disk.st_ino == ours.st_ino and on_disk.st_dev == ours.st_dev
            except OSError:
                same = False
            if same:
                self._size = ours.st_size  # truncated in place by someone else: the file's size counts
                return
            self._drop_fd()
        self._open()

    def _append(self, line: bytes) -> None:
        fd = self._fd
        assert fd is not None
        start = self._size
        view = memoryview(line)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if self.fsync == "always":
                os.fsync(fd)
        except OSError:
            try:
                os.ftruncate(fd, start)  # never leave half a record behind
            except OSError:
                self._drop_fd()  # cannot repair through this descriptor; reopen on the next write
            raise
        self._size = start + len(line)

    def _rotate(self) -> None:
        fd = self._fd
        assert fd is not None
        if self.fsync != "never":
            os.fsync(fd)  # the renamed file is complete on disk before we move on
        self._drop_fd()
        if self.backups == 0:
            os.unlink(self.path)
        else:
            paths = rotated_paths(self.path, self.backups)  # oldest first; paths[-1] is the live file
            paths[0].unlink(missing_ok=True)
            for older, newer in zip(paths[:-1], paths[1:], strict=True):
                if newer.exists():
                    os.replace(newer, older)
        self.rotations += 1
        self._open()  # creates the new file and, unless fsync is "never", flushes the directory
