"""Fan results out to every sink so that no sink can stall the pipeline or another sink.

Why one bounded queue and one worker thread per sink: a sink can fail in three ways - raise (a bug, a
bad record), fail with an OSError (disk full, a vanished mount), or hang (a peer that does not answer).
Sharing a thread would let any of these hold up the others; sharing a queue would let a slow sink fill
memory. So ``submit`` only appends to each sink's own deque under a short lock and returns: when a
queue is full the *oldest* record for that sink is dropped and counted (freshness wins, daemon.md
§2.4), and the caller never blocks.

A failing write is retried with exponential backoff (``base_s * 2**k``, capped at ``cap_s``): the sink
is not hammered while a disk is full, and it catches up by itself when the fault clears. A record that
fails ``max_attempts`` times in a row is abandoned (``failed``) so that one poison record cannot wedge
a sink forever; during an outage that also paces how fast the queue is consumed. Failures are logged
with structlog at most once per ``log_interval_s`` per sink, with the count of suppressed lines, and a
recovery is logged once.

Each worker is the only thread that touches its sink after construction (pyzmq sockets are not
thread-safe): it also closes the sink when ``close`` asks it to drain.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

log = structlog.get_logger("sacmf.sinks")

EXIT_GRACE_S = 0.2  # how long close waits past its deadline for a worker that is not inside a write


class Sink(Protocol):
    name: str

    # None when written; False when the sink chose not to write it (a rate limit): counted as skipped
    def write(self, record: Any) -> bool | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Backoff between attempts of one sink: base_s, 2*base_s, 4*base_s, ... at most cap_s."""

    base_s: float = 0.05
    cap_s: float = 5.0
    max_attempts: int = 5  # per record; then the record is abandoned (counted in ``failed``)

    def __post_init__(self) -> None:
        if self.base_s <= 0 or self.cap_s < self.base_s:
            raise ValueError(f"need 0 < base_s <= cap_s, got base_s={self.base_s}, cap_s={self.cap_s}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    def delay(self, consecutive_failures: int) -> float:
        """Wait after the n-th consecutive failure (n >= 1) of a sink, across records."""
        return min(self.cap_s, self.base_s * 2.0 ** min(consecutive_failures - 1, 62))


class _Lane:
    """One sink's queue, worker and counters."""

    def __init__(self, sink: Sink, maxlen: int) -> None:
        self.sink = sink
        self.name: str = sink.name
        self.queue: deque[Any] = deque()
        self.maxlen = maxlen
        self.cond = threading.Condition()
        self.closing = False
        self.deadline = float("inf")  # monotonic time after which a closing worker gives up
        self.thread: threading.Thread | None = None
        self.consecutive_failures = 0
        self.done = threading.Event()
        self.in_flight = False  # the worker holds a record it took from the queue (under ``cond``)
        self.given_up = False  # close() counted that record as abandoned: it must not count again
        self.writing = False  # the worker is inside sink.write()


class SinkSupervisor:
    """Owns the sinks: ``submit(record)`` fans out without blocking, ``close(timeout)`` drains them.

    Counters (plain dicts keyed by sink name, read at any time, e.g. by a Prometheus collector):
    ``written``, ``skipped`` (the sink chose not to write them: ``write`` returned False),
    ``errors`` (failed write attempts), ``dropped`` (oldest records dropped on a full queue),
    ``failed`` (records abandoned after ``max_attempts``), ``abandoned`` (left in the queue, or inside a
    hung ``write``, when ``close`` timed out). All but ``errors`` add up to the records submitted.
    """

    def __init__(
        self,
        sinks: Iterable[Sink],
        *,
        queue_size: int = 1024,
        retry: RetryPolicy | None = None,
        log_interval_s: float = 10.0,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        lanes = [_Lane(s, queue_size) for s in sinks]
        names = [lane.name for lane in lanes]
        if len(set(names)) != len(names):
            raise ValueError(f"sink names must be unique, got {names}")
        self.retry = retry or RetryPolicy()
        self.log_interval_s = log_interval_s
        self._lanes = {lane.name: lane for lane in lanes}
        self.written = dict.fromkeys(names, 0)
        self.skipped = dict.fromkeys(names, 0)
        self.errors = dict.fromkeys(names, 0)
        self.dropped = dict.fromkeys(names, 0)
        self.failed = dict.fromkeys(names, 0)
        self.abandoned = dict.fromkeys(names, 0)
        self._last_log: dict[str, float] = {}
        self._suppressed = dict.fromkeys(names, 0)
        self._closed = False
        self._finished = False  # finish_closing ran: hung lanes' records are counted once
        for lane in lanes:
            name = f"sink-{lane.name}"
            lane.thread = threading.Thread(target=self._run, args=(lane,), name=name, daemon=True)
            lane.thread.start()

    @property
    def names(self) -> list[str]:
        return list(self._lanes)

    def queue_depths(self) -> dict[str, int]:
        return {name: len(lane.queue) for name, lane in self._lanes.items()}

    def submit(self, record: Any) -> None:
        """Queue ``record`` for every sink; never blocks on a sink (drops that sink's oldest instead)."""
        if self._closed:
            raise RuntimeError("SinkSupervisor is closed")
        for lane in self._lanes.values():
            with lane.cond:
                if len(lane.queue) >= lane.maxlen:
                    lane.queue.popleft()
                    self.dropped[lane.name] += 1
                lane.queue.append(record)
                lane.cond.notify()

    def close(self, timeout: float = 10.0) -> bool:
        """Drain every queue, then close every sink, all within ``timeout`` seconds.

        Returns True when every queued record was handled (written or counted as failed) and every
        sink closed in time. Records still queued at the deadline are counted in ``abandoned`` (and
        logged); a worker stuck inside a hung sink is left behind (it is a daemon thread).
        """
        deadline = time.monotonic() + timeout
        self.start_closing(deadline)
        return self.finish_closing(deadline)

    def start_closing(self, deadline: float) -> None:
        """Tell every worker to drain and close its sink by ``deadline`` (monotonic); returns at once,
        so that several supervisors drain side by side (``finish_closing`` waits)."""
        if self._closed:
            return
        self._closed = True
        for lane in self._lanes.values():
            with lane.cond:
                lane.closing = True
                lane.deadline = deadline
                lane.cond.notify_all()

    def finish_closing(self, deadline: float) -> bool:
        """Wait for the workers until ``deadline``; see ``close`` for what is returned and counted."""
        if not self._closed:
            raise RuntimeError("finish_closing() before start_closing()")
        if self._finished:
            return all(lane.done.is_set() for lane in self._lanes.values())
        self._finished = True
        clean = True
        for lane in self._lanes.values():
            assert lane.thread is not None
            lane.thread.join(max(0.0, deadline - time.monotonic()))
            if lane.thread.is_alive() and not lane.writing:
                # between attempts, or taking its last record, at the deadline: it sees the deadline and
                # stops by itself (counting what it leaves), unlike a worker stuck inside a write
                lane.thread.join(EXIT_GRACE_S)
            if lane.thread.is_alive():  # stuck inside the sink: give up on what it still holds
                with lane.cond:
                    # the record inside the hung write() too, so the counters still add up to what
                    # was submitted; should the write return after all, it is not counted again
                    self.abandoned[lane.name] += len(lane.queue) + int(lane.in_flight)
                    lane.given_up = lane.in_flight
                    lane.queue.clear()
                clean = False
            elif self.abandoned[lane.name]:
                clean = False
            if self.abandoned[lane.name]:
                log.error("sink_records_abandoned", sink=lane.name, records=self.abandoned[lane.name],
                          hung=lane.thread.is_alive())  # fmt: skip
        return clean

    # ------------------------------------------------------------------ worker
    def _run(self, lane: _Lane) -> None:
        try:
            while True:
                with lane.cond:
                    while not lane.queue and not lane.closing:
                        lane.cond.wait()
                    if not lane.queue:
                        break  # closing and drained
                    if time.monotonic() >= lane.deadline:
                        self.abandoned[lane.name] += len(lane.queue)
                        lane.queue.clear()
                        break
                    record = lane.queue.popleft()
                    lane.in_flight = True
                outcome = self._deliver(lane, record)
                with lane.cond:
                    lane.in_flight = False
                    if not lane.given_up:
                        counter = {"written": self.written, "skipped": self.skipped}.get(outcome, self.failed)
                        counter[lane.name] += 1
                    lane.given_up = False
        finally:
            try:
                lane.sink.close()
            except Exception as exc:  # a sink's close must not kill the others' shutdown
                log.warning("sink_close_failed", sink=lane.name, error=repr(exc))
            lane.done.set()

    def _deliver(self, lane: _Lane, record: Any) -> str:
        """Write with retries: "written", "skipped" or "failed" (the caller counts it)."""
        attempts = 0
        while True:
            lane.writing = True
            try:
                skipped = lane.sink.write(record) is False
            except Exception as exc:  # any failure of one sink stays inside its lane
                lane.writing = False
                attempts += 1
                lane.consecutive_failures += 1
                self.errors[lane.name] += 1
                last = attempts >= self.retry.max_attempts
                self._log_failure(lane, exc, last)
                if last or not self._backoff(lane):
                    return "failed"
                continue
            lane.writing = False
            if skipped:
                return "skipped"  # no write was attempted: says nothing of a failing sink's health
            if lane.consecutive_failures:
                log.info("sink_recovered", sink=lane.name, failures=lane.consecutive_failures)
                lane.consecutive_failures = 0
            return "written"

    def _backoff(self, lane: _Lane) -> bool:
        """Sleep before the next attempt; False when close's deadline leaves no time for it."""
        wait = self.retry.delay(lane.consecutive_failures)
        with lane.cond:
            if lane.closing:
                wait = min(wait, lane.deadline - time.monotonic())
                if wait <= 0:
                    return False
            # submit() and close() notify this condition; a wake-up only ends the wait when close's
            # deadline has passed, otherwise the rest of the delay is slept out (up to that deadline:
            # a close that begins during a long wait must not be waited out).
            end = time.monotonic() + wait
            while True:
                if lane.closing:
                    if time.monotonic() >= lane.deadline:
                        return False
                    end = min(end, lane.deadline)
                left = end - time.monotonic()
                if left <= 0:
                    return True
                lane.cond.wait(left)

    def _log_failure(self, lane: _Lane, exc: BaseException, gave_up: bool) -> None:
        now = time.monotonic()
        last = self._last_log.get(lane.name)
        if last is not None and now - last < self.log_interval_s:
            self._suppressed[lane.name] += 1
            return
        self._last_log[lane.name] = now
        suppressed, self._suppressed[lane.name] = self._suppressed[lane.name], 0
        # the record's last attempt: it is given up (counted in ``failed``), not retried
        after = {"record_failed": True} if gave_up else {"retry_in_s": self.retry.delay(lane.consecutive_failures)}
        log.warning(
            "sink_write_failed",
            sink=lane.name,
            error=repr(exc)[:300],
            consecutive_failures=lane.consecutive_failures,
            suppressed=suppressed,
            **after,
        )
