"""Part 8: the exporter's memory with Kubernetes labels on, against a test API server
(lab/kubeapi.py) holding a large cluster: 10,000 pods of 1,000 ReplicaSets on 100 nodes in
two zones, and 2,000 Services. The exporter starts with its kubeconfig, lists and watches
them all (the cache every node's exporter keeps), and its RSS is read once the cache holds
every object and a few scrapes have run."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass

from lab import kubeapi
from lab.exporter_process import ExporterProcess, wait_until
from lab.kubeapi import KubeAPI
from lab.testnode import TestNode

from . import startup
from .procstat import Memory, memory

PODS, SERVICES, NODES, PODS_PER_REPLICASET = 10_000, 2_000, 100, 10
NAMESPACES = 20
NODE_NAME = "node-0"
SCRAPES = 3


@dataclass(frozen=True)
class KubernetesMemory:
    pods: int
    services: int
    nodes: int
    sync_seconds: float     # launch to every object in the exporter's cache
    memory: Memory          # after the sync and a few scrapes


def populate(api: KubeAPI, pods: int, services: int, nodes: int) -> None:
    addresses = ipaddress.ip_network("10.128.0.0/12").hosts()
    for index in range(nodes):
        api.create("nodes", kubeapi.node(f"node-{index}", [f"172.20.{index // 250}.{index % 250}"],
                                         [f"10.{128 + index // 64}.{index % 64 * 4}.0/22"],
                                         zone=f"zone-{index % 2}"))
    for index in range(pods // PODS_PER_REPLICASET):
        namespace = f"ns-{index % NAMESPACES}"
        api.create("replicasets", kubeapi.replicaset(namespace, f"rs-{index}", f"app-{index}"))
        for replica in range(PODS_PER_REPLICASET):
            api.create("pods", kubeapi.pod(
                namespace, f"rs-{index}-{replica}", [str(next(addresses))],
                owner=("ReplicaSet", f"rs-{index}"), labels={"app": f"app-{index}"},
                node=f"node-{(index * PODS_PER_REPLICASET + replica) % nodes}"))
    for index in range(services):
        selected = index % (pods // PODS_PER_REPLICASET)
        api.create("services", kubeapi.service(
            f"ns-{selected % NAMESPACES}", f"svc-{index}", {"app": f"app-{selected}"},
            cluster_ip=f"10.96.{index // 250}.{index % 250 + 1}"))


def run(node: TestNode, say: Callable[[str], None] = print, pods: int = PODS,
        services: int = SERVICES, nodes: int = NODES) -> KubernetesMemory:
    with KubeAPI(node.node_ns) as api:
        populate(api, pods, services, nodes)
        launched = time.monotonic()
        with ExporterProcess(node, ["--kubeconfig", str(api.kubeconfig),
                                    "--node-name", NODE_NAME]) as exporter:
            exporter.wait_ready(timeout=startup.READY_TIMEOUT)

            def synced() -> bool:
                scrape = exporter.scrape()
                return (scrape.value("ebpf_net_exporter_k8s_objects", kind="pods") == pods and
                        scrape.value("ebpf_net_exporter_k8s_objects", kind="services")
                        == services)

            wait_until(synced, 120, "the exporter's cache to hold every object", interval=0.5)
            seconds = time.monotonic() - launched
            for _ in range(SCRAPES):
                exporter.scrape()
            measured = memory(exporter.proc.pid)
    say(f"  {pods:,} pods, {services:,} services: cached in {seconds:.1f} s, "
        f"RSS {measured.rss_mib:.0f} MiB (PSS {measured.pss_mib:.0f}, peak "
        f"{measured.peak_rss_mib:.0f})")
    return KubernetesMemory(pods, services, nodes, seconds, measured)
