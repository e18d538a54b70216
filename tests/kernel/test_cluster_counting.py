"""Counted once per cluster: two nodes of a test cluster (lab/testcluster.py), one exporter
each attached to every interface of its node (pod veths, uplink, VXLAN device, as the
DaemonSet does), both reading the same Kubernetes objects. Real traffic within a node and
across nodes, natively routed and through the VXLAN overlay; the sum of both exporters'
scrapes must count every packet and exchange once.

Both simulated nodes share one kernel, so the TCP tracepoints of each exporter see every
namespace's sockets: the summed assertions stay with what the TC classifier counts (flows,
DNS, HTTP)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lab.clusterexporters import (
    ADDRESSES_PER_NODE,
    DNS_VIP,
    GRPC_VIP,
    WEB_VIP,
    ClusterExporters,
    cluster_exporters,
    ends,
)
from lab.exporter_process import Scrape
from lab.testcluster import ClusterPod, TestCluster
from lab.testnode import HTTP_DATA_SIZE, udp_send

pytestmark = pytest.mark.kernel

IPV4_UDP_HEADERS = 28
IPV4_HEADER, IPV6_HEADER, TCP_HEADER_MIN, TCP_HEADER_MAX = 20, 40, 20, 40
DATAGRAMS = [300] * 50
NGINX_PORT, DOWNLOAD_PORT, IPERF_PORT, NODE_PORT = 80, 8080, 5201, 30080
LOCATIONS = {"/ok": 200, "/created": 201, "/error": 500, "/unavailable": 503}
DNS_TIMEOUT = 1.0
GRPC_PORT = 50051
GRPC_PEER = str(Path(__file__).with_name("grpc_peer.py"))


@pytest.fixture(scope="module")
def exporters(cluster: TestCluster) -> Iterator[ClusterExporters]:
    with cluster_exporters(cluster, config={"dns": {"timeout": f"{DNS_TIMEOUT}s"}}) as started:
        yield started


def test_each_exporter_knows_whose_addresses_are_whose(exporters: ClusterExporters) -> None:
    for scrape in exporters.scrapes():
        owners = {s.labels["owner"]: s.value
                  for s in scrape.select("ebpf_net_exporter_cluster_addresses")}
        assert owners == {"local": ADDRESSES_PER_NODE, "exporter_node": ADDRESSES_PER_NODE,
                          "other_node": 0}
        assert scrape.value("ebpf_net_exporter_bpf_map_entries", map="cluster_addresses") == \
            2 * ADDRESSES_PER_NODE
        assert scrape.value("ebpf_net_exporter_network_interfaces") == 1



def summed(scrapes: list[Scrape], name: str, **labels: str) -> float:
    return sum(scrape.value(name, **labels) for scrape in scrapes)


def per_node(scrapes: list[Scrape], name: str, **labels: str) -> list[float]:
    return [scrape.value(name, **labels) for scrape in scrapes]


class Delta:
    """What the exporters counted since it was made, summed over both."""

    def __init__(self, exporters: ClusterExporters) -> None:
        self.exporters = exporters
        self.before = exporters.scrapes()
        self.after = self.before

    def value(self, name: str, **labels: str) -> float:
        return summed(self.after, name, **labels) - summed(self.before, name, **labels)

    def by_node(self, name: str, **labels: str) -> list[float]:
        return [a - b for a, b in zip(per_node(self.after, name, **labels),
                                      per_node(self.before, name, **labels), strict=True)]

    def wait(self, condition: Callable[[Delta], bool], what: str, timeout: float = 20) -> Delta:
        """Scrapes until condition(self) holds, then once more: what holds must stay so (a
        count arriving late on the other node would show there)."""
        def check(scrapes: list[Scrape]) -> bool:
            self.after = scrapes
            return condition(self)

        self.exporters.wait_for(check, what, timeout)
        self.after = self.exporters.scrapes()
        return self


@pytest.fixture(scope="module")
def servers(cluster: TestCluster) -> TestCluster:
    """nginx and a 1 MiB download on pod-2a, dnsmasq and iperf3 on pod-2b; ClusterIPs for
    both, and a NodePort on node 2 for nginx."""
    web, dns = cluster.pod("pod-2a"), cluster.pod("pod-2b")
    cluster.nginx(web.ns, web.ip, NGINX_PORT, LOCATIONS)
    cluster.http_server(web.ns, web.ip, DOWNLOAD_PORT)
    cluster.dns_server(dns.ns, dns.ip, {"ok.test": web.ip, "nx.test": ""})
    cluster.iperf3_server(dns.ns, dns.ip, IPERF_PORT)
    cluster.add_cluster_ip(cluster.service_ip(WEB_VIP), NGINX_PORT, web.ip, NGINX_PORT)
    cluster.add_cluster_ip(cluster.service_ip(DNS_VIP), 53, dns.ip, 53, proto="udp")
    cluster.add_node_port(1, NODE_PORT, web.ip, NGINX_PORT)
    return cluster


@pytest.fixture(params=["routed", "vxlan"])
def mode(request: pytest.FixtureRequest, exporters: ClusterExporters) -> Iterator[str]:
    """Pods on different nodes reach each other natively routed, then through the overlay."""
    exporters.route_via(request.param)
    try:
        yield request.param
    finally:
        exporters.route_via("routed")


def test_udp_within_and_across_nodes_is_counted_once_by_the_sender(
        cluster: TestCluster, exporters: ClusterExporters, mode: str) -> None:
    pairs = [("pod-1a", "pod-1b"), ("pod-1a", "pod-2a"), ("pod-2b", "pod-1b")]
    base = 7210 if mode == "routed" else 7220
    delta = Delta(exporters)
    for offset, (client_name, server_name) in enumerate(pairs):
        client, server = cluster.pod(client_name), cluster.pod(server_name)
        assert udp_send(client.ns, server.ns, server.ip, base + offset, DATAGRAMS) == \
            len(DATAGRAMS)

    def labels(offset: int) -> dict[str, str]:
        client, server = (cluster.pod(name) for name in pairs[offset])
        return {"protocol": "udp", "dst_port": str(base + offset), **ends(client, server)}

    delta.wait(lambda d: all(d.value("ebpf_net_flow_packets_total", **labels(i))
                             >= len(DATAGRAMS) for i in range(len(pairs))), "the datagrams")
    for offset, (client_name, _) in enumerate(pairs):
        assert delta.value("ebpf_net_flow_packets_total", **labels(offset)) == len(DATAGRAMS)
        assert delta.value("ebpf_net_flow_bytes_total", **labels(offset)) == \
            sum(DATAGRAMS) + len(DATAGRAMS) * IPV4_UDP_HEADERS
        # by the sender's node alone
        sender = 0 if client_name.startswith("pod-1") else 1
        expected = [0.0, 0.0]
        expected[sender] = len(DATAGRAMS)
        assert delta.by_node("ebpf_net_flow_packets_total", **labels(offset)) == expected
    # what the receiving nodes left to the senders: the two cross-node pairs' datagrams
    assert delta.value("ebpf_net_exporter_counted_elsewhere_total", signal="flow_packets") >= \
        2 * len(DATAGRAMS)


def test_ipv6_across_nodes_is_counted_once_by_the_sender(
        cluster: TestCluster, exporters: ClusterExporters) -> None:
    """The trie holds IPv6 networks beside IPv4 ones (IPv4 as mapped IPv6): a pod's IPv6
    datagrams to another node's pod, and back, each counted by their sender only."""
    delta = Delta(exporters)
    pairs = [(cluster.pod("pod-1a"), cluster.pod("pod-2b"), 7251),
             (cluster.pod("pod-2a"), cluster.pod("pod-1b"), 7252)]
    for client, server, port in pairs:
        assert udp_send(client.ns, server.ns, server.ip6, port, DATAGRAMS) == len(DATAGRAMS)

    def labels(client: ClusterPod, server: ClusterPod, port: int) -> dict[str, str]:
        return {"protocol": "udp", "family": "ipv6", "dst_port": str(port),
                **ends(client, server)}

    delta.wait(lambda d: all(d.value("ebpf_net_flow_packets_total", **labels(*pair))
                             >= len(DATAGRAMS) for pair in pairs), "the IPv6 datagrams")
    for (client, server, port), sender in zip(pairs, (0, 1), strict=True):
        expected = [0.0, 0.0]
        expected[sender] = len(DATAGRAMS)
        assert delta.by_node("ebpf_net_flow_packets_total",
                             **labels(client, server, port)) == expected
        assert delta.value("ebpf_net_flow_bytes_total", **labels(client, server, port)) == \
            sum(DATAGRAMS) + len(DATAGRAMS) * (IPV6_HEADER + 8)


