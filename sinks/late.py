"""Late-data sink: every message that missed its window, one JSON line each (docs/results.md §4).

Why a file and not just a counter: late data is the evidence for tuning ``allowed_lateness`` and for
spotting a drifting sensor clock, and the protocol promises it is never silently dropped. The record
keeps (sensor, seq) so the message itself can be found in an MCAP recording.

``late_record`` adapts the windower's ``on_late(group, sensor, item, reason)`` callback without
importing ``ingest``: it only needs ``item.t_ns`` and ``item.seq``, plus ``item.values`` for a run of
radiation samples (a camera frame counts as one sample).
"""

from __future__ import annotations

import os
from typing import Any

from sinks.jsonl import JsonlSink
from sinks.record import LateRecord


def late_record(group: str, sensor: str, item: Any, reason: str, recv_ns: int) -> LateRecord:
    """A LateRecord from the windower's late item (a Frame or a RadChunk, duck-typed)."""
    values = getattr(item, "values", None)
    n_samples = 1 if values is None else len(values)
    return LateRecord(
        group=group,
        sensor=sensor,
        t_ns=item.t_ns,
        n_samples=n_samples,
        reason=reason,
        recv_ns=recv_ns,
        seq=getattr(item, "seq", None),
    )


class LateSink(JsonlSink):
    """A JsonlSink that only accepts LateRecords, so results never end up in the late log by mistake."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = 16 * 2**20,
        backups: int = 3,
        fsync: str = "rotate",
        name: str = "late",
    ) -> None:
        super().__init__(path, max_bytes=max_bytes, backups=backups, fsync=fsync, name=name)

    def write(self, record: LateRecord) -> None:
        if not isinstance(record, LateRecord):
            raise TypeError(f"sink {self.name!r} takes LateRecord, got {type(record).__name__}")
        super().write(record)
