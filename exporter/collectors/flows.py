"""ebpf_net_flow_bytes_total and ebpf_net_flow_packets_total, from the TC classifier's `flows`
map (bpf/flows.h). src is the packet's sender."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client.core import CounterMetricFamily

from ..cardinality import SeriesStore
from ..endpoints import (
    OVERFLOW,
    EndpointLabels,
    PortFolder,
    address_text,
    family_name,
    protocol_name,
)
from ..maps import BatchMap, CounterArray, Generation
from ..selfmetrics import KernelStats

FLOW_KEY = np.dtype({
    "names": ["generation", "family", "protocol", "sport", "dport", "saddr", "daddr"],
    "formats": ["<u4", "u1", "u1", "<u2", "<u2", ("u1", 16), ("u1", 16)],
    "offsets": [0, 4, 5, 6, 8, 12, 28],
    "itemsize": 44,
})
FLOW_VALUE = np.dtype({
    "names": ["bytes", "packets", "handshake"],
    "formats": ["<u8", "<u8", "<u8"],
    "offsets": [0, 8, 16],
    "itemsize": 24,
})
FLOW_SAW_SYN = 1        # the sender is the client
FLOW_SAW_SYNACK = 2     # the sender is the server

# flow_overflow index = family_index * 4 + protocol_index
OVERFLOW_INDEX = [(family, protocol) for family in ("ipv4", "ipv6")
                  for protocol in ("tcp", "udp", "icmp", "other")]


@dataclass
class FlowBatch:
    """What one drain of the kernel gave: the old generation's flows (summed over CPUs) and
    what flow_overflow gained since the previous drain."""
    keys: np.ndarray
    values: np.ndarray
    overflow: np.ndarray = field(default_factory=lambda: np.zeros((8, 3), dtype=np.uint64))
    entries: int = 0
    capacity: int = 0


class KernelFlowSource:
    """Drains the classifier's maps (see maps.py for the generation protocol)."""

    def __init__(self, program: object) -> None:
        table = program.table  # type: ignore[attr-defined]
        self.generation = Generation(table("flow_generation"))
        self.flows = BatchMap("flows", table("flows"), FLOW_KEY, FLOW_VALUE, per_cpu=True)
        # rows of (bytes, packets, handshake) by family and protocol
        self.overflow = CounterArray("flow_overflow", table("flow_overflow"), width=3)

    def drain(self) -> FlowBatch:
        drained, entries = self.flows.drain(self.generation.flip())
        per_cpu = drained.values
        values = np.zeros(len(per_cpu), dtype=FLOW_VALUE)
        values["bytes"] = per_cpu["bytes"].sum(axis=1)
        values["packets"] = per_cpu["packets"].sum(axis=1)
        values["handshake"] = np.bitwise_or.reduce(per_cpu["handshake"], axis=1)

        return FlowBatch(drained.keys, values, self.overflow.read_deltas(), entries,
                         self.flows.capacity)


class FlowsCollector:
    name = "flows"

    def __init__(self, source: KernelFlowSource | object, endpoints: EndpointLabels,
                 ports: PortFolder, stats: KernelStats, max_series: int,
                 ttl_seconds: float) -> None:
        self.source = source
        self.endpoints = endpoints
        self.ports = ports
        self.stats = stats
        self.label_names = (endpoints.label_names("src") + endpoints.label_names("dst")
                            + ["protocol", "family"])
        endpoint_names = [n for n in self.label_names if n.startswith(("src_", "dst_"))]
        self._bytes = SeriesStore("ebpf_net_flow_bytes_total", self.label_names,
                                  endpoint_names, max_series, ttl_seconds)
        self._packets = SeriesStore("ebpf_net_flow_packets_total", self.label_names,
                                    endpoint_names, max_series, ttl_seconds)
        self._lock = threading.Lock()

    def stores(self) -> Sequence[SeriesStore]:
        return (self._bytes, self._packets)

    def describe(self) -> Iterable[CounterMetricFamily]:
        return self._families()

    def collect(self) -> Iterable[CounterMetricFamily]:
        with self._lock:
            self._fold(self.source.drain())  # type: ignore[attr-defined]
            self._bytes.expire()
            self._packets.expire()
            return self._families()

    def _fold(self, batch: FlowBatch) -> None:
        keys, values = batch.keys, batch.values
        addresses = [(address_text(k["family"], k["saddr"].tobytes()),
                      address_text(k["family"], k["daddr"].tobytes())) for k in keys]
        # learn servers from this batch's handshakes before folding its ports
        for (src, dst), key, handshake in zip(addresses, keys, values["handshake"], strict=True):
            if handshake & FLOW_SAW_SYN:
                self.ports.learn_server(dst, int(key["dport"]))
            if handshake & FLOW_SAW_SYNACK:
                self.ports.learn_server(src, int(key["sport"]))

        deltas: defaultdict[tuple[str, ...], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for (src, dst), key, value in zip(addresses, keys, values, strict=True):
            sport, dport = self.ports.fold(src, int(key["sport"]), dst, int(key["dport"]))
            labels = (self.endpoints.values(src, sport) + self.endpoints.values(dst, dport)
                      + (protocol_name(key["protocol"]), family_name(key["family"])))
            delta = deltas[labels]
            delta[0] += float(value["bytes"])
            delta[1] += float(value["packets"])

        overflow_endpoint = (OVERFLOW,) * (len(self.label_names) - 2)
        for index, (family, protocol) in enumerate(OVERFLOW_INDEX):
            byte_count, packet_count = batch.overflow[index][:2]
            if packet_count:
                delta = deltas[(*overflow_endpoint, protocol, family)]
                delta[0] += float(byte_count)
                delta[1] += float(packet_count)

        for labels, (byte_count, packet_count) in deltas.items():
            self._bytes.add(labels, (byte_count,))
            self._packets.add(labels, (packet_count,))

        self.stats.record_map("flows", batch.entries, batch.capacity)

    def _families(self) -> list[CounterMetricFamily]:
        byte_family = CounterMetricFamily(
            "ebpf_net_flow_bytes", "Bytes of IP packets (IP header included, link header "
            "excluded) seen on the monitored interfaces, counted once per node.",
            labels=self.label_names)
        packet_family = CounterMetricFamily(
            "ebpf_net_flow_packets", "IP packets seen on the monitored interfaces, as on the "
            "wire (an offloaded aggregate counts as its segments), counted once per node.",
            labels=self.label_names)
        for family, store in ((byte_family, self._bytes), (packet_family, self._packets)):
            for labels, (value,) in store.items():
                family.add_metric(labels, value)
        return [byte_family, packet_family]