def test_traffic_between_the_nodes_themselves_is_counted_once(
        cluster: TestCluster, exporters: ClusterExporters, mode: str) -> None:
    one, two = cluster.nodes
    port = 7230 if mode == "routed" else 7231
    delta = Delta(exporters)
    assert udp_send(one.ns, two.ns, two.internal_ip, port, DATAGRAMS,
                    source=one.internal_ip) == len(DATAGRAMS)
    labels = {"protocol": "udp", "dst_port": str(port), "src_workload": one.name,
              "src_workload_kind": "Node", "dst_workload": two.name}
    delta.wait(lambda d: d.value("ebpf_net_flow_packets_total", **labels) >= len(DATAGRAMS),
               "the node's datagrams")
    assert delta.by_node("ebpf_net_flow_packets_total", **labels) == [len(DATAGRAMS), 0]
    assert delta.value("ebpf_net_flow_bytes_total", **labels) == \
        sum(DATAGRAMS) + len(DATAGRAMS) * IPV4_UDP_HEADERS


def tcp_headers_bound(delta: Delta, payload: int, resent: float, **labels: str) -> None:
    """Bytes of one direction of a transfer: the payload plus an IP and a TCP header for each
    wire segment, never twice."""
    packets = delta.value("ebpf_net_flow_packets_total", **labels)
    headers = delta.value("ebpf_net_flow_bytes_total", **labels) - payload
    assert packets * (IPV4_HEADER + TCP_HEADER_MIN) <= headers <= \
        packets * (IPV4_HEADER + TCP_HEADER_MAX) + resent * 65536, (packets, headers)
    mss = 1500 - IPV4_HEADER - 32
    assert payload / mss <= packets < payload / mss * 1.2 + 10 + resent * (65536 / mss + 1)


