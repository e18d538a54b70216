"""The exporter's own metrics, and the collector that runs every signal collector with
per-collector success and duration (node_exporter style)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .. import logs
from .cardinality import SeriesStore

log = logs.get("selfmetrics")


class SignalCollector(Protocol):
    name: str

    def describe(self) -> Iterable[Metric]: ...

    def collect(self) -> Iterable[Metric]: ...

    def stores(self) -> Sequence[SeriesStore]: ...


class KernelStats:
    """What collectors learn about the kernel side while they drain it: map fill, failures to
    record (map full), packets skipped as malformed. Totals here only grow."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.map_entries: dict[str, int] = {}
        self.map_capacity: dict[str, int] = {}
        self.update_failures: defaultdict[str, float] = defaultdict(float)
        self.parse_errors: defaultdict[str, float] = defaultdict(float)

    def record_map(self, name: str, entries: int, capacity: int) -> None:
        with self._lock:
            self.map_entries[name] = entries
            self.map_capacity[name] = capacity

    def add_failures(self, name: str, count: float) -> None:
        with self._lock:
            self.update_failures[name] += count

    def add_parse_errors(self, protocol: str, count: float) -> None:
        with self._lock:
            self.parse_errors[protocol] += count

    def snapshot(self) -> tuple[dict[str, int], dict[str, int], dict[str, float],
                                dict[str, float]]:
        with self._lock:
            return (dict(self.map_entries), dict(self.map_capacity),
                    dict(self.update_failures), dict(self.parse_errors))


class ExporterCollector(Collector):
    """Runs the signal collectors in order, then reports on them and on the exporter."""

    def __init__(self, collectors: Sequence[SignalCollector], stats: KernelStats,
                 build_labels: dict[str, str], attached_interfaces: Callable[[], int],
                 reporters: Sequence[Callable[[KernelStats], None]] = ()) -> None:
        self.collectors = list(collectors)
        self.stats = stats
        # program-wide counters (failures, parse errors) that no single collector owns
        self.reporters = list(reporters)
        self.build_labels = build_labels
        self.attached_interfaces = attached_interfaces
        self._failing: set[str] = set()

    def describe(self) -> Iterable[Metric]:
        for collector in self.collectors:
            yield from collector.describe()
        yield from self._own_metrics({}, {})

    def collect(self) -> Iterable[Metric]:
        success: dict[str, float] = {}
        duration: dict[str, float] = {}
        for collector in self.collectors:
            started = time.perf_counter()
            try:
                families = list(collector.collect())
                success[collector.name] = 1.0
                self._failing.discard(collector.name)
            except Exception as e:
                families = []
                success[collector.name] = 0.0
                if collector.name not in self._failing:     # once per outage, not per scrape
                    self._failing.add(collector.name)
                    log.error("collector failed", extra={"collector": collector.name,
                                                         "error": str(e)}, exc_info=True)
            duration[collector.name] = time.perf_counter() - started
            yield from families
        for report in self.reporters:
            try:
                report(self.stats)
            except Exception as e:
                log.error("reading kernel counters failed", extra={"error": str(e)})
        yield from self._own_metrics(success, duration)

    def _own_metrics(self, success: dict[str, float],
                     duration: dict[str, float]) -> Iterable[Metric]:
        build = GaugeMetricFamily(
            "ebpf_net_exporter_build_info",
            "A metric with a constant 1 labelled by version, bcc version and running kernel.",
            labels=list(self.build_labels))
        build.add_metric(list(self.build_labels.values()), 1)
        yield build

        ok = GaugeMetricFamily("ebpf_net_exporter_scrape_collector_success",
                               "Whether the collector's last scrape succeeded (1) or not (0).",
                               labels=["collector"])
        took = GaugeMetricFamily("ebpf_net_exporter_scrape_collector_duration_seconds",
                                 "Time the collector took in this scrape.", labels=["collector"])
        for name in success:
            ok.add_metric([name], success[name])
            took.add_metric([name], duration[name])
        yield ok
        yield took

        entries, capacity, failures, parse_errors = self.stats.snapshot()
        fill = GaugeMetricFamily("ebpf_net_exporter_bpf_map_entries",
                                 "Entries in the kernel map when it was last read.",
                                 labels=["map"])
        size = GaugeMetricFamily("ebpf_net_exporter_bpf_map_capacity",
                                 "Capacity (max entries) of the kernel map.", labels=["map"])
        for name in sorted(entries):
            fill.add_metric([name], entries[name])
            size.add_metric([name], capacity[name])
        yield fill
        yield size

        failed = CounterMetricFamily(
            "ebpf_net_exporter_bpf_map_update_failures",
            "Updates the kernel could not record because the map was full (the counts went to "
            "the metric's overflow series instead).", labels=["map"])
        for name in sorted(failures):
            failed.add_metric([name], failures[name])
        yield failed

        parse = CounterMetricFamily(
            "ebpf_net_exporter_parse_errors",
            "Packets skipped by a kernel parser because their headers did not hold together.",
            labels=["protocol"])
        for protocol in sorted(parse_errors):
            parse.add_metric([protocol], parse_errors[protocol])
        yield parse

        attached = GaugeMetricFamily("ebpf_net_exporter_attached_interfaces",
                                     "Interfaces the TC classifier is attached to.")
        attached.add_metric([], self.attached_interfaces())
        yield attached

        overflow = CounterMetricFamily(
            "ebpf_net_exporter_series_overflow",
            "Label sets that found their metric at the series cap and were folded into its "
            "overflow series, counted once per scrape in which they appeared.",
            labels=["metric"])
        for collector in self.collectors:
            for store in collector.stores():
                overflow.add_metric([store.metric], store.overflowed_series_total)
        yield overflow
