"""Counted once per cluster: two nodes of a test cluster (tests/testcluster.py), one exporter
each attached to every interface of its node (pod veths, uplink, VXLAN device, as the
DaemonSet does), both reading the same Kubernetes objects. Real traffic within a node and
across nodes, natively routed and through the VXLAN overlay; the sum of both exporters'
scrapes must count every packet and exchange once.

Both simulated nodes share one kernel, so the TCP tracepoints of each exporter see every
namespace's sockets: the summed assertions stay with what the TC classifier counts (flows,
DNS, HTTP)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests import kubeapi
from tests.exporter_process import ExporterProcess, Scrape, wait_until
from tests.kubeapi import KubeAPI
from tests.testcluster import ClusterNode, ClusterPod, TestCluster
from tests.testnode import udp_send

pytestmark = pytest.mark.kernel

EXPORTER_NAMESPACE = "monitoring"
DAEMONSET = "ebpf-net-exporter"
IPV4_UDP_HEADERS = 28
DATAGRAMS = [300] * 50
# pod -> (namespace, workload): a Deployment's pods, a StatefulSet's, ...
WORKLOADS = {"pod-1a": ("shop", "frontend"), "pod-1b": ("shop", "worker"),
             "pod-2a": ("shop", "web"), "pod-2b": ("infra", "dns")}


def exporter_pod_name(node: ClusterNode) -> str:
    return f"{DAEMONSET}-{node.name}"


def register(api: KubeAPI, cluster: TestCluster) -> None:
    for node in cluster.nodes:
        api.create("nodes", kubeapi.node(node.name, [node.internal_ip], [node.pod_cidr]))
        api.create("pods", kubeapi.pod(EXPORTER_NAMESPACE, exporter_pod_name(node),
                                       [node.internal_ip], owner=("DaemonSet", DAEMONSET),
                                       node=node.name, host_network=True))
        for pod in node.pods:
            namespace, workload = WORKLOADS[pod.name]
            api.create("pods", kubeapi.pod(namespace, f"{workload}-0", [pod.ip],
                                           owner=("StatefulSet", workload), node=node.name,
                                           labels={"app": workload}))
    api.create("services", kubeapi.service("shop", "web", {"app": "web"},
                                           cluster.service_ip(10)))
    api.create("services", kubeapi.service("infra", "dns", {"app": "dns"},
                                           cluster.service_ip(53)))


@dataclass
class Exporters:
    """One exporter per node; scrapes of all of them, summed."""

    processes: list[ExporterProcess]

    def scrapes(self) -> list[Scrape]:
        return [process.scrape() for process in self.processes]

    def wait_for(self, condition: Callable[[list[Scrape]], bool], what: str,
                 timeout: float = 20) -> list[Scrape]:
        holder: list[list[Scrape]] = []

        def check() -> bool:
            holder[:] = [self.scrapes()]
            return condition(holder[0])

        wait_until(check, timeout, what, interval=0.2)
        return holder[0]


def total(scrapes: list[Scrape], name: str, **labels: str) -> float:
    return sum(scrape.value(name, **labels) for scrape in scrapes)


def ends(client: ClusterPod, server: ClusterPod) -> dict[str, str]:
    return {"src_workload": WORKLOADS[client.name][1], "dst_workload": WORKLOADS[server.name][1]}


@pytest.fixture(scope="module")
def exporters(cluster: TestCluster) -> Iterator[Exporters]:
    apis = [KubeAPI(netns=node.ns) for node in cluster.nodes]
    processes: list[ExporterProcess] = []
    try:
        for api in apis:
            api.start()
            register(api, cluster)
        for index, (node, api) in enumerate(zip(cluster.nodes, apis, strict=True)):
            processes.append(ExporterProcess(
                node, ["--kubeconfig", str(api.kubeconfig), "--node-name", node.name],
                interfaces=cluster.interfaces_regex(index),
                config={"dns": {"timeout": "1s"}},
                env={"POD_NAME": exporter_pod_name(node), "POD_NAMESPACE": EXPORTER_NAMESPACE}))
        for process in processes:
            process.wait_ready()
            process.wait_for(
                lambda s: s.value("ebpf_net_exporter_cluster_addresses",
                                  owner="exporter_node") >= 2,
                "the other node's addresses in the cluster map")
        yield Exporters(processes)
    finally:
        for process in processes:
            code = process.stop()
            assert code == 0, f"exporter exited with {code}:\n{process.log()}"
        for api in apis:
            api.stop()


def test_each_exporter_knows_whose_addresses_are_whose(exporters: Exporters) -> None:
    for scrape in exporters.scrapes():
        owners = {s.labels["owner"]: s.value
                  for s in scrape.select("ebpf_net_exporter_cluster_addresses")}
        # its own InternalIP and pod CIDR, the other node's, and four pods' addresses
        assert owners == {"local": 4, "exporter_node": 4, "other_node": 0}
        assert scrape.value("ebpf_net_exporter_network_interfaces") == 1


def test_udp_across_nodes_is_counted_once(cluster: TestCluster, exporters: Exporters) -> None:
    client, server = cluster.pod("pod-1a"), cluster.pod("pod-2a")
    port = 7201
    assert udp_send(client.ns, server.ns, server.ip, port, DATAGRAMS) == len(DATAGRAMS)
    labels = {"protocol": "udp", "dst_port": str(port), **ends(client, server)}
    scrapes = exporters.wait_for(
        lambda s: total(s, "ebpf_net_flow_packets_total", **labels) >= len(DATAGRAMS),
        "the datagrams")
    assert total(scrapes, "ebpf_net_flow_packets_total", **labels) == len(DATAGRAMS)

