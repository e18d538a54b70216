"""Flow accounting against the real kernel: exact byte and packet counts from real sockets
through a test node (pod a -> veth a -> node routing -> veth b -> pod b), both veths monitored."""

from __future__ import annotations

import os
import socket

import pytest

from lab.exporter_process import ExporterProcess, Scrape
from lab.testnode import TestNode, in_netns, tcp_transfer, udp_send

pytestmark = pytest.mark.kernel

IPV4_HEADER, IPV6_HEADER, UDP_HEADER = 20, 40, 8
# TCP header with the timestamp option Linux sends on every segment; the SYN carries more
TCP_HEADER_MIN, TCP_HEADER_MAX = 20, 40


def flow(scrape: Scrape, metric: str, src: str, dst: str, dst_port: str, protocol: str,
         **labels: str) -> float:
    return scrape.value(f"ebpf_net_flow_{metric}_total", src_ip=src, dst_ip=dst,
                        dst_port=dst_port, protocol=protocol, **labels)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_udp_datagrams_are_counted_exactly_once(node: TestNode, exporter: ExporterProcess,
                                                family: str):
    src, dst = (node.a_ip, node.b_ip) if family == "ipv4" else (node.a_ip6, node.b_ip6)
    ip_header = IPV4_HEADER if family == "ipv4" else IPV6_HEADER
    port = 7001 if family == "ipv4" else 7002
    sizes = [1, 100, 1000, 1400] * 25
    assert udp_send(node.a_ns, node.b_ns, dst, port, sizes) == len(sizes)
    expected_bytes = sum(sizes) + len(sizes) * (UDP_HEADER + ip_header)

    scrape = exporter.wait_for(
        lambda s: flow(s, "packets", src, dst, str(port), "udp") >= len(sizes),
        f"{len(sizes)} {family} datagrams")
    # once, not once per monitored veth (the packet crosses two)
    assert flow(scrape, "packets", src, dst, str(port), "udp") == len(sizes)
    assert flow(scrape, "bytes", src, dst, str(port), "udp") == expected_bytes
    assert flow(scrape, "packets", src, dst, str(port), "udp", family=family,
                src_port="*", src_ip_type="private", dst_ip_type="private") == len(sizes)


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_tcp_transfer_counts_payload_plus_headers_and_every_wire_segment(
        node: TestNode, exporter: ExporterProcess, family: str):
    src, dst = (node.a_ip, node.b_ip) if family == "ipv4" else (node.a_ip6, node.b_ip6)
    ip_header = IPV4_HEADER if family == "ipv4" else IPV6_HEADER
    port = 7011 if family == "ipv4" else 7012
    payload = 3_000_000
    tcp_transfer(node.a_ns, node.b_ns, dst, port, payload)

    def settled(s: Scrape) -> bool:
        sent = flow(s, "bytes", src, dst, str(port), "tcp")
        return sent >= payload and flow(s, "packets", dst, src, "*", "tcp", src_port=str(port))

    scrape = exporter.wait_for(settled, f"the {family} transfer to be counted")
    packets = flow(scrape, "packets", src, dst, str(port), "tcp")
    byte_count = flow(scrape, "bytes", src, dst, str(port), "tcp")
    # a retransmitted aggregate (up to 64 KB) is on the wire again, so it counts again; the
    # exporter's own retransmit count for the pair bounds it (0 on a quiet machine)
    resent = scrape.value("ebpf_net_tcp_retransmits_total", src_ip=src, dst_ip=dst,
                          dst_port=str(port))
    mss = 1500 - ip_header - 32
    headers = byte_count - payload
    # every segment carries an IP and a TCP header: tight bounds, and far below a double count
    assert packets * (ip_header + TCP_HEADER_MIN) <= headers <= \
        packets * (ip_header + TCP_HEADER_MAX) + resent * 65536
    # the veth carries 64 KB GSO aggregates; each must count as the wire segments it stands for
    assert packets >= payload / mss
    assert packets < payload / mss * 1.2 + 10 + resent * (65536 / mss + 1)


