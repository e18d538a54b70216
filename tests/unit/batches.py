"""Kernel-shaped batches for collector tests: numpy rows laid out exactly as the kernel's map
keys, so the collectors see what a drain of the real maps gives them."""

from __future__ import annotations

import ctypes
import errno
import ipaddress
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exporter.collectors.flows import FLOW_KEY, FLOW_VALUE, FlowBatch
from exporter.collectors.tcp import TCP_KEY, TCP_KEY_PROCESS, TcpBatch


def _address(text: str) -> tuple[int, np.ndarray]:
    """Family and kernel bytes of an address; "" is none (family 0: an HTTPS socket not
    seen)."""
    if not text:
        return 0, np.zeros(16, dtype=np.uint8)
    ip = ipaddress.ip_address(text)
    raw = ip.packed.ljust(16, b"\0")
    return (4 if ip.version == 4 else 6), np.frombuffer(raw, dtype=np.uint8)


def flow_batch(rows: list[dict], **extra) -> FlowBatch:
    """rows: src, dst, sport, dport, protocol (number), bytes, packets, handshake (optional)."""
    keys = np.zeros(len(rows), dtype=FLOW_KEY)
    values = np.zeros(len(rows), dtype=FLOW_VALUE)
    for i, row in enumerate(rows):
        family, src = _address(row["src"])
        _, dst = _address(row["dst"])
        keys[i]["family"] = family
        keys[i]["protocol"] = row.get("protocol", 6)
        keys[i]["sport"] = row.get("sport", 0)
        keys[i]["dport"] = row.get("dport", 0)
        keys[i]["saddr"] = src
        keys[i]["daddr"] = dst
        values[i]["bytes"] = row["bytes"]
        values[i]["packets"] = row["packets"]
        values[i]["handshake"] = row.get("handshake", 0)
    return FlowBatch(keys, values, **extra)


def tcp_batch(rows: list[dict], process: bool = False, **extra) -> TcpBatch:
    """rows: metric, variant, role, local, remote, lport, rport, count; comm with process."""
    keys = np.zeros(len(rows), dtype=TCP_KEY_PROCESS if process else TCP_KEY)
    counts = np.zeros(len(rows), dtype=np.uint64)
    for i, row in enumerate(rows):
        family, local = _address(row["local"])
        _, remote = _address(row["remote"])
        keys[i]["metric"] = row["metric"]
        keys[i]["variant"] = row.get("variant", 0)
        keys[i]["family"] = family
        keys[i]["role"] = row.get("role", 0)
        keys[i]["lport"] = row.get("lport", 0)
        keys[i]["rport"] = row.get("rport", 0)
        keys[i]["laddr"] = local
        keys[i]["raddr"] = remote
        if process:
            keys[i]["comm"] = np.frombuffer(row.get("comm", b"").ljust(16, b"\0"), np.uint8)
        counts[i] = row["count"]
    return TcpBatch(keys, counts, **extra)


@dataclass
class QueueSource:
    """A source whose drain() hands out prepared batches, then empty ones."""
    batches: list = field(default_factory=list)
    empty: object = None

    def drain(self):
        return self.batches.pop(0) if self.batches else self.empty


def dns_batch(rows: list[dict], timeouts=(), named: bool = False, **extra):
    """rows: kind, client, server, qtype, rcode, transport (0 udp, 1 tcp), variant, count."""
    from exporter.collectors.dns import DNS_KEY, DNS_KEY_NAMED, DnsBatch

    keys = np.zeros(len(rows), dtype=DNS_KEY_NAMED if named else DNS_KEY)
    counts = np.zeros(len(rows), dtype=np.uint64)
    for i, row in enumerate(rows):
        family, client = _address(row["client"])
        _, server = _address(row["server"])
        keys[i]["kind"] = row["kind"]
        keys[i]["transport"] = row.get("transport", 0)
        keys[i]["family"] = family
        keys[i]["rcode"] = row.get("rcode", 0)
        keys[i]["qtype"] = row.get("qtype", 1)
        keys[i]["variant"] = row.get("variant", 0)
        keys[i]["server_port"] = row.get("port", 53)
        keys[i]["client"] = client
        keys[i]["server"] = server
        counts[i] = row["count"]
    return DnsBatch(keys, counts, list(timeouts), **extra)


def timeout(client: str, server: str, qtype: int = 1, transport: int = 0, port: int = 53,
            name: bytes = b""):
    from exporter.collectors.dns import Timeout

    family, client_raw = _address(client)
    _, server_raw = _address(server)
    return Timeout(family, transport, client_raw.tobytes(), server_raw.tobytes(), port, qtype,
                   name)


