"""Endpoint labels for metrics with two ends: the address, its type and the port, with
ephemeral ports folded to ``*``.

The server side of a pair is taken from what the exporter saw of the handshake (a SYN's
destination, a passive TCP open) where it saw it, else from the port rule: a port at or above
the ephemeral floor that is not a configured server port is a client's, shown as ``*``."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from cachetools import LRUCache, TTLCache

FOLDED_PORT = "*"
NO_PORT = ""
OVERFLOW = "overflow"

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

    def learn_server(self, address: str, port: int) -> None:
        if port:
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

    def _by_rule(self, port: int) -> str:
        if not port:
            return FOLDED_PORT
        return FOLDED_PORT if self.looks_ephemeral(port) else str(port)


class EndpointLabels:
    """Label names and values of one end of a pair, from the configured vocabulary."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self._with_ip = "ip" in self.names
        self._with_type = "ip_type" in self.names
        self.with_port = "port" in self.names
        self._types: LRUCache[str, str] = LRUCache(maxsize=262144)

    def label_names(self, side: str, with_port: bool = True) -> list[str]:
        names = []
        if self._with_ip:
            names.append(f"{side}_ip")
        if self._with_type:
            names.append(f"{side}_ip_type")
        if self.with_port and with_port:
            names.append(f"{side}_port")
        return names

    def values(self, address: str, port: str | None) -> tuple[str, ...]:
        """Label values for an end; port None when this end carries no port label."""
        values: list[str] = []
        if self._with_ip:
            values.append(address)
        if self._with_type:
            kind = self._types.get(address)
            if kind is None:
                kind = self._types[address] = ip_type(ipaddress.ip_address(address))
            values.append(kind)
        if self.with_port and port is not None:
            values.append(port)
        return tuple(values)
