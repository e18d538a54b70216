"""Endpoint labels for metrics with two ends: the address, its type and the port, with
ephemeral ports folded to ``*``.

The server side of a pair is taken from what the exporter saw of the handshake (a SYN's
destination, a passive TCP open) where it saw it, else from the port rule: a port at or above
the ephemeral floor that is not a configured server port is a client's, shown as ``*``."""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import replace
from typing import Protocol

import numpy as np
from cachetools import LRUCache, TTLCache

from ..k8s.cluster import Identity
from .namepolicy import NamePolicy

# the endpoint label vocabulary, in the order labels appear
KUBERNETES_LABELS = ("namespace", "workload", "workload_kind", "service", "pod", "node", "zone")
ENDPOINT_LABELS = (*KUBERNETES_LABELS, "ip", "ip_type", "dns_name", "port")
CACHE_SECONDS = 60.0        # endpoint values are recomputed at least this often
CACHE_SIZE = 1 << 20        # ... and when this many are cached

FOLDED_PORT = "*"
NO_PORT = ""
# port label codes in vectorised folding: a port number, or one of these
FOLDED_CODE = -1
NO_PORT_CODE = -2
OVERFLOW = "overflow"
VIA = ">"       # joins a ClusterIP and the backend that answered (EndpointLabels.via_server)

# learned server endpoints are kept this long after last seen
SERVER_MEMORY_SECONDS = 3600.0
SERVER_MEMORY_SIZE = 65536

PROTOCOL_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmp"}
FAMILY_NAMES = {4: "ipv4", 6: "ipv6"}


def protocol_name(number: int) -> str:
    return PROTOCOL_NAMES.get(int(number), "other")


def family_name(number: int) -> str:
    return FAMILY_NAMES.get(int(number), "other")


