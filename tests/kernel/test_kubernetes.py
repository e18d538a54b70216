"""Kubernetes labels end to end: the test node's pod namespaces registered as pods of two
namespaces and three workloads in the test API server, real traffic between them, and the
scraped metrics carrying the right src_*/dst_* names, with an allowlist folding the excluded
namespace to `other` while the totals stay exact."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab import kubeapi
from lab.exporter_process import ExporterProcess, Scrape
from lab.kubeapi import KubeAPI
from lab.testnode import TestNode, tcp_connections, udp_send

pytestmark = pytest.mark.kernel

IPV4_UDP_HEADERS = 28
DATAGRAMS = [200] * 40
FRONTEND_POD = "frontend-6f7d-x2x9k"


@pytest.fixture(scope="module")
def second_address(node: TestNode) -> str:
    """A second address on pod a's interface: the pod of another workload."""
    address = node.a_ip.rsplit(".", 1)[0] + ".3"
    node.run(node.a_ns, ["ip", "addr", "add", f"{address}/24", "dev", "eth0"])
    return address


@pytest.fixture(scope="module")
def cluster(node: TestNode, second_address: str) -> Iterator[KubeAPI]:
    with KubeAPI(netns=node.node_ns) as api:
        api.create("replicasets", kubeapi.replicaset("shop", "frontend-6f7d", "frontend"))
        api.create("pods", kubeapi.pod("shop", FRONTEND_POD, [node.a_ip, node.a_ip6],
                                       owner=("ReplicaSet", "frontend-6f7d"),
                                       labels={"app": "frontend"}))
        api.create("pods", kubeapi.pod("shop", "db-0", [node.b_ip, node.b_ip6],
                                       owner=("StatefulSet", "db"), labels={"app": "db"}))
        api.create("services", kubeapi.service("shop", "db", {"app": "db"}))
        api.create("jobs", kubeapi.job("batch", "report-29", "report"))
        api.create("pods", kubeapi.pod("batch", "report-29-q8w7e", [second_address],
                                       owner=("Job", "report-29")))
        yield api


@pytest.fixture(scope="module")
def k8s_exporter(node: TestNode, cluster: KubeAPI) -> Iterator[ExporterProcess]:
    config = {"labels": {"namespace_allow": ["shop"], "pod_namespaces": ["shop"]}}
    process = ExporterProcess(node, ["--kubeconfig", str(cluster.kubeconfig),
                                     "--node-name", "node-1"], config=config)
    try:
        process.wait_ready()
        process.wait_for(lambda s: s.value("ebpf_net_exporter_k8s_objects", kind="pods") == 3,
                         "the exporter to list the test pods")
        yield process
    finally:
        code = process.stop()
        assert code == 0, f"exporter exited with {code}:\n{process.log()}"


DB = {"dst_namespace": "shop", "dst_workload": "db", "dst_workload_kind": "StatefulSet",
      "dst_service": "db", "dst_pod": "db-0"}
FRONTEND = {"src_namespace": "shop", "src_workload": "frontend",
            "src_workload_kind": "Deployment", "src_service": "", "src_pod": FRONTEND_POD}


def udp_flow(scrape: Scrape, metric: str, port: int, **labels: str) -> float:
    return scrape.value(f"ebpf_net_flow_{metric}_total", protocol="udp", dst_port=str(port),
                        **labels)


def test_flows_carry_both_ends_names(node: TestNode, k8s_exporter: ExporterProcess) -> None:
    port = 7101
    assert udp_send(node.a_ns, node.b_ns, node.b_ip, port, DATAGRAMS) == len(DATAGRAMS)
    scrape = k8s_exporter.wait_for(
        lambda s: udp_flow(s, "packets", port) >= len(DATAGRAMS), "the datagrams")
    assert udp_flow(scrape, "packets", port, **FRONTEND, **DB) == len(DATAGRAMS)
    assert udp_flow(scrape, "bytes", port, **FRONTEND, **DB) == \
        sum(DATAGRAMS) + len(DATAGRAMS) * IPV4_UDP_HEADERS
    sample = scrape.select("ebpf_net_flow_packets_total", dst_port=str(port))[0]
    # Kubernetes on: names instead of addresses; the address type stays
    assert "src_ip" not in sample.labels and "dst_ip" not in sample.labels
    assert sample.labels["src_ip_type"] == "private"


def test_ipv6_address_of_a_pod_resolves_to_the_same_pod(
        node: TestNode, k8s_exporter: ExporterProcess) -> None:
    port = 7102
    assert udp_send(node.a_ns, node.b_ns, node.b_ip6, port, DATAGRAMS) == len(DATAGRAMS)
    scrape = k8s_exporter.wait_for(
        lambda s: udp_flow(s, "packets", port, family="ipv6") >= len(DATAGRAMS),
        "the IPv6 datagrams")
    assert udp_flow(scrape, "packets", port, family="ipv6", **FRONTEND, **DB) == len(DATAGRAMS)


