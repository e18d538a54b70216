"""Exporters on the two-node test cluster (lab/testcluster.py) as the DaemonSet runs them:
one per node, attached to every interface of its node (pod veths, uplink, VXLAN device),
given its node's name and its own pod's, and reading the same Kubernetes objects: the nodes
with their InternalIP and pod CIDR, the pods, our DaemonSet's pods and two Services. Each node
gets its own test API server (an exporter reaches it on its node's loopback)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from lab import kubeapi
from lab.exporter_process import ExporterProcess, Scrape, free_port, wait_until
from lab.kubeapi import KubeAPI
from lab.testcluster import ClusterNode, ClusterPod, TestCluster

EXPORTER_NAMESPACE = "monitoring"
DAEMONSET = "ebpf-net-exporter"
# pod -> (namespace, workload), each pod a StatefulSet's
WORKLOADS = {"pod-1a": ("shop", "frontend"), "pod-1b": ("shop", "worker"),
             "pod-2a": ("shop", "web"), "pod-2b": ("infra", "dns")}
WEB_VIP, DNS_VIP = 10, 53           # the Services' ClusterIPs: hosts of the service CIDR
# a Service whose selector matches no pod: only its ClusterIP is named after it (its backend,
# the gRPC server on pod-2a, keeps the name the web Service gives it)
GRPC_VIP = 11
# interfaces facing the network in each routing mode: the uplink (a route through a gateway
# to the other node's pods, or the route to the other node's address), and the VXLAN device
# (the overlay's route through the other node's gateway address)
FACING = {"routed": 1, "vxlan": 2}
# a node's entries in the cluster-address map: InternalIP, pod CIDR and two pods, each in both
# families
ADDRESSES_PER_NODE = 8
# the availability zone of each node, in node order
ZONES = ("zone-a", "zone-b")


def exporter_pod_name(node: ClusterNode) -> str:
    return f"{DAEMONSET}-{node.name}"


def register(api: KubeAPI, cluster: TestCluster) -> None:
    for node, zone in zip(cluster.nodes, ZONES, strict=True):
        # dual stack: an IPv4 and an IPv6 address and pod CIDR each
        api.create("nodes", kubeapi.node(node.name, [node.internal_ip, node.internal_ip6],
                                         [node.pod_cidr, node.pod_cidr6], zone=zone))
        api.create("pods", kubeapi.pod(EXPORTER_NAMESPACE, exporter_pod_name(node),
                                       [node.internal_ip, node.internal_ip6],
                                       owner=("DaemonSet", DAEMONSET),
                                       node=node.name, host_network=True))
        for pod in node.pods:
            namespace, workload = WORKLOADS[pod.name]
            api.create("pods", kubeapi.pod(namespace, f"{workload}-0", [pod.ip, pod.ip6],
                                           owner=("StatefulSet", workload), node=node.name,
                                           labels={"app": workload}))
    api.create("services", kubeapi.service("shop", "web", {"app": "web"},
                                           cluster.service_ip(WEB_VIP)))
    api.create("services", kubeapi.service("infra", "dns", {"app": "dns"},
                                           cluster.service_ip(DNS_VIP)))
    api.create("services", kubeapi.service("shop", "grpc", {"app": "grpc"},
                                           cluster.service_ip(GRPC_VIP)))


def ends(client: ClusterPod, server: ClusterPod) -> dict[str, str]:
    """The workload labels of a client and a server."""
    return {"src_workload": WORKLOADS[client.name][1], "dst_workload": WORKLOADS[server.name][1]}


@dataclass
class ClusterExporters:
    """One exporter per node, in node order."""

    cluster: TestCluster
    processes: list[ExporterProcess]
    apis: list[KubeAPI]             # each node's API server, in node order

    def create(self, kind: str, obj: dict[str, Any]) -> None:
        """One more object in every node's API server; returns once every exporter has it."""
        counts = [scrape.value("ebpf_net_exporter_k8s_objects", kind=kind)
                  for scrape in self.scrapes()]
        for api in self.apis:
            api.create(kind, obj)
        self.wait_for(lambda scrapes: all(
            scrape.value("ebpf_net_exporter_k8s_objects", kind=kind) > count
            for scrape, count in zip(scrapes, counts, strict=True)), f"the new {kind}")

    def scrapes(self) -> list[Scrape]:
        return [process.scrape() for process in self.processes]

    def wait_for(self, condition: Callable[[list[Scrape]], bool], what: str,
                 timeout: float = 20) -> list[Scrape]:
        """Scrapes every exporter until condition(scrapes) holds; returns those scrapes."""
        holder: list[list[Scrape]] = []

        def check() -> bool:
            holder[:] = [self.scrapes()]
            return condition(holder[0])

        wait_until(check, timeout, what, interval=0.2)
        return holder[0]

    def route_via(self, mode: str) -> None:
        """Switches the routing mode and waits for every exporter to have read the new routes
        (a route event wakes its interface monitor within milliseconds; a packet in between
        would meet the old roles)."""
        self.cluster.route_via(mode)
        for process in self.processes:
            process.wait_for(lambda s: s.value("ebpf_net_exporter_network_interfaces")
                             == FACING[mode], f"the {mode} interface roles")


@contextlib.contextmanager
def cluster_exporters(cluster: TestCluster, config: dict[str, Any] | None = None,
                      hosts: Sequence[str] | None = None) -> Iterator[ClusterExporters]:
    """Started and ready, with both nodes' addresses in their cluster maps; stopped (exit
    code 0 asserted) on leaving. `hosts`: each exporter's listen address (127.0.0.1)."""
    with contextlib.ExitStack() as stack:
        processes, apis = [], []
        for index, node in enumerate(cluster.nodes):
            api = stack.enter_context(KubeAPI(netns=node.ns))
            apis.append(api)
            register(api, cluster)
            process = ExporterProcess(
                node, ["--kubeconfig", str(api.kubeconfig), "--node-name", node.name],
                interfaces=cluster.interfaces_regex(index), config=config,
                host=hosts[index] if hosts else "127.0.0.1", port=free_port(node.ns),
                env={"POD_NAME": exporter_pod_name(node), "POD_NAMESPACE": EXPORTER_NAMESPACE})
            stack.callback(stopped, process)
            processes.append(process)
        for process in processes:
            process.wait_ready()
            # its own and the other node's InternalIPs, pod CIDRs and two pods' addresses,
            # IPv4 and IPv6
            process.wait_for(
                lambda s: s.value("ebpf_net_exporter_cluster_addresses",
                                  owner="exporter_node") == ADDRESSES_PER_NODE
                and s.value("ebpf_net_exporter_cluster_addresses", owner="local")
                == ADDRESSES_PER_NODE, "both nodes' addresses in the cluster map")
        yield ClusterExporters(cluster, processes, apis)


def stopped(process: ExporterProcess) -> None:
    """Stops an exporter; its exit code must be 0 (its log says why otherwise)."""
    code = process.stop()
    assert code == 0, f"exporter exited with {code}:\n{process.log()}"
