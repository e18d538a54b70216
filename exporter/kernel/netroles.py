"""Which of the node's interfaces face the network, read off its routing table, never off the
kind of interface: real nodes reach each other through NICs, VLANs, bonds and tunnels, and
reach their pods through veths, ipvlan or a bridge, and any of these can be either.

- An interface faces the network when the node's main routing table sends a route with a
  gateway through it (the default route included, and an overlay's `via ... onlink`), or when
  it is where the table sends another node's address or pod CIDR (known from Kubernetes).
- The node's own networks (for `cluster.cidrs` without Kubernetes) are its own addresses and
  the destinations it routes without a gateway through a monitored interface that does not
  face the network: its pods' host routes, a pod bridge's subnet."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .clustermap import Address, Network

MAIN_TABLE = 254
RTN_UNICAST = 1


@dataclass(frozen=True)
class Route:
    destination: Network
    interfaces: tuple[int, ...]     # one per next hop
    gateway: bool                   # any next hop goes through a gateway


def _has_gateway(hop: Any) -> bool:
    return bool(hop.get_attr("RTA_GATEWAY") or hop.get_attr("RTA_VIA"))


def route_from(msg: Any) -> Route | None:
    """A unicast route of the main table from its netlink message; None for any other."""
    if msg["type"] != RTN_UNICAST or (msg.get_attr("RTA_TABLE") or msg["table"]) != MAIN_TABLE:
        return None
    default = "0.0.0.0" if msg["family"] == socket.AF_INET else "::"
    destination = ipaddress.ip_network(f"{msg.get_attr('RTA_DST') or default}/{msg['dst_len']}",
                                       strict=False)
    hops = msg.get_attr("RTA_MULTIPATH")
    if hops:
        interfaces = tuple(hop["oif"] for hop in hops)
        gateway = any(_has_gateway(hop) for hop in hops)
    else:
        oif = msg.get_attr("RTA_OIF")
        interfaces = (oif,) if oif else ()
        gateway = _has_gateway(msg)
    return Route(destination, interfaces, gateway)


def read_routes(ipr: Any) -> list[Route]:
    """The main table's unicast routes, IPv4 and IPv6 (an rtnetlink.RtNetlink of this
    thread)."""
    routes = []
    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.get_routes(family):
            route = route_from(msg)
            if route is not None and route.interfaces:
                routes.append(route)
    return routes


def read_addresses(ipr: Any) -> list[Network]:
    """The node's own addresses, as single-address networks."""
    addresses = []
    for msg in ipr.get_addr():
        text = msg.get_attr("IFA_ADDRESS")
        if text:
            addresses.append(ipaddress.ip_network(text))
    return addresses


def longest_match(routes: Iterable[Route], address: Address) -> Route | None:
    best: Route | None = None
    for route in routes:
        if route.destination.version == address.version and address in route.destination and \
                (best is None or route.destination.prefixlen > best.destination.prefixlen):
            best = route
    return best


def network_interfaces(routes: list[Route], probes: Iterable[Address]) -> set[int]:
    """Interfaces that face the network: those of routes with a gateway, and those the node
    reaches the `probes` (other nodes' addresses and pod CIDRs) through."""
    facing = {index for route in routes if route.gateway for index in route.interfaces}
    for probe in probes:
        route = longest_match(routes, probe)
        if route is not None:
            facing.update(route.interfaces)
    return facing


def local_networks(routes: Iterable[Route], addresses: Iterable[Network],
                   facing: set[int], monitored: set[int]) -> list[Network]:
    """The node's own addresses, and what it routes without a gateway through monitored
    interfaces that do not face the network."""
    local = list(addresses)
    for route in routes:
        if not route.gateway and route.destination.prefixlen > 0 and \
                all(i in monitored and i not in facing for i in route.interfaces):
            local.append(route.destination)
    return local