def retransmits(exporters: ClusterExporters) -> float:
    """Every retransmit in the kernel (both exporters' tracepoints see every namespace)."""
    return exporters.scrapes()[0].value("ebpf_net_tcp_retransmits_total")


def test_a_download_across_nodes_is_counted_once(
        cluster: TestCluster, servers: TestCluster, exporters: ClusterExporters, mode: str) -> None:
    client, web = cluster.pod("pod-1a"), cluster.pod("pod-2a")
    resent_before = retransmits(exporters)
    delta = Delta(exporters)
    out = cluster.run(client.ns, ["curl", "-sS", "-o", "/dev/null", "-w", "%{size_download}",
                                  f"http://{web.ip}:{DOWNLOAD_PORT}/data.bin"]).stdout
    assert int(out) == HTTP_DATA_SIZE
    down = {"protocol": "tcp", "src_port": str(DOWNLOAD_PORT), **ends(web, client)}
    delta.wait(lambda d: d.value("ebpf_net_flow_bytes_total", **down) >= HTTP_DATA_SIZE,
               "the download")
    # (the HTTP response's own headers, some 200 bytes, fit in the TCP headers' bound)
    tcp_headers_bound(delta, HTTP_DATA_SIZE, retransmits(exporters) - resent_before, **down)
    assert delta.by_node("ebpf_net_flow_bytes_total", **down)[0] == 0     # node 2 sent it


def test_iperf3_across_nodes_is_counted_once(
        cluster: TestCluster, servers: TestCluster, exporters: ClusterExporters, mode: str) -> None:
    client, server = cluster.pod("pod-1b"), cluster.pod("pod-2b")
    resent_before = retransmits(exporters)
    delta = Delta(exporters)
    report = json.loads(cluster.run(client.ns, [
        "iperf3", "-c", server.ip, "-p", str(IPERF_PORT), "-n", str(2 << 20), "-J"],
        timeout=60).stdout)
    # between what the server read and what the client wrote: -n is a floor (the client may
    # write a block more), and the server may end the test and close while the client's last
    # segments are in flight or not yet sent
    received = report["end"]["sum_received"]["bytes"]
    sent = report["end"]["sum_sent"]["bytes"]
    up = {"protocol": "tcp", "dst_port": str(IPERF_PORT), **ends(client, server)}
    delta.wait(lambda d: d.value("ebpf_net_flow_bytes_total", **up) >= received, "iperf3")
    # iperf3's control connection shares the port: its bytes are few and bounded
    packets = delta.value("ebpf_net_flow_packets_total", **up)
    counted = delta.value("ebpf_net_flow_bytes_total", **up)
    resent = retransmits(exporters) - resent_before
    assert received + packets * (IPV4_HEADER + TCP_HEADER_MIN) <= counted <= \
        sent + packets * (IPV4_HEADER + TCP_HEADER_MAX) + 4096 + resent * 65536
    assert delta.by_node("ebpf_net_flow_bytes_total", **up)[1] == 0       # node 1 sent it


def dig(cluster: TestCluster, client: ClusterPod, server: str, name: str) -> str:
    argv = ["dig", "+time=1", "+tries=1", f"@{server}", name]
    out = cluster.run(client.ns, argv, check=False).stdout
    match = re.search(r"status: (\w+)", out)
    return match.group(1) if match else "none"