def test_namespace_not_allowed_reads_other_and_totals_stay_exact(
        node: TestNode, k8s_exporter: ExporterProcess, second_address: str) -> None:
    port = 7103
    assert udp_send(node.a_ns, node.b_ns, node.b_ip, port, DATAGRAMS,
                    source=second_address) == len(DATAGRAMS)
    scrape = k8s_exporter.wait_for(
        lambda s: udp_flow(s, "packets", port) >= len(DATAGRAMS), "the batch datagrams")
    folded = {"src_namespace": "other", "src_workload": "other", "src_pod": ""}
    assert udp_flow(scrape, "packets", port, **folded, **DB) == len(DATAGRAMS)
    assert udp_flow(scrape, "bytes", port, **folded, **DB) == \
        sum(DATAGRAMS) + len(DATAGRAMS) * IPV4_UDP_HEADERS
    assert udp_flow(scrape, "packets", port) == len(DATAGRAMS)      # nothing elsewhere
    assert not scrape.select("ebpf_net_flow_packets_total", src_namespace="batch")


def test_tcp_connections_carry_client_and_server_names(
        node: TestNode, k8s_exporter: ExporterProcess) -> None:
    port, count = 7104, 3
    tcp_connections(node.a_ns, node.b_ns, node.b_ip, port, count)
    labels = {**FRONTEND, **DB, "dst_port": str(port)}
    scrape = k8s_exporter.wait_for(
        lambda s: s.value("ebpf_net_tcp_connections_closed_total", role="server",
                          **labels) >= count, "the connections to close")
    for role in ("client", "server"):
        assert scrape.value("ebpf_net_tcp_connections_opened_total", role=role,
                            **labels) == count


def test_node_address_resolves_to_this_node(node: TestNode,
                                            k8s_exporter: ExporterProcess) -> None:
    port = 7105
    assert udp_send(node.node_ns, node.a_ns, node.a_ip, port, DATAGRAMS,
                    source=node.node_ip_a) == len(DATAGRAMS)
    scrape = k8s_exporter.wait_for(
        lambda s: udp_flow(s, "packets", port) >= len(DATAGRAMS), "the node's datagrams")
    assert udp_flow(scrape, "packets", port, src_namespace="", src_workload="node-1",
                    src_workload_kind="Node", src_node="node-1", dst_workload="frontend") \
        == len(DATAGRAMS)


def test_cache_size_is_reported(k8s_exporter: ExporterProcess) -> None:
    scrape = k8s_exporter.scrape()
    objects = {s.labels["kind"]: s.value for s in scrape.select("ebpf_net_exporter_k8s_objects")}
    assert objects == {"pods": 3, "services": 1, "nodes": 0, "replicasets": 1, "jobs": 1}
    assert scrape.value("ebpf_net_exporter_k8s_watch_errors_total") == 0


def test_sighup_applies_new_allowlists_without_losing_counts(
        node: TestNode, k8s_exporter: ExporterProcess, second_address: str) -> None:
    import signal

    import yaml

    from lab.exporter_process import wait_until

    exporter, port = k8s_exporter, 7106
    path = exporter.workdir / "config.yaml"
    original = path.read_text()

    def reload(config_text: str, reloads: int) -> None:
        path.write_text(config_text)
        exporter.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: exporter.log().count("configuration reloaded") == reloads, 10,
                   "the reload")

    assert udp_send(node.a_ns, node.b_ns, node.b_ip, port, DATAGRAMS,
                    source=second_address) == len(DATAGRAMS)
    exporter.wait_for(lambda s: udp_flow(s, "packets", port, src_namespace="other")
                      == len(DATAGRAMS), "the batch datagrams, folded")
    config = yaml.safe_load(original)
    config["labels"]["namespace_allow"] = ["shop", "batch"]
    try:
        reload(yaml.safe_dump(config), 1)
        assert udp_send(node.a_ns, node.b_ns, node.b_ip, port, DATAGRAMS,
                        source=second_address) == len(DATAGRAMS)
        scrape = exporter.wait_for(
            lambda s: udp_flow(s, "packets", port, src_namespace="batch") == len(DATAGRAMS),
            "the batch datagrams under their own name")
        # the folded series keeps what it counted before: nothing counted twice or lost
        assert udp_flow(scrape, "packets", port, src_namespace="other") == len(DATAGRAMS)
        assert udp_flow(scrape, "packets", port, src_workload="report",
                        src_workload_kind="CronJob") == len(DATAGRAMS)
        assert "after a restart" not in exporter.log()
    finally:
        reload(original, 2)
