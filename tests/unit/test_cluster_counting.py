"""Counting once per cluster, user-space half: whose each address is (from the Kubernetes
objects or cluster.cidrs), how it is keyed in the kernel's trie, which interfaces face the
network (from routes), and when the rule is on."""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

import pytest

from exporter import config
from exporter.k8s.cluster import NODES, PODS, ClusterState
from exporter.kernel import clustermap, netroles, oncepercluster
from exporter.kernel.clustermap import COUNTED_ELSEWHERE, LOCAL, NO_EXPORTER, KernelClusterMap
from exporter.kernel.netroles import Route
from exporter.kernel.oncepercluster import ClusterCounting
from exporter.serving.selfmetrics import KernelStats
from lab import kubeapi
from tests.unit.batches import FakeLeft, FakeTrie

net = ipaddress.ip_network
addr = ipaddress.ip_address


def exporter_pod(node: str, ready: bool = True) -> dict[str, Any]:
    return kubeapi.pod("monitoring", f"ebpf-net-exporter-{node}", ["192.168.0.1"],
                       owner=("DaemonSet", "ebpf-net-exporter"), node=node, host_network=True,
                       ready=ready)


@pytest.fixture
def state() -> ClusterState:
    cluster = ClusterState(deleted_pod_grace=60)
    for index, name in enumerate(("node-1", "node-2", "node-3"), start=1):
        cluster.apply(NODES, "ADDED", kubeapi.node(name, [f"192.168.0.{index}"],
                                                  [f"10.244.{index}.0/24", f"fd00:{index}::/64"]))
    cluster.apply(PODS, "ADDED", exporter_pod("node-1"))
    cluster.apply(PODS, "ADDED", exporter_pod("node-2"))
    cluster.apply(PODS, "ADDED", exporter_pod("node-3", ready=False))   # still starting
    # another DaemonSet's ready pod on node 3 does not make it an exporter node
    cluster.apply(PODS, "ADDED", kubeapi.pod("monitoring", "other-agent-n3", ["192.168.0.3"],
                                             owner=("DaemonSet", "other-agent"),
                                             node="node-3", host_network=True))
    cluster.apply(PODS, "ADDED", kubeapi.pod("shop", "web-1", ["10.244.2.7"], node="node-2"))
    # a CNI that gives a pod an address outside its node's CIDR
    cluster.apply(PODS, "ADDED", kubeapi.pod("shop", "web-2", ["10.9.9.9"], node="node-1"))
    cluster.apply(PODS, "ADDED", kubeapi.pod("shop", "done", ["10.9.9.10"], node="node-2",
                                             phase="Succeeded"))
    return cluster


def test_topology_names_the_nodes_with_a_ready_pod_of_our_own_daemonset(
        state: ClusterState) -> None:
    topology = state.topology(("monitoring", "ebpf-net-exporter-node-1"))
    assert topology.exporter_nodes == {"node-1", "node-2"}
    assert topology.nodes["node-2"].pod_cidrs == ("10.244.2.0/24", "fd00:2::/64")
    assert topology.pod_addresses == {"10.244.2.7": "node-2", "10.9.9.9": "node-1"}
    # an exporter whose own pod is unknown knows no exporter node
    assert state.topology(("monitoring", "nobody")).exporter_nodes == frozenset()


def test_entries_say_whose_each_address_is(state: ClusterState) -> None:
    topology = state.topology(("monitoring", "ebpf-net-exporter-node-1"))
    entries = clustermap.from_topology(topology, "node-1")
    assert entries[net("10.244.1.0/24")] == LOCAL
    assert entries[net("192.168.0.1/32")] == LOCAL
    assert entries[net("10.244.2.0/24")] == COUNTED_ELSEWHERE
    assert entries[net("fd00:2::/64")] == COUNTED_ELSEWHERE
    assert entries[net("192.168.0.2/32")] == COUNTED_ELSEWHERE
    assert entries[net("10.244.3.0/24")] == NO_EXPORTER       # its exporter is not ready
    assert entries[net("10.9.9.9/32")] == LOCAL
    assert net("10.9.9.10/32") not in entries                  # a finished pod's
    # node 2 sees it the other way round
    mirrored = clustermap.from_topology(topology, "node-2")
    assert mirrored[net("10.244.1.0/24")] == COUNTED_ELSEWHERE
    assert mirrored[net("10.9.9.9/32")] == COUNTED_ELSEWHERE
    assert mirrored[net("10.244.2.7/32")] == LOCAL


