"""Prometheus metrics of one node process, for ``GET /metrics``.

One :class:`NodeMetrics` per process, made by the service and handed to the
parts that count things. Its metrics live in their own ``CollectorRegistry``
(never prometheus_client's global one), so tests and a second node in the same
process never see each other's counts.

Counters and histograms are updated by the hook methods as things happen.
What is a *state* rather than an event (queue depth, outbox backlog, free
disk) is read when Prometheus scrapes, from a callback and ``shutil.disk_usage``,
so a gauge can never be stale or outlive a restart.

Every metric name starts with ``pacs_ai_node_``. Label values are bounded: the
hooks accept only the values listed in their docstrings (a ``ValueError``
names any other), destinations and model bundles come from the configuration,
and rule names from the rules file.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from node import __version__
from pipelines.timing import StageTiming

LOG = logging.getLogger(__name__)

PREFIX = "pacs_ai_node_"

#: Seconds, from a rules check (~10 ms) to a slow CPU inference of a large volume (10 min).
DURATION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 600.0)

INSTANCE_SOURCES = ("dicom", "stowrs")
ASSOCIATION_RESULTS = ("accepted", "rejected")
SERIES_OUTCOMES = ("done", "rejected", "failed")
SEND_RESULTS = ("ok", "warning", "failed")
#: Series states that make up the work queue; always exported, 0 when empty.
QUEUE_STATES = ("receiving", "queued", "processing")

#: The rule counted for a rejection that names none (the volume checks name
#: :data:`node.work.orchestrate.GEOMETRY_RULE`, ``"geometry"``).
OTHER_RULE = "other"

#: What the ``counts`` callback returns: ``{"series": {state: n}, "outbox_pending":
#: {destination: n}, "outbox_dead": {destination: n}}``; any key may be missing.
Counts = Mapping[str, Mapping[str, int]]


class CountingStore(Protocol):
    """What :func:`store_counts` reads of a :class:`node.store.state.StateStore`."""

    def counts(self) -> Mapping[str, int]: ...

    def outbox_counts(self) -> Mapping[tuple[str, str], int]: ...


def store_counts(store: CountingStore) -> Callable[[], Counts]:
    """A ``counts`` callback reading a :class:`node.store.state.StateStore` (two small queries per scrape)."""

    def counts() -> Counts:
        series = {key[len("series_"):]: n for key, n in store.counts().items() if key.startswith("series_")}
        pending: dict[str, int] = {}
        dead: dict[str, int] = {}
        for (destination, state), n in store.outbox_counts().items():
            if state == "pending":
                pending[destination] = n
            elif state == "dead":
                dead[destination] = n
        return {"series": {s: series.get(s, 0) for s in QUEUE_STATES}, "outbox_pending": pending,
                "outbox_dead": dead}

    return counts


class ScrapeTimeCollector(Collector):
    """Gauges computed at each scrape: work queue, outbox backlog, free disk."""

    def __init__(self, data_dir: Path, counts: Callable[[], Counts] | None) -> None:
        self.data_dir = data_dir
        self.counts = counts

    def _families(self) -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(PREFIX + "queue_depth", "Series in each state of the work queue.", labels=["state"]),
            GaugeMetricFamily(PREFIX + "outbox_pending", "Result objects waiting to be delivered, by destination.",
                              labels=["destination"]),
            GaugeMetricFamily(PREFIX + "outbox_dead", "Result objects given up on (dead letters), by destination.",
                              labels=["destination"]),
            GaugeMetricFamily(PREFIX + "state_store_up", "1 when the state counts could be read at this scrape."),
            GaugeMetricFamily(PREFIX + "disk_free_bytes", "Free bytes on the file system of the data directory."),
            GaugeMetricFamily(PREFIX + "disk_total_bytes", "Size of the file system of the data directory."),
        )

    def describe(self) -> Iterable[Metric]:
        # Names only, so that registering neither calls the callback nor touches the disk.
        return self._families()

    def collect(self) -> Iterable[Metric]:
        queue, pending, dead, up, free, total = self._families()
        if self.counts is not None:
            try:
                counts = self.counts()
            except Exception:  # a locked or missing database must not break the whole scrape
                LOG.warning("metrics: the state counts could not be read", exc_info=True)
                up.add_metric([], 0)
            else:
                up.add_metric([], 1)
                series = dict(counts.get("series", {}))
                for state in QUEUE_STATES:
                    series.setdefault(state, 0)
                for state, n in sorted(series.items()):
                    queue.add_metric([state], n)
                for destination, n in sorted(counts.get("outbox_pending", {}).items()):
                    pending.add_metric([destination], n)
                for destination, n in sorted(counts.get("outbox_dead", {}).items()):
                    dead.add_metric([destination], n)
        try:
            usage = shutil.disk_usage(self.data_dir)
        except OSError as exc:
            LOG.warning("metrics: no disk usage for %s: %s", self.data_dir, exc)
        else:
            free.add_metric([], usage.free)
            total.add_metric([], usage.total)
        out: list[Metric] = [queue, pending, dead, up] if self.counts is not None else []
        return out + [free, total]


def _check(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not one of {', '.join(allowed)}")
    return value


class NodeMetrics:
    """The node's metrics and the hooks that update them (all thread-safe).

    ``data_dir`` is where free disk is measured; ``counts`` (e.g.
    :func:`store_counts`) is called at every scrape for the queue and outbox
    gauges (None: those gauges are not exported); ``version`` defaults to
    ``node.__version__``.
    """

    def __init__(self, data_dir: Path | str, counts: Callable[[], Counts] | None = None, *,
                 version: str | None = None) -> None:
        if counts is not None and not callable(counts):
            raise TypeError(f"counts: expected a callable returning counts, got {type(counts).__name__}")
        self.data_dir = Path(data_dir)
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(PREFIX + "instances_received", "Instances stored, by how they came.",
                                          ["source"], registry=r)
        self.instances_refused = Counter(PREFIX + "instances_refused", "Instances refused, by DICOM status.",
                                         ["status"], registry=r)
        self.associations = Counter(PREFIX + "associations", "Association requests, accepted or rejected.",
                                    ["result"], registry=r)
        self.series_finished_total = Counter(PREFIX + "series_finished", "Series whose processing ended, by outcome.",
                                             ["state"], registry=r)
        self.series_rejected = Counter(PREFIX + "series_rejected",
                                       "Rejected series by failed rule ('geometry', 'other': not a rules-file rule).",
                                       ["rule"], registry=r)
        self.stage_seconds = Histogram(PREFIX + "stage_duration_seconds", "Time spent in each processing stage.",
                                       ["stage", "bundle"], buckets=DURATION_BUCKETS, registry=r)
        self.model_seconds = Histogram(PREFIX + "model_inference_seconds", "ONNX inference time per model stage.",
                                       ["bundle", "stage"], buckets=DURATION_BUCKETS, registry=r)
        self.send_attempts = Counter(PREFIX + "send_attempts", "Delivery attempts of result objects, by result.",
                                     ["destination", "result"], registry=r)
        self.send_failures = Counter(PREFIX + "send_failures",
                                     "Failed deliveries: 'retry' (tried again later) or 'dead' (given up).",
                                     ["destination", "disposition"], registry=r)
        self.build_info = Info(PREFIX + "build", "The node's software version.", registry=r)
        self.build_info.info({"version": version or __version__})
        r.register(ScrapeTimeCollector(self.data_dir, counts))

    # -- hooks ----------------------------------------------------------------

    def instance_received(self, source: str) -> None:
        """One instance stored; ``source`` is ``"dicom"`` or ``"stowrs"``."""
        self.instances_received.labels(_check("source", source, INSTANCE_SOURCES)).inc()

    def instance_refused(self, status: int | str) -> None:
        """One instance refused with a DICOM status (``0xA700`` or ``"0xA700"``)."""
        if isinstance(status, bool) or not isinstance(status, (int, str)):
            raise TypeError(f"status: expected an int or '0x....' text, got {status!r}")
        if isinstance(status, str):
            try:
                status = int(status, 16)
            except ValueError:
                raise ValueError(f"status: {status!r} is not a hexadecimal DICOM status") from None
        if not 0 <= status <= 0xFFFF:
            raise ValueError(f"status: {status!r} is not a 16-bit DICOM status")
        self.instances_refused.labels(f"0x{status:04X}").inc()

    def association(self, result: str) -> None:
        """One association request, ``"accepted"`` or ``"rejected"``."""
        self.associations.labels(_check("result", result, ASSOCIATION_RESULTS)).inc()

    def series_finished(self, state: str, *, rules: Iterable[str] = ()) -> None:
        """A series ended ``"done"``, ``"rejected"`` or ``"failed"``.

        For a rejection, each failed rule is counted once: ``rules`` are the rule ids of a
        ``Decision``'s failures, or ``["geometry"]`` for a rejection by the volume checks
        (:class:`node.work.orchestrate.SeriesRefused`); a rejection without one counts as ``"other"``.
        """
        self.series_finished_total.labels(_check("state", state, SERIES_OUTCOMES)).inc()
        if state == "rejected":
            for name in list(dict.fromkeys(rules)) or [OTHER_RULE]:
                self.series_rejected.labels(name).inc()

    def stage_timings(self, timings: Iterable[StageTiming]) -> None:
        """Observe a series' timings (``SeriesResult.timings``): a network's own run goes to the model
        inference histogram, every other stage to the stage histogram. Non-finite values are skipped."""
        for timing in timings:
            if not math.isfinite(timing.seconds):
                continue
            if timing.model:
                self.model_seconds.labels(timing.bundle, timing.stage).observe(timing.seconds)
            else:
                self.stage_seconds.labels(timing.stage, timing.bundle).observe(timing.seconds)

    def send_attempt(self, destination: str, result: str, *, dead: bool = False, count: int = 1) -> None:
        """``count`` delivery attempts to ``destination`` ended ``"ok"``, ``"warning"`` (stored
        with a warning status) or ``"failed"``; a failure is also counted as ``dead`` (the item
        went to the dead letters) or to be retried."""
        _check("result", result, SEND_RESULTS)
        if count <= 0:
            return
        self.send_attempts.labels(destination, result).inc(count)
        if result == "failed":
            self.send_failures.labels(destination, "dead" if dead else "retry").inc(count)

    # -- exposition -----------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The text exposition of every metric and its content type (Prometheus text format).

        Blocking (calls the ``counts`` callback): run it off the event loop.
        """
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def samples(self) -> Iterator[tuple[str, dict[str, str], float]]:
        """(name, labels, value) of every current sample, for a status page or a test."""
        for family in self.registry.collect():
            for sample in family.samples:
                yield sample.name, dict(sample.labels), sample.value