def ip_type(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """DataKit's classes: loopback, multicast, private (RFC 1918, ULA, link-local, ...), public."""
    if address.is_loopback:
        return "loopback"
    if address.is_multicast:
        return "multicast"
    if address.is_global:
        return "public"
    return "private"


_address_cache: LRUCache[tuple[int, bytes], str] = LRUCache(maxsize=262144)


def address_text(family: int, raw: bytes) -> str:
    """The kernel's 16-byte address field as text; IPv4-mapped IPv6 shows as IPv4."""
    key = (int(family), raw)
    text = _address_cache.get(key)
    if text is None:
        if family == 4:
            text = str(ipaddress.IPv4Address(raw[:4]))
        else:
            v6 = ipaddress.IPv6Address(raw[:16])
            text = str(v6.ipv4_mapped or v6)
        _address_cache[key] = text
    return text


def read_ephemeral_floor(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> int:
    with open(path) as f:
        return int(f.read().split()[0])


class PortFolder:
    """Decides which port of a pair is a server's (kept) and which a client's (``*``)."""

    def __init__(self, ephemeral_floor: int, server_ports: Iterable[int] = ()) -> None:
        self.ephemeral_floor = ephemeral_floor
        self.server_ports = frozenset(server_ports)
        self._servers: TTLCache[tuple[str, int], bool] = TTLCache(
            maxsize=SERVER_MEMORY_SIZE, ttl=SERVER_MEMORY_SECONDS)
        self._lock = threading.Lock()   # iterating the cache must not see it change

    def learn_server(self, address: str, port: int) -> None:
        if port:
            with self._lock:
                self._servers[(address, int(port))] = True

    def is_known_server(self, address: str, port: int) -> bool:
        return (address, int(port)) in self._servers

    def looks_ephemeral(self, port: int) -> bool:
        return port >= self.ephemeral_floor and port not in self.server_ports

    def fold(self, src: str, sport: int, dst: str, dport: int) -> tuple[str, str]:
        """Port labels for a packet or event from src:sport to dst:dport (0 = no port)."""
        if not sport and not dport:
            return NO_PORT, NO_PORT
        if self.is_known_server(dst, dport):
            return FOLDED_PORT, str(dport)
        if self.is_known_server(src, sport):
            return str(sport), FOLDED_PORT
        return self._by_rule(sport), self._by_rule(dport)

    def server_is_remote(self, local: str, lport: int, remote: str, rport: int) -> bool:
        """For an event on a socket whose role was not seen: is the remote end the server?"""
        if self.is_known_server(remote, rport):
            return True
        if self.is_known_server(local, lport):
            return False
        return self.looks_ephemeral(lport) or (not self.looks_ephemeral(rport) and rport < lport)

    def fold_codes(self, texts: list[str], src: np.ndarray, sport: np.ndarray,
                   dst: np.ndarray, dport: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """fold() for many packets at once: src and dst index `texts`; returns port label codes
        (the port, FOLDED_CODE or NO_PORT_CODE)."""
        sport = sport.astype(np.int64)
        dport = dport.astype(np.int64)
        codes = self._server_codes(texts, len(src))
        dst_known = self._known(texts, dst, dport, codes)
        src_known = self._known(texts, src, sport, codes)
        servers = np.fromiter(self.server_ports, dtype=np.int64, count=len(self.server_ports))

        def by_rule(port: np.ndarray) -> np.ndarray:
            folded = ((port >= self.ephemeral_floor) & ~np.isin(port, servers)) | (port == 0)
            return np.where(folded, FOLDED_CODE, port)

        s_code = np.where(dst_known, FOLDED_CODE, np.where(src_known, sport, by_rule(sport)))
        d_code = np.where(dst_known, dport, np.where(src_known, FOLDED_CODE, by_rule(dport)))
        no_ports = (sport == 0) & (dport == 0)
        return np.where(no_ports, NO_PORT_CODE, s_code), np.where(no_ports, NO_PORT_CODE, d_code)

    def _server_codes(self, texts: list[str], rows: int) -> np.ndarray | None:
        """Every known server among `texts` as address index * 65536 + port, for batches of
        more rows than there are known servers (many clients); None for the others, whose rows
        are looked up one by one."""
        with self._lock:
            servers = list(self._servers)
        if rows <= len(servers):
            return None
        indexes: dict[str, list[int]] = {}
        for i, text in enumerate(texts):
            indexes.setdefault(text, []).append(i)
        return np.array([i * 65536 + server_port for text, server_port in servers
                         for i in indexes.get(text, ())], dtype=np.int64)

    def _known(self, texts: list[str], address: np.ndarray, port: np.ndarray,
               codes: np.ndarray | None) -> np.ndarray:
        """Whether each row's (address, port) is a known server; `codes` from _server_codes."""
        pairs = address.astype(np.int64) * 65536 + port
        if codes is not None:
            # against a few codes numpy compares the rows with each code instead of sorting
            return np.isin(pairs, codes)
        return np.fromiter((self.is_known_server(texts[int(p) >> 16], int(p) & 0xFFFF)
                            for p in pairs), dtype=bool, count=len(pairs))

    def _by_rule(self, port: int) -> str:
        if not port:
            return FOLDED_PORT
        return FOLDED_PORT if self.looks_ephemeral(port) else str(port)


def port_text(code: int) -> str:
    """The label of a port code from PortFolder.fold_codes."""
    if code == FOLDED_CODE:
        return FOLDED_PORT
    if code == NO_PORT_CODE:
        return NO_PORT
    return str(code)


def distinct_addresses(family: np.ndarray, *columns: np.ndarray) -> tuple[list[str], list]:
    """Text of each distinct (family, 16-byte address) in the columns, and for each column the
    index of its rows' addresses in that list. Sorts integers, not byte strings: numpy's sort of
    opaque bytes is several times slower."""
    rows = len(family)
    fam = np.tile(np.asarray(family, dtype=np.uint8), len(columns))
    raw = np.ascontiguousarray(np.concatenate(columns))
    words = raw.view(">u8")                                # two big-endian words per address
    # an IPv4 address is its 32-bit value; an IPv6 one is numbered among the IPv6 addresses and
    # placed past 2^32, so one integer sort groups both families
    codes = (words[:, 0] >> 32).astype(np.int64)
    v6 = np.flatnonzero(fam == 6)
    if len(v6):
        codes[v6] = (1 << 32) + unique_rows(words[v6, 0], words[v6, 1])[1]
    firsts, inverse = grouped(codes)
    # IPv4 text straight from the 4 bytes: the addresses of a drain are mostly new to a cache
    quads = raw[firsts, :4].tobytes()
    texts = [socket.inet_ntoa(quads[4 * i:4 * i + 4]) if family == 4
             else address_text(family, raw[row].tobytes())
             for i, (family, row) in enumerate(zip(fam[firsts].tolist(), firsts.tolist(),
                                                   strict=True))]
    return texts, [inverse[i * rows:(i + 1) * rows] for i in range(len(columns))]


def grouped(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For integer values: a row holding each distinct value (in the values' sorted order), and
    for every row the number of its distinct value. Any row of a group stands for it.

    Where a value and its row number fit in 63 bits together (addresses, packed label sets),
    the row number goes into the low bits and the pairs are sorted as plain integers: numpy's
    vectorised sort of int64 takes a third of the argsort np.unique's inverse needs (2M
    addresses of a 1M-flow drain: 136 against 352 ms)."""
    rows = len(values)
    index_bits = max(rows - 1, 1).bit_length()
    if rows and int(values.min()) >= 0 and int(values.max()).bit_length() + index_bits <= 63:
        pairs = values.astype(np.int64) << index_bits | np.arange(rows, dtype=np.int64)
        pairs.sort()
        order = pairs & ((1 << index_bits) - 1)
        ordered = pairs >> index_bits
        starts = np.empty(rows, dtype=bool)
        starts[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
        inverse = np.empty(rows, dtype=np.int64)
        inverse[order] = np.cumsum(starts) - 1
        return order[starts], inverse
    # the rows are scattered from the inverse, since np.unique's return_index takes a stable
    # sort, about three times the time of the sort return_inverse needs alone
    distinct, inverse = np.unique(values, return_inverse=True)
    inverse = inverse.reshape(-1)
    rows = np.empty(len(distinct), dtype=np.int64)
    rows[inverse] = np.arange(len(inverse))
    return rows, inverse


def ranks(values: np.ndarray, size: int) -> tuple[np.ndarray, int]:
    """For integers in [0, size): each value's rank among the distinct values, and how many
    there are. A table of `size` flags, no sort."""
    present = np.zeros(size, dtype=bool)
    present[values] = True
    rank = np.cumsum(present) - 1
    return rank[values], (int(rank[-1]) + 1) if size else 0


def unique_rows(*columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows given as integer columns: the first row of each distinct row (in sorted order)
    and, for every row, the number of its distinct row."""
    order = np.lexsort(columns[::-1])
    changes = np.zeros(len(order), dtype=bool)
    if len(order):
        changes[0] = True
        for column in columns:
            ordered = column[order]
            changes[1:] |= ordered[1:] != ordered[:-1]
    inverse = np.empty(len(order), dtype=np.int64)
    inverse[order] = np.cumsum(changes) - 1
    return order[changes], inverse


class Resolver(Protocol):
    """Kubernetes identities of addresses (k8s.metadata.KubernetesMetadata)."""

    def resolve(self, address: str) -> Identity: ...

    def version(self) -> Hashable:
        """Changes whenever a resolve() result may have changed."""
        ...


class ExternalNamer(Protocol):
    """The dns_name of an address for the client at the other end (externalnames.py)."""

    def label(self, client: str, address: str, since: float) -> str: ...

    def poll(self) -> None: ...


class EndpointLabels:
    """Label names and values of the two ends of a pair, from the configured vocabulary
    (METRICS.md, "Endpoint labels"). Each side may carry its own subset: a metric family can
    keep, say, only the destination's names. Kubernetes names come from `resolver` (an address
    to its Identity) folded by `policy` (allowlists, pod namespaces); an outside end's
    dns_name from `external`, by the pair of addresses."""

    def __init__(self, names: Sequence[str], dst_names: Sequence[str] | None = None,
                 resolver: Resolver | None = None, policy: NamePolicy | None = None,
                 external: ExternalNamer | None = None) -> None:
        self.names = {"src": _in_order(names),
                      "dst": _in_order(names if dst_names is None else dst_names)}
        wanted = set(self.names["src"]) | set(self.names["dst"])
        if resolver is None and wanted & set(KUBERNETES_LABELS):
            raise ValueError(f"labels {sorted(wanted & set(KUBERNETES_LABELS))} need "
                             "Kubernetes metadata")
        if external is None and "dns_name" in wanted:
            raise ValueError("the dns_name label needs external names (DNS answers)")
        self.resolver = resolver
        self.policy = policy or NamePolicy()
        self.external = external
        self._with_port = {side: "port" in names for side, names in self.names.items()}
        # where dns_name sits among a side's values, if it has one
        self._dns_index = {side: names.index("dns_name") if "dns_name" in names else None
                           for side, names in self.names.items()}
        # traffic drained now happened since the previous refresh (external names' expiry)
        self._since = self._refreshed = time.monotonic()
        # (side, address) -> values but the port (always last); see refresh()
        self._cache: dict[tuple[str, str], tuple[str, ...]] = {}
        self._cache_key: Hashable = None

    def set_policy(self, policy: NamePolicy) -> None:
        """New allowlists (SIGHUP): values are recomputed from the next scrape on."""
        self.policy = policy
        self._cache_key = None

    def label_names(self, side: str, with_port: bool = True) -> list[str]:
        return [f"{side}_{name}" for name in self.names[side] if with_port or name != "port"]

    def refresh(self) -> None:
        """Called once per scrape: forgets cached values if identities may have changed
        (a watch event), and at least once a minute (deleted pods expire by time)."""
        now = time.monotonic()
        self._since, self._refreshed = self._refreshed, now
        if self.external is not None:
            self.external.poll()        # answers before the traffic they name
        key = (self.resolver.version() if self.resolver else None, int(now // CACHE_SECONDS))
        if key != self._cache_key or len(self._cache) > CACHE_SIZE:
            self._cache.clear()
            self._cache_key = key

    def values(self, side: str, address: str, port: str | None) -> tuple[str, ...]:
        """Label values for an end; port None when this end carries no port label."""
        values = self._cache.get((side, address))
        if values is None:
            values = self._cache[(side, address)] = self._address_values(side, address)
        if port is not None and self._with_port[side]:
            return (*values, port)
        return values

    def pair(self, src: str, src_port: str | None, dst: str,
             dst_port: str | None) -> tuple[str, ...]:
        """Label values of both ends (src's, then dst's); a port None when that end carries
        none."""
        src_values = self.values("src", src, src_port)
        dst_values = self.values("dst", dst, dst_port)
        index = self._dns_index["src"]
        if index is not None and src_values[index] is None:
            src_values = self._with_name(src_values, index, dst, src)
        index = self._dns_index["dst"]
        if index is not None and dst_values[index] is None:
            dst_values = self._with_name(dst_values, index, src, dst)
        return src_values + dst_values

    def _with_name(self, values: tuple[str, ...], index: int, client: str,
                   address: str) -> tuple[str, ...]:
        assert self.external is not None
        name = self.external.label(client, address, self._since)
        return (*values[:index], name, *values[index + 1:])

    @property
    def wants_server_zones(self) -> bool:
        """Whether the destination's zone is a label, so that a connection to a ClusterIP
        needs the zone of the backend that answered it (zoneless_service, via_server)."""
        return self.resolver is not None and "zone" in self.names["dst"]

    def zoneless_service(self, address: str) -> bool:
        """Whether `address` is a Service's ClusterIP whose backends span zones."""
        if self.resolver is None:
            return False
        identity = self.resolver.resolve(address)
        return bool(identity.service and not identity.pod and not identity.zone
                    and identity.workload_kind != "Node")

    @staticmethod
    def via_server(service: str, server: str) -> str:
        """The end of a connection to the ClusterIP `service` that the backend `server`
        answered: labelled as `service` with `server`'s zone."""
        return f"{service}{VIA}{server}"

    def _address_values(self, side: str, address: str) -> tuple[str, ...]:
        """Values but the port; an outside end's dns_name is None, filled in by pair()."""
        names = self.names[side]
        address, _, server = address.partition(VIA)
        raw = self.resolver.resolve(address) if self.resolver else None
        if raw is not None and server:
            raw = replace(raw, zone=self.resolver.resolve(server).zone)  # type: ignore[union-attr]
        identity = self.policy.apply(raw) if raw is not None else None
        values: list = []
        for name in names:
            if name == "ip":
                values.append(address)
            elif name == "ip_type":
                values.append(ip_type(ipaddress.ip_address(address)))
            elif name == "dns_name":
                # the cluster's own ends (pods, nodes, Services) are named by the other labels
                inside = raw is not None and bool(raw.namespace or raw.workload_kind)
                values.append("" if inside else None)
            elif name != "port":
                values.append(getattr(identity, name))
        return tuple(values)


def _in_order(names: Sequence[str]) -> tuple[str, ...]:
    unknown = set(names) - set(ENDPOINT_LABELS)
    if unknown:
        raise ValueError(f"unknown endpoint labels {sorted(unknown)}")
    return tuple(name for name in ENDPOINT_LABELS if name in names)
