"""BatchQueue: full-or-delay batching, drop-oldest (live) vs blocking (replay), and the shutdown drain."""

from __future__ import annotations

import threading
import time

import pytest

from daemon.scheduler import BatchQueue, QueueClosed


def test_a_full_batch_fires_at_once_without_waiting_for_the_delay():
    q: BatchQueue[int] = BatchQueue(max_batch_size=4, max_delay_s=30.0, capacity=16)
    for i in range(6):
        q.put(i)
    t0 = time.monotonic()
    batch = q.next_batch(timeout=5)
    assert time.monotonic() - t0 < 1.0  # far below the 30 s delay
    assert [b.item for b in batch] == [0, 1, 2, 3]
    assert q.depth == 2 and q.batches == 1


def test_a_partial_batch_fires_when_its_oldest_item_has_waited_the_delay():
    delay = 0.3
    q: BatchQueue[str] = BatchQueue(max_batch_size=8, max_delay_s=delay, capacity=16)
    q.put("a")
    t_first = time.monotonic()
    time.sleep(0.1)
    q.put("b")  # a later item does not restart the clock: the oldest one decides
    batch = q.next_batch(timeout=5)
    waited = time.monotonic() - t_first
    assert [b.item for b in batch] == ["a", "b"]
    assert delay - 0.02 <= waited < delay + 1.5  # generous upper bound: loaded CI machines
    assert batch[0].enqueued_s <= batch[1].enqueued_s


def test_the_batch_is_taken_as_soon_as_it_fills_up_while_waiting():
    q: BatchQueue[int] = BatchQueue(max_batch_size=3, max_delay_s=30.0, capacity=8)
    q.put(0)
    got: list = []
    consumer = threading.Thread(target=lambda: got.append(q.next_batch(timeout=10)))
    consumer.start()
    time.sleep(0.1)
    assert consumer.is_alive()  # one item, 30 s delay: still waiting
    t0 = time.monotonic()
    q.put(1)
    q.put(2)
    consumer.join(5)
    assert not consumer.is_alive() and time.monotonic() - t0 < 2.0
    assert [b.item for b in got[0]] == [0, 1, 2]


def test_zero_delay_runs_each_item_as_soon_as_the_consumer_is_free():
    q: BatchQueue[int] = BatchQueue(max_batch_size=8, max_delay_s=0.0, capacity=8)
    q.put(7)
    assert [b.item for b in q.next_batch(timeout=1)] == [7]


def test_timeout_returns_an_empty_batch_so_the_consumer_loop_can_tick():
    q: BatchQueue[int] = BatchQueue(max_batch_size=2, max_delay_s=0.05, capacity=4)
    t0 = time.monotonic()
    assert q.next_batch(timeout=0.1) == []
    assert time.monotonic() - t0 >= 0.09


def test_drop_oldest_keeps_the_newest_and_counts_the_drops():
    q: BatchQueue[int] = BatchQueue(max_batch_size=2, max_delay_s=0.0, capacity=3, policy="drop_oldest")
    t0 = time.monotonic()
    for i in range(10):
        assert q.put(i) is True  # never blocks
    assert time.monotonic() - t0 < 1.0
    assert q.dropped == 7 and q.enqueued == 10 and q.depth == 3
    q.close()
    items = []
    while (batch := q.next_batch(timeout=1)) is not None:
        items += [b.item for b in batch]
    assert items == [7, 8, 9]


def test_block_policy_is_lossless_the_producer_waits_for_room():
    q: BatchQueue[int] = BatchQueue(max_batch_size=2, max_delay_s=0.0, capacity=2, policy="block")
    q.put(0)
    q.put(1)
    assert q.put(2, timeout=0.1) is False  # full: waits, then gives up without queuing or dropping
    assert q.depth == 2 and q.dropped == 0

    produced = threading.Event()

    def producer() -> None:
        for i in range(2, 8):
            q.put(i)
        produced.set()

    t = threading.Thread(target=producer)
    t.start()
    time.sleep(0.1)
    assert not produced.is_set() and q.depth == 2  # blocked on the full queue
    items = []
    while len(items) < 8:
        items += [b.item for b in q.next_batch(timeout=5)]
    t.join(5)
    assert produced.is_set()
    assert items == list(range(8)) and q.dropped == 0


def test_switching_to_block_makes_a_live_queue_lossless():
    q: BatchQueue[int] = BatchQueue(max_batch_size=1, max_delay_s=0.0, capacity=1, policy="drop_oldest")
    q.put(0)
    q.set_policy("block")
    assert q.put(1, timeout=0.05) is False
    assert [b.item for b in q.next_batch(timeout=1)] == [0] and q.dropped == 0


def test_close_drains_without_waiting_then_signals_the_end():
    q: BatchQueue[int] = BatchQueue(max_batch_size=4, max_delay_s=60.0, capacity=16)
    for i in range(6):
        q.put(i)
    q.close()
    t0 = time.monotonic()
    first, second = q.next_batch(timeout=5), q.next_batch(timeout=5)
    assert time.monotonic() - t0 < 1.0  # no 60 s delay once closed
    assert [b.item for b in first] == [0, 1, 2, 3] and [b.item for b in second] == [4, 5]
    assert q.next_batch(timeout=5) is None
    with pytest.raises(QueueClosed):
        q.put(99)


def test_close_wakes_a_consumer_waiting_on_an_empty_queue_and_a_blocked_producer():
    q: BatchQueue[int] = BatchQueue(max_batch_size=1, max_delay_s=0.0, capacity=1, policy="block")
    results: list = []
    consumer_q: BatchQueue[int] = BatchQueue(max_batch_size=1, max_delay_s=0.0, capacity=1)
    consumer = threading.Thread(target=lambda: results.append(consumer_q.next_batch()))
    consumer.start()
    q.put(0)
    errors: list = []

    def blocked() -> None:
        try:
            q.put(1)
        except QueueClosed as exc:
            errors.append(exc)

    producer = threading.Thread(target=blocked)
    producer.start()
    time.sleep(0.1)
    consumer_q.close()
    q.close()
    consumer.join(5)
    producer.join(5)
    assert results == [None]
    assert len(errors) == 1


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_delay_s": -1}, "max_delay_s"),
        ({"capacity": 1}, "capacity"),
        ({"policy": "lifo"}, "policy"),
    ],
)
def test_invalid_settings_are_refused(kw, message):
    args = {"max_batch_size": 2, "max_delay_s": 0.1, "capacity": 4, "policy": "block"} | kw
    with pytest.raises(ValueError, match=message):
        BatchQueue(**args)
