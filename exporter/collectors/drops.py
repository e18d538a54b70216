"""ebpf_net_drops_total, from the `drops` map of bpf/drops.c (the skb:kfree_skb tracepoint).
src is the dropped packet's sender; reasons are named as the running kernel names them."""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import logs
from ..kernel import btf, dropreasons
from ..kernel.maps import BatchMap, CounterArray, Generation
from ..naming.endpoints import OVERFLOW, EndpointLabels, PortFolder, address_text, protocol_name
from ..serving.cardinality import SeriesStore
from ..serving.exposition import StoreFamily, store_family
from ..serving.selfmetrics import KernelStats

log = logs.get("drops")

TRACEPOINT = "skb/kfree_skb"
DROP_KEY = np.dtype({
    "names": ["generation", "reason", "family", "protocol", "sport", "dport", "saddr", "daddr"],
    "formats": ["<u4", "<u4", "u1", "u1", "<u2", "<u2", ("u1", 16), ("u1", 16)],
    "offsets": [0, 4, 8, 9, 10, 12, 16, 32],
    "itemsize": 48,
})
COUNT = np.dtype("<u8")
PROTOCOL_NON_IP = 255           # DROP_PROTOCOL_NON_IP in bpf/drops.c
OVERFLOW_OTHER = 255            # DROP_OVERFLOW_OTHER: reasons from 255 up share it


def program_flags(capacity: int, reasons: dict[int, str]) -> list[str]:
    """-D flags of bpf/drops.c: map size, which reason values are not drops, and the running
    kernel's sk_buff offsets (from BTF) that let the program read the packet's IP header."""
    flags = [f"-DDROP_CAPACITY={capacity}"]
    skip = dropreasons.not_drop_values(reasons)
    if skip:
        flags.append("-DNOT_A_DROP(r)=(" + "||".join(f"(r)=={v}" for v in skip) + ")")
    try:
        table = btf.kernel_btf()
        flags += [f"-DSKB_HEAD_OFFSET={table.member_offset('sk_buff', 'head')}",
                  f"-DSKB_NETWORK_HEADER_OFFSET="
                  f"{table.member_offset('sk_buff', 'network_header')}"]
    except btf.BtfError as e:
        log.warning("no kernel BTF: drops are counted without endpoint labels",
                    extra={"error": str(e)})
    return flags


def reason_names(tracefs_events: Path) -> dict[int, str]:
    return dropreasons.kernel_reasons(tracefs_events / TRACEPOINT / "format")


def tracepoint_has_reason(tracefs_events: Path) -> bool:
    try:
        return "reason;" in (tracefs_events / TRACEPOINT / "format").read_text()
    except OSError:
        return False


@dataclass
class DropBatch:
    keys: np.ndarray                    # old generation's DROP_KEY rows
    counts: np.ndarray                  # summed over CPUs
    overflow: np.ndarray = field(
        default_factory=lambda: np.zeros(OVERFLOW_OTHER + 1, dtype=np.uint64))
    failures: int = 0
    entries: int = 0
    capacity: int = 0


class KernelDropSource:
    def __init__(self, program: object) -> None:
        table = program.table  # type: ignore[attr-defined]
        self.generation = Generation(table("generation"))
        self.drops = BatchMap("drops", table("drops"), DROP_KEY, COUNT, per_cpu=True)
        self.overflow = CounterArray("drop_overflow", table("drop_overflow"))
        self.failures = CounterArray("map_update_failures", table("map_update_failures"))

    def drain(self) -> DropBatch:
        drained, entries = self.drops.drain(self.generation.flip())
        counts = drained.values.sum(axis=1, dtype=np.uint64)
        return DropBatch(drained.keys, counts, self.overflow.read_deltas(),
                         int(self.failures.read_deltas()[0]), entries, self.drops.capacity)


class DropsCollector:
    name = "drops"

    def __init__(self, source: KernelDropSource | object, endpoints: EndpointLabels,
                 ports: PortFolder, stats: KernelStats, max_series: int, ttl_seconds: float,
                 reasons: dict[int, str] | None = None) -> None:
        self.source = source
        self.endpoints = endpoints
        self.ports = ports
        self.stats = stats
        self.reasons = reasons or {}
        self.endpoint_names = endpoints.label_names("src") + endpoints.label_names("dst")
        self.label_names = [*self.endpoint_names, "reason", "protocol"]
        self._drops = SeriesStore("ebpf_net_drops_total", self.label_names, self.endpoint_names,
                                  max_series, ttl_seconds)
        self._lock = threading.Lock()

    def stores(self) -> Sequence[SeriesStore]:
        return (self._drops,)

    def describe(self) -> Iterable[StoreFamily]:
        return self._families()

    def collect(self) -> Iterable[StoreFamily]:
        with self._lock:
            self.endpoints.refresh()
            self._fold(self.source.drain())  # type: ignore[attr-defined]
            self._drops.expire()
            return self._families()

    def _reason(self, value: int) -> str:
        return dropreasons.name_of(self.reasons, value)

    def _endpoints(self, key: np.void) -> tuple[str, ...]:
        family = int(key["family"])
        if family not in (4, 6):        # not IP, or a header the program could not read
            return ("",) * len(self.endpoint_names)
        src = address_text(family, key["saddr"].tobytes())
        dst = address_text(family, key["daddr"].tobytes())
        sport, dport = self.ports.fold(src, int(key["sport"]), dst, int(key["dport"]))
        return self.endpoints.pair(src, sport, dst, dport)

    @staticmethod
    def _protocol(key: np.void) -> str:
        if int(key["family"]) == 0:
            return "non_ip" if int(key["protocol"]) == PROTOCOL_NON_IP else "other"
        return protocol_name(int(key["protocol"]))

    def _fold(self, batch: DropBatch) -> None:
        deltas: defaultdict[tuple[str, ...], float] = defaultdict(float)
        for key, count in zip(batch.keys, batch.counts, strict=True):
            labels = (*self._endpoints(key), self._reason(int(key["reason"])),
                      self._protocol(key))
            deltas[labels] += float(count)
        overflow_ends = (OVERFLOW,) * len(self.endpoint_names)
        for index in np.flatnonzero(batch.overflow):
            reason = "other" if index == OVERFLOW_OTHER else self._reason(int(index))
            deltas[(*overflow_ends, reason, OVERFLOW)] += float(batch.overflow[index])
        for labels, delta in deltas.items():
            self._drops.add(labels, (delta,))
        self.stats.record_map("drops", batch.entries, batch.capacity)
        self.stats.add_failures("drops", float(batch.failures))

    def _families(self) -> list[StoreFamily]:
        return [store_family(
            "ebpf_net_drops", "Packets the kernel dropped (skb:kfree_skb), by the reason it "
            "gave, as this kernel names it.", "counter", self._drops)]