def test_malformed_addresses_from_the_api_are_left_out() -> None:
    cluster = ClusterState(deleted_pod_grace=60)
    cluster.apply(NODES, "ADDED", kubeapi.node("node-2", ["not-an-ip"], ["10.244.2.0/33"]))
    topology = cluster.topology(("monitoring", "x"))
    assert clustermap.from_topology(topology, "node-1") == {}
    assert clustermap.probe_addresses(topology, "node-1") == []


def test_probes_are_the_other_nodes_and_their_pod_networks(state: ClusterState) -> None:
    topology = state.topology(("monitoring", "ebpf-net-exporter-node-1"))
    probes = clustermap.probe_addresses(topology, "node-1")
    assert addr("192.168.0.2") in probes and addr("10.244.2.1") in probes
    assert addr("fd00:3::1") in probes
    assert addr("192.168.0.1") not in probes and addr("10.244.1.1") not in probes


def test_trie_keys_hold_ipv4_as_mapped_ipv6() -> None:
    assert clustermap.trie_key(net("10.244.1.0/24")) == (
        120, bytes(10) + b"\xff\xff" + bytes([10, 244, 1, 0]))
    assert clustermap.trie_key(net("fd00:1::/64")) == (64, addr("fd00:1::").packed)


def test_cidrs_without_kubernetes_leave_the_nodes_own_networks_local() -> None:
    entries = clustermap.from_cidrs(["10.244.0.0/16", "192.168.0.0/24"],
                                    [net("10.244.1.2/32"), net("192.168.0.1/32"),
                                     net("172.17.0.0/16")])
    assert entries == {net("10.244.0.0/16"): COUNTED_ELSEWHERE,
                       net("192.168.0.0/24"): COUNTED_ELSEWHERE,
                       net("10.244.1.2/32"): LOCAL, net("192.168.0.1/32"): LOCAL}


ROUTES = [
    Route(net("0.0.0.0/0"), (2,), gateway=True),            # default via the uplink
    Route(net("192.168.0.0/24"), (2,), gateway=False),      # the node network
    Route(net("10.244.1.2/32"), (5,), gateway=False),       # a pod's host route
    Route(net("10.244.1.3/32"), (6,), gateway=False),
    Route(net("10.244.2.0/24"), (7,), gateway=True),        # overlay: via 10.244.2.0 onlink
    Route(net("10.244.3.0/24"), (8,), gateway=False),       # a tunnel without a gateway
]


def test_interfaces_with_gateway_routes_or_routes_to_other_nodes_face_the_network() -> None:
    assert netroles.network_interfaces(ROUTES, []) == {2, 7}
    assert netroles.network_interfaces(ROUTES, [addr("10.244.3.1")]) == {2, 7, 8}
    # a probe reached by the default route only adds the uplink again
    assert netroles.network_interfaces(ROUTES, [addr("172.16.0.1")]) == {2, 7}


def test_local_networks_are_routed_without_a_gateway_to_pod_facing_interfaces() -> None:
    facing = {2, 7}
    local = netroles.local_networks(ROUTES, [net("192.168.0.1/32")], facing, {2, 5, 6, 7})
    assert local == [net("192.168.0.1/32"), net("10.244.1.2/32"), net("10.244.1.3/32")]


class Message(dict[str, Any]):
    """The parts of a pyroute2 route message that route_from reads."""

    def __init__(self, attrs: dict[str, Any], **fields: Any) -> None:
        super().__init__(fields)
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


def test_route_messages_become_routes() -> None:
    default = Message({"RTA_GATEWAY": "192.168.0.254", "RTA_OIF": 2, "RTA_TABLE": 254},
                      family=socket.AF_INET, type=1, dst_len=0, table=254)
    assert netroles.route_from(default) == Route(net("0.0.0.0/0"), (2,), True)
    multipath = Message({"RTA_DST": "10.244.2.0", "RTA_TABLE": 254, "RTA_MULTIPATH": [
        Message({"RTA_GATEWAY": "192.168.0.2"}, oif=3), Message({}, oif=4)]},
        family=socket.AF_INET, type=1, dst_len=24, table=254)
    assert netroles.route_from(multipath) == Route(net("10.244.2.0/24"), (3, 4), True)
    local_table = Message({"RTA_DST": "192.168.0.1", "RTA_OIF": 2, "RTA_TABLE": 255},
                          family=socket.AF_INET, type=2, dst_len=32, table=255)
    assert netroles.route_from(local_table) is None