def test_dns_is_counted_once_by_the_clients_node(
        cluster: TestCluster, servers: TestCluster, exporters: ClusterExporters, mode: str) -> None:
    frontend, worker = cluster.pod("pod-1a"), cluster.pod("pod-1b")
    dns, web = cluster.pod("pod-2b"), cluster.pod("pod-2a")
    vip = cluster.service_ip(DNS_VIP)
    delta = Delta(exporters)
    answers = [dig(cluster, frontend, dns.ip, "ok.test") for _ in range(3)]
    answers += [dig(cluster, frontend, dns.ip, "nx.test") for _ in range(2)]
    answers += [dig(cluster, worker, vip, "ok.test") for _ in range(2)]   # through the DNAT
    answers += [dig(cluster, frontend, web.ip, "ok.test")]                 # no server there
    assert answers == ["NOERROR"] * 3 + ["NXDOMAIN"] * 2 + ["NOERROR"] * 2 + ["none"]
    direct = {"dst_port": "53", **ends(frontend, dns)}
    service = {"dst_port": "53", "dst_service": "dns", **ends(worker, dns)}
    dead = {"dst_port": "53", **ends(frontend, web)}
    delta.wait(lambda d: d.value("ebpf_net_dns_timeouts_total", **dead) >= 1,
               "the unanswered query's timeout", timeout=DNS_TIMEOUT + 20)
    responses = "ebpf_net_dns_responses_total"
    assert delta.value("ebpf_net_dns_requests_total", **direct) == 5
    assert delta.value(responses, rcode="NoError", **direct) == 3
    assert delta.value(responses, rcode="NXDomain", **direct) == 2
    assert delta.value("ebpf_net_dns_requests_total", **service) == 2
    assert delta.value(responses, rcode="NoError", **service) == 2
    assert delta.value("ebpf_net_dns_requests_total", **dead) == 1
    assert delta.value("ebpf_net_dns_timeouts_total", **dead) == 1
    assert delta.value("ebpf_net_dns_timeouts_total") == 1
    # each answered query in the latency histogram once, on the client's node
    latency = "ebpf_net_dns_request_duration_seconds_count"
    assert delta.value(latency) == 7
    assert delta.by_node(latency) == [7, 0]
    assert delta.value("ebpf_net_exporter_parse_errors_total", protocol="dns") == 0
    # node 2 saw every query (the unanswered one too) and left it to the clients' node
    assert delta.by_node("ebpf_net_exporter_counted_elsewhere_total", signal="dns_queries") \
        == [0, 8]


def curl(cluster: TestCluster, client: ClusterPod, url: str) -> int:
    out = cluster.run(client.ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                  url]).stdout
    return int(out)


def test_http_is_counted_once_by_the_clients_node(
        cluster: TestCluster, servers: TestCluster, exporters: ClusterExporters, mode: str) -> None:
    frontend, worker = cluster.pod("pod-1a"), cluster.pod("pod-1b")
    web, neighbour = cluster.pod("pod-2a"), cluster.pod("pod-2b")
    base = f"http://{web.ip}"
    delta = Delta(exporters)
    plan = [(frontend, f"{base}/ok", 200)] * 3 + [(frontend, f"{base}/error", 500)] * 2 + \
        [(frontend, f"{base}/missing", 404), (frontend, f"{base}/created", 201)] + \
        [(neighbour, f"{base}/ok", 200)] * 2 + \
        [(worker, f"http://{cluster.service_ip(WEB_VIP)}/unavailable", 503)] * 2 + \
        [(worker, f"http://{cluster.nodes[1].internal_ip}:{NODE_PORT}/ok", 200)]
    assert [curl(cluster, client, url) for client, url, _ in plan] == \
        [code for _, _, code in plan]
    requests = "ebpf_net_http_requests_total"
    delta.wait(lambda d: d.value(requests) >= len(plan), "the requests")
    direct = {"dst_port": "80", **ends(frontend, web)}
    assert {code: delta.value(requests, status_code=code, **direct)
            for code in ("200", "201", "404", "500")} == \
        {"200": 3, "201": 1, "404": 1, "500": 2}
    assert delta.value(requests, status_code="200", dst_port="80", **ends(neighbour, web)) == 2
    # through the ClusterIP: the Service's name, as the client addressed it
    assert delta.value(requests, status_code="503", dst_port="80", dst_service="web",
                       **ends(worker, web)) == 2
    # through the NodePort: the node the client addressed
    assert delta.value(requests, status_code="200", dst_port=str(NODE_PORT),
                       src_workload="worker", dst_workload=cluster.nodes[1].name) == 1
    assert delta.value(requests) == len(plan)
    latency = "ebpf_net_http_request_duration_seconds_count"
    assert delta.value(latency) == len(plan)
    # node 1's clients on node 1, node 2's (the neighbour) on node 2
    assert delta.by_node(latency) == [len(plan) - 2, 2]
    assert delta.value("ebpf_net_exporter_parse_errors_total", protocol="http") == 0


