"""Packet drops from skb:kfree_skb, against real drops in a test node: an nftables drop rule and
an address the node has no route to. Reason names are read from this kernel."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from exporter.kernel import dropreasons
from exporter.kernel.environment import TRACEFS
from lab.exporter_process import ExporterProcess, Scrape
from lab.testnode import TestNode, in_netns

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def reasons(kernel_ready: None) -> set[str]:
    names = set(dropreasons.kernel_reasons(TRACEFS / "events/skb/kfree_skb/format").values())
    assert {"NETFILTER_DROP", "IP_INNOROUTES", "NOT_SPECIFIED"} <= names, sorted(names)
    return names


# The tracepoint sees the whole machine, where other tests may drop packets by the thousand
# (a flood to a closed port from many addresses): room for all of them, so this test's drops
# keep their own series instead of folding into `overflow`.
ROOMY = {"series": {"max_per_metric": 1_000_000}, "maps": {"drop_capacity": 262144}}


@pytest.fixture(scope="module")
def drops_exporter(node: TestNode) -> Iterator[ExporterProcess]:
    process = ExporterProcess(node, ["--collector.drops"], config=ROOMY)
    try:
        yield process.wait_ready()
    finally:
        assert process.stop() == 0, process.log()


def send_udp(node: TestNode, address: str, port: int, count: int) -> None:
    with in_netns(node.a_ns):
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET,
                             socket.SOCK_DGRAM)
    with sock:
        for _ in range(count):
            try:
                sock.sendto(b"dropped", (address, port))
            except OSError:
                pass    # an ICMP error from an earlier datagram surfaces on a later send


def drops(scrape: Scrape, **labels: str) -> float:
    return scrape.value("ebpf_net_drops_total", **labels)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_datagrams_to_a_port_blocked_by_nftables_are_netfilter_drops(
        node: TestNode, drops_exporter: ExporterProcess, reasons: set[str], family: str):
    port, count = 7501 if family == "ipv4" else 7502, 7
    server = node.b_ip if family == "ipv4" else node.b_ip6
    client = node.a_ip if family == "ipv4" else node.a_ip6
    node.nft(node.b_ns, f"""
        table inet ebpf_net_test_drop {{
            chain input {{ type filter hook input priority 0; udp dport {port} drop; }}
        }}""")
    try:
        send_udp(node, server, port, count)
        labels = {"src_ip": client, "dst_ip": server, "dst_port": str(port), "protocol": "udp"}
        scrape = drops_exporter.wait_for(lambda s: drops(s, **labels) >= count,
                                         f"{count} netfilter drops")
    finally:
        node.run(node.b_ns, ["nft", "delete", "table", "inet", "ebpf_net_test_drop"])
    assert drops(scrape, reason="NETFILTER_DROP", **labels) == count
    assert drops(scrape, **labels) == count          # under no other reason
    sample = scrape.select("ebpf_net_drops_total", reason="NETFILTER_DROP", **labels)[0]
    assert sample.labels["src_port"] == "*"          # the client's ephemeral port, folded


def test_datagrams_to_an_unrouted_address_are_no_route_drops(
        node: TestNode, drops_exporter: ExporterProcess, reasons: set[str]):
    unrouted, port, count = f"10.{node.n}.99.9", 7503, 5     # the node routes 10.N.1/24, 2/24
    send_udp(node, unrouted, port, count)
    labels = {"src_ip": node.a_ip, "dst_ip": unrouted, "dst_port": str(port)}
    scrape = drops_exporter.wait_for(lambda s: drops(s, **labels) >= count,
                                     f"{count} no-route drops")
    assert drops(scrape, reason="IP_INNOROUTES", protocol="udp", **labels) == count
    assert drops(scrape, **labels) == count
