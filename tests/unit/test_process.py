"""The opt-in process label of the TCP metrics, on kernel-shaped batches."""

from __future__ import annotations

import numpy as np

from exporter.collectors import tcp as tcpmod
from exporter.collectors.tcp import TcpCollector
from exporter.naming.endpoints import EndpointLabels, PortFolder
from exporter.serving.selfmetrics import KernelStats

from .batches import QueueSource, tcp_batch

CLIENT = {"local": "10.0.0.1", "remote": "10.0.0.2", "rport": 80, "role": tcpmod.ROLE_CLIENT}
SERVER = {"local": "10.0.0.2", "remote": "10.0.0.1", "lport": 80, "role": tcpmod.ROLE_SERVER}


def samples(collector):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in collector.collect() for s in family.samples}


def labels(**values):
    return tuple(sorted({"src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "dst_port": "80",
                         **values}.items()))


def test_processes_are_told_apart_on_every_tcp_metric():
    rows = [
        {**CLIENT, "metric": tcpmod.OPENED, "count": 1, "comm": b"curl"},
        {**CLIENT, "metric": tcpmod.OPENED, "count": 2, "comm": b"python3"},
        {**CLIENT, "metric": tcpmod.CLOSED, "count": 2, "comm": b"python3"},
        {**SERVER, "metric": tcpmod.OPENED, "count": 3, "comm": b"nginx"},
        {**CLIENT, "metric": tcpmod.RETRANSMITS, "count": 4, "comm": b"curl"},
    ]
    overflow = np.zeros(tcpmod.METRIC_COUNT * 3 * 64, dtype=np.uint64)
    overflow[(tcpmod.OPENED * 3 + tcpmod.ROLE_CLIENT) * 64] = 5
    collector = TcpCollector(
        QueueSource([tcp_batch(rows, process=True, overflow=overflow)],
                    tcp_batch([], process=True)),
        EndpointLabels(["ip", "port"]), PortFolder(32768), KernelStats(), 100, 300,
        process_label=True)
    got = samples(collector)
    opened = "ebpf_net_tcp_connections_opened_total"
    assert got[opened, labels(role="client", process="curl")] == 1
    assert got[opened, labels(role="client", process="python3")] == 2
    assert got[opened, labels(role="server", process="nginx")] == 3
    assert got["ebpf_net_tcp_active_connections", labels(role="client", process="curl")] == 1
    assert got["ebpf_net_tcp_active_connections", labels(role="client", process="python3")] == 0
    assert got["ebpf_net_tcp_retransmits_total", labels(process="curl")] == 4
    overflowed = tuple(sorted({"src_ip": "overflow", "dst_ip": "overflow",
                               "dst_port": "overflow", "role": "client",
                               "process": "overflow"}.items()))
    assert got[opened, overflowed] == 5
    # every TCP family carries the label
    assert all("process" in dict(key) for _, key in got)


def test_without_the_option_there_is_no_process_label():
    rows = [{**CLIENT, "metric": tcpmod.OPENED, "count": 1}]
    collector = TcpCollector(QueueSource([tcp_batch(rows)], tcp_batch([])),
                             EndpointLabels(["ip", "port"]), PortFolder(32768), KernelStats(),
                             100, 300)
    assert all("process" not in dict(key) for _, key in samples(collector))
