"""HTTP/1.x metrics: requests by scheme, method and status code, and the time from a request's
first byte to its response's first byte as a kernel log2 histogram. src is the client; dst is
the server, with its port. Each scheme has a program of its own with the same parser and maps
(bpf/http.h): scheme="http" from the classifier's packets, scheme="https" from the plaintext
of OpenSSL's calls (bpf/tls.c), where a connection whose socket was not seen has no endpoints.

Connections whose end the kernel never saw are swept after http.idle_timeout: the sweep
deletes key by key and counts a connection's unanswered requests (status_code="none") only
when its delete succeeds; the kernel does the same when the connection ends, so each request
is counted once."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import logs
from ..kernel.maps import BatchMap, CounterArray, Generation, older_than
from ..naming.endpoints import OVERFLOW, EndpointLabels, PortFolder
from ..naming.httpnames import PathLabel, method_name, status_label, version_label
from ..serving import histogram
from ..serving.cardinality import SeriesStore
from ..serving.exposition import StoreFamily, store_family
from ..serving.selfmetrics import KernelStats
from .base import PairCollector

log = logs.get("http")

PIPELINE = 8        # HTTP_PIPELINE in bpf/http.h
PATH_CAPTURE = 64   # HTTP_PATH_CAPTURE
_KEY_FIELDS = {
    "names": ["generation", "kind", "method", "status", "variant", "family", "server_port",
              "client", "server"],
    "formats": ["<u4", "u1", "u1", "<u2", "<u2", "u1", "<u2", ("u1", 16), ("u1", 16)],
    "offsets": [0, 4, 5, 6, 8, 10, 12, 16, 32],
}
HTTP_KEY = np.dtype({**_KEY_FIELDS, "itemsize": 48})
# with the path label the kernel appends the request target's first bytes
HTTP_KEY_PATHS = np.dtype({"names": [*_KEY_FIELDS["names"], "path"],
                           "formats": [*_KEY_FIELDS["formats"], ("u1", PATH_CAPTURE)],
                           "offsets": [*_KEY_FIELDS["offsets"], 48],
                           "itemsize": 48 + PATH_CAPTURE})
CONN_KEY = np.dtype({
    "names": ["family", "client_port", "server_port", "client", "server"],
    "formats": ["u1", "<u2", "<u2", ("u1", 16), ("u1", 16)],
    "offsets": [0, 2, 4, 8, 24],
    "itemsize": 40,
})
CONN = np.dtype({
    "names": ["requested_ns", "method", "requested", "answered", "pipelined", "seen",
              "client_seq_end", "server_seq_end", "last_seen_ns"],
    "formats": [("<u8", PIPELINE), ("u1", PIPELINE), "<u4", "<u4", "<u4", "<u4", "<u4", "<u4",
                "<u8"],
    "offsets": [0, 64, 72, 76, 80, 84, 88, 92, 96],
    "itemsize": 104,
})
CONN_PATHS = np.dtype({"names": [*CONN.names, "path"],
                       "formats": [*(CONN.fields[n][0] for n in CONN.names),
                                   ("u1", (PIPELINE, PATH_CAPTURE))],
                       "offsets": [*(CONN.fields[n][1] for n in CONN.names), 104],
                       "itemsize": 104 + PIPELINE * PATH_CAPTURE})
COUNT = np.dtype("<u8")
REQUEST, LATENCY = 0, 1
STATUS_NONE = 0
SWEEP_SECONDS = 5.0


@dataclass
class Unanswered:
    """Requests of a connection swept as idle: no response will be counted for them."""
    family: int
    client: bytes
    server: bytes
    server_port: int
    methods: list[int]
    paths: list[bytes] = field(default_factory=list)   # with the path label only


@dataclass
class HttpBatch:
    keys: np.ndarray
    counts: np.ndarray
    unanswered: list[Unanswered] = field(default_factory=list)
    overflow: np.ndarray = field(default_factory=lambda: np.zeros(64, dtype=np.uint64))
    entries: int = 0
    capacity: int = 0
    conns: int = 0
    conn_capacity: int = 0
    scheme: str = "http"
    name: str = ""          # of its maps in the self-metrics; the scheme's when empty


def queued_slots(conn: np.void) -> list[int]:
    """Queue slots of the requests a connection still waits a response for, oldest first."""
    answered, requested = int(conn["answered"]), int(conn["requested"])
    return [i % PIPELINE for i in range(answered, requested)]


class KernelHttpSource:
    """The maps of one program with bpf/http.h: the classifier's (scheme "http") or the HTTPS
    program's ("https"); its maps are named after the scheme in the self-metrics."""

    def __init__(self, program: object, idle_seconds: float, paths: bool = False,
                 scheme: str = "http") -> None:
        table = program.table  # type: ignore[attr-defined]
        self.scheme = scheme
        self.generation = Generation(table("http_generation"))
        self.paths = paths
        self.events = BatchMap(f"{scheme}_events", table("http_events"),
                               HTTP_KEY_PATHS if paths else HTTP_KEY, COUNT, per_cpu=True)
        self.conns = BatchMap(f"{scheme}_conns", table("http_conns"), CONN_KEY,
                              CONN_PATHS if paths else CONN, per_cpu=False)
        self.overflow = CounterArray("http_overflow", table("http_overflow"))
        self.idle_ns = int(idle_seconds * 1e9)
        self._unanswered: list[Unanswered] = []
        self._conn_entries = 0
        self._lock = threading.Lock()

    def sweep(self) -> None:
        snapshot = self.conns.read()
        # the kernel deletes a connection when it ends: its unanswered requests are counted
        # by whichever claims it first
        claimed = self.conns.claim(snapshot, older_than(
            snapshot.values["last_seen_ns"], time.monotonic_ns(), self.idle_ns))
        swept = []
        for row in claimed:
            key, conn = snapshot.keys[row], snapshot.values[row]
            slots = queued_slots(conn)
            if slots:
                swept.append(Unanswered(
                    int(key["family"]), key["client"].tobytes(), key["server"].tobytes(),
                    int(key["server_port"]), [int(conn["method"][s]) for s in slots],
                    [conn["path"][s].tobytes() for s in slots] if self.paths else []))
        with self._lock:
            self._unanswered += swept
            self._conn_entries = len(snapshot.raw_keys) - len(claimed)

    def drain(self) -> HttpBatch:
        self.sweep()
        drained, entries = self.events.drain(self.generation.flip())
        with self._lock:
            unanswered, self._unanswered = self._unanswered, []
            conns = self._conn_entries
        return HttpBatch(drained.keys, drained.values.sum(axis=1, dtype=np.uint64), unanswered,
                         self.overflow.read_deltas(), entries, self.events.capacity, conns,
                         self.conns.capacity, self.scheme)