def test_the_kernel_map_is_written_with_differences_only() -> None:
    trie = FakeTrie(16)
    kernel = KernelClusterMap(trie, None)
    first = {net("10.244.2.0/24"): COUNTED_ELSEWHERE, net("10.244.1.0/24"): LOCAL}
    kernel.apply(first)
    assert trie == {clustermap.trie_key(n): kind for n, kind in first.items()}
    writes = trie.writes
    kernel.apply(first)
    assert trie.writes == writes                                # nothing changed
    second = {net("10.244.2.0/24"): NO_EXPORTER}                # node 2's exporter is gone
    kernel.apply(second)
    assert trie == {clustermap.trie_key(net("10.244.2.0/24")): NO_EXPORTER}
    assert trie.writes == writes + 1
    assert kernel.entries_by_kind() == {"local": 0, "exporter_node": 0, "other_node": 1}


def test_a_full_map_keeps_the_widest_networks_and_counts_the_rest() -> None:
    trie = FakeTrie(2)
    kernel = KernelClusterMap(trie, None)
    kernel.apply({net("10.244.2.7/32"): COUNTED_ELSEWHERE, net("10.244.2.0/24"): COUNTED_ELSEWHERE,
                  net("10.0.0.0/8"): COUNTED_ELSEWHERE})
    assert set(trie) == {clustermap.trie_key(net("10.0.0.0/8")),
                         clustermap.trie_key(net("10.244.2.0/24"))}
    assert kernel.failures == 1 and kernel.entries() == 2


def settings(**flat: Any) -> config.Config:
    return config.load(None, {}, flat)


def test_the_rule_is_on_with_kubernetes_and_our_pod_or_with_cidrs() -> None:
    kubernetes: Any = object()      # only whether there is one matters
    named = {"kubernetes.node_name": "node-1", "kubernetes.pod_name": "e-1",
             "kubernetes.pod_namespace": "monitoring"}
    assert oncepercluster.wanted(settings(**named), kubernetes)[0]
    on, why = oncepercluster.wanted(settings(**{**named, "kubernetes.pod_name": ""}), kubernetes)
    assert not on and "POD_NAME" in why
    assert not oncepercluster.wanted(settings(**named, **{"cluster.counting": "node"}),
                                     kubernetes)[0]
    assert not oncepercluster.wanted(settings(), None)[0]        # today's once per node
    assert oncepercluster.wanted(settings(**{"cluster.cidrs": "10.244.0.0/16"}), None)[0]


def test_pod_identity_comes_from_the_downward_api_variables() -> None:
    loaded = config.load(None, {"POD_NAME": "e-1", "POD_NAMESPACE": "monitoring"}, {})
    assert (loaded.kubernetes.pod_name, loaded.kubernetes.pod_namespace) == ("e-1", "monitoring")


@pytest.mark.parametrize("value", ["10.244.0.0/33", "node-1", "[10.0.0.0/8, 300.1.1.1]"])
def test_a_bad_network_names_the_key(value: str) -> None:
    with pytest.raises(config.ConfigError, match=r"^cluster.cidrs.*expected a network"):
        settings(**{"cluster.cidrs": value})


def test_host_bits_in_a_network_are_dropped() -> None:
    assert settings(**{"cluster.cidrs": "10.244.1.7/16"}).cluster.cidrs == ("10.244.0.0/16",)


def test_self_metrics_say_what_was_left_to_other_nodes_and_whose_addresses_are_known() -> None:
    stats = KernelStats()
    left = FakeLeft([{"flow_packets": 3, "flow_bytes": 300, "dns_queries": 1},
                     {"flow_packets": 2, "flow_bytes": 200, "http_requests": 4}])
    cidrs = {"cluster.cidrs": "10.244.0.0/16,10.0.0.0/24,10.1.0.0/24"}
    counting = ClusterCounting(KernelClusterMap(FakeTrie(2), left), settings(**cidrs), None,
                               stats)
    counting.attached = lambda: [5, 7]
    families = {family.name: family for family in counting.collect()}
    assert {s.labels["signal"]: s.value for s in
            families["ebpf_net_exporter_counted_elsewhere"].samples} == \
        {"flow_packets": 5, "flow_bytes": 500, "dns_queries": 1, "http_requests": 4}
    assert {s.labels["owner"]: s.value for s in
            families["ebpf_net_exporter_cluster_addresses"].samples} == \
        {"local": 0, "exporter_node": 2, "other_node": 0}
    assert families["ebpf_net_exporter_network_interfaces"].samples[0].value == 0
    entries, capacity, failures, _ = stats.snapshot()
    # three networks for a trie of two: the third is counted as a failure, once
    assert (entries["cluster_addresses"], capacity["cluster_addresses"]) == (2, 2)
    assert failures["cluster_addresses"] == 1
    list(counting.collect())
    assert stats.snapshot()[2]["cluster_addresses"] == 1