def http_batch(rows: list[dict], swept=(), **extra):
    """rows: kind, method, status, client, server, port, variant, count, and version (the
    kernel's code: 2 is HTTP/1.1, the default)."""
    from exporter.collectors import http as httpmod

    keys = np.zeros(len(rows), dtype=httpmod.HTTP_KEY)
    counts = np.zeros(len(rows), dtype=np.uint64)
    for i, row in enumerate(rows):
        family, client = _address(row.get("client", "10.0.0.1"))
        _, server = _address(row.get("server", "10.0.0.80"))
        keys[i]["kind"] = row["kind"]
        keys[i]["method"] = row["method"] | row.get("version", 2) << 4
        keys[i]["status"] = row["status"]
        keys[i]["variant"] = row.get("variant", 0)
        keys[i]["family"] = family
        keys[i]["server_port"] = row.get("port", 80)
        keys[i]["client"] = client
        keys[i]["server"] = server
        counts[i] = row["count"]
    return httpmod.HttpBatch(keys, counts, list(swept), **extra)


def unanswered(client: str, server: str, methods: list[int], port: int = 80, version: int = 2):
    from exporter.collectors.http import Unanswered

    family, client_raw = _address(client)
    _, server_raw = _address(server)
    return Unanswered(family, client_raw.tobytes(), server_raw.tobytes(), port,
                      [m | version << 4 for m in methods])


def grpc_counts(rows: list[dict]) -> dict:
    """gRPC counts as the HTTP/2 tracker takes them (exporter/decoding/http2.py GrpcKey)."""
    counts: dict = {}
    for row in rows:
        family, client = _address(row["client"])
        _, server = _address(row["server"])
        key = (family, client.tobytes(), server.tobytes(), row.get("port", 50051),
               row["kind"], row["status"], row.get("variant", 0), row.get("path", b""))
        counts[key] = counts.get(key, 0) + row["count"]
    return counts


def drop_batch(rows: list[dict], **extra):
    """rows: reason, src, dst (absent: not IP), sport, dport, protocol (number), count."""
    from exporter.collectors import drops as dropsmod

    keys = np.zeros(len(rows), dtype=dropsmod.DROP_KEY)
    counts = np.zeros(len(rows), dtype=np.uint64)
    for i, row in enumerate(rows):
        keys[i]["reason"] = row["reason"]
        if "src" in row:
            family, src = _address(row["src"])
            _, dst = _address(row["dst"])
            keys[i]["family"] = family
            keys[i]["saddr"] = src
            keys[i]["daddr"] = dst
            keys[i]["protocol"] = row.get("protocol", 17)
            keys[i]["sport"] = row.get("sport", 0)
            keys[i]["dport"] = row.get("dport", 0)
        else:
            keys[i]["protocol"] = row.get("protocol", dropsmod.PROTOCOL_NON_IP)
        counts[i] = row["count"]
    return dropsmod.DropBatch(keys, counts, **extra)


def bash_record(line: bytes, uid: int = 1000, pid: int = 42,
                time_ns: int = 5_000_000_000) -> bytes:
    """A record of bpf/bash.c's ring buffer."""
    from exporter.collectors.bash import BASH_COMMAND, LINE_BYTES

    record = np.zeros(1, dtype=BASH_COMMAND)
    record[0]["time_ns"] = time_ns
    record[0]["pid"] = pid
    record[0]["uid"] = uid
    cut = line[:LINE_BYTES - 1]
    record[0]["length"] = len(cut) + 1
    record[0]["line"] = cut
    return record.tobytes()


@dataclass
class BashSource:
    """Hands prepared records to the collector when opened; reports `lost` once."""
    records: list = field(default_factory=list)
    lost_records: int = 0

    def open(self, on_record):
        for record in self.records:
            on_record(record)

    def consume(self):
        pass

    def lost(self):
        lost, self.lost_records = self.lost_records, 0
        return lost


class FakeTrie(dict[tuple[int, bytes], int]):
    """cluster_addresses as bcc shows it: Key and Leaf types, a capacity, E2BIG when full."""

    class Key(ctypes.Structure):
        _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_ubyte * 16)]

    Leaf = ctypes.c_ubyte

    def __init__(self, max_entries: int) -> None:
        super().__init__()
        self.max_entries = max_entries
        self.writes = 0

    @staticmethod
    def _plain(key: Key) -> tuple[int, bytes]:
        return key.prefixlen, bytes(key.addr)

    def __setitem__(self, key: Any, leaf: Any) -> None:
        plain = self._plain(key)
        if plain not in self and len(self) >= self.max_entries:
            # as kernelmap.KernelMap raises it
            raise OSError(errno.E2BIG, "map update: Argument list too long")
        self.writes += 1
        super().__setitem__(plain, leaf.value)

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(self._plain(key))


class LeftCounts(ctypes.Structure):
    """struct left_counts (bpf/cluster.h)."""
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("flow_packets", "flow_bytes", "dns_queries", "http_requests")]


class FakeLeft:
    """counted_elsewhere as bcc shows it: one per-CPU entry."""

    Key = ctypes.c_int

    def __init__(self, cpus: list[dict[str, int]]) -> None:
        self.cpus = [LeftCounts(**counts) for counts in cpus]

    def __getitem__(self, key: Any) -> list[LeftCounts]:
        return self.cpus