@pytest.fixture(scope="module")
def grpc_server(cluster: TestCluster) -> Iterator[ClusterPod]:
    """A gRPC server on pod-2a, also behind a ClusterIP."""
    web = cluster.pod("pod-2a")
    server = cluster.spawn(web.ns, [sys.executable, GRPC_PEER, "serve", web.ip, str(GRPC_PORT)],
                           stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    cluster.add_cluster_ip(cluster.service_ip(GRPC_VIP), GRPC_PORT, web.ip, GRPC_PORT)
    yield web
    cluster.stop(server)


def test_grpc_is_counted_once_by_the_clients_node_through_pod_ips_and_cluster_ips(
        cluster: TestCluster, grpc_server: ClusterPod, exporters: ClusterExporters,
        mode: str) -> None:
    """HTTP/2 connections from a pod on the server's node and from one on the other node, to
    the server's pod address and to a ClusterIP (whose replies come from the backend's address
    before the DNAT is undone): every call counted once, by its client's node."""
    web, vip = grpc_server, cluster.service_ip(GRPC_VIP)
    frontend, neighbour = cluster.pod("pod-1a"), cluster.pod("pod-2b")
    plan = ["unary:OK"] * 3 + ["unary:NOT_FOUND"]
    delta = Delta(exporters)
    for client in (frontend, neighbour):
        for address in (web.ip, vip):
            seen = cluster.run(client.ns, [sys.executable, GRPC_PEER, "call", address,
                                           str(GRPC_PORT), *plan], timeout=60).stdout.split()
            assert seen == ["OK"] * 3 + ["NOT_FOUND"]
    calls = "ebpf_net_grpc_requests_total"
    delta.wait(lambda d: d.value(calls) >= 16, "the gRPC calls")
    assert {status: delta.value(calls, grpc_status=status)
            for status in ("OK", "NOT_FOUND")} == {"OK": 12, "NOT_FOUND": 4}
    assert delta.value(calls) == 16
    # each client's node alone: frontend's on node 1, the neighbour's on node 2
    assert delta.by_node(calls) == [8, 8]
    # through the ClusterIP, named as the client addressed it
    assert delta.value(calls, dst_service="grpc") == 8
    assert delta.value(calls, dst_port=str(GRPC_PORT), **ends(frontend, web)) == 4
    assert delta.value("ebpf_net_http_requests_total", version="2", method="POST",
                       status_code="200") == 16
    assert delta.value("ebpf_net_exporter_parse_errors_total", protocol="http2") == 0


def test_vxlan_outer_packets_are_node_traffic_counted_by_the_sender(
        cluster: TestCluster, exporters: ClusterExporters) -> None:
    exporters.route_via("vxlan")
    try:
        client, server = cluster.pod("pod-1a"), cluster.pod("pod-2a")
        delta = Delta(exporters)
        assert udp_send(client.ns, server.ns, server.ip, 7240, DATAGRAMS) == len(DATAGRAMS)
        one, two = cluster.nodes
        outer = {"protocol": "udp", "dst_port": "4789", "src_workload": one.name,
                 "dst_workload": two.name}
        delta.wait(lambda d: d.value("ebpf_net_flow_packets_total", **outer) >= len(DATAGRAMS),
                   "the encapsulated datagrams")
        # the inner flow once, and the outer (VXLAN in UDP) once, both by node 1
        inner = {"protocol": "udp", "dst_port": "7240", **ends(client, server)}
        assert delta.by_node("ebpf_net_flow_packets_total", **inner) == [len(DATAGRAMS), 0]
        assert delta.by_node("ebpf_net_flow_packets_total", **outer) == [len(DATAGRAMS), 0]
        # VXLAN adds an outer IP, UDP, VXLAN and Ethernet header: 50 bytes per packet
        assert delta.value("ebpf_net_flow_bytes_total", **outer) == \
            delta.value("ebpf_net_flow_bytes_total", **inner) + 50 * len(DATAGRAMS)
    finally:
        exporters.route_via("routed")
