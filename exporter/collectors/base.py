"""What the collectors of client/server metrics share: label names for the two ends, drain
and fold at scrape time under a lock, TTL expiry, and an optional background sweep."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client.metrics_core import Metric

from .. import logs
from ..naming.endpoints import EndpointLabels, PortFolder, address_text
from ..serving.cardinality import SeriesStore
from ..serving.selfmetrics import KernelStats

log = logs.get("collectors")


class PairCollector:
    """Subclasses name themselves, build their stores, and implement _fold and _families.
    A source with a sweep() method is swept every `sweep_seconds` in a thread of its own."""

    name = "pair"
    sweep_seconds: float | None = None

    def __init__(self, source: Any, endpoints: EndpointLabels, ports: PortFolder,
                 stats: KernelStats, max_series: int, ttl_seconds: float) -> None:
        self.source = source
        self.endpoints = endpoints
        self.ports = ports
        self.stats = stats
        self.max_series = max_series
        self.ttl_seconds = ttl_seconds
        # src is the client (no port: it is ephemeral), dst the server with its port
        self.pair_names = endpoints.label_names("src", with_port=False) + \
            endpoints.label_names("dst")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def store(self, metric: str, extra: Sequence[str], width: int = 1) -> SeriesStore:
        return SeriesStore(metric, [*self.pair_names, *extra], self.pair_names,
                           self.max_series, self.ttl_seconds, width=width)

    def stores(self) -> Sequence[SeriesStore]:
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            self.endpoints.refresh()
            self._fold(self.source.drain())
            self._expire()
            return self._families()

    def _fold(self, batch: Any) -> None:
        raise NotImplementedError

    def _families(self) -> list[Metric]:
        raise NotImplementedError

    def _expire(self) -> None:
        for store in self.stores():
            store.expire()

    def _pair(self, family: int, client: bytes, server: bytes, port: int) -> tuple[str, ...]:
        """Label values of a client and a server (with its port, remembered as a server's)."""
        server_text = address_text(family, server)
        self.ports.learn_server(server_text, port)
        return self.endpoints.pair(address_text(family, client), None, server_text, str(port))

    def start(self) -> None:
        sweep = getattr(self.source, "sweep", None)
        if sweep is None or self.sweep_seconds is None:
            return
        interval = self.sweep_seconds

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    sweep()
                except Exception as e:   # keep sweeping; the scrape reports failures
                    log.warning("sweep failed", extra={"collector": self.name,
                                                       "error": str(e)})

        self._sweeper = threading.Thread(target=run, name=f"{self.name}-sweep", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._sweeper:
            self._sweeper.join(timeout=5)
