"""ebpf_net_flow_bytes_total and ebpf_net_flow_packets_total, from the TC classifier's `flows`
map (bpf/flows.h). src is the packet's sender."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..kernel.maps import BatchMap, CounterArray, Generation
from ..naming.endpoints import (
    OVERFLOW,
    EndpointLabels,
    PortFolder,
    address_text,
    distinct_addresses,
    family_name,
    grouped,
    port_text,
    protocol_name,
    ranks,
)
from ..serving.cardinality import SeriesStore
from ..serving.exposition import StoreFamily
from ..serving.selfmetrics import KernelStats

FLOW_KEY = np.dtype({
    "names": ["family", "protocol", "sport", "dport", "saddr", "daddr"],
    "formats": ["u1", "u1", "<u2", "<u2", ("u1", 16), ("u1", 16)],
    "offsets": [0, 1, 2, 4, 8, 24],
    "itemsize": 40,
})
# struct flow_value: packets in the low 62 bits, the FLOW_SAW_* bits above them
KERNEL_FLOW_VALUE = np.dtype([("bytes", "<u8"), ("packets_handshake", "<u8")])
HANDSHAKE_SHIFT = 62
PACKETS_MASK = np.uint64((1 << HANDSHAKE_SHIFT) - 1)
# struct recent_flow: one of the two flows a CPU counted last, stamped with its generation
RECENT_FLOW = np.dtype([("key", FLOW_KEY), ("bytes", "<u8"), ("packets_handshake", "<u8"),
                        ("generation", "<u4"), ("pad", "<u4")])
RECENT_WAYS = 2         # recent_flows slots per generation parity: index parity * 2 + way
# struct client_end and struct server_end (bpf/common.h), answering_servers' key and value
CLIENT_END = np.dtype({"names": ["family", "port", "addr"],
                       "formats": ["u1", "<u2", ("u1", 16)], "offsets": [0, 2, 4],
                       "itemsize": 20})
SERVER_END = np.dtype({"names": ["port", "addr"], "formats": ["<u2", ("u1", 16)],
                       "offsets": [0, 4], "itemsize": 20})
TCP = 6
# a drain's flows, summed over CPUs
FLOW_VALUE = np.dtype([("bytes", "<u8"), ("packets", "<u8"), ("handshake", "<u8")])
FLOW_SAW_SYN = 1        # the sender is the client
FLOW_SAW_SYNACK = 2     # the sender is the server
PORT_CODES = 65536 + 2  # port label codes shifted by 2: NO_PORT_CODE, FOLDED_CODE, the ports
PACKED_BITS = 62        # a label set packed into one int64, kept positive

# flow_overflow index = family_index * 4 + protocol_index
OVERFLOW_INDEX = [(family, protocol) for family in ("ipv4", "ipv6")
                  for protocol in ("tcp", "udp", "icmp", "other")]


@dataclass
class FlowBatch:
    """What one drain of the kernel gave: the old generation's flows and what flow_overflow
    gained since the previous drain. A flow can have several rows (its counts in the flows map
    and those still in CPUs' recent_flows slots): whoever reads a batch sums by key."""
    keys: np.ndarray
    values: np.ndarray
    overflow: np.ndarray = field(default_factory=lambda: np.zeros((8, 2), dtype=np.uint64))
    entries: int = 0
    capacity: int = 0


class KernelFlowSource:
    """Drains the classifier's maps: one `flows_<parity>` map per generation parity
    (bpf/flows.h), so the one no program writes after the flip is read and emptied in a single
    pass, and each CPU's recent_flows slots of that generation, which hold the counts of the
    two flows the CPU counted last."""

    def __init__(self, program: object, answering_servers: bool = False) -> None:
        table = program.table  # type: ignore[attr-defined]
        self.generation = Generation(table("flow_generation"), counting=True)
        self.servers = BatchMap("answering_servers", table("answering_servers"), CLIENT_END,
                                SERVER_END, per_cpu=False) if answering_servers else None
        self.flows = [BatchMap("flows", table(f"flows_{parity}"), FLOW_KEY,
                               KERNEL_FLOW_VALUE, per_cpu=True) for parity in (0, 1)]
        self.recent = BatchMap("recent_flows", table("recent_flows"), np.dtype("<u4"),
                               RECENT_FLOW, per_cpu=True)
        # rows of (bytes, packets and handshake bits) by family and protocol
        self.overflow = CounterArray("flow_overflow", table("flow_overflow"), width=2)

    def drain(self) -> FlowBatch:
        generation = self.generation.flip()
        old = self.flows[generation & 1]
        drained = old.take()
        recent = self._recent(generation)
        per_cpu = drained.values
        values = np.zeros(len(per_cpu) + len(recent), dtype=FLOW_VALUE)
        values["bytes"][:len(per_cpu)] = per_cpu["bytes"].sum(axis=1)
        values["bytes"][len(per_cpu):] = recent["bytes"]
        counts = per_cpu["packets_handshake"]
        values["packets"][:len(per_cpu)] = (counts & PACKETS_MASK).sum(axis=1)
        values["handshake"][:len(per_cpu)] = np.bitwise_or.reduce(
            counts >> np.uint64(HANDSHAKE_SHIFT), axis=1)
        values["packets"][len(per_cpu):] = recent["packets_handshake"] & PACKETS_MASK
        values["handshake"][len(per_cpu):] = recent["packets_handshake"] >> np.uint64(
            HANDSHAKE_SHIFT)
        keys = drained.keys
        if len(recent):
            # as opaque bytes: numpy copies a structured dtype with padding field by field
            # (1M keys: 117 ms, against 11 ms for their bytes)
            recent_keys = np.ascontiguousarray(recent["key"]).view(drained.raw_keys.dtype)
            keys = np.concatenate([drained.raw_keys, recent_keys.reshape(-1)]).view(FLOW_KEY)
        overflow = self.overflow.read_deltas()
        overflow[:, 1] &= PACKETS_MASK
        return FlowBatch(keys, values, overflow, len(drained.raw_keys), old.capacity)

    def answering_servers(self) -> tuple[dict[bytes, bytes], int]:
        """The server that answered each client's SYN: the client's end (struct client_end,
        as bytes) -> the server's 16-byte address; and the map's capacity."""
        if self.servers is None:
            return {}, 0
        snapshot = self.servers.read()
        raw = snapshot.raw_keys.tobytes()
        size = CLIENT_END.itemsize
        addresses = snapshot.values["addr"]
        return ({raw[i * size:(i + 1) * size]: addresses[i].tobytes()
                 for i in range(len(snapshot.raw_keys))}, self.servers.capacity)

    def _recent(self, generation: int) -> np.ndarray:
        """The CPUs' recent_flows slots that counted in `generation`: no program writes them
        after its flip, and the programs of the generation after next start them afresh."""
        snapshot = self.recent.read()
        parity = snapshot.keys // RECENT_WAYS == (generation & 1)
        slots = snapshot.values[parity].reshape(-1)
        return slots[(slots["generation"] == generation) & (slots["packets_handshake"] != 0)]


def _numbered(values: np.ndarray) -> np.ndarray:
    """For each value, the rank of its distinct value (0, 1, ...)."""
    return grouped(values)[1]


def _bits(count: int) -> int:
    """Bits that hold the numbers 0 .. count - 1."""
    return max(count - 1, 1).bit_length()


class _TextCache(dict):
    """Label text of small integer codes (ports, protocol and family), each made once."""

    def __init__(self, make: Callable[[int], Any]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, code: int) -> Any:
        text = self[code] = self._make(code)
        return text


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
                                    endpoint_names, max_series, ttl_seconds,
                                    text_from=self._bytes)
        self._lock = threading.Lock()

    def stores(self) -> Sequence[SeriesStore]:
        return (self._bytes, self._packets)

    def describe(self) -> Iterable[StoreFamily]:
        return self._families()

    def collect(self) -> Iterable[StoreFamily]:
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

        self._bytes.add_counts(deltas.keys(), (byte_count for byte_count, _ in deltas.values()))
        self._packets.add_counts(deltas.keys(),
                                 (packet_count for _, packet_count in deltas.values()))

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
        if self.endpoints.wants_server_zones:
            dst = self._via_servers(texts, keys, src, dst)

        # one group per label set: (src, its port, dst, its port, protocol); the family follows
        # from the addresses. Ports and protocols are replaced by their ranks among the few
        # distinct ones, so that the label set packs into one integer (one integer sort).
        protocol = keys["protocol"].astype(np.int64)
        s_rank, s_count = ranks(s_code + 2, PORT_CODES)
        d_rank, d_count = ranks(d_code + 2, PORT_CODES)
        p_rank, p_count = ranks(protocol, 256)
        address_bits = _bits(len(texts))
        columns = ((src, address_bits), (s_rank, _bits(s_count)), (dst, address_bits),
                   (d_rank, _bits(d_count)), (p_rank, _bits(p_count)))
        if sum(bits for _, bits in columns) > PACKED_BITS:
            # many distinct ports and addresses: number each end (address, port) first
            src_end = _numbered(src.astype(np.int64) << 17 | (s_code + 2))
            dst_end = _numbered(dst.astype(np.int64) << 17 | (d_code + 2))
            end_bits = _bits(len(protocol))     # ranks are below the rows
            columns = ((src_end, end_bits), (dst_end, end_bits), (p_rank, 8))
        packed = np.zeros(len(protocol), dtype=np.int64)
        for column, bits in columns:
            packed = (packed << bits) | column
        firsts, inverse = grouped(packed)
        byte_sums = np.bincount(inverse, weights=values["bytes"].astype(np.float64))
        packet_sums = np.bincount(inverse, weights=values["packets"].astype(np.float64))
        # one Python iteration per label set: over lists, since indexing numpy arrays row by
        # row makes a numpy scalar of every field
        pair = self.endpoints.pair
        ports = _TextCache(port_text)
        kinds = _TextCache(lambda code: (protocol_name(code >> 8), family_name(code & 0xFF)))
        kind = (protocol[firsts] << 8 | keys["family"][firsts]).tolist()
        for s, sp, d, dp, k, byte_count, packet_count in zip(
                src[firsts].tolist(), s_code[firsts].tolist(), dst[firsts].tolist(),
                d_code[firsts].tolist(), kind, byte_sums.tolist(), packet_sums.tolist(),
                strict=True):
            labels = pair(texts[s], ports[sp], texts[d], ports[dp]) + kinds[k]
            delta = deltas[labels]
            delta[0] += byte_count
            delta[1] += packet_count

    def _via_servers(self, texts: list[str], keys: np.ndarray, src: np.ndarray,
                     dst: np.ndarray) -> np.ndarray:
        """`dst` with each TCP flow to the ClusterIP of a Service whose backends span zones
        pointed at a new end in `texts`: the ClusterIP joined with the backend that answered
        the client (EndpointLabels.via_server), whose zone it takes."""
        services = [i for i, text in enumerate(texts) if self.endpoints.zoneless_service(text)]
        if not services:
            return dst
        rows = np.flatnonzero(np.isin(dst, services) & (keys["protocol"] == TCP))
        if not len(rows):
            return dst
        servers, capacity = self.source.answering_servers()  # type: ignore[attr-defined]
        self.stats.record_map("answering_servers", len(servers), capacity)
        if not servers:
            return dst
        ends = np.zeros(len(rows), dtype=CLIENT_END)
        ends["family"], ends["port"] = keys["family"][rows], keys["sport"][rows]
        ends["addr"] = keys["saddr"][rows]
        raw, size = ends.tobytes(), CLIENT_END.itemsize
        dst = dst.copy()
        joined: dict[str, int] = {}
        for i, row in enumerate(rows.tolist()):
            server = servers.get(raw[i * size:(i + 1) * size])
            if server is None:
                continue
            text = self.endpoints.via_server(texts[dst[row]],
                                             address_text(int(keys["family"][row]), server))
            index = joined.get(text)
            if index is None:
                index = joined[text] = len(texts)
                texts.append(text)
            dst[row] = index
        return dst

    def _families(self) -> list[StoreFamily]:
        return [
            StoreFamily("ebpf_net_flow_bytes", "Bytes of IP packets (IP header included, link "
                        "header excluded) seen on the monitored interfaces, counted once (per "
                        "cluster: by the sending node).", "counter", self.label_names,
                        self._bytes.rows()),
            StoreFamily("ebpf_net_flow_packets", "IP packets seen on the monitored interfaces, "
                        "as on the wire (an offloaded aggregate counts as its segments), counted "
                        "once (per cluster: by the sending node).", "counter", self.label_names,
                        self._packets.rows()),
        ]
