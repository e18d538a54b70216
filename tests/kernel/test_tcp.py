"""TCP metrics from tracepoints, against real sockets in a test node."""

from __future__ import annotations

import socket
import threading

import pytest

from lab.exporter_process import ExporterProcess, Scrape
from lab.testnode import TestNode, connect_refused, in_netns, tcp_connections, tcp_transfer

pytestmark = pytest.mark.kernel


def pair(node: TestNode, port: int) -> dict[str, str]:
    return {"src_ip": node.a_ip, "dst_ip": node.b_ip, "dst_port": str(port)}


def test_k_connections_open_and_close_exactly_k_times_on_each_side(node: TestNode,
                                                                 exporter: ExporterProcess):
    k, port = 25, 7101
    tcp_connections(node.a_ns, node.b_ns, node.b_ip, port, k)
    labels = pair(node, port)

    def all_closed(s: Scrape) -> bool:
        return all(s.value("ebpf_net_tcp_connections_closed_total", role=r, **labels) >= k
                   for r in ("client", "server"))

    scrape = exporter.wait_for(all_closed, f"{k} closes on both sides")
    for role in ("client", "server"):
        assert scrape.value("ebpf_net_tcp_connections_opened_total", role=role, **labels) == k
        assert scrape.value("ebpf_net_tcp_connections_closed_total", role=role, **labels) == k
        assert scrape.value("ebpf_net_tcp_active_connections", role=role, **labels) == 0
    # the client's ephemeral port is folded away: no src_port label at all
    assert "src_port" not in scrape.select("ebpf_net_tcp_connections_opened_total",
                                           **labels)[0].labels


def test_open_connections_show_as_active(node: TestNode, exporter: ExporterProcess):
    port = 7102
    with in_netns(node.b_ns):
        server = socket.create_server((node.b_ip, port))
    clients = []
    try:
        with in_netns(node.a_ns):
            clients = [socket.create_connection((node.b_ip, port), timeout=5) for _ in range(3)]
        accepted = [server.accept()[0] for _ in clients]
        labels = pair(node, port)
        scrape = exporter.wait_for(
            lambda s: s.value("ebpf_net_tcp_active_connections", role="server", **labels) == 3,
            "3 active server connections")
        assert scrape.value("ebpf_net_tcp_active_connections", role="client", **labels) == 3
        for sock in clients + accepted:
            sock.close()
        exporter.wait_for(
            lambda s: s.value("ebpf_net_tcp_active_connections", **labels) == 0,
            "active connections back to 0")
    finally:
        server.close()
        for sock in clients:
            sock.close()


def test_connections_to_a_closed_port_are_refused_failures_with_resets(
        node: TestNode, exporter: ExporterProcess):
    port, count = 7199, 5
    connect_refused(node.a_ns, node.b_ip, port, count)
    labels = pair(node, port)
    scrape = exporter.wait_for(
        lambda s: s.value("ebpf_net_tcp_connect_failures_total", reason="refused",
                          **labels) >= count, "refused connects")
    assert scrape.value("ebpf_net_tcp_connect_failures_total", reason="refused",
                        **labels) == count
    assert scrape.value("ebpf_net_tcp_connect_failures_total", reason="timeout", **labels) == 0
    assert scrape.value("ebpf_net_tcp_resets_total", direction="received", **labels) == count
    assert scrape.value("ebpf_net_tcp_resets_total", direction="sent", **labels) == count
    assert scrape.value("ebpf_net_tcp_connections_opened_total", **labels) == 0


