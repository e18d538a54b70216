"""exporter/kernel/rtnetlink.py against pyroute2, in a test node's namespace given a bridge
with a veth port, another veth pair, a clsact qdisc, addresses of both families, and routes
with a gateway, with several next hops, with an IPv6 gateway and in another table: the links,
routes, addresses and qdiscs the exporter reads come out the same as pyroute2 reads them."""

from __future__ import annotations

import socket

import pytest
from pyroute2 import IPRoute

from exporter.kernel import netroles
from exporter.kernel.interfaces import Link
from exporter.kernel.rtnetlink import RtNetlink
from lab.testnode import TestNode, in_netns

pytestmark = pytest.mark.kernel


@pytest.fixture
def furnished(node: TestNode) -> TestNode:
    ns = node.node_ns
    for command in (
        # (these VMs have bridges and veths, no dummy or VLAN devices)
        "link add br-t type bridge", "link add dum-t type veth peer name dum-p",
        "link add port-t type veth peer name peer-t", "link set port-t master br-t",
        "link set br-t up", "link set dum-t up", "link set dum-p up", "link set port-t up",
        "address add 10.98.0.1/24 dev dum-t", "-6 address add 2001:db8:98::1/64 dev dum-t",
        "route add 198.51.100.0/24 via 10.98.0.2",
        "route add 203.0.113.0/24 nexthop via 10.98.0.2 nexthop via 10.98.0.3",
        "-6 route add 2001:db8:99::/64 via 2001:db8:98::2",
        "route add 192.0.2.0/24 via 10.98.0.4 table 100",
    ):
        node.run(ns, ["ip", *command.split()])
    node.run(ns, ["tc", "qdisc", "add", "dev", "dum-t", "clsact"])
    return node


def test_links_routes_addresses_and_qdiscs_read_as_pyroute2_reads_them(furnished: TestNode):
    with in_netns(furnished.node_ns):
        ours, theirs = RtNetlink(), IPRoute()
    with ours, theirs:
        links = [Link.from_message(m) for m in ours.get_links()]
        assert links == [Link.from_message(m) for m in theirs.get_links()]
        by_name = {link.name: link for link in links}
        port = by_name["port-t"]
        assert port.kind == "veth" and port.master == by_name["br-t"].index
        assert port.lower == by_name["peer-t"].index and by_name["br-t"].kind == "bridge"

        routes = netroles.read_routes(ours)
        assert routes == [r for family in (socket.AF_INET, socket.AF_INET6)
                          for r in map(netroles.route_from,
                                       theirs.get_routes(family=family, table=254))
                          if r is not None and r.interfaces]
        dummy = by_name["dum-t"].index
        multipath = next(r for r in routes if str(r.destination) == "203.0.113.0/24")
        assert multipath.interfaces == (dummy, dummy) and multipath.gateway
        assert any(str(r.destination) == "2001:db8:99::/64" and r.gateway for r in routes)
        assert not any(str(r.destination) == "192.0.2.0/24" for r in routes)   # table 100

        assert netroles.read_addresses(ours) == netroles.read_addresses(theirs)
        kinds: dict[int, set[str]] = {}
        for qdisc in theirs.get_qdiscs():
            kinds.setdefault(qdisc["index"], set()).add(qdisc.get_attr("TCA_KIND"))
        assert ours.qdisc_kinds() == kinds
        assert "clsact" in ours.qdisc_kinds()[dummy]
