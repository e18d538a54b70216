"""DNS metrics from the classifier's DNS part (bpf/dns.h): requests, responses by rcode,
latency (a kernel log2 histogram) and timeouts. src is the client (the end that sent the
query); dst is the server, with its port.

Timeouts: a query still pending after dns.timeout is deleted from the kernel's dns_pending map
by a sweep (every SWEEP_SECONDS, and at each scrape) and counted once. The sweep deletes key by
key and counts a timeout only when its delete succeeds; the kernel deletes the same key when the
response comes, and counts the response only when its delete succeeds. Whoever is first counts,
exactly once."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import logs
from ..kernel.maps import BatchMap, CounterArray, Generation, older_than
from ..naming.dnsnames import QueryLabel, qtype_name, rcode_name, transport_name
from ..naming.endpoints import OVERFLOW, EndpointLabels, PortFolder
from ..serving import histogram
from ..serving.cardinality import SeriesStore
from ..serving.exposition import StoreFamily, store_family
from ..serving.selfmetrics import KernelStats
from .base import PairCollector

log = logs.get("dns")

NAME_CAPTURE = 128      # DNS_NAME_CAPTURE in bpf/dns.h
_KEY_FIELDS = {
    "names": ["generation", "kind", "transport", "family", "rcode", "qtype", "variant",
              "server_port", "client", "server"],
    "formats": ["<u4", "u1", "u1", "u1", "u1", "<u2", "<u2", "<u2", ("u1", 16), ("u1", 16)],
    "offsets": [0, 4, 5, 6, 7, 8, 10, 12, 16, 32],
}
DNS_KEY = np.dtype({**_KEY_FIELDS, "itemsize": 48})
# with the query label the kernel appends the question name (wire format) to key and value
DNS_KEY_NAMED = np.dtype({"names": [*_KEY_FIELDS["names"], "name"],
                          "formats": [*_KEY_FIELDS["formats"], ("u1", NAME_CAPTURE)],
                          "offsets": [*_KEY_FIELDS["offsets"], 48],
                          "itemsize": 48 + NAME_CAPTURE})
# a query by its client's end and id; the server it asked is in the value (bpf/dns.h)
PENDING_KEY = np.dtype({
    "names": ["family", "transport", "id", "client_port", "client"],
    "formats": ["u1", "u1", "<u2", "<u2", ("u1", 16)],
    "offsets": [0, 1, 2, 4, 8],
    "itemsize": 24,
})
_PENDING_VALUE_FIELDS = {"names": ["queried_ns", "qtype", "server_port", "server"],
                         "formats": ["<u8", "<u2", "<u2", ("u1", 16)],
                         "offsets": [0, 8, 10, 16]}
PENDING_VALUE = np.dtype({**_PENDING_VALUE_FIELDS, "itemsize": 32})
PENDING_VALUE_NAMED = np.dtype({"names": [*_PENDING_VALUE_FIELDS["names"], "name"],
                                "formats": [*_PENDING_VALUE_FIELDS["formats"],
                                            ("u1", NAME_CAPTURE)],
                                "offsets": [*_PENDING_VALUE_FIELDS["offsets"], 32],
                                "itemsize": 32 + NAME_CAPTURE})
COUNT = np.dtype("<u8")

REQUEST, RESPONSE, LATENCY = 0, 1, 2
SWEEP_SECONDS = 1.0


@dataclass
class Timeout:
    family: int
    transport: int
    client: bytes
    server: bytes
    server_port: int
    qtype: int
    name: bytes = b""       # wire format, with the query label only


@dataclass
class DnsBatch:
    keys: np.ndarray
    counts: np.ndarray
    timeouts: list[Timeout] = field(default_factory=list)
    overflow: np.ndarray = field(default_factory=lambda: np.zeros(3 * 16, dtype=np.uint64))
    entries: int = 0
    capacity: int = 0
    pending: int = 0
    pending_capacity: int = 0


class KernelDnsSource:
    def __init__(self, program: object, timeout_seconds: float,
                 query_names: bool = False) -> None:
        table = program.table  # type: ignore[attr-defined]
        self.generation = Generation(table("dns_generation"))
        self.events = BatchMap("dns_events", table("dns_events"),
                               DNS_KEY_NAMED if query_names else DNS_KEY, COUNT, per_cpu=True)
        self.pending = BatchMap("dns_pending", table("dns_pending"), PENDING_KEY,
                                PENDING_VALUE_NAMED if query_names else PENDING_VALUE,
                                per_cpu=False)
        self.query_names = query_names
        self.overflow = CounterArray("dns_overflow", table("dns_overflow"))
        self.timeout_ns = int(timeout_seconds * 1e9)
        self._timeouts: list[Timeout] = []
        self._pending_entries = 0
        self._lock = threading.Lock()

    def sweep(self) -> None:
        """Deletes queries pending longer than the timeout, remembering each one deleted."""
        snapshot = self.pending.read()
        # the kernel deletes a query when its response comes: a query is a response or a
        # timeout, whichever claims it first
        claimed = self.pending.claim(snapshot, older_than(
            snapshot.values["queried_ns"], time.monotonic_ns(), self.timeout_ns))
        timeouts = []
        for row in claimed:
            key, value = snapshot.keys[row], snapshot.values[row]
            timeouts.append(Timeout(int(key["family"]), int(key["transport"]),
                                    key["client"].tobytes(), value["server"].tobytes(),
                                    int(value["server_port"]), int(value["qtype"]),
                                    value["name"].tobytes() if self.query_names else b""))
        with self._lock:
            self._timeouts += timeouts
            self._pending_entries = len(snapshot.raw_keys) - len(claimed)

    def drain(self) -> DnsBatch:
        self.sweep()
        drained, entries = self.events.drain(self.generation.flip())
        with self._lock:
            timeouts, self._timeouts = self._timeouts, []
            pending = self._pending_entries
        return DnsBatch(drained.keys, drained.values.sum(axis=1, dtype=np.uint64), timeouts,
                        self.overflow.read_deltas(), entries, self.events.capacity, pending,
                        self.pending.capacity)


class DnsCollector(PairCollector):
    name = "dns"
    # a burst of unanswered queries must not fill the pending map between scrapes
    sweep_seconds = SWEEP_SECONDS

    def __init__(self, source: KernelDnsSource | object, endpoints: EndpointLabels,
                 ports: PortFolder, stats: KernelStats, max_series: int,
                 ttl_seconds: float, query_label: QueryLabel | None = None) -> None:
        super().__init__(source, endpoints, ports, stats, max_series, ttl_seconds)
        self.query_label = query_label
        query = ["query"] if query_label else []
        self._requests = self.store("ebpf_net_dns_requests_total", ["qtype", "transport", *query])
        self._responses = self.store("ebpf_net_dns_responses_total",
                                     ["qtype", "rcode", "transport", *query])
        self._timeouts = self.store("ebpf_net_dns_timeouts_total",
                                    ["qtype", "transport", *query])
        self._latency = self.store("ebpf_net_dns_request_duration_seconds", ["rcode"],
                                   width=histogram.WIDTH)

    def stores(self) -> Sequence[SeriesStore]:
        return (self._requests, self._responses, self._timeouts, self._latency)

    def _query(self, wire: bytes) -> tuple[str, ...]:
        return (self.query_label(wire),) if self.query_label else ()

    def _fold(self, batch: DnsBatch) -> None:
        requests: defaultdict[tuple[str, ...], float] = defaultdict(float)
        responses: defaultdict[tuple[str, ...], float] = defaultdict(float)
        timeouts: defaultdict[tuple[str, ...], float] = defaultdict(float)
        latency: defaultdict[tuple[str, ...], list[float]] = defaultdict(
            lambda: [0.0] * histogram.WIDTH)

        for key, count in zip(batch.keys, batch.counts, strict=True):
            pair = self._pair(int(key["family"]), key["client"].tobytes(),
                              key["server"].tobytes(), int(key["server_port"]))
            kind, transport = int(key["kind"]), transport_name(key["transport"])
            query = self._query(key["name"].tobytes()) if self.query_label else ()
            if kind == REQUEST:
                requests[(*pair, qtype_name(key["qtype"]), transport, *query)] += float(count)
            elif kind == RESPONSE:
                responses[(*pair, qtype_name(key["qtype"]), rcode_name(key["rcode"]),
                           transport, *query)] += float(count)
            elif kind == LATENCY:
                index = histogram.index_of(int(key["variant"]))
                if index is not None:
                    latency[(*pair, rcode_name(key["rcode"]))][index] += float(count)

        for timeout in batch.timeouts:
            pair = self._pair(timeout.family, timeout.client, timeout.server,
                              timeout.server_port)
            timeouts[(*pair, qtype_name(timeout.qtype), transport_name(timeout.transport),
                      *self._query(timeout.name))] += 1

        # counts that found dns_events full, by kind and rcode (qtype and transport unknown)
        overflow_pair = (OVERFLOW,) * len(self.pair_names)
        overflow_query = (OVERFLOW,) if self.query_label else ()
        for index in np.flatnonzero(batch.overflow):
            kind, rcode = divmod(int(index), 16)
            count = float(batch.overflow[index])
            if kind == REQUEST:
                requests[(*overflow_pair, OVERFLOW, OVERFLOW, *overflow_query)] += count
            elif kind == RESPONSE:
                responses[(*overflow_pair, OVERFLOW, rcode_name(rcode), OVERFLOW,
                           *overflow_query)] += count

        for store, series in ((self._requests, requests), (self._responses, responses),
                              (self._timeouts, timeouts)):
            for labels, value in series.items():
                store.add(labels, (value,))
        for labels, slots in latency.items():
            self._latency.add(labels, slots)
        self.stats.record_map("dns_events", batch.entries, batch.capacity)
        self.stats.record_map("dns_pending", batch.pending, batch.pending_capacity)

    def _families(self) -> list[StoreFamily]:
        requests = store_family(
            "ebpf_net_dns_requests", "DNS queries seen, by question type and transport.",
            "counter", self._requests)
        responses = store_family(
            "ebpf_net_dns_responses", "DNS responses matched to their query, by question type, "
            "response code and transport.", "counter", self._responses)
        timeouts = store_family(
            "ebpf_net_dns_timeouts", "DNS queries left without a response for dns.timeout.",
            "counter", self._timeouts)
        latency = store_family(
            "ebpf_net_dns_request_duration_seconds", "Time from a DNS query to its response, "
            "measured in the kernel, by response code.", "histogram", self._latency)
        return [requests, responses, timeouts, latency]
