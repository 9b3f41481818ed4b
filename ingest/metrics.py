"""Prometheus view of the ingest path, read from the workers' plain counters at scrape time.

Why a collector instead of Counter objects updated per message: a labelled Prometheus child costs a
lock and a dict lookup per increment, which at 50k+ messages/s is a large share of the budget. The
worker keeps integers; this collector turns them into metric families when Prometheus scrapes.

Naming follows the Prometheus conventions: prefix ``sacmf_``, base units, ``_total`` counters. Label
values are bounded by configuration (groups, sensors, kinds, roles) or by fixed sets (reasons,
completeness), never by message content.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ingest.protocol import REJECT_REASONS
from ingest.subscriber import IngestWorker
from ingest.windowing import COMPLETENESS, DROP_REASONS, TRIGGERS


def _snapshot(read: Callable[[], object]) -> object:
    """Read state owned by the worker thread; retry the rare iteration race instead of locking it."""
    for _ in range(5):
        try:
            return read()
        except RuntimeError:  # dictionary changed size during iteration
            continue
    return read()


class IngestCollector(Collector):
    def __init__(self, workers: Iterable[IngestWorker], clock: Callable[[], int] = time.time_ns) -> None:
        self.workers = list(workers)
        self.clock = clock

    def collect(self) -> Iterable[Metric]:
        now = self.clock()
        c = CounterMetricFamily
        g = GaugeMetricFamily
        messages = c("sacmf_ingest_messages", "Valid messages received", labels=["group", "sensor", "kind"])
        nbytes = c("sacmf_ingest_bytes", "Bytes of valid messages received", labels=["group", "sensor"])
        rejected = c("sacmf_ingest_rejected_messages", "Messages rejected, by reason", labels=["reason"])
        gaps = c(
            "sacmf_ingest_gap_messages", "Messages detected missing (seq jumps, tail loss)", labels=["group", "sensor"]
        )
        missing = g(
            "sacmf_ingest_missing_messages",
            "Messages missing now (gaps not filled by late arrivals)",
            labels=["group", "sensor"],
        )
        joined = g(
            "sacmf_ingest_joined_late_messages",
            "Seqs of a session that had started before sacmf first heard from it (not gaps)",
            labels=["group", "sensor"],
        )
        dups = c("sacmf_ingest_duplicate_messages", "Duplicate messages dropped", labels=["group", "sensor"])
        reord = c(
            "sacmf_ingest_reordered_messages", "Messages that arrived after a later one", labels=["group", "sensor"]
        )
        stale = c(
            "sacmf_ingest_stale_messages",
            "Messages too old to tell from duplicates, dropped",
            labels=["group", "sensor"],
        )
        restarts = c("sacmf_publisher_restarts", "Publisher restarts (new sessions)", labels=["group", "sensor"])
        age = g(
            "sacmf_sensor_last_message_age_seconds",
            "Seconds since the last message (data or heartbeat); for a configured sensor never heard from, "
            "since ingest started listening",
            labels=["group", "sensor"],
        )
        skew = g(
            "sacmf_sensor_clock_offset_seconds",
            "Sliding minimum of receive time minus the time the data was complete (a frame's exposure end, "
            "a chunk's last sample): the sensor clock's offset plus the shortest transport delay",
            labels=["group", "sensor"],
        )
        late = c(
            "sacmf_ingest_late_messages", "Messages arriving after their window closed", labels=["group", "sensor"]
        )
        late_s = c(
            "sacmf_ingest_late_samples",
            "Samples (frames count 1) arriving after their window closed",
            labels=["group", "sensor"],
        )
        late_used = c(
            "sacmf_ingest_late_used_messages",
            "Late messages whose data went into a window update (late_policy = update), not the late-data sink",
            labels=["group", "sensor"],
        )
        emitted = c("sacmf_windows_emitted", "Windows emitted, by completeness", labels=["group", "completeness"])
        updated = c("sacmf_windows_updated", "Windows emitted again with late data (revision >= 1)", labels=["group"])
        triggers = c("sacmf_windows_triggered", "Windows closed, by what closed them", labels=["group", "trigger"])
        dropped = c("sacmf_windows_dropped", "Windows dropped, by reason", labels=["group", "reason"])
        buffered = g(
            "sacmf_ingest_buffered_bytes", "Payload bytes held in open windows and kept ones", labels=["group"]
        )
        open_w = g("sacmf_ingest_open_windows", "Open windows", labels=["group"])
        kept = g("sacmf_ingest_kept_windows", "Fired windows kept for late-data updates", labels=["group"])
        wm_lag = g("sacmf_watermark_lag_seconds", "Newest event time minus the watermark", labels=["group"])
        dead = c("sacmf_dead_letter_skipped_messages", "Rejected messages not written: dead-letter file full")
        cb_err = c("sacmf_ingest_callback_errors", "Exceptions raised by window/late consumers", labels=["callback"])
        drops = c(
            "sacmf_ingest_connection_drops",
            "Connections to a publisher that libzmq dropped (an oversized frame, the peer gone); reconnected",
            labels=["endpoint"],
        )

        reasons = dict.fromkeys(REJECT_REASONS, 0)
        dead_skipped = win_err = late_err = internal = 0
        for w in self.workers:
            st = w.stats
            for (group, sensor, kind), v in w.messages().items():
                messages.add_metric([group, sensor, kind], v)
            for reason, v in dict(st.rejected).items():
                reasons[reason] = reasons.get(reason, 0) + v
            win_err += st.window_callback_errors
            internal += st.internal_errors
            late_err += st.late_callback_errors
            if w.dead_letter is not None:
                dead_skipped += w.dead_letter.skipped
            if not w.settings.bind:
                for endpoint in w.settings.endpoints:
                    drops.add_metric([endpoint], st.disconnects[endpoint])
            tracked = _snapshot(w.tracker.snapshot)
            for key, s in tracked.items():
                group, sensor = key.split("/", 1)
                labels = [group, sensor]
                gaps.add_metric(labels, s.gaps_detected)
                missing.add_metric(labels, s.gaps)
                joined.add_metric(labels, s.joined_late)
                dups.add_metric(labels, s.duplicates)
                reord.add_metric(labels, s.reordered)
                stale.add_metric(labels, s.stale)
                restarts.add_metric(labels, s.restarts)
                if s.last_message_recv_ns is not None:
                    age.add_metric(labels, max(0.0, (now - s.last_message_recv_ns) / 1e9))
            for r in w.routes.values():
                heard = tracked.get(r.key)
                if heard is None or heard.last_message_recv_ns is None:  # silent since start: a stall too
                    age.add_metric([r.group, r.sensor], max(0.0, (now - w.started_ns) / 1e9))
                nbytes.add_metric([r.group, r.sensor], r.bytes)
                if r.skew.offset_ns is not None:
                    skew.add_metric([r.group, r.sensor], r.skew.offset_ns / 1e9)
            for group, wd in w.windowers.items():
                for sensor, v in dict(wd.late_messages).items():
                    late.add_metric([group, sensor], v)
                for sensor, v in dict(wd.late_samples).items():
                    late_s.add_metric([group, sensor], v)
                for sensor, v in dict(wd.late_used).items():
                    late_used.add_metric([group, sensor], v)
                updated.add_metric([group], wd.updated)
                kept.add_metric([group], wd.kept_windows)
                for k in COMPLETENESS:
                    emitted.add_metric([group, k], wd.emitted[k])
                for k in TRIGGERS:
                    triggers.add_metric([group, k], wd.triggers[k])
                for k in DROP_REASONS:
                    dropped.add_metric([group, k], wd.dropped[k])
                buffered.add_metric([group], wd.buffered_bytes)
                open_w.add_metric([group], wd.open_windows)
                lag = wd.watermark_lag_ns
                if lag is not None:
                    wm_lag.add_metric([group], lag / 1e9)
        for reason, v in reasons.items():
            rejected.add_metric([reason], v)
        dead.add_metric([], dead_skipped)
        cb_err.add_metric(["window"], win_err)
        cb_err.add_metric(["late"], late_err)
        cb_err.add_metric(["internal"], internal)
        yield from (messages, nbytes, rejected, gaps, missing, joined, dups, reord, stale, restarts, age, skew, late,
                    late_s, late_used, emitted, updated, triggers, dropped, buffered, open_w, kept, wm_lag, dead,
                    cb_err, drops)  # fmt: skip
