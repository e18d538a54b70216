"""What the TCP program reads from the socket itself (exporter/sockfields.py): the RTT of a
connection the exporter did not see open, the TCP metrics of a kernel whose BTF is out of
sight, and the tick rate its RTT window is counted in. Each exporter test starts its own
exporter (the module-wide one of test_tcp.py would be in the way of the first, and has BTF)."""

from __future__ import annotations

import gzip
import socket
import time
from pathlib import Path

import pytest

from exporter import config, jiffies
from exporter.app import tcp_program_flags
from exporter.loader import Program
from tests.exporter_process import ExporterProcess
from tests.kernel.test_tcp import pair
from tests.testnode import TestNode, connect_refused, in_netns, tcp_connections

pytestmark = pytest.mark.kernel


def test_a_connection_older_than_the_exporter_is_sampled_in_flight_and_at_close(node: TestNode):
    """A socket the exporter never saw open is found by its first segment after start-up (its
    endpoints read from the socket itself), sampled once per window while it receives, and once
    more at close; its open and close are not counted, as they were not seen."""
    port = 7403
    with in_netns(node.b_ns):
        server = socket.create_server((node.b_ip, port))
    with in_netns(node.a_ns):
        client = socket.create_connection((node.b_ip, port), timeout=5)
    accepted, _ = server.accept()
    labels = pair(node, port)
    exporter = ExporterProcess(node, config={"tcp": {"rtt_sample_interval": "50ms"}})
    try:
        exporter.wait_ready()

        def ping_pong(rounds: int) -> None:
            for _ in range(rounds):
                client.sendall(b"p")
                assert accepted.recv(1) == b"p"
                accepted.sendall(b"q")
                assert client.recv(1) == b"q"
                time.sleep(0.01)      # spreads the segments over windows of 50 ms

        # both sockets receive for about 0.5 s: several windows each, after the first
        ping_pong(50)
        in_flight = exporter.wait_for(
            lambda s: s.value("ebpf_net_tcp_rtt_seconds_count", **labels) >= 4,
            "in-flight RTT samples of both sockets").value("ebpf_net_tcp_rtt_seconds_count",
                                                           **labels)
        assert in_flight <= 2 * 0.5 / 0.05 + 4        # at most one per socket and window
        client.close()
        accepted.close()
        scrape = exporter.wait_for(
            lambda s: s.value("ebpf_net_tcp_rtt_seconds_count", **labels) >= in_flight + 2,
            "the close samples")
        mean = scrape.value("ebpf_net_tcp_rtt_seconds_sum", **labels) / \
            scrape.value("ebpf_net_tcp_rtt_seconds_count", **labels)
        # microseconds of path, plus up to the 10 ms pause where an ACK waits for the next ping
        assert 2e-6 < mean < 0.02
        assert scrape.value("ebpf_net_tcp_connections_opened_total", **labels) == 0
        assert scrape.value("ebpf_net_tcp_connections_closed_total", **labels) == 0
    finally:
        exporter.stop()
        client.close()
        accepted.close()
        server.close()


# runs the exporter in a mount namespace of its own where /sys/kernel/btf is an empty tmpfs
WITHOUT_BTF = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               'mount -t tmpfs none /sys/kernel/btf && exec "$@"', "sh"]


def test_without_btf_the_tcp_counters_stay_exact_and_there_is_no_rtt(node: TestNode):
    port, refused_port, k, refused = 7404, 7405, 5, 3
    exporter = ExporterProcess(node, prefix=WITHOUT_BTF)
    try:
        exporter.wait_ready()
        tcp_connections(node.a_ns, node.b_ns, node.b_ip, port, k)
        connect_refused(node.a_ns, node.b_ip, refused_port, refused)
        labels, refused_labels = pair(node, port), pair(node, refused_port)
        scrape = exporter.wait_for(
            lambda s: s.value("ebpf_net_tcp_connections_closed_total", **labels) >= 2 * k
            and s.value("ebpf_net_tcp_connect_failures_total", **refused_labels) >= refused,
            "closes and refused connects")
        for role in ("client", "server"):
            assert scrape.value("ebpf_net_tcp_connections_opened_total", role=role,
                                **labels) == k
            assert scrape.value("ebpf_net_tcp_connections_closed_total", role=role,
                                **labels) == k
        assert scrape.value("ebpf_net_tcp_connect_failures_total", reason="refused",
                            **refused_labels) == refused
        assert scrape.value("ebpf_net_tcp_connect_failures_total", **refused_labels) == refused
        assert scrape.select("ebpf_net_tcp_rtt_seconds_count") == []
        log = exporter.log_path.read_text()
        assert "no ebpf_net_tcp_rtt_seconds" in log and "/sys/kernel/btf/vmlinux" in log
    finally:
        exporter.stop()


def test_the_tick_rate_measured_by_the_program_is_the_kernels(kernel_ready: None):
    """sample_clock run with BPF_PROG_TEST_RUN gives CONFIG_HZ, where the kernel tells it."""
    program = Program("tcp", "tcp.c", tcp_program_flags(config.load(None, {}, {})))
    try:
        hz = jiffies.kernel_hz(program)
    finally:
        program.close()
    assert hz in jiffies.CONFIGURABLE
    built = Path("/proc/config.gz")
    if built.exists():
        assert f"\nCONFIG_HZ={hz}\n" in gzip.decompress(built.read_bytes()).decode()
