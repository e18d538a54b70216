"""What the TCP program reads from the socket itself (exporter/kernel/sockfields.py): the RTT of a
connection the exporter did not see open, the TCP metrics of a kernel whose BTF is out of
sight, and the tick rate its RTT window is counted in. Each exporter test starts its own
exporter (the module-wide one of test_tcp.py would be in the way of the first, and has BTF)."""

from __future__ import annotations

import gzip
import socket
import struct
import time
from pathlib import Path

import pytest

from exporter import config
from exporter.kernel import bpfsys, jiffies
from exporter.kernel.loader import Program
from exporter.kernel.programs import tcp_program_flags
from lab.exporter_process import ExporterProcess, bpf_map_dump, fd_infos
from lab.testnode import TestNode, connect_refused, in_netns, tcp_connections
from tests.kernel.test_tcp import lossy_transfer, pair

pytestmark = pytest.mark.kernel


def _ping_pong(client: socket.socket, server: socket.socket, rounds: int) -> None:
    """A byte each way per round, 10 ms apart: both sockets receive for rounds * 10 ms."""
    for _ in range(rounds):
        client.sendall(b"p")
        assert server.recv(1) == b"p"
        server.sendall(b"q")
        assert client.recv(1) == b"q"
        time.sleep(0.01)      # spreads the segments over windows of the sampling interval


def _close(server: socket.socket | None, clients: list[socket.socket],
           accepted: list[socket.socket]) -> None:
    for sock in clients + accepted:
        sock.close()
    if server:
        server.close()


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

        # both sockets receive for about 0.5 s: several windows each, after the first
        _ping_pong(client, accepted, 50)
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


def _raw_tracepoints(pid: int) -> set[str]:
    """The raw tracepoints the process holds links to (`tp_name` in their fds' fdinfo)."""
    return {info["tp_name"] for info in fd_infos(pid) if "tp_name" in info}


def test_with_rtt_sampling_off_only_the_close_is_sampled_and_tcp_probe_is_not_attached(
        node: TestNode):
    """tcp.rtt_sample_interval: off leaves tcp_probe out of the program: a connection that
    exchanges segments for half a second gets no in-flight sample, and one sample per socket
    at its close, read from the socket as before."""
    port = 7408
    exporter = ExporterProcess(node, config={"tcp": {"rtt_sample_interval": "off"}})
    server, clients, accepted = None, [], []
    try:
        exporter.wait_ready()
        attached = _raw_tracepoints(exporter.proc.pid)
        assert "inet_sock_set_state" in attached and "tcp_probe" not in attached, attached
        server, clients, accepted = _held_connections(node, port, 1)
        labels = pair(node, port)
        _ping_pong(clients[0], accepted[0], 50)   # about 0.5 s
        scrape = exporter.wait_for(
            lambda s: s.value("ebpf_net_tcp_connections_opened_total", **labels) >= 2,
            "both opens")
        assert scrape.value("ebpf_net_tcp_rtt_seconds_count", **labels) == 0
        for sock in clients + accepted:
            sock.close()
        scrape = exporter.wait_for(
            lambda s: s.value("ebpf_net_tcp_connections_closed_total", **labels) >= 2,
            "both closes")
        assert scrape.value("ebpf_net_tcp_rtt_seconds_count", **labels) == 2
        assert 2e-6 < scrape.value("ebpf_net_tcp_rtt_seconds_sum", **labels) / 2 < 0.02
    finally:
        exporter.stop()
        _close(server, clients, accepted)


def _map_entries(pid: int, name: str) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs of the process's BPF map `name`; for a per-CPU map, the first
    CPU's value."""
    return [(key, values[0]) for key, values in bpf_map_dump(pid, name)]


def _map_values(pid: int, name: str) -> list[bytes]:
    """The values of the process's BPF map `name`, raw (bpftool)."""
    return [value for _, value in _map_entries(pid, name)]


def _socket_entries_with_port(pid: int, port: int) -> int:
    """tcp_sockets entries whose endpoints (struct tcp_endpoints at the start of the value:
    family, role, local port, remote port) hold `port` at either end."""
    ports = [struct.unpack_from("<HH", value, 2) for value in _map_values(pid, "tcp_sockets")]
    return sum(port in pair for pair in ports)


def _held_connections(node: TestNode, port: int, count: int):
    """`count` connections from pod a to pod b, open: (listener, clients, accepted)."""
    with in_netns(node.b_ns):
        server = socket.create_server((node.b_ip, port))
    with in_netns(node.a_ns):
        clients = [socket.create_connection((node.b_ip, port), timeout=5) for _ in range(count)]
    return server, clients, [server.accept()[0] for _ in clients]