def test_unanswered_syns_are_timeout_failures(node: TestNode, exporter: ExporterProcess):
    port, count = 7198, 3
    node.nft(node.b_ns, f"""
        table inet ebpf_net_test_timeout {{
            chain input {{ type filter hook input priority 0;
                           tcp dport {port} drop; }}
        }}""")
    try:
        def attempt() -> None:
            with in_netns(node.a_ns):
                sock = socket.socket()
            sock.settimeout(1.5)        # the first SYN retransmission goes out at 1 s
            with pytest.raises(TimeoutError):
                sock.connect((node.b_ip, port))
            sock.close()

        threads = [threading.Thread(target=attempt) for _ in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        labels = pair(node, port)
        scrape = exporter.wait_for(
            lambda s: s.value("ebpf_net_tcp_connect_failures_total", **labels) >= count,
            "timed-out connects")
        assert scrape.value("ebpf_net_tcp_connect_failures_total", reason="timeout",
                            **labels) == count
        assert scrape.value("ebpf_net_tcp_retransmits_total", **labels) >= count
    finally:
        node.run(node.b_ns, ["nft", "delete", "table", "inet", "ebpf_net_test_timeout"])


def lossy_transfer(node: TestNode, port: int, nbytes: int) -> None:
    """A TCP transfer from pod a to pod b whose client retransmits: pod b drops every tenth
    packet to `port` from the sixth (not the SYN), not a random tenth: the transfer crosses the
    veths as some 30 GSO aggregates, and a random 10% spared all of them about one run in 25
    (then no retransmit to count)."""
    node.nft(node.b_ns, f"""
        table inet ebpf_net_test_loss {{
            chain input {{ type filter hook input priority 0;
                           tcp dport {port} numgen inc mod 10 == 5 drop; }}
        }}""")
    try:
        tcp_transfer(node.a_ns, node.b_ns, node.b_ip, port, nbytes)
    finally:
        node.run(node.b_ns, ["nft", "delete", "table", "inet", "ebpf_net_test_loss"])


def test_retransmits_are_zero_on_a_clean_path_and_counted_under_loss(
        node: TestNode, exporter: ExporterProcess):
    clean, lossy = 7301, 7302
    tcp_transfer(node.a_ns, node.b_ns, node.b_ip, clean, 2_000_000)
    lossy_transfer(node, lossy, 2_000_000)
    scrape = exporter.wait_for(
        lambda s: s.value("ebpf_net_tcp_connections_closed_total", role="client",
                          **pair(node, lossy)) >= 1, "the lossy transfer to finish")
    assert scrape.value("ebpf_net_tcp_retransmits_total", **pair(node, clean)) == 0
    assert scrape.value("ebpf_net_tcp_retransmits_total", **pair(node, lossy)) > 0


def test_rtt_histogram_has_observations_with_a_plausible_mean(node: TestNode,
                                                              exporter: ExporterProcess):
    port = 7401
    tcp_connections(node.a_ns, node.b_ns, node.b_ip, port, 10)
    labels = pair(node, port)
    # each short connection gives one sample per socket, at close: two per connection, as both
    # sockets are on this node
    scrape = exporter.wait_for(
        lambda s: s.value("ebpf_net_tcp_rtt_seconds_count", **labels) >= 20, "RTT samples")
    count = scrape.value("ebpf_net_tcp_rtt_seconds_count", **labels)
    assert count == 20
    mean = scrape.value("ebpf_net_tcp_rtt_seconds_sum", **labels) / count
    assert 2e-6 < mean < 5e-3          # a veth hop through a namespace router: microseconds
    inf = scrape.value("ebpf_net_tcp_rtt_seconds_bucket", le="+Inf", **labels)
    assert inf == count
    buckets = sorted((float(s.labels["le"]), s.value)
                     for s in scrape.select("ebpf_net_tcp_rtt_seconds_bucket", **labels))
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)   # cumulative


def test_rtt_follows_real_queueing_delay(node: TestNode, exporter: ExporterProcess):
    """A 2 Mbit/s token bucket on pod b's link queues b's bulk data: its RTT rises from
    microseconds to tens of milliseconds, and the samples taken during the transfer show it."""
    port = 7402
    node.run(node.b_ns, ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "2mbit",
                         "burst", "8kb", "latency", "500ms"])
    try:
        # b sends 800 KB at 250 KB/s: ~3 s, so its socket is sampled again while queued
        tcp_transfer(node.b_ns, node.a_ns, node.a_ip, port, 800_000)
    finally:
        node.run(node.b_ns, ["tc", "qdisc", "del", "dev", "eth0", "root"])
    labels = {"src_ip": node.b_ip, "dst_ip": node.a_ip, "dst_port": str(port)}
    scrape = exporter.wait_for(
        lambda s: s.value("ebpf_net_tcp_rtt_seconds_count", **labels) >= 3, "RTT samples")
    slow = scrape.value("ebpf_net_tcp_rtt_seconds_count", **labels) - \
        scrape.value("ebpf_net_tcp_rtt_seconds_bucket", le="0.008192", **labels)
    assert slow >= 1                    # at least one sample above 8 ms
    mean = scrape.value("ebpf_net_tcp_rtt_seconds_sum", **labels) / \
        scrape.value("ebpf_net_tcp_rtt_seconds_count", **labels)
    assert 2e-3 < mean < 1.0


def test_ipv6_connections_are_counted_with_their_addresses_and_rtt(node: TestNode,
                                                                   exporter: ExporterProcess):
    """The endpoints of an IPv6 socket are read from its own fields (SK_*_ADDR6)."""
    k, port = 4, 7103
    tcp_connections(node.a_ns, node.b_ns, node.b_ip6, port, k)
    labels = {"src_ip": node.a_ip6, "dst_ip": node.b_ip6, "dst_port": str(port)}
    scrape = exporter.wait_for(
        lambda s: s.value("ebpf_net_tcp_connections_closed_total", **labels) >= 2 * k
        and s.value("ebpf_net_tcp_rtt_seconds_count", **labels) >= 2 * k,
        f"{k} IPv6 connections closed on both sides")
    for role in ("client", "server"):
        assert scrape.value("ebpf_net_tcp_connections_opened_total", role=role, **labels) == k
        assert scrape.value("ebpf_net_tcp_connections_closed_total", role=role, **labels) == k
    assert scrape.value("ebpf_net_tcp_rtt_seconds_count", **labels) == 2 * k
