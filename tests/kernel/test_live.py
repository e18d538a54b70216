"""The live view (`ebpf-net-exporter flows`) against real traffic in a test node, with an
exporter running beside it on the same interfaces whose counts must stay exact."""

from __future__ import annotations

import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.certs import make_certs
from lab.exporter_process import ExporterProcess
from lab.httptools import SlowServer
from lab.live_process import LiveProcess
from lab.testnode import TestNode, tcp_transfer, udp_send

pytestmark = pytest.mark.kernel

IPV4_HEADER, UDP_HEADER = 20, 8


@pytest.fixture(scope="module")
def pair(node: TestNode) -> Iterator[tuple[ExporterProcess, LiveProcess]]:
    exporter = ExporterProcess(node)
    live = None
    try:
        exporter.wait_ready()
        live = LiveProcess(node, ["--idle", "1s"]).wait_ready()
        yield exporter, live
    finally:
        if live is not None:
            assert live.stop() == 0, live.log()
        assert exporter.stop() == 0, exporter.log()


def ends(line: dict, src: str, dst: str, dst_port: int) -> bool:
    return (line["src"]["ip"], line["dst"]["ip"], line["dst"]["port"]) == (src, dst, dst_port)


def test_flows_dns_and_http_lines_match_what_was_sent_and_the_exporter_counts_exactly(
        node: TestNode, pair: tuple[ExporterProcess, LiveProcess]):
    exporter, live = pair
    a, b = node.a_ip, node.b_ip
    tcp_port, udp_port, http_port, payload = 7601, 7602, 7680, 200_000
    sizes = [100, 500, 1000]

    tcp_transfer(node.a_ns, node.b_ns, b, tcp_port, payload)
    assert udp_send(node.a_ns, node.b_ns, b, udp_port, sizes) == len(sizes)
    node.dns_server(node.b_ns, b, {"live.test": "10.9.9.9"})
    answer = node.run(node.a_ns, ["dig", "+short", "+tries=1", "+time=2", f"@{b}",
                                  "live.test", "A"]).stdout.strip()
    assert answer == "10.9.9.9"
    node.http_server(node.b_ns, b, http_port)
    status = node.run(node.a_ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                  f"http://{b}:{http_port}/index.html"]).stdout
    assert status == "200"

    # TCP: one line when both sockets closed, with the bytes each way and the RTT
    (tcp,) = live.wait_for(lambda x: x["type"] == "flow" and ends(x, a, b, tcp_port),
                           "the TCP flow's line")
    assert tcp["protocol"] == "tcp" and tcp["state"] == "closed"
    assert payload < tcp["src_bytes"] < payload * 1.2     # payload plus headers (and resends)
    assert tcp["dst_packets"] > 0 and tcp["src"]["port"] > 0
    assert 0 < tcp["rtt_seconds"] < 0.1

    # UDP: one line once idle, exact bytes and packets one way
    (udp,) = live.wait_for(lambda x: x["type"] == "flow" and ends(x, a, b, udp_port),
                           "the UDP flow's line")
    expected_bytes = sum(sizes) + len(sizes) * (IPV4_HEADER + UDP_HEADER)
    assert (udp["protocol"], udp["state"]) == ("udp", "idle")
    assert (udp["src_packets"], udp["src_bytes"]) == (len(sizes), expected_bytes)
    assert (udp["dst_packets"], udp["dst_bytes"]) == (0, 0)

    (dns,) = live.wait_for(lambda x: x["type"] == "dns" and x["query"] == "live.test",
                           "the DNS exchange")
    assert ends(dns, a, b, 53)
    assert (dns["qtype"], dns["rcode"], dns["transport"]) == ("A", "NoError", "udp")
    assert 0 < dns["latency_seconds"] < 1

    (http,) = live.wait_for(lambda x: x["type"] == "http" and x["path"] == "/index.html",
                            "the HTTP exchange")
    assert ends(http, a, b, http_port)
    assert (http["method"], http["status"]) == ("GET", 200)
    assert 0 < http["latency_seconds"] < 1

    # the exporter beside it: exact counts, as without the live view
    udp_labels = {"src_ip": a, "dst_ip": b, "dst_port": str(udp_port), "protocol": "udp"}
    scrape = exporter.wait_for(
        lambda s: s.value("ebpf_net_http_requests_total", dst_port=str(http_port)) >= 1,
        "the exporter to count the HTTP request")
    assert scrape.value("ebpf_net_flow_packets_total", **udp_labels) == len(sizes)
    assert scrape.value("ebpf_net_flow_bytes_total", **udp_labels) == expected_bytes
    assert scrape.value("ebpf_net_dns_requests_total", src_ip=a, dst_ip=b) == 1
    assert scrape.value("ebpf_net_dns_responses_total", src_ip=a, dst_ip=b,
                        rcode="NoError") == 1
    assert scrape.value("ebpf_net_http_requests_total", dst_port=str(http_port),
                        status_code="200") == 1
    assert scrape.value("ebpf_net_tcp_connections_opened_total", role="client", src_ip=a,
                        dst_ip=b, dst_port=str(tcp_port)) == 1
    assert tcp["src_bytes"] == scrape.value("ebpf_net_flow_bytes_total", src_ip=a, dst_ip=b,
                                            dst_port=str(tcp_port), protocol="tcp")


