"""Part 1: the kernel's own accounting of our programs (run_time_ns / run_cnt) under small-packet
UDP, TCP bulk and a TCP connection loop, with the do-nothing floor on the same packets."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.exporter_process import REPO
from tests.testnode import TestNode

from . import connections, kernel_cost, startup, throughput

KernelCosts = tuple[list[list[kernel_cost.WorkloadCost]], list[kernel_cost.ConnectionCost]]


def run(node: TestNode, seconds: float, repetitions: int, source: Path = REPO,
        say: Callable[[str], None] = print, settle: float = startup.SETTLE_SECONDS
        ) -> KernelCosts:
    """Per repetition: [udp, tcp] workload costs and the connection loop's cost, measured on one
    exporter of the `source` tree. The node needs its iperf3 server and connections.prepare()."""
    started = startup.start(node, source=source)
    time.sleep(settle)
    floor = kernel_cost.Floor(node, [node.veth_a, node.veth_b])
    costs: list[list[kernel_cost.WorkloadCost]] = []
    per_connection: list[kernel_cost.ConnectionCost] = []
    try:
        floor.attach()
        with kernel_cost.run_time_statistics():
            pid = started.exporter.proc.pid
            for _ in range(repetitions):
                costs.append([
                    kernel_cost.measure("udp, 64-byte frames", pid, floor,
                                        lambda: throughput.udp_kpps(node, seconds)),
                    kernel_cost.measure("tcp bulk", pid, floor,
                                        lambda: throughput.tcp_gbits(node, seconds)),
                ])
                per_connection.append(kernel_cost.measure_connections(
                    pid, lambda: connections.loop(node, seconds)))
                udp, tcp = costs[-1]
                say(f"  over the floor: udp {udp.over_floor_per_packet:+.0f} ns per packet, tcp "
                    f"{tcp.over_floor_per_packet:+.0f} ns per skb; tracepoints "
                    f"{per_connection[-1].ns_per_connection:.0f} ns per TCP connection")
    finally:
        floor.detach()
        floor.close()
        started.exporter.stop()
    return costs, per_connection