class SchemeSources:
    """The sources of every scheme counted, drained and swept together."""

    def __init__(self, sources: Sequence[KernelHttpSource | object]) -> None:
        self.sources = list(sources)

    def sweep(self) -> None:
        for source in self.sources:
            source.sweep()  # type: ignore[attr-defined]

    def drain(self) -> list[HttpBatch]:
        return [source.drain() for source in self.sources]  # type: ignore[attr-defined]


class HttpCollector(PairCollector):
    name = "http"
    sweep_seconds = SWEEP_SECONDS

    def __init__(self, source: SchemeSources | object, endpoints: EndpointLabels,
                 ports: PortFolder, stats: KernelStats, max_series: int,
                 ttl_seconds: float, path_label: PathLabel | None = None) -> None:
        super().__init__(source, endpoints, ports, stats, max_series, ttl_seconds)
        self.path_label = path_label
        extra = ["scheme", "version", "method", "status_code",
                 *(["path"] if path_label else [])]
        self._requests = self.store("ebpf_net_http_requests_total", extra)
        self._duration = self.store("ebpf_net_http_request_duration_seconds", extra,
                                    width=histogram.WIDTH)

    def stores(self) -> Sequence[SeriesStore]:
        return (self._requests, self._duration)

    def _path(self, captured: bytes) -> tuple[str, ...]:
        return (self.path_label(captured),) if self.path_label else ()

    def _pair_of(self, family: int, client: bytes, server: bytes, port: int) -> tuple[str, ...]:
        """The endpoint labels; all empty for an HTTPS connection whose socket was not seen
        (family 0)."""
        if family == 0:
            return ("",) * len(self.pair_names)
        return self._pair(family, client, server, port)

    def _fold(self, batches: list[HttpBatch] | HttpBatch) -> None:
        requests: defaultdict[tuple[str, ...], float] = defaultdict(float)
        duration: defaultdict[tuple[str, ...], list[float]] = defaultdict(
            lambda: [0.0] * histogram.WIDTH)
        for batch in batches if isinstance(batches, list) else [batches]:
            self._fold_batch(batch, requests, duration)
        for labels, value in requests.items():
            self._requests.add(labels, (value,))
        for labels, slots in duration.items():
            self._duration.add(labels, slots)

    def _fold_batch(self, batch: HttpBatch, requests: defaultdict[tuple[str, ...], float],
                    duration: defaultdict[tuple[str, ...], list[float]]) -> None:
        scheme = batch.scheme
        for key, count in zip(batch.keys, batch.counts, strict=True):
            labels = (*self._pair_of(int(key["family"]), key["client"].tobytes(),
                                     key["server"].tobytes(), int(key["server_port"])),
                      scheme, version_label(key["method"]), method_name(key["method"]),
                      status_label(key["status"]),
                      *self._path(key["path"].tobytes() if self.path_label else b""))
            if int(key["kind"]) == REQUEST:
                requests[labels] += float(count)
            else:
                index = histogram.index_of(int(key["variant"]))
                if index is not None:
                    duration[labels][index] += float(count)
        for conn in batch.unanswered:
            pair = self._pair_of(conn.family, conn.client, conn.server, conn.server_port)
            paths = conn.paths or [b""] * len(conn.methods)
            for method, path in zip(conn.methods, paths, strict=True):
                requests[(*pair, scheme, version_label(method), method_name(method),
                          status_label(STATUS_NONE),
                          *self._path(path))] += 1
        overflow_pair = (OVERFLOW,) * len(self.pair_names)
        overflow_path = (OVERFLOW,) if self.path_label else ()
        for method in np.flatnonzero(batch.overflow):
            requests[(*overflow_pair, scheme, version_label(method), method_name(method),
                      OVERFLOW, *overflow_path)] += float(batch.overflow[method])
        name = batch.name or scheme
        if batch.capacity:
            self.stats.record_map(f"{name}_events", batch.entries, batch.capacity)
        self.stats.record_map(f"{name}_conns", batch.conns, batch.conn_capacity)

    def _families(self) -> list[StoreFamily]:
        requests = store_family(
            "ebpf_net_http_requests", "HTTP/1.x requests by scheme (http, or https read from "
            "OpenSSL), method and response status code (none: the connection ended first; "
            "pipelined: past the pipelining depth; untracked: the connection map was full).",
            "counter", self._requests)
        duration = store_family(
            "ebpf_net_http_request_duration_seconds", "Time from an HTTP request's first byte "
            "to its response's first byte, measured in the kernel (https: where OpenSSL's "
            "caller wrote and read them).", "histogram", self._duration)
        return [requests, duration]
