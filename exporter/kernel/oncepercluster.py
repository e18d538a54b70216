"""Counting once per cluster: keeps the classifier's cluster-address trie and the roles of the
monitored interfaces current (bpf/cluster.h), and serves what the rule did as self-metrics.

Two sources say whose an address is:
- Kubernetes: every node's addresses and pod CIDRs and every pod's address, and which nodes
  run a ready pod of this exporter's own DaemonSet (found from its own pod, POD_NAME and
  POD_NAMESPACE). Re-read whenever the watched objects change, at most every REFRESH_SECONDS.
- `cluster.cidrs` without Kubernetes: those networks send through an exporter, but for the
  node's own networks (netroles.local_networks), re-read with the routes.

The interface roles come from the routing table (netroles.py), read in the interface
monitor's thread on every reconcile (link and route events, and its periodic resync)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .. import logs
from ..config import Config
from ..serving.selfmetrics import KernelStats
from . import clustermap, netroles
from .clustermap import Address, KernelClusterMap

if TYPE_CHECKING:
    from ..k8s.metadata import KubernetesMetadata

log = logs.get("cluster")

IFACE_NETWORK = 2           # bpf/packet.h
CFLAG = "-DONCE_PER_CLUSTER"
REFRESH_SECONDS = 1.0


def wanted(config: Config, kubernetes: KubernetesMetadata | None) -> tuple[bool, str]:
    """Whether to count once per cluster, and why (or why not), for the start-up log."""
    settings = config.cluster
    if settings.counting == "node":
        return False, "cluster.counting is node"
    if kubernetes is not None:
        k8s = config.kubernetes
        if not (k8s.node_name and k8s.pod_name and k8s.pod_namespace):
            return False, ("Kubernetes without node_name, pod_name and pod_namespace "
                           "(NODE_NAME, POD_NAME, POD_NAMESPACE: the DaemonSet sets them)")
        return True, "Kubernetes"
    if settings.cidrs:
        return True, "cluster.cidrs"
    return False, "no cluster addresses known (neither Kubernetes nor cluster.cidrs)"


def cflags(config: Config) -> list[str]:
    return [CFLAG, f"-DCLUSTER_ADDRESS_CAPACITY={config.maps.cluster_address_capacity}"]


class ClusterCounting(Collector):
    """The rule's user-space half. `refresh_routes` runs in the interface monitor's thread;
    the Kubernetes refresh in a thread of its own."""

    def __init__(self, cluster_map: KernelClusterMap, config: Config,
                 kubernetes: KubernetesMetadata | None, stats: KernelStats) -> None:
        self.map = cluster_map
        self._cidrs = config.cluster.cidrs
        self._kubernetes = kubernetes
        self._this_node = config.kubernetes.node_name
        self._exporter_pod = (config.kubernetes.pod_namespace, config.kubernetes.pod_name)
        self._stats = stats
        self._lock = threading.Lock()
        self._probes: list[Address] = []
        self._facing: set[int] = set()
        self._seen_version: Any = None
        self._exporter_nodes: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures_reported = 0
        # set by the wiring: wakes the interface monitor; the interfaces it has attached
        self.on_probes_changed: Callable[[], None] | None = None
        self.attached: Callable[[], Iterable[int]] = lambda: ()
        if kubernetes is None:
            self.map.apply(clustermap.from_cidrs(self._cidrs, ()))

    # --- interface roles (the interface monitor's thread) ---

    def flags(self, ifindex: int) -> int:
        with self._lock:
            return IFACE_NETWORK if ifindex in self._facing else 0

    def refresh_routes(self, ipr: Any, monitored: Iterable[int]) -> set[int]:
        """Re-reads the routes; returns the monitored interfaces whose role changed."""
        routes = netroles.read_routes(ipr)
        with self._lock:
            probes = list(self._probes)
        facing = netroles.network_interfaces(routes, probes)
        monitored = set(monitored)
        if self._kubernetes is None:
            local = netroles.local_networks(routes, netroles.read_addresses(ipr), facing,
                                            monitored)
            self.map.apply(clustermap.from_cidrs(self._cidrs, local))
        with self._lock:
            changed = (facing ^ self._facing) & monitored
            if facing != self._facing:
                log.info("interfaces facing the network", extra={
                    "ifindexes": ",".join(str(i) for i in sorted(facing & monitored))})
            self._facing = facing
        return changed

    # --- Kubernetes ---

    def start(self) -> None:
        if self._kubernetes is None:
            return
        self._thread = threading.Thread(target=self._follow, name="cluster", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5.0)

    def _follow(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self.refresh_kubernetes()
                failing = False
            except Exception as e:      # keep following: the next round retries
                if not failing:         # once per spell, not every second
                    log.warning("cluster addresses not refreshed", extra={"error": str(e)})
                failing = True
            self._stop.wait(REFRESH_SECONDS)

    def refresh_kubernetes(self) -> None:
        """Rewrites the trie when the watched objects changed since the last success."""
        assert self._kubernetes is not None
        version = self._kubernetes.version()
        if version == self._seen_version:
            return
        topology = self._kubernetes.state.topology(self._exporter_pod)
        self.map.apply(clustermap.from_topology(topology, self._this_node))
        self._seen_version = version
        if topology.exporter_nodes != self._exporter_nodes:
            self._exporter_nodes = topology.exporter_nodes
            log.info("nodes counting their own traffic",
                     extra={"nodes": ",".join(sorted(topology.exporter_nodes))})
        probes = clustermap.probe_addresses(topology, self._this_node)
        with self._lock:
            changed = probes != self._probes
            self._probes = probes
        if changed and self.on_probes_changed:
            self.on_probes_changed()

    # --- self-metrics ---

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        self._stats.record_map("cluster_addresses", self.map.entries(), self.map.capacity)
        failures = self.map.failures
        self._stats.add_failures("cluster_addresses", failures - self._failures_reported)
        self._failures_reported = failures
        left = CounterMetricFamily(
            "ebpf_net_exporter_counted_elsewhere",
            "Packets, bytes and exchanges this node saw but left to the node that counts "
            "them (once per cluster): flows sent by another node with an exporter, DNS "
            "queries and HTTP requests of its clients.", labels=["signal"])
        for signal, value in self.map.left().items():
            left.add_metric([signal], value)
        yield left
        kinds = GaugeMetricFamily(
            "ebpf_net_exporter_cluster_addresses",
            "Entries (addresses and networks) of the cluster-address map by whose they are: "
            "this node's, a node that counts its own traffic, a node without an exporter.",
            labels=["owner"])
        for kind, count in sorted(self.map.entries_by_kind().items()):
            kinds.add_metric([kind], count)
        yield kinds
        facing = GaugeMetricFamily(
            "ebpf_net_exporter_network_interfaces",
            "Attached interfaces that face the network (routes through a gateway, or to "
            "other nodes): what arrives on them from a node with an exporter is left to it.")
        with self._lock:
            facing.add_metric([], len(self._facing & set(self.attached())))
        yield facing
