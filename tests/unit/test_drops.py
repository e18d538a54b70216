"""The drops collector on kernel-shaped batches, and drop reason names read from a kernel's
tracepoint format or BTF."""

from __future__ import annotations

import struct

import numpy as np
from prometheus_client import CollectorRegistry

from exporter.collectors import drops as dropsmod
from exporter.collectors.drops import DropsCollector
from exporter.kernel import btf, dropreasons
from exporter.naming.endpoints import EndpointLabels, PortFolder
from exporter.serving.selfmetrics import KernelStats
from tests.btftools import BtfWriter

from .batches import QueueSource, drop_batch

REASONS = {2: "NOT_SPECIFIED", 3: "NO_SOCKET", 12: "NETFILTER_DROP"}
FORMAT = """name: kfree_skb
print fmt: "skbaddr=%p protocol=%u location=%pS reason: %s", REC->skbaddr, REC->protocol, \
REC->location, __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, \
{ 12, "NETFILTER_DROP" })
"""


def collect(batches, reasons=REASONS):
    stats = KernelStats()
    collector = DropsCollector(QueueSource(list(batches), drop_batch([])),
                               EndpointLabels(["ip", "port"]), PortFolder(32768), stats, 100,
                               300, reasons=reasons)
    registry = CollectorRegistry()
    registry.register(collector)
    samples = {}
    for metric in registry.collect():
        for s in metric.samples:
            samples[tuple(sorted(s.labels.items()))] = s.value
    return samples, stats


def labels(**values):
    return tuple(sorted(values.items()))


def test_drops_are_counted_by_kernel_reason_with_folded_client_ports():
    rows = [
        {"reason": 12, "src": "10.0.0.1", "sport": 40000, "dst": "10.0.0.2", "dport": 53,
         "count": 3},
        {"reason": 12, "src": "10.0.0.1", "sport": 40001, "dst": "10.0.0.2", "dport": 53,
         "count": 2},
        {"reason": 3, "src": "fd00::1", "sport": 50000, "dst": "fd00::2", "dport": 9,
         "protocol": 6, "count": 1},
        {"reason": 2, "count": 4},                       # an ARP frame
        {"reason": 2, "protocol": 0, "count": 1},        # an IP packet with no readable header
        {"reason": 77, "src": "10.0.0.1", "dst": "10.0.0.3", "protocol": 1, "count": 1},
    ]
    overflow = np.zeros(256, dtype=np.uint64)
    overflow[12] = 5
    overflow[255] = 1
    samples, stats = collect([drop_batch(rows, overflow=overflow, failures=6, entries=6,
                                         capacity=16384)])
    udp = dict(src_ip="10.0.0.1", src_port="*", dst_ip="10.0.0.2", dst_port="53",
               protocol="udp")
    assert samples[labels(reason="NETFILTER_DROP", **udp)] == 5
    assert samples[labels(reason="NO_SOCKET", src_ip="fd00::1", src_port="*", dst_ip="fd00::2",
                          dst_port="9", protocol="tcp")] == 1
    empty = dict(src_ip="", src_port="", dst_ip="", dst_port="")
    assert samples[labels(reason="NOT_SPECIFIED", protocol="non_ip", **empty)] == 4
    assert samples[labels(reason="NOT_SPECIFIED", protocol="other", **empty)] == 1
    assert samples[labels(reason="unknown:77", src_ip="10.0.0.1", src_port="",
                          dst_ip="10.0.0.3", dst_port="", protocol="icmp")] == 1
    over = dict(src_ip="overflow", src_port="overflow", dst_ip="overflow",
                dst_port="overflow", protocol="overflow")
    assert samples[labels(reason="NETFILTER_DROP", **over)] == 5
    assert samples[labels(reason="other", **over)] == 1
    assert stats.update_failures["drops"] == 6
    assert stats.map_entries["drops"] == 6


def test_counts_accumulate_across_scrapes():
    row = {"reason": 3, "src": "10.0.0.1", "sport": 40000, "dst": "10.0.0.2", "dport": 80,
           "protocol": 6, "count": 2}
    stats = KernelStats()
    collector = DropsCollector(QueueSource([drop_batch([row]), drop_batch([row])],
                                           drop_batch([])),
                               EndpointLabels(["ip"]), PortFolder(32768), stats, 100, 300,
                               reasons=REASONS)
    values = []
    for _ in range(3):
        (family,) = collector.collect()
        values.append([s.value for s in family.samples])
    assert values == [[2.0], [4.0], [4.0]]


def test_reason_names_come_from_the_tracepoint_format():
    assert dropreasons.from_format(FORMAT) == REASONS
    assert dropreasons.from_format("print fmt: \"no symbols\"") == {}


def _btf_bytes() -> bytes:
    """A tiny BTF: struct sk_buff { void *head; union { struct { u16 transport_header;
    u16 network_header; }; }; } and enum skb_drop_reason."""
    reasons = ((b"SKB_NOT_DROPPED_YET", 0), (b"SKB_CONSUMED", 1),
               (b"SKB_DROP_REASON_NOT_SPECIFIED", 2), (b"SKB_DROP_REASON_SKB_CSUM", 75),
               (b"SKB_DROP_REASON_SUBSYS_MASK", -65536))
    w = BtfWriter([b"u16", b"sk_buff", b"head", b"transport_header", b"network_header",
                   b"skb_drop_reason", *(name for name, _ in reasons)])
    w.add(btf.KIND_INT, 0, 2, b"u16", struct.pack("<I", 16))                          # 1
    w.add(btf.KIND_PTR, 0, 0)                                                         # 2
    w.add(btf.KIND_STRUCT, 2, 4,                                                      # 3
          items=w.member(b"transport_header", 1, 0) + w.member(b"network_header", 1, 16))
    w.add(btf.KIND_UNION, 1, 4, items=w.member(b"", 3, 0))                            # 4
    w.add(btf.KIND_STRUCT, 2, 16, b"sk_buff",                                         # 5
          w.member(b"head", 2, 0) + w.member(b"", 4, 64))
    w.add(btf.KIND_ENUM, len(reasons), 4, b"skb_drop_reason",                         # 6
          b"".join(w.enumerator(name, value) for name, value in reasons))
    return w.blob()


def test_btf_gives_offsets_through_anonymous_members_and_the_reason_enum():
    table = btf.Btf(_btf_bytes())
    assert table.member_offset("sk_buff", "head") == 0
    assert table.member_offset("sk_buff", "transport_header") == 8
    assert table.member_offset("sk_buff", "network_header") == 10
    reasons = dropreasons.from_btf(table)
    assert reasons == {0: "NOT_DROPPED_YET", 1: "CONSUMED", 2: "NOT_SPECIFIED", 75: "SKB_CSUM"}
    assert dropreasons.not_drop_values(reasons) == [0, 1]


def test_program_flags_skip_values_that_are_not_drops():
    flags = dropsmod.program_flags(100, {0: "NOT_DROPPED_YET", 1: "CONSUMED", 2: "X"})
    assert "-DDROP_CAPACITY=100" in flags
    assert "-DNOT_A_DROP(r)=((r)==0||(r)==1)" in flags