def test_a_server_on_a_port_that_looks_ephemeral_is_known_by_its_handshake(
        node: TestNode, exporter: ExporterProcess):
    # 45123 is past the ephemeral floor, so only the kernel's handshake bits (the SYN's sender
    # is the client) keep it from folding to "*"; they share a word with the packet count
    port, payload = 45123, 200_000
    tcp_transfer(node.a_ns, node.b_ns, node.b_ip, port, payload)

    def settled(s: Scrape) -> bool:
        return (flow(s, "bytes", node.a_ip, node.b_ip, str(port), "tcp", src_port="*") >= payload
                and flow(s, "packets", node.b_ip, node.a_ip, "*", "tcp", src_port=str(port)) > 0)

    scrape = exporter.wait_for(settled, "the transfer to a high server port")
    to_server = flow(scrape, "packets", node.a_ip, node.b_ip, str(port), "tcp", src_port="*")
    to_client = flow(scrape, "packets", node.b_ip, node.a_ip, "*", "tcp", src_port=str(port))
    mss = 1500 - IPV4_HEADER - 32
    # wire segments, and nothing of the handshake bits (2^62) in the counts
    assert payload / mss <= to_server < payload / mss * 1.2 + 10
    assert 1 <= to_client <= to_server + 10
    assert not scrape.select("ebpf_net_flow_packets_total", src_ip=node.a_ip, dst_ip=node.b_ip,
                             dst_port="*", protocol="tcp")


def test_traffic_the_node_itself_sends_is_counted_on_egress(node: TestNode,
                                                            exporter: ExporterProcess):
    sizes = [200] * 40
    assert udp_send(node.node_ns, node.b_ns, node.b_ip, 7021, sizes) == len(sizes)
    scrape = exporter.wait_for(
        lambda s: flow(s, "packets", node.node_ip_b, node.b_ip, "7021", "udp") >= 40,
        "node-originated datagrams")
    assert flow(scrape, "packets", node.node_ip_b, node.b_ip, "7021", "udp") == 40
    assert flow(scrape, "bytes", node.node_ip_b, node.b_ip, "7021", "udp") == \
        40 * (200 + UDP_HEADER + IPV4_HEADER)


def test_counters_never_decrease_between_scrapes(node: TestNode, exporter: ExporterProcess):
    previous = exporter.scrape()
    for _ in range(5):
        udp_send(node.a_ns, node.b_ns, node.b_ip, 7031, [64] * 20)
        current = exporter.scrape()
        before = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in previous.samples
                  if s.name.startswith("ebpf_net_flow_")}
        for sample in current.select("ebpf_net_flow_packets_total") + \
                current.select("ebpf_net_flow_bytes_total"):
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert sample.value >= before.get(key, 0), key
        previous = current
    assert flow(previous, "packets", node.a_ip, node.b_ip, "7031", "udp") == 100


@pytest.mark.parametrize("pattern", [(0, 1), (0, 1, 2), (0, 1, 0, 2, 2, 1)],
                         ids=["two-in-turn", "three-in-turn", "mixed"])