def test_a_connection_sampled_in_flight_is_opened_and_closed_once_on_each_side(node: TestNode):
    """A socket whose open was seen carries a mark (bpf/tcp.c, socket_marks), and a tcp_sockets
    entry too once it is sampled in flight: its close, which finds both, counts once and takes
    both away."""
    port = 7404
    exporter = ExporterProcess(node, config={"tcp": {"rtt_sample_interval": "50ms"}})
    server, clients, accepted = None, [], []
    try:
        exporter.wait_ready()
        server, clients, accepted = _held_connections(node, port, 1)
        labels = pair(node, port)
        _ping_pong(clients[0], accepted[0], 50)   # about 0.5 s: windows of 50 ms
        in_flight = exporter.wait_for(
            lambda s: s.value("ebpf_net_tcp_rtt_seconds_count", **labels) >= 2,
            "in-flight RTT samples").value("ebpf_net_tcp_rtt_seconds_count", **labels)
        # sampled in flight: an entry each, beside the marks (the client's port is folded)
        assert _socket_entries_with_port(exporter.proc.pid, port) == 2
        for sock in clients + accepted:
            sock.close()
        scrape = exporter.wait_for(
            lambda s: s.value("ebpf_net_tcp_connections_closed_total", **labels) >= 2
            and s.value("ebpf_net_tcp_rtt_seconds_count", **labels) >= in_flight + 2,
            "both closes and their samples")
        for role in ("client", "server"):
            assert scrape.value("ebpf_net_tcp_connections_opened_total", role=role,
                                **labels) == 1
            assert scrape.value("ebpf_net_tcp_connections_closed_total", role=role,
                                **labels) == 1
            assert scrape.value("ebpf_net_tcp_active_connections", role=role, **labels) == 0
        # the closes' samples, and up to one more in flight per socket if its FIN came in a
        # new window
        assert in_flight + 2 <= scrape.value("ebpf_net_tcp_rtt_seconds_count", **labels) \
            <= in_flight + 4
        assert _socket_entries_with_port(exporter.proc.pid, port) == 0
    finally:
        exporter.stop()
        _close(server, clients, accepted)


def test_sockets_past_the_marks_go_to_the_socket_map_and_past_it_are_failures(node: TestNode):
    """maps.tcp_socket_capacity 4 gives 8 marks (2 groups of 4) and 4 entries: of 12 sockets
    held open, those whose group is full take an entry, and past those the socket map's update
    failures count what cannot be closed. Every socket is either closed with its own labels
    or counted as a failure, closes come through both ways, and a second round finds the marks
    and entries of the first given back."""
    count = 6
    exporter = ExporterProcess(node, config={"maps": {"tcp_socket_capacity": 4},
                                             "tcp": {"rtt_sample_interval": "1h"}})
    try:
        scrape = exporter.wait_ready().scrape()
        assert scrape.value("ebpf_net_exporter_bpf_map_capacity", map="socket_marks") == 8
        for port in (7405, 7406):
            failures_before = scrape.value("ebpf_net_exporter_bpf_map_update_failures_total",
                                           map="tcp_sockets")
            server, clients, accepted = _held_connections(node, port, count)
            _close(server, clients, accepted)
            labels = pair(node, port)
            scrape = exporter.wait_for(
                lambda s, labels=labels, before=failures_before:
                s.value("ebpf_net_tcp_connections_opened_total", **labels) >= 2 * count
                and s.value("ebpf_net_tcp_connections_closed_total", **labels)
                + s.value("ebpf_net_exporter_bpf_map_update_failures_total", map="tcp_sockets")
                - before >= 2 * count, "every socket closed or counted as a failure")
            for role in ("client", "server"):
                assert scrape.value("ebpf_net_tcp_connections_opened_total", role=role,
                                    **labels) == count
            closed = scrape.value("ebpf_net_tcp_connections_closed_total", **labels)
            assert 8 < closed <= 2 * count, port    # past the marks: the socket map closed some
    finally:
        exporter.stop()


def _map_keys(pid: int, name: str) -> list[bytes]:
    """The keys of the process's BPF map `name`, raw (bpftool)."""
    return [key for key, _ in _map_entries(pid, name)]


def test_retransmits_of_a_marked_socket_are_keyed_with_its_role_and_folded_port(node: TestNode):
    """A marked socket has no tcp_sockets entry to take its role from: its retransmits take it
    from the mark (role_from_mark), so the kernel keys them with the client's port folded to 0,
    one entry per pair as for its other counters, not one per connection."""
    port = 7407
    exporter = ExporterProcess(node, config={"tcp": {"rtt_sample_interval": "1h"}})
    try:
        exporter.wait_ready()
        lossy_transfer(node, port, 2_000_000)
        # struct tcp_key: generation u32, metric u8 at 4, then struct tcp_endpoints at 8:
        # family, role, local port, remote port
        retransmits = [struct.unpack_from("<BBHH", key, 8)
                       for key in _map_keys(exporter.proc.pid, "tcp_events")
                       if key[4] == 3 and port in struct.unpack_from("<HH", key, 10)]
        assert retransmits, "no retransmit of the transfer in tcp_events"
        assert set(retransmits) == {(4, 1, 0, port)}     # IPv4, client, port folded
    finally:
        exporter.stop()


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


def test_this_kernel_takes_the_atomics_the_socket_marks_need(kernel_ready: None):
    """Linux 6.18's verifier takes BPF_CMPXCHG (exporter/kernel/bpfsys.py's probe), so the exporter
    builds bpf/tcp.c with its socket marks here; an invalid atomic operation is refused."""
    assert bpfsys.has_atomics()
    invalid = bpfsys._insn(0xDB, dst=10, src=1, off=-8, imm=0xF3)    # no such operation
    program = list(bpfsys.CMPXCHG_PROGRAM)
    program[3] = invalid
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bpfsys, "CMPXCHG_PROGRAM", tuple(program))
        assert not bpfsys.has_atomics()


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
