"""Smoke test of the benchmark harness (benchmarks/, `make bench`) against the real kernel: the
floor attaches beside the exporter, the kernel's run-time accounting is read back per program,
and sprayed flows reach the exporter's counters. It checks the harness, not performance."""

from __future__ import annotations

import pytest

from benchmarks import kernel_cost
from benchmarks.sprayer import DISCARD_PORT, Sprayer
from tests.exporter_process import ExporterProcess
from tests.testnode import TestNode

pytestmark = pytest.mark.kernel

FLOWS = 2000


def test_sprayed_flows_are_accounted_per_program_and_counted(node: TestNode,
                                                             exporter: ExporterProcess):
    floor = kernel_cost.Floor(node, [node.veth_a, node.veth_b])
    sprayer = Sprayer(node, FLOWS, 10)

    def traffic() -> None:
        sprayer.spray()
        node.tcp_transfer(node.a_ns, node.b_ns, node.b_ip, 7301, 1 << 20)

    try:
        floor.attach()
        with kernel_cost.run_time_statistics():
            cost = kernel_cost.measure("smoke", exporter.proc.pid, floor, traffic)
    finally:
        sprayer.close()
        floor.detach()
        floor.close()

    runs = {p.name: p.runs for p in cost.programs}
    # every sprayed frame ran the classifier and the floor once, at the node's ingress
    assert runs["classify_ingress"] >= FLOWS + 10
    assert cost.floor_runs >= runs["classify_ingress"]
    # the TCP segments were tail-called into parse_http, which is never a run of its own
    assert runs["parse_http"] == 0 and runs["parse_dns"] == 0
    assert 0 < cost.floor_ns_per_run < cost.tc_ns_per_run

    def sprayed(scrape) -> float:
        return scrape.value("ebpf_net_flow_packets_total", dst_ip=node.node_ip_a,
                            dst_port=str(DISCARD_PORT), protocol="udp")

    scrape = exporter.wait_for(lambda s: sprayed(s) >= FLOWS, "the sprayed flows")
    assert sprayed(scrape) == FLOWS
    assert len(scrape.select("ebpf_net_flow_packets_total", dst_ip=node.node_ip_a,
                             dst_port=str(DISCARD_PORT))) == FLOWS // 10
