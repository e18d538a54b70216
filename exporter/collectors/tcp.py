"""TCP connection metrics from the tracepoint program's `tcp_events` map (bpf/tcp.c): opened,
closed, active, connect failures, retransmits, resets and the RTT histogram. src is the client
(the end that opened the connection); dst is the server, with its port."""

from __future__ import annotations

import ctypes
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..kernel.maps import BatchMap, CounterArray, Generation
from ..naming.endpoints import OVERFLOW, EndpointLabels, PortFolder, address_text
from ..serving import histogram
from ..serving.cardinality import SeriesStore
from ..serving.exposition import StoreFamily, store_family
from ..serving.selfmetrics import KernelStats
from .base import PairCollector

TCP_ENDPOINTS_FIELDS = {
    "names": ["family", "role", "lport", "rport", "laddr", "raddr"],
    "formats": ["u1", "u1", "<u2", "<u2", ("u1", 16), ("u1", 16)],
}
TCP_KEY = np.dtype({
    "names": ["generation", "metric", "variant", *TCP_ENDPOINTS_FIELDS["names"]],
    "formats": ["<u4", "u1", "<u2", *TCP_ENDPOINTS_FIELDS["formats"]],
    "offsets": [0, 4, 6, 8, 9, 10, 12, 16, 32],
    "itemsize": 48,
})
# with the process label (-DWITH_PROCESS) the endpoints end with the command name
TCP_KEY_PROCESS = np.dtype({
    "names": [*TCP_KEY.names, "comm"],
    "formats": [*(TCP_KEY.fields[n][0] for n in TCP_KEY.names), ("u1", 16)],
    "offsets": [*(TCP_KEY.fields[n][1] for n in TCP_KEY.names), 48],
    "itemsize": 64,
})
COUNT = np.dtype("<u8")

ROLE_UNKNOWN, ROLE_CLIENT, ROLE_SERVER = 0, 1, 2
ROLE_NAMES = {ROLE_CLIENT: "client", ROLE_SERVER: "server"}
OPENED, CLOSED, CONNECT_FAILURES, RETRANSMITS, RESETS, RTT = range(6)
METRIC_COUNT = 6
CONNECT_FAILURE_REASONS = ["refused", "timeout", "aborted"]
RESET_DIRECTIONS = ["sent", "received"]
# the slots of map_update_failures in bpf/tcp.c (C name, the map's name in the self-metrics),
# given to it as -D flags
FAILURES = (("EVENTS", "tcp_events"), ("SOCKETS", "tcp_sockets"))
FAILURE_MAPS = [label for _, label in FAILURES]
MARK_WAYS = 4           # marks per group of socket_marks (bpf/tcp.c)


@dataclass
class TcpBatch:
    keys: np.ndarray                # old generation's TCP_KEY rows
    counts: np.ndarray              # summed over CPUs
    overflow: np.ndarray = field(
        default_factory=lambda: np.zeros(METRIC_COUNT * 3 * 64, dtype=np.uint64))
    failures: np.ndarray = field(default_factory=lambda: np.zeros(2, dtype=np.uint64))
    entries: int = 0
    capacity: int = 0
    sockets: int = 0
    socket_capacity: int = 0
    marks: int = 0
    mark_capacity: int = 0          # 0: a build without socket marks (bpf/tcp.c)


class KernelTcpSource:
    def __init__(self, program: object, process: bool = False) -> None:
        table = program.table  # type: ignore[attr-defined]
        self.generation = Generation(table("generation"))
        self.events = BatchMap("tcp_events", table("tcp_events"),
                               TCP_KEY_PROCESS if process else TCP_KEY, COUNT, per_cpu=True)
        self.socket_capacity = int(table("tcp_sockets").max_entries)
        self.socket_count = table("tcp_socket_count")
        try:
            self.mark_count = table("socket_mark_count")
            self.mark_capacity = int(table("socket_marks").max_entries) * MARK_WAYS
        except KeyError:            # with the process label or without the socket fields
            self.mark_count, self.mark_capacity = None, 0
        self.overflow = CounterArray("tcp_overflow", table("tcp_overflow"))
        self.failures = CounterArray("map_update_failures", table("map_update_failures"))

    def drain(self) -> TcpBatch:
        drained, entries = self.events.drain(self.generation.flip())
        keys = drained.keys
        counts = drained.values.sum(axis=1, dtype=np.uint64)
        sockets = int(self.socket_count.sum(ctypes.c_int(0)).value)
        marks = int(self.mark_count.sum(ctypes.c_int(0)).value) if self.mark_count else 0
        return TcpBatch(keys, counts, self.overflow.read_deltas(), self.failures.read_deltas(),
                        entries, self.events.capacity,
                        max(sockets, 0), self.socket_capacity, max(marks, 0), self.mark_capacity)


