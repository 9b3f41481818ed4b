"""The daemon's Prometheus registry: one registry, one ``/metrics``, for every part of the daemon.

Why one registry in the main process: ingest runs in a child process, and client_python's multiprocess
mode cannot carry custom collectors (ingest's collector is one), Info metrics or exemplars (daemon.md
§4). Instead the child ships snapshots of its collector's metric families over the ingest pipe and
``SnapshotCollector`` re-exposes the latest one here; everything else lives in this process.

Two kinds of metrics, for the same reason ingest uses a collector: counters touched per window or per
batch are ordinary client objects (a few per batch, cheap); state that other components already count
in plain integers (queue depths, drops, sink errors, reloads) is read at scrape time by
``StateCollector`` instead of being mirrored on every change.

Conventions (promtool-clean): prefix ``sacmf_``, base units (seconds), ``_total`` only on counters,
bounded labels (results, classes, configured groups and sinks), no ``_created`` series (they double the
series count and carry nothing an operator needs). Latency histograms have bucket edges at the
configured latency objectives, so ``histogram_quantile`` and SLO ratios are exact at those points.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, choose_encoder, generate_latest
from prometheus_client.registry import Collector

from sinks.record import ResultRecord

REQUEST_RESULTS = ("success", "failure")
RELOAD_RESULTS = ("success", "failure")
MODALITIES = ("image", "sequence")
DEFAULT_LATENCY_BUCKETS_S = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    """1, 2, 4, ... up to and including ``max_batch_size``: a full batch always has its own bucket."""
    edges, b = [], 1
    while b < max_batch_size:
        edges.append(float(b))
        b *= 2
    edges.append(float(max_batch_size))
    return tuple(edges)


class SnapshotCollector(Collector):
    """Re-exposes the metric families last received from the ingest process."""

    def __init__(self) -> None:
        self._families: list[Metric] = []

    def update(self, families: Sequence[Metric]) -> None:
        self._families = list(families)  # one reference swap: a scrape sees the old or the new list

    def collect(self) -> Iterable[Metric]:
        return list(self._families)


class StateCollector(Collector):
    """Reads counts that other components keep as plain integers, at scrape time."""

    def __init__(self, read: Callable[[], dict]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        s = self._read()
        depth = GaugeMetricFamily("sacmf_inference_queue_depth", "Windows waiting for the model")
        depth.add_metric([], s.get("queue_depth", 0))
        dropped = CounterMetricFamily(
            "sacmf_inference_windows_dropped",
            "Windows dropped before inference, by reason (queue_full: the live policy shed the oldest; "
            "shutdown: the drain's deadline passed before it was queued)",
            labels=["reason"],
        )
        dropped.add_metric(["queue_full"], s.get("queue_dropped", 0))
        dropped.add_metric(["shutdown"], s.get("shutdown_dropped", 0))
        reloads = CounterMetricFamily("sacmf_model_reloads", "Model reload attempts, by result", labels=["result"])
        for result in RELOAD_RESULTS:
            reloads.add_metric([result], s.get("reloads", {}).get(result, 0))
        sink_depth = GaugeMetricFamily("sacmf_sink_queue_depth", "Records waiting for a sink", labels=["sink"])
        written = CounterMetricFamily(
            "sacmf_sink_records_written",
            "Records a sink wrote (zmq: handed to ZeroMQ, which drops them for a subscriber past its high-water mark)",
            labels=["sink"],
        )
        skipped = CounterMetricFamily(
            "sacmf_sink_records_skipped", "Records a sink chose not to write (png: its rate limit)", labels=["sink"]
        )
        errors = CounterMetricFamily("sacmf_sink_errors", "Failed write attempts, by sink", labels=["sink"])
        sink_dropped = CounterMetricFamily(
            "sacmf_sink_records_dropped", "Records dropped because a sink's queue was full", labels=["sink"]
        )
        failed = CounterMetricFamily(
            "sacmf_sink_records_failed", "Records abandoned after the retry limit", labels=["sink"]
        )
        for sup in s.get("sinks", ()):
            depths = sup.queue_depths()
            for name in sup.names:
                sink_depth.add_metric([name], depths.get(name, 0))
                written.add_metric([name], sup.written[name])
                skipped.add_metric([name], sup.skipped[name])
                errors.add_metric([name], sup.errors[name])
                sink_dropped.add_metric([name], sup.dropped[name])
                failed.add_metric([name], sup.failed[name])
        age = GaugeMetricFamily(
            "sacmf_ingest_snapshot_age_seconds", "Seconds since the ingest process last reported its metrics"
        )
        if s.get("snapshot_age_s") is not None:
            age.add_metric([], s["snapshot_age_s"])
        families = [depth, dropped, reloads, sink_depth, written, skipped, errors, sink_dropped, failed, age]
        if s.get("recording_inputs_dropped") is not None:  # only when inputs are recorded ([sinks] mcap_inputs)
            pipe = CounterMetricFamily(
                "sacmf_recording_inputs_dropped",
                "Input messages left out of the MCAP recording because the ingest process's recording pipe was "
                "full (the pipeline never waits for the recorder; drops at the sink's own queue are in "
                'sacmf_sink_records_dropped_total{sink="mcap_inputs"})',
            )
            pipe.add_metric([], s["recording_inputs_dropped"])
            families.append(pipe)
        return families


class DaemonMetrics:
    """All daemon metrics and the registry that exposes them (ingest snapshot included)."""

    def __init__(
        self,
        *,
        latency_buckets_s: Sequence[float] = DEFAULT_LATENCY_BUCKETS_S,
        max_batch_size: int = 8,
        build: dict[str, str] | None = None,
    ) -> None:
        disable_created_metrics()  # process-wide in client_python; this daemon never wants them
        self.registry = r = CollectorRegistry()
        buckets = tuple(sorted(set(float(b) for b in latency_buckets_s)))
        self.requests = Counter(
            "sacmf_inference_requests", "Windows sent to the model, by result", ["result"], registry=r
        )
        for result in REQUEST_RESULTS:
            self.requests.labels(result)
        self.windows_received = Counter(
            "sacmf_inference_windows_received", "Windows received from the ingest process", registry=r
        )
        self.batch_size = Histogram(
            "sacmf_inference_batch_size",
            "Windows per model call",
            buckets=batch_size_buckets(max_batch_size),
            registry=r,
        )
        self.queue_wait = Histogram(
            "sacmf_inference_queue_wait_seconds",
            "Time a window waited in the inference queue",
            buckets=buckets,
            registry=r,
        )
        self.duration = Histogram(
            "sacmf_inference_duration_seconds",
            "Time of one model call (adapter, preprocessing, forward, decoding) for a batch",
            buckets=buckets,
            registry=r,
        )
        self.window_latency = Histogram(
            "sacmf_window_latency_seconds",
            "Wall clock at publication minus window end (includes allowed lateness and clock offsets)",
            buckets=buckets,
            registry=r,
        )
        self.detections = Counter("sacmf_detections", "Detections published, by class", ["class"], registry=r)
        self.fusion_weight = Gauge(
            "sacmf_fusion_modality_weight",
            "Modality-level fusion weight of the latest window of a group that had both modalities (image vs "
            "sequence importance)",
            ["group", "modality"],
            registry=r,
        )
        self.mutual_information = Gauge(
            "sacmf_fusion_mutual_information_nats",
            "Model's running image-sequence mutual-information estimate (Gumbel copula)",
            registry=r,
        )
        self.late_records = Counter("sacmf_late_records", "Late-data records handed to the late sinks", registry=r)
        self.image_fusion_quality = Gauge(
            "sacmf_image_fusion_quality",
            "EN (bits), SD and SF (0-255 scale) of the latest pixel-fused frame of a group ([image_fusion])",
            ["group", "metric"],
            registry=r,
        )
        self.model_info = Gauge("sacmf_model_info", "The served model (value 1)", ["version", "sha256"], registry=r)
        self.ready = Gauge(
            "sacmf_ready", "1 when the daemon is ready to serve (model warm, sockets up, not draining)", registry=r
        )
        self.build_info = Gauge(
            "sacmf_build_info", "Build and runtime versions (value 1)", ["version", "python", "torch"], registry=r
        )
        b = build or {}
        self.build_info.labels(
            b.get("version", "unknown"), b.get("python", platform.python_version()), b.get("torch", "unknown")
        ).set(1)
        self.ingest = SnapshotCollector()
        r.register(self.ingest)

    def register_state(self, read: Callable[[], dict]) -> None:
        """Attach the scrape-time reader of queue, reload and sink counters."""
        self.registry.register(StateCollector(read))

    def set_model(self, version: str, sha256: str) -> None:
        self.model_info.clear()
        self.model_info.labels(version, sha256).set(1)

    def observe_batch(self, n: int, duration_s: float, queue_waits_s: Iterable[float]) -> None:
        self.batch_size.observe(n)
        self.duration.observe(max(0.0, duration_s))
        for wait in queue_waits_s:
            self.queue_wait.observe(max(0.0, wait))

    def observe_published(self, record: ResultRecord) -> None:
        """One result left for the sinks: success, latency, detections, fusion weights.

        A late-data update (revision >= 1) of an older window counts as a request and its detections as
        published, but stays out of the latency histogram (the objective is about a window's first result)
        and leaves the gauges, which show the newest window."""
        self.requests.labels("success").inc()
        for det in record.detections:
            self.detections.labels(det.cls).inc()
        if record.revision:
            return
        self.window_latency.observe(max(0.0, record.latency_s))  # a flushed window can end in the future
        p = record.presence
        if (p.get("image_a") or p.get("image_b")) and (p.get("seq_a") or p.get("seq_b")):
            # only a window with both modalities says how the model balances them (one without is 1/0 by
            # construction: a group configured with one modality would look collapsed for good)
            self.fusion_weight.labels(record.group, "image").set(record.fusion.image)
            self.fusion_weight.labels(record.group, "sequence").set(record.fusion.sequence)
        if record.mi_nats is not None:
            self.mutual_information.set(record.mi_nats)

    def observe_fusion_quality(self, group: str, quality: dict[str, float]) -> None:
        """EN/SD/SF of a group's latest fused frame (``daemon.fusion_stage.FusionStage.frame_quality``)."""
        for metric, value in quality.items():
            self.image_fusion_quality.labels(group, metric).set(value)

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """(body, content type) for ``/metrics``; OpenMetrics when the scraper asks for it."""
        try:
            encoder, content_type = choose_encoder(accept)
        except Exception:  # a malformed OpenMetrics version (client_python compares it unparsed)
            encoder, content_type = generate_latest, CONTENT_TYPE_LATEST
        return encoder(self.registry), content_type


class ImageFusionMetrics:
    """The [image_fusion] stage's metrics, registered only when the stage is on.

    ``sacmf_image_fusion_quality`` (``DaemonMetrics``) shows the latest *fused* frame of a group and keeps
    its value while windows go through unfused; ``sacmf_image_fusion_windows_total{group,result}``
    (``fused``, ``not_fused``: a camera missing, ``failed``) shows how many windows each value stands for.
    """

    def __init__(self, registry: CollectorRegistry, groups: Iterable[str], stage: Any) -> None:
        from daemon.fusion_stage import FAILURE_REASONS, STATUSES

        self.windows = Counter(
            "sacmf_image_fusion_windows",
            "Windows through the [image_fusion] stage, by group and result (fused; not_fused: a camera "
            "missing, passed through; failed: the fusion raised or gave non-finite pixels)",
            ["group", "result"],
            registry=registry,
        )
        for group in groups:
            for result in STATUSES:
                self.windows.labels(group, result)
        self.failures = Counter(
            "sacmf_image_fusion_failures",
            "Windows whose pixel fusion failed, by reason (error: the stage raised; non_finite: NaN/Inf "
            'out of the network); with feed = "image_a" each is also a failed window',
            ["reason"],
            registry=registry,
        )
        for reason in FAILURE_REASONS:
            self.failures.labels(reason)
        self.info = Gauge(
            "sacmf_image_fusion_info",
            "The fusion method and weights in use (value 1; sha256 empty for mean)",
            ["method", "sha256"],
            registry=registry,
        )
        self.set_info(stage)

    def set_info(self, stage: Any) -> None:
        """The stage now serving (its ``method`` and ``sha256``): after start-up and after a reload."""
        self.info.clear()
        self.info.labels(stage.method.name, stage.sha256 or "").set(1)