def test_https_exchanges_show_like_http_ones(node: TestNode,
                                            pair: tuple[ExporterProcess, LiveProcess],
                                            tmp_path: Path):
    """Read from OpenSSL in curl (the client counts it), beside the exporter, which counts it
    once too."""
    exporter, live = pair
    certs = make_certs(tmp_path / "certs")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    port = 7643
    server = SlowServer(node.b_ns, node.b_ip, port, 0.0, tls=context)
    try:
        status = node.run(node.a_ns, ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                                      f"https://{node.b_ip}:{port}/secure/page"]).stdout
        assert status == "200"
        (line,) = live.wait_for(lambda x: x["type"] == "https" and x["path"] == "/secure/page",
                                "the HTTPS exchange")
        scrape = exporter.wait_for(
            lambda s: s.value("ebpf_net_http_requests_total", dst_port=str(port)) >= 1,
            "the exporter to count the HTTPS request")
    finally:
        server.close()
    assert ends(line, node.a_ip, node.b_ip, port)
    assert (line["method"], line["status"]) == ("GET", 200)
    assert 0 < line["latency_seconds"] < 1
    assert scrape.value("ebpf_net_http_requests_total", dst_port=str(port), scheme="https",
                        status_code="200") == 1


def test_http2_requests_and_grpc_calls_show_with_their_status(
        node: TestNode, pair: tuple[ExporterProcess, LiveProcess]):
    """A gRPC call over h2c is one http2 line (POST, 200) and one grpc line (its method and
    grpc_status); the exporter beside the view counts it once."""
    exporter, live = pair
    peer = str(Path(__file__).with_name("grpc_peer.py"))
    port = 7651
    server = node.spawn(node.b_ns, [sys.executable, peer, "serve", node.b_ip, str(port)],
                        stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        seen = node.run(node.a_ns, [sys.executable, peer, "call", node.b_ip, str(port),
                                    "unary:NOT_FOUND"], timeout=60).stdout.split()
        assert seen == ["NOT_FOUND"]
        (call,) = live.wait_for(lambda x: x["type"] == "grpc", "the gRPC call")
        (request,) = live.wait_for(lambda x: x["type"] == "http2", "the HTTP/2 request")
        scrape = exporter.wait_for(
            lambda s: s.value("ebpf_net_grpc_requests_total", dst_port=str(port)) >= 1,
            "the exporter to count the call")
    finally:
        node.stop(server)
    assert ends(call, node.a_ip, node.b_ip, port) and ends(request, node.a_ip, node.b_ip, port)
    assert (call["method"], call["grpc_status"]) == ("/test.Echo/Unary", "NOT_FOUND")
    assert (request["method"], request["path"], request["status"], request["version"],
            request["scheme"], call["scheme"]) == \
        ("POST", "/test.Echo/Unary", 200, "2", "http", "http")
    assert 0 < request["latency_seconds"] <= call["latency_seconds"] < 1
    assert scrape.value("ebpf_net_grpc_requests_total", dst_port=str(port),
                        grpc_status="NOT_FOUND") == 1


def test_filters_keep_only_the_chosen_lines(node: TestNode,
                                            pair: tuple[ExporterProcess, LiveProcess]):
    live = LiveProcess(node, ["--udp", "--port", "7612", "--idle", "1s"]).wait_ready()
    try:
        assert udp_send(node.a_ns, node.b_ns, node.b_ip, 7611, [10]) == 1
        assert udp_send(node.a_ns, node.b_ns, node.b_ip, 7612, [10, 10]) == 2
        tcp_transfer(node.a_ns, node.b_ns, node.b_ip, 7612, 1000)
        (line,) = live.wait_for(lambda x: True, "the filtered UDP line")
        assert (line["protocol"], line["dst"]["port"], line["src_packets"]) == ("udp", 7612, 2)
        # the other port's datagram and the TCP flow were seen by the other view only
        pair[1].wait_for(lambda x: x["type"] == "flow" and x["dst"]["port"] == 7611,
                         "the unfiltered view's line for port 7611")
        pair[1].wait_for(lambda x: x["type"] == "flow" and x["protocol"] == "tcp" and
                         x["dst"]["port"] == 7612, "the unfiltered view's TCP line")
        assert len(live.lines) == 1
    finally:
        assert live.stop() == 0, live.log()


def test_kubernetes_names_and_the_namespace_filter(node: TestNode):
    from lab import kubeapi
    from lab.exporter_process import wait_until
    from lab.kubeapi import KubeAPI

    with KubeAPI(netns=node.node_ns) as api:
        api.create("replicasets", kubeapi.replicaset("shop", "web-5d9c", "web"))
        api.create("pods", kubeapi.pod("shop", "web-5d9c-k2j4", [node.a_ip],
                                       owner=("ReplicaSet", "web-5d9c")))
        api.create("pods", kubeapi.pod("data", "db-0", [node.b_ip], owner=("StatefulSet", "db")))
        live = LiveProcess(node, ["--udp", "--namespace", "shop", "--idle", "0.5s",
                                  "--kubeconfig", str(api.kubeconfig)]).wait_ready()
        try:
            # a flow with no end in namespace shop: pod b (namespace data) to the node
            assert udp_send(node.b_ns, node.node_ns, node.node_ip_b, 7661, [10]) == 1
            port = iter(range(7630, 7660))

            def named() -> list[dict]:
                # a datagram at a time until the view has listed the pods
                assert udp_send(node.a_ns, node.b_ns, node.b_ip, next(port), [10]) == 1
                return live.matching(lambda x: x["src"].get("namespace") == "shop")

            (line, *_) = wait_until(named, 20, "a line with Kubernetes names", interval=1.0)
            assert line["src"] == {"ip": node.a_ip, "port": line["src"]["port"],
                                   "namespace": "shop", "workload": "web",
                                   "workload_kind": "Deployment", "pod": "web-5d9c-k2j4"}
            assert (line["dst"]["namespace"], line["dst"]["workload"]) == ("data", "db")
            # printed before the first shop line would have been, had it passed the filter
            assert not live.matching(lambda x: x["dst"]["port"] == 7661)
            assert all("shop" in (x["src"].get("namespace"), x["dst"].get("namespace"))
                       for x in live.matching(lambda x: True))
        finally:
            assert live.stop() == 0, live.log()


@pytest.mark.parametrize("killed_attach,successor_attach", [("clsact", "auto"),
                                                            ("tcx", "clsact")])
def test_a_killed_view_leaves_nothing_the_next_view_keeps_and_the_exporters_stay(
        node: TestNode, pair: tuple[ExporterProcess, LiveProcess], killed_attach: str,
        successor_attach: str):
    """A view killed on clsact leaves its filters, which the next view removes (on tcx links
    here); one killed on tcx leaves nothing (the kernel closes its links). Neither touches
    the exporter's tcx links nor the first view's."""
    import signal

    from lab.exporter_process import (
        attachments_on,
        filter_listings,
        link_exists,
        tcx_links,
        wait_until,
    )

    def filters_of(pid: int) -> int:
        """On how many of the four hooks the view's clsact filter is."""
        return sum(f"ebpf_net_live_{pid}" in out.split()
                   for out in filter_listings(node, devices).values())

    def link_ids(pid: int) -> list[int]:
        return [link_id for _, _, link_id in tcx_links(pid)]

    devices = (node.veth_a, node.veth_b)
    first_view = pair[1].proc.pid      # `ip netns exec` execs the view: same pid
    first_links = link_ids(first_view)
    assert len(first_links) == 4        # auto: tcx links on 6.18
    killed = LiveProcess(node, attach=killed_attach).wait_ready()
    killed_links = link_ids(killed.proc.pid)
    assert filters_of(killed.proc.pid) == (4 if killed_attach == "clsact" else 0)
    assert len(killed_links) == (4 if killed_attach == "tcx" else 0)
    killed.proc.send_signal(signal.SIGKILL)
    assert killed.stop() == -signal.SIGKILL
    assert filters_of(killed.proc.pid) == (4 if killed_attach == "clsact" else 0)  # left
    assert not any(link_exists(link_id) for link_id in killed_links)  # went with it

    successor = LiveProcess(node, attach=successor_attach).wait_ready()
    try:
        assert filters_of(killed.proc.pid) == 0
        assert filters_of(successor.proc.pid) == (4 if successor_attach == "clsact" else 0)
        assert len(link_ids(successor.proc.pid)) == (0 if successor_attach == "clsact" else 4)
        assert link_ids(first_view) == first_links
    finally:
        assert successor.stop() == 0, successor.log()
    wait_until(lambda: filters_of(successor.proc.pid) == 0, 5, "the successor's filters gone")
    # the exporter's own links were never replaced nor removed
    assert set(attachments_on(node, devices).values()) == {1}
