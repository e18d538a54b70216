"""Faults a node agent meets: a second copy of itself, interfaces that vanish and come back
under traffic, a crash and restart, and nowhere to write its logs. (Stopping, kill -9 and
restart, and interfaces coming and going without traffic are in test_lifecycle.py.)"""

from __future__ import annotations

import pytest

from tests.exporter_process import ExporterProcess, filters_on
from tests.testnode import TestNode, udp_send

pytestmark = pytest.mark.kernel


def test_a_second_exporter_in_the_same_netns_refuses_and_the_first_keeps_counting(
        node: TestNode):
    with ExporterProcess(node) as first:
        first.wait_ready()
        second = ExporterProcess(node)
        assert second.proc.wait(timeout=120) == 1
        second.stop()
        errors = [line for line in second.log().splitlines() if "level=error" in line]
        assert len(errors) == 1, second.log()
        assert f"another ebpf-net-exporter (pid {first.proc.pid}) already monitors this " \
               "network namespace" in errors[0]
        assert "Traceback" not in second.log()
        # the first one's filters are untouched and it still counts every packet
        assert set(filters_on(node, [node.veth_a, node.veth_b]).values()) == {1}
        assert udp_send(node.a_ns, node.b_ns, node.b_ip, 7401, [64] * 20) == 20
        scrape = first.wait_for(lambda s: s.value("ebpf_net_flow_packets_total",
                                                  dst_port="7401") >= 20, "20 datagrams")
        assert scrape.value("ebpf_net_flow_packets_total", dst_port="7401") == 20
        assert first.stop() == 0