class TcpCollector(PairCollector):
    name = "tcp"

    def __init__(self, source: KernelTcpSource | object, endpoints: EndpointLabels,
                 ports: PortFolder, stats: KernelStats, max_series: int,
                 ttl_seconds: float, process_label: bool = False) -> None:
        super().__init__(source, endpoints, ports, stats, max_series, ttl_seconds)
        self.process_label = process_label
        # the opt-in process label goes last on every TCP metric
        self._process_names = ["process"] if process_label else []

        def store(metric: str, extra: list[str], width: int = 1) -> SeriesStore:
            return self.store(metric, [*extra, *self._process_names], width)

        self._opened = store("ebpf_net_tcp_connections_opened_total", ["role"])
        self._closed = store("ebpf_net_tcp_connections_closed_total", ["role"])
        self._failures = store("ebpf_net_tcp_connect_failures_total", ["reason"])
        self._retransmits = store("ebpf_net_tcp_retransmits_total", [])
        self._resets = store("ebpf_net_tcp_resets_total", ["direction"])
        self._rtt = store("ebpf_net_tcp_rtt_seconds", [], width=histogram.WIDTH)
        self._by_metric = {OPENED: self._opened, CLOSED: self._closed,
                           CONNECT_FAILURES: self._failures, RETRANSMITS: self._retransmits,
                           RESETS: self._resets, RTT: self._rtt}

    def stores(self) -> Sequence[SeriesStore]:
        return tuple(self._by_metric.values())

    def _oriented_pair(self, key: np.void) -> tuple[tuple[str, ...], int]:
        """Endpoint label values (client first) and the role of the socket."""
        family, role = int(key["family"]), int(key["role"])
        local = address_text(family, key["laddr"].tobytes())
        remote = address_text(family, key["raddr"].tobytes())
        lport, rport = int(key["lport"]), int(key["rport"])
        if role == ROLE_UNKNOWN:
            remote_is_server = self.ports.server_is_remote(local, lport, remote, rport)
        else:
            remote_is_server = role == ROLE_CLIENT
        if remote_is_server:
            client, server, port = local, remote, rport
        else:
            client, server, port = remote, local, lport
        return self.endpoints.pair(client, None, server, str(port)), role

    def _process(self, key: np.void) -> tuple[str, ...]:
        if not self.process_label:
            return ()
        return (key["comm"].tobytes().split(b"\0", 1)[0].decode(errors="replace"),)

    @staticmethod
    def _extra(metric: int, role: int, variant: int) -> tuple[str, ...]:
        if metric in (OPENED, CLOSED):
            return (ROLE_NAMES.get(role, "unknown"),)
        if metric == CONNECT_FAILURES:
            return (CONNECT_FAILURE_REASONS[variant],)
        if metric == RESETS:
            return (RESET_DIRECTIONS[variant],)
        return ()

    def _fold(self, batch: TcpBatch) -> None:
        deltas: dict[int, defaultdict[tuple[str, ...], list[float]]] = {
            metric: defaultdict(lambda m=metric: [0.0] * self._by_metric[m].width)
            for metric in self._by_metric}

        for key, count in zip(batch.keys, batch.counts, strict=True):
            metric, variant = int(key["metric"]), int(key["variant"])
            if metric not in self._by_metric:
                continue
            if metric == OPENED:    # the server end of an open is a server for port folding
                self._learn_server(key)
            pair, role = self._oriented_pair(key)
            self._count(deltas[metric],
                        pair + self._extra(metric, role, variant) + self._process(key),
                        metric, variant, float(count))

        overflow_pair = (OVERFLOW,) * len(self.pair_names)
        overflow_process = (OVERFLOW,) if self.process_label else ()
        for index in np.flatnonzero(batch.overflow):
            metric, rest = divmod(int(index), 3 * 64)
            role, variant = divmod(rest, 64)
            if metric in self._by_metric:
                self._count(deltas[metric],
                            overflow_pair + self._extra(metric, role, variant) + overflow_process,
                            metric, variant, float(batch.overflow[index]))

        for metric, series in deltas.items():
            store = self._by_metric[metric]
            for labels, delta in series.items():
                store.add(labels, delta)

        self.stats.record_map("tcp_events", batch.entries, batch.capacity)
        self.stats.record_map("tcp_sockets", batch.sockets, batch.socket_capacity)
        if batch.mark_capacity:
            self.stats.record_map("socket_marks", batch.marks, batch.mark_capacity)
        for index, name in enumerate(FAILURE_MAPS):
            self.stats.add_failures(name, float(batch.failures[index]))

    @staticmethod
    def _count(series: defaultdict[tuple[str, ...], list[float]], labels: tuple[str, ...],
               metric: int, variant: int, count: float) -> None:
        if metric == RTT:
            index = histogram.index_of(variant)
            if index is not None:
                series[labels][index] += count
        else:
            series[labels][0] += count

    def _learn_server(self, key: np.void) -> None:
        family, role = int(key["family"]), int(key["role"])
        if role == ROLE_CLIENT:
            self.ports.learn_server(address_text(family, key["raddr"].tobytes()),
                                    int(key["rport"]))
        elif role == ROLE_SERVER:
            self.ports.learn_server(address_text(family, key["laddr"].tobytes()),
                                    int(key["lport"]))

    def _active(self, labels: tuple[str, ...]) -> float:
        opened = self._opened.get(labels)
        closed = self._closed.get(labels)
        return (opened[0] if opened else 0.0) - (closed[0] if closed else 0.0)

    def _expire(self) -> None:
        # a pair with open connections keeps its opened/closed series however long it is idle
        def has_open(labels: tuple[str, ...]) -> bool:
            return self._active(labels) != 0

        self._opened.expire(keep=has_open)
        self._closed.expire(keep=has_open)
        for store in (self._failures, self._retransmits, self._resets, self._rtt):
            store.expire()

    def _families(self) -> list[StoreFamily]:
        opened = store_family(
            "ebpf_net_tcp_connections_opened", "TCP connections established, by the role of "
            "the local socket (client: active open, server: passive open).", "counter",
            self._opened)
        closed = store_family(
            "ebpf_net_tcp_connections_closed", "TCP connections closed whose open the exporter "
            "saw, by the role of the local socket.", "counter", self._closed)
        active = StoreFamily(
            "ebpf_net_tcp_active_connections", "TCP connections open now (opened minus closed "
            "since the exporter started), by the role of the local socket.", "gauge",
            self._opened.label_names,
            [(labels, text, [self._active(labels)]) for labels, text, _ in opened.rows])
        failures = store_family(
            "ebpf_net_tcp_connect_failures", "Connection attempts that ended before "
            "establishment: refused (reset), timeout (SYN retransmitted, no answer), aborted.",
            "counter", self._failures)
        retransmits = store_family(
            "ebpf_net_tcp_retransmits", "TCP segments retransmitted.", "counter",
            self._retransmits)
        resets = store_family(
            "ebpf_net_tcp_resets", "TCP resets sent and received.", "counter", self._resets)
        rtt = store_family(
            "ebpf_net_tcp_rtt_seconds", "Smoothed RTT of TCP connections: each connection's "
            "latest srtt once per sampling interval and once at close.", "histogram", self._rtt)
        return [opened, closed, active, failures, retransmits, resets, rtt]
