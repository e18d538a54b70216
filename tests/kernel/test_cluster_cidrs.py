"""Counting without Kubernetes on the two-node test cluster: with `cluster.cidrs` empty each
exporter counts once per node as it always did (traffic between the nodes on both of them);
with the cluster's networks in `cluster.cidrs` the sum over both is exact again, each node
finding its own pods from its routes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from lab.clusterexporters import stopped
from lab.exporter_process import ExporterProcess, Scrape, wait_until
from lab.testcluster import TestCluster
from lab.testnode import udp_send

pytestmark = pytest.mark.kernel

DATAGRAMS = [300] * 40


def start(cluster: TestCluster, stack: ExitStack, config: dict[str, object],
          pods_only: bool = False) -> list[ExporterProcess]:
    """An exporter on each node, attached to all its interfaces (or its pods' veths only),
    stopped with the stack."""
    processes = []
    for index, node in enumerate(cluster.nodes):
        interfaces = "|".join(pod.veth for pod in node.pods) if pods_only else \
            cluster.interfaces_regex(index)
        process = ExporterProcess(node, interfaces=interfaces, config=config)
        stack.callback(stopped, process)
        processes.append(process)
    for process in processes:
        process.wait_ready()
    return processes


def packets(processes: list[ExporterProcess], port: int) -> list[float]:
    return [process.scrape().value("ebpf_net_flow_packets_total", protocol="udp",
                                   dst_port=str(port)) for process in processes]


def send(cluster: TestCluster, client: str, server: str, port: int) -> None:
    sender, receiver = cluster.pod(client), cluster.pod(server)
    assert udp_send(sender.ns, receiver.ns, receiver.ip, port, DATAGRAMS) == len(DATAGRAMS)


@pytest.fixture
def routed(cluster: TestCluster) -> Iterator[TestCluster]:
    cluster.route_via("routed")
    yield cluster


def test_without_cluster_cidrs_each_node_counts_what_crosses_it(routed: TestCluster) -> None:
    with ExitStack() as stack:
        processes = start(routed, stack, {})
        assert all("counting once per node" in p.log() for p in processes)
        send(routed, "pod-1a", "pod-2a", 7301)
        send(routed, "pod-1a", "pod-1b", 7302)
        # across the nodes: sent by node 1, and received by node 2, as before
        wait_until(lambda: packets(processes, 7301) == [len(DATAGRAMS)] * 2, 20,
                   "both nodes to count the datagrams")
        wait_until(lambda: packets(processes, 7302) == [len(DATAGRAMS), 0], 20,
                   "node 1 alone to count its own pods' datagrams")
        scrape = processes[1].scrape()
        assert not scrape.select("ebpf_net_exporter_counted_elsewhere_total")


def test_cluster_cidrs_count_once_per_cluster(routed: TestCluster) -> None:
    cidrs = [f"10.{routed.n}.0.0/16"]       # both nodes' addresses and pod networks
    with ExitStack() as stack:
        processes = start(routed, stack, {"cluster": {"cidrs": cidrs}})
        assert all("counting once per cluster" in p.log() for p in processes)
        send(routed, "pod-1a", "pod-2a", 7311)
        send(routed, "pod-2b", "pod-1b", 7312)
        send(routed, "pod-1a", "pod-1b", 7313)
        expected = {7311: [len(DATAGRAMS), 0], 7312: [0, len(DATAGRAMS)],
                    7313: [len(DATAGRAMS), 0]}
        wait_until(lambda: {port: packets(processes, port) for port in expected} == expected,
                   20, "each datagram counted by its sender's node only")
        scrapes: list[Scrape] = [process.scrape() for process in processes]
        for scrape in scrapes:
            # the pods' host routes are the node's own; the uplink faces the other node
            assert scrape.value("ebpf_net_exporter_cluster_addresses", owner="exporter_node") \
                == 1
            assert scrape.value("ebpf_net_exporter_cluster_addresses", owner="local") >= 2
            assert scrape.value("ebpf_net_exporter_network_interfaces") == 1
            assert scrape.value("ebpf_net_exporter_counted_elsewhere_total",
                                signal="flow_packets") >= len(DATAGRAMS)


def test_pod_interfaces_only_still_count_once_per_cluster(routed: TestCluster) -> None:
    """interfaces.include with the pods' veths only (the "pod traffic only" example): a
    packet from another node reaches a pod's veth egress from an uplink not monitored, and
    is left to its sender all the same."""
    cidrs = [f"10.{routed.n}.0.0/16"]
    with ExitStack() as stack:
        processes = start(routed, stack, {"cluster": {"cidrs": cidrs}}, pods_only=True)
        send(routed, "pod-1a", "pod-2a", 7321)
        send(routed, "pod-2b", "pod-1b", 7322)
        expected = {7321: [len(DATAGRAMS), 0], 7322: [0, len(DATAGRAMS)]}
        wait_until(lambda: {port: packets(processes, port) for port in expected} == expected,
                   20, "each datagram counted by its sender's node only")
        assert [process.scrape().value("ebpf_net_exporter_network_interfaces")
                for process in processes] == [0, 0]
