"""Whose each address is, for counting once per cluster (bpf/cluster.h): the entries of the
kernel's `cluster_addresses` trie, worked out from the Kubernetes API or from `cluster.cidrs`,
and written to the kernel as differences from what it holds."""

from __future__ import annotations

import functools
import ipaddress
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from .. import logs
from ..k8s.cluster import Topology

log = logs.get("cluster")

# values of cluster_addresses (bpf/cluster.h)
LOCAL, COUNTED_ELSEWHERE, NO_EXPORTER = 1, 2, 3
KIND_NAMES = {LOCAL: "local", COUNTED_ELSEWHERE: "exporter_node", NO_EXPORTER: "other_node"}
# fields of struct left_counts (bpf/cluster.h), as the self-metric's `signal` label
LEFT_SIGNALS = ("flow_packets", "flow_bytes", "dns_queries", "http_requests")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


# the addresses of a large cluster's pods, parsed once: a refresh re-reads every one of them,
# and parsing was nine tenths of its time (50000 pods: 390 ms, against 40 ms from the cache)
NETWORK_CACHE = 1 << 17


@functools.lru_cache(maxsize=NETWORK_CACHE)
def network(text: str) -> Network | None:
    """A network or a single address as a network; None for what does not parse (an API
    object's field is not ours to trust)."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


def trie_key(net: Network) -> tuple[int, bytes]:
    """(prefix length, 16 address bytes) as the kernel keys it: IPv4 as IPv4-mapped IPv6."""
    if net.version == 4:
        return 96 + net.prefixlen, V4_MAPPED.network_address.packed[:12] + \
            net.network_address.packed
    return net.prefixlen, net.network_address.packed


def from_topology(topology: Topology, this_node: str) -> dict[Network, int]:
    """Every node's addresses and pod CIDRs, and every pod's address, with whose they are:
    this node's, another node's that counts its own traffic (it runs a ready exporter), or
    another node's that does not. A pod's own entry wins over its node's CIDR (the longest
    prefix), which covers CNIs that hand out addresses outside the node's pod CIDR."""
    def kind_of(node: str) -> int:
        if node == this_node:
            return LOCAL
        return COUNTED_ELSEWHERE if node in topology.exporter_nodes else NO_EXPORTER

    entries: dict[Network, int] = {}
    for name, node in topology.nodes.items():
        kind = kind_of(name)
        for text in (*node.pod_cidrs, *node.addresses):
            net = network(text)
            if net is not None:
                entries[net] = kind
    for address, node_name in topology.pod_addresses.items():
        net = network(address)
        if net is not None:
            entries[net] = kind_of(node_name)
    return entries


def probe_addresses(topology: Topology, this_node: str) -> list[Address]:
    """Where the other nodes are: their addresses and the first host of each of their pod
    CIDRs. The interfaces this node routes them through face the network (netroles.py)."""
    probes: list[Address] = []
    for name, node in topology.nodes.items():
        if name == this_node:
            continue
        for text in node.addresses:
            net = network(text)
            if net is not None:
                probes.append(net.network_address)
        for text in node.pod_cidrs:
            net = network(text)
            if net is not None:
                probes.append(next(iter(net.hosts()), net.network_address))
    return probes


def from_cidrs(cidrs: Iterable[str], local: Iterable[Network]) -> dict[Network, int]:
    """Without Kubernetes: `cluster.cidrs` are senders that count their own traffic, but for
    this node's own networks (netroles.local_networks) within them."""
    entries: dict[Network, int] = {}
    for text in cidrs:
        net = network(text)
        if net is not None:
            entries[net] = COUNTED_ELSEWHERE
    for net in local:
        if any(net.version == other.version and net.subnet_of(other)  # type: ignore[arg-type]
               for other in entries if entries[other] == COUNTED_ELSEWHERE):
            entries[net] = LOCAL
    return entries


class KernelClusterMap:
    """The kernel's cluster_addresses trie and its left-to-another-node counters, written with
    the differences from the last entries it was given; and the same maps of every other
    program that applies the rule (the HTTPS program's), kept equal to the first."""

    @classmethod
    def of(cls, program: Any) -> KernelClusterMap:
        """The maps of a classifier compiled with -DONCE_PER_CLUSTER."""
        return cls(program.table("cluster_addresses"), program.table("counted_elsewhere"))

    def __init__(self, trie: Any, left: Any) -> None:
        self._tries = [trie]
        self._lefts = [left]
        self.capacity = int(trie.max_entries)
        self._held: dict[Network, int] = {}
        self._lock = threading.Lock()
        self.failures = 0
        self._full_logged = False

    def mirror_to(self, program: Any) -> None:
        """Keeps the maps of another program compiled with -DONCE_PER_CLUSTER equal to these,
        from the entries held now on."""
        trie = program.table("cluster_addresses")
        with self._lock:
            self._tries.append(trie)
            self._lefts.append(program.table("counted_elsewhere"))
            for net, kind in sorted(self._held.items(), key=lambda item: item[0].prefixlen):
                self._write(trie, net, kind)

    def apply(self, wanted: Mapping[Network, int]) -> None:
        with self._lock:
            for net in [n for n in self._held if n not in wanted]:
                self._delete(net)
            changed = [net for net, kind in wanted.items() if self._held.get(net) != kind]
            # shortest prefixes first: when the trie fills up, nodes' CIDRs, which cover the
            # most addresses, are in it
            for net in sorted(changed, key=lambda n: n.prefixlen):
                self._put(net, wanted[net])

    @staticmethod
    def _key(trie: Any, net: Network) -> Any:
        prefixlen, packed = trie_key(net)
        key = trie.Key()
        key.prefixlen = prefixlen
        for index, byte in enumerate(packed):
            key.addr[index] = byte
        return key

    def _write(self, trie: Any, net: Network, kind: int) -> bool:
        try:
            trie[self._key(trie, net)] = trie.Leaf(kind)
            return True
        except OSError as e:        # E2BIG: the trie is full
            self.failures += 1
            if not self._full_logged:
                self._full_logged = True
                log.warning("cluster address map full: addresses past it are counted as "
                            "outside the cluster (raise maps.cluster_address_capacity)",
                            extra={"capacity": self.capacity, "error": str(e)})
            return False

    def _put(self, net: Network, kind: int) -> None:
        written = [self._write(trie, net, kind) for trie in self._tries]
        if written[0]:
            self._held[net] = kind

    def _delete(self, net: Network) -> None:
        for trie in self._tries:
            try:
                del trie[self._key(trie, net)]
            except KeyError:
                pass
        self._held.pop(net, None)

    def entries_by_kind(self) -> dict[str, int]:
        with self._lock:
            counts = dict.fromkeys(KIND_NAMES.values(), 0)
            for kind in self._held.values():
                counts[KIND_NAMES[kind]] += 1
            return counts

    def entries(self) -> int:
        with self._lock:
            return len(self._held)

    def left(self) -> dict[str, int]:
        """What this node left to others so far, summed over CPUs."""
        return {name: sum(getattr(cpu, name) for left in self._lefts
                          for cpu in left[left.Key(0)]) for name in LEFT_SIGNALS}
