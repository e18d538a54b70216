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
    distinct_addresses,
    family_name,
    port_text,
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


def _numbered(values: np.ndarray) -> np.ndarray:
    """For each value, the rank of its distinct value (0, 1, ...)."""
    return np.unique(values, return_inverse=True)[1].reshape(-1).astype(np.int64)


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
            self.endpoints.refresh()
            self._fold(self.source.drain())  # type: ignore[attr-defined]
            self._bytes.expire()
            self._packets.expire()
            return self._families()

    def _fold(self, batch: FlowBatch) -> None:
        keys, values = batch.keys, batch.values
        deltas: defaultdict[tuple[str, ...], list[float]] = defaultdict(lambda: [0.0, 0.0])
        if len(keys):
            self._fold_flows(keys, values, deltas)

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

    def _fold_flows(self, keys: np.ndarray, values: np.ndarray,
                    deltas: defaultdict[tuple[str, ...], list[float]]) -> None:
        """Folds a drain into per-label-set deltas with numpy: Python runs once per distinct
        address, (address, port) and label set, not once per flow."""
        texts, (src, dst) = distinct_addresses(keys["family"], keys["saddr"], keys["daddr"])
        sport, dport = keys["sport"], keys["dport"]
        # learn servers from this batch's handshakes before folding its ports
        handshake = values["handshake"]
        for row in np.flatnonzero(handshake & FLOW_SAW_SYN):
            self.ports.learn_server(texts[dst[row]], int(dport[row]))
        for row in np.flatnonzero(handshake & FLOW_SAW_SYNACK):
            self.ports.learn_server(texts[src[row]], int(sport[row]))
        s_code, d_code = self.ports.fold_codes(texts, src, sport, dst, dport)

        # one group per label set: (src, its port, dst, its port, protocol); the family follows
        # from the addresses. Packed into one integer when the ranges fit (a fast sort).
        protocol = keys["protocol"].astype(np.int64)
        columns = (src.astype(np.int64), s_code + 2, dst.astype(np.int64), d_code + 2, protocol)
        address_bits = max(len(texts) - 1, 1).bit_length()
        if 2 * address_bits + 2 * 17 + 8 <= 62:
            packed = columns[0]
            for column, bits in zip(columns[1:], (17, address_bits, 17, 8), strict=True):
                packed = (packed << bits) | column
            _, firsts, inverse = np.unique(packed, return_index=True, return_inverse=True)
            inverse = inverse.reshape(-1)
        else:
            # many addresses: number each end (address, port code) first, so the label set
            # still packs into one integer (three integer sorts beat one lexsort of 5 columns)
            src_end = _numbered(columns[0] << 17 | columns[1])
            dst_end = _numbered(columns[2] << 17 | columns[3])
            end_bits = max(len(protocol), 1).bit_length()    # ranks are below the rows
            packed = (src_end << end_bits | dst_end) << 8 | protocol
            _, firsts, inverse = np.unique(packed, return_index=True, return_inverse=True)
            inverse = inverse.reshape(-1)
        byte_sums = np.bincount(inverse, weights=values["bytes"].astype(np.float64))
        packet_sums = np.bincount(inverse, weights=values["packets"].astype(np.float64))
        family = keys["family"]
        for row, byte_count, packet_count in zip(firsts, byte_sums, packet_sums, strict=True):
            labels = (self.endpoints.values("src", texts[src[row]], port_text(s_code[row]))
                      + self.endpoints.values("dst", texts[dst[row]], port_text(d_code[row]))
                      + (protocol_name(protocol[row]), family_name(family[row])))
            delta = deltas[labels]
            delta[0] += float(byte_count)
            delta[1] += float(packet_count)

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