def test_flows_interleaved_on_one_cpu_are_counted_exactly_across_scrapes(
        node: TestNode, exporter: ExporterProcess, pattern: tuple[int, ...]):
    """Each CPU keeps the two flows it counted last in slots of its own (bpf/flows.h): two
    flows in turn stay there, a third moves the counts of the one used less recently into the
    flows map, packet by packet; scrapes in between take the slots' counts and the map's."""
    ports, rounds, per_round = (7051, 7052, 7053), 4, 25
    sizes = {7051: 40, 7052: 300, 7053: 120}
    with in_netns(node.b_ns):
        sinks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in ports]
    with in_netns(node.a_ns):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    affinity = os.sched_getaffinity(0)
    sent = dict.fromkeys(ports, 0)
    before = exporter.scrape()
    try:
        for sink, port in zip(sinks, ports, strict=True):
            sink.bind((node.b_ip, port))
        os.sched_setaffinity(0, {min(affinity)})    # this thread: the classifier's CPU too
        for _ in range(rounds):
            for _ in range(per_round):
                for index in pattern:
                    sender.sendto(bytes(sizes[ports[index]]), (node.b_ip, ports[index]))
                    sent[ports[index]] += 1
            exporter.scrape()
    finally:
        os.sched_setaffinity(0, affinity)
        sender.close()
        for sink in sinks:
            sink.close()
    final = exporter.scrape()
    for port in ports:
        packets = flow(final, "packets", node.a_ip, node.b_ip, str(port), "udp") - \
            flow(before, "packets", node.a_ip, node.b_ip, str(port), "udp")
        octets = flow(final, "bytes", node.a_ip, node.b_ip, str(port), "udp") - \
            flow(before, "bytes", node.a_ip, node.b_ip, str(port), "udp")
        assert (packets, octets) == (sent[port], sent[port] * (sizes[port] + UDP_HEADER
                                                               + IPV4_HEADER)), port


def test_concurrent_scrapes_neither_double_count_nor_lose_counts(node: TestNode,
                                                                 exporter: ExporterProcess):
    import threading

    port, rounds, per_round = 7041, 30, 20
    stop = threading.Event()
    errors: list[BaseException] = []

    def scrape_forever() -> None:
        try:
            while not stop.is_set():
                exporter.scrape()
        except BaseException as e:  # surfaced below
            errors.append(e)

    scrapers = [threading.Thread(target=scrape_forever) for _ in range(3)]
    for thread in scrapers:
        thread.start()
    try:
        for _ in range(rounds):
            assert udp_send(node.a_ns, node.b_ns, node.b_ip, port, [10] * per_round) == per_round
    finally:
        stop.set()
        for thread in scrapers:
            thread.join()
    assert not errors, errors
    final = exporter.scrape()
    assert flow(final, "packets", node.a_ip, node.b_ip, str(port), "udp") == rounds * per_round


def test_real_tools_iperf3_and_curl_are_counted_once(node: TestNode, exporter: ExporterProcess):
    import json

    from lab.testnode import HTTP_DATA_SIZE

    node.iperf3_server(node.b_ns, node.b_ip, 5301)
    result = node.run(node.a_ns, ["iperf3", "-c", node.b_ip, "-p", "5301", "-n", "20M",
                                  "--json"], timeout=60)
    # iperf3 stops the test once the bytes are written, not delivered: it may close the data
    # connection with some still unsent, so what crossed the wire lies between what the
    # server read and what the client wrote
    end = json.loads(result.stdout)["end"]
    written, received = end["sum_sent"]["bytes"], end["sum_received"]["bytes"]
    node.http_server(node.b_ns, node.b_ip, 8380)
    node.run(node.a_ns, ["curl", "-sf", "-o", "/dev/null", f"http://{node.b_ip}:8380/data.bin"])

    def counted(s: Scrape) -> bool:
        return (flow(s, "bytes", node.a_ip, node.b_ip, "5301", "tcp") >= received and
                flow(s, "bytes", node.b_ip, node.a_ip, "*", "tcp", src_port="8380")
                >= HTTP_DATA_SIZE)

    scrape = exporter.wait_for(counted, "iperf3 and curl traffic")
    # payload plus headers, and far below twice the payload (a packet counted on both veths)
    iperf_bytes = flow(scrape, "bytes", node.a_ip, node.b_ip, "5301", "tcp")
    assert received < iperf_bytes < written * 1.06
    http_bytes = flow(scrape, "bytes", node.b_ip, node.a_ip, "*", "tcp", src_port="8380")
    assert HTTP_DATA_SIZE < http_bytes < HTTP_DATA_SIZE * 1.06
