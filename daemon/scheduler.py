"""Micro-batching of windows in front of the model, with a bounded queue and an explicit loss policy.

Why batch at all: one forward pass over B windows costs far less than B passes (the per-call overhead of
PyTorch and of the Python glue dominates small models), so under load batching raises throughput; but
waiting for a batch adds latency. The rule is the one Triton, TorchServe and Ray Serve use (daemon.md
§2.1-2.3): a batch fires as soon as it is full **or** when its oldest window has waited ``max_delay_s``.
Idle or light traffic therefore costs at most ``max_delay_s`` of extra latency, and heavy traffic gets
full batches.

Why a bounded queue with two policies (daemon.md §2.4): ZeroMQ PUB/SUB cannot push back on sensors, so
if the model is slower than the windows arrive something must give. In live operation freshness wins:
the *oldest* queued window is dropped (and counted), so results stay current. Replaying a recording
must be lossless instead: ``put`` blocks, which stalls the ingest pipe, the ingest worker and finally
the PUSH sender of the recording.

The queue is thread-safe (one condition variable): producers call ``put``; one consumer calls
``next_batch``. ``close`` ends intake; the consumer then gets what is left in full batches without
waiting for the delay (shutdown drain), and ``None`` once the queue is empty.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

POLICIES = ("drop_oldest", "block")


class QueueClosed(RuntimeError):
    """``put`` after ``close``: intake has ended (the daemon is draining)."""


@dataclass(slots=True)
class Queued(Generic[T]):
    """One queued item and when it was queued (monotonic seconds), for the queue-wait metric."""

    item: T
    enqueued_s: float


class BatchQueue(Generic[T]):
    """Bounded FIFO that hands out batches: full, or the oldest item has waited ``max_delay_s``.

    Counters (plain ints, read by the metrics collector): ``enqueued``, ``dropped`` (live policy, the
    oldest item made room for a new one), ``batches``.
    """

    def __init__(
        self,
        max_batch_size: int,
        max_delay_s: float,
        capacity: int,
        policy: str = "drop_oldest",
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {max_delay_s}")
        if capacity < max_batch_size:
            raise ValueError(f"capacity ({capacity}) must be >= max_batch_size ({max_batch_size})")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.capacity = capacity
        self.policy = policy
        self.clock = clock
        self._items: deque[Queued[T]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.enqueued = 0
        self.dropped = 0
        self.batches = 0

    # ------------------------------------------------------------------ producer side
    def put(self, item: T, timeout: float | None = None) -> bool:
        """Queue ``item``. Live policy: never blocks (drops the oldest when full). Block policy: waits
        for room, up to ``timeout`` seconds (None: forever); returns False if it timed out.

        Raises QueueClosed after ``close``.
        """
        with self._cond:
            if self._closed:
                raise QueueClosed("the queue is closed")
            if len(self._items) >= self.capacity:
                if self.policy == "drop_oldest":
                    self._items.popleft()
                    self.dropped += 1
                else:
                    end = None if timeout is None else self.clock() + timeout
                    while len(self._items) >= self.capacity and not self._closed:
                        left = None if end is None else end - self.clock()
                        if left is not None and left <= 0:
                            return False
                        self._cond.wait(left)
                    if self._closed:
                        raise QueueClosed("the queue was closed while waiting for room")
            self._items.append(Queued(item, self.clock()))
            self.enqueued += 1
            self._cond.notify_all()
            return True

    def set_policy(self, policy: str) -> None:
        """Switch policy at run time (the daemon makes its drain lossless this way)."""
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        with self._cond:
            self.policy = policy

    def close(self) -> None:
        """End intake: no more ``put``; the consumer drains what is queued without waiting."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ------------------------------------------------------------------ consumer side
    def next_batch(self, timeout: float | None = None) -> list[Queued[T]] | None:
        """The next batch, oldest first, at most ``max_batch_size`` items.

        Waits until the batch is full, or its oldest item has waited ``max_delay_s``, or the queue is
        closed. Returns ``[]`` when ``timeout`` seconds pass with nothing ready (so the caller's loop can
        tick), and ``None`` when the queue is closed and empty (the consumer should stop).
        """
        with self._cond:
            end = None if timeout is None else self.clock() + timeout
            while True:
                n = len(self._items)
                if n >= self.max_batch_size or (n and self._closed):
                    return self._take()
                if n:
                    due = self._items[0].enqueued_s + self.max_delay_s
                    now = self.clock()
                    if now >= due:
                        return self._take()
                    wait = due - now
                elif self._closed:
                    return None
                else:
                    wait = None
                if end is not None:
                    left = end - self.clock()
                    if left <= 0:
                        return []
                    wait = left if wait is None else min(wait, left)
                self._cond.wait(wait)

    def _take(self) -> list[Queued[T]]:
        k = min(self.max_batch_size, len(self._items))
        batch = [self._items.popleft() for _ in range(k)]
        self.batches += 1
        self._cond.notify_all()  # room for blocked producers
        return batch

    # ------------------------------------------------------------------ gauges
    @property
    def depth(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed
