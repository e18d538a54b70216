"""End to end over a cluster: one exporter on each node of the two-node test cluster (both
reading the same Kubernetes objects), one real Prometheus scraping both, and known traffic
between pods of different nodes, natively routed and through the VXLAN overlay. The network
overview's service map (its edges), the DNS and the HTTP panels, evaluated by Prometheus over
both exporters' series as Grafana would, must show that traffic once.

The panels show rates; with `rate(x[$__rate_interval])` replaced by `x` the same expressions
give the counts since the exporters started, which the test knows exactly."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests import monitoring
from tests.clusterexporters import (
    DAEMONSET,
    DNS_VIP,
    WEB_VIP,
    WORKLOADS,
    ClusterExporters,
    cluster_exporters,
)
from tests.exporter_process import ExporterProcess, wait_until
from tests.prometheus import Prometheus
from tests.testcluster import TestCluster
from tests.testnode import udp_send

pytestmark = pytest.mark.kernel

JOB = DAEMONSET
DATAGRAMS = [400] * 30
UDP_PORT, NGINX_PORT = 7401, 80
RATE = re.compile(r"rate\((.+?)\[\$__rate_interval\]\)")
OVERVIEW, DNS_DASHBOARD, HTTP_DASHBOARD = "network-overview.json", "dns.json", "http.json"


def counts(expr: str) -> str:
    """A panel's expression over counts since start instead of rates."""
    return RATE.sub(r"\1", expr)


def panel_expr(dashboard: str, title: str, ref: str | None = None, **variables: str) -> str:
    panel = next(p for p in monitoring.panels(monitoring.dashboards()[dashboard])
                 if p["title"] == title)
    target = next(t for t in panel["targets"] if ref is None or t.get("refId") == ref)
    return monitoring.fill(counts(target["expr"]), variables)


@dataclass
class Stack:
    exporters: ClusterExporters
    prometheus: Prometheus

    @property
    def cluster(self) -> TestCluster:
        return self.exporters.cluster

    def instance(self, node: int) -> str:
        process: ExporterProcess = self.exporters.processes[node]
        return f"{process.host}:{process.port}"

    def values(self, expr: str, *labels: str) -> dict[tuple[str, ...], float]:
        return {tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1])
                for r in self.prometheus.query(expr)}


@pytest.fixture(scope="module")
def stack(cluster: TestCluster) -> Iterator[Stack]:
    web, dns = cluster.pod("pod-2a"), cluster.pod("pod-2b")
    cluster.nginx(web.ns, web.ip, NGINX_PORT, {"/ok": 200, "/error": 500, "/busy": 503})
    cluster.dns_server(dns.ns, dns.ip, {"ok.test": web.ip, "nx.test": ""})
    cluster.add_cluster_ip(cluster.service_ip(DNS_VIP), 53, dns.ip, 53, proto="udp")
    cluster.add_cluster_ip(cluster.service_ip(WEB_VIP), NGINX_PORT, web.ip, NGINX_PORT)
    # node 2's exporter listens on its InternalIP: Prometheus, on node 1, scrapes it across
    # the uplink as it would scrape any node
    hosts = ["127.0.0.1", cluster.nodes[1].internal_ip]
    with cluster_exporters(cluster, hosts=hosts) as exporters:
        targets = [f"{p.host}:{p.port}" for p in exporters.processes]
        prometheus = Prometheus(cluster, cluster.nodes[0].ns, JOB, targets).wait_ready()
        wait_until(prometheus.targets_up, 30, "Prometheus to scrape both exporters",
                   interval=0.5)
        yield Stack(exporters, prometheus)


def dig(cluster: TestCluster, client: str, server: str, name: str) -> str:
    out = cluster.run(cluster.pod(client).ns, ["dig", "+time=2", "+tries=1", f"@{server}",
                                               name]).stdout
    match = re.search(r"status: (\w+)", out)
    return match.group(1) if match else "none"


def curl(cluster: TestCluster, client: str, url: str) -> int:
    return int(cluster.run(cluster.pod(client).ns, ["curl", "-s", "-o", "/dev/null", "-w",
                                                    "%{http_code}", url]).stdout)


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> dict[str, Any]:
    """The same traffic natively routed and through the overlay; what was sent."""
    cluster = stack.cluster
    frontend, web, dns = cluster.pod("pod-1a"), cluster.pod("pod-2a"), cluster.pod("pod-2b")
    # (the mode switch's own check echoes from pod-1a to pod-2a: the datagrams go elsewhere)
    sent: dict[str, Any] = {"datagrams": 0, "rcodes": {}, "statuses": {}}
    for mode in ("routed", "vxlan"):
        stack.exporters.route_via(mode)
        # the service map's dns -> frontend edge: these datagrams and nothing else
        assert udp_send(dns.ns, frontend.ns, frontend.ip, UDP_PORT, DATAGRAMS) == \
            len(DATAGRAMS)
        sent["datagrams"] += len(DATAGRAMS)
        # DNS and HTTP from the worker: straight to the pods, and through the ClusterIPs
        for server, name in ((dns.ip, "ok.test"), (dns.ip, "nx.test"),
                             (cluster.service_ip(DNS_VIP), "ok.test")):
            rcode = dig(cluster, "pod-1b", server, name)
            sent["rcodes"][rcode] = sent["rcodes"].get(rcode, 0) + 1
        for path in ("/ok", "/ok", "/error"):
            status = curl(cluster, "pod-1b", f"http://{web.ip}{path}")
            sent["statuses"][str(status)] = sent["statuses"].get(str(status), 0) + 1
        status = curl(cluster, "pod-1b", f"http://{cluster.service_ip(WEB_VIP)}/busy")
        sent["statuses"][str(status)] = sent["statuses"].get(str(status), 0) + 1
    stack.exporters.route_via("routed")
    assert sent["rcodes"] == {"NOERROR": 4, "NXDOMAIN": 2}
    assert sent["statuses"] == {"200": 4, "500": 2, "503": 2}
    return sent


def shop(workload: str) -> str:
    return f"{WORKLOADS_BY_NAME[workload]}/{workload}"


WORKLOADS_BY_NAME = {workload: namespace for namespace, workload in WORKLOADS.values()}


def test_the_service_map_edge_between_two_nodes_pods_is_the_traffic_once(
        stack: Stack, traffic: dict[str, Any]) -> None:
    expected = traffic["datagrams"] * (DATAGRAMS[0] + 28)
    edges = panel_expr(OVERVIEW, "Service map", "edges")
    edge = (shop("dns"), shop("frontend"))
    wait_until(lambda: stack.values(edges, "source", "target").get(edge) == expected, 30,
               f"the edge {edge} to read {expected} bytes")
    # the same sum by instance: node 2 sent it, node 1 counted none of it
    by_instance = stack.values(
        'sum by (instance) (ebpf_net_flow_bytes_total{src_workload="dns", '
        'dst_workload="frontend"})', "instance")
    assert by_instance == {(stack.instance(1),): expected}
    # the edge's bytes are all the frontend received from anyone but web (the switch's echo)
    received = panel_expr(OVERVIEW, "Received by workload", namespace="shop",
                          workload="frontend")
    from_web = stack.values('sum(ebpf_net_flow_bytes_total{src_workload="web", '
                            'dst_workload="frontend"})')[()]
    assert stack.values(received, "dst_workload")[("frontend",)] == expected + from_web


def test_the_dns_panels_show_each_query_once(stack: Stack, traffic: dict[str, Any]) -> None:
    rcodes = panel_expr(DNS_DASHBOARD, "Responses by rcode", namespace="infra", workload="dns")
    expected = {("NoError",): traffic["rcodes"]["NOERROR"],
                ("NXDomain",): traffic["rcodes"]["NXDOMAIN"]}
    wait_until(lambda: stack.values(rcodes, "rcode") == expected, 30,
               f"the DNS responses to read {expected}")
    clients = panel_expr(DNS_DASHBOARD, "Top clients", namespace="infra", workload="dns")
    assert stack.values(clients, "src_workload") == {("worker",): 6}
    # every answered query once in the latency histogram the quantile panels read
    latencies = panel_expr(DNS_DASHBOARD, "Latency quantiles", namespace="infra",
                           workload="dns")
    inner = re.search(r"sum by \(le\) \((.+)\)\)$", latencies)
    assert inner is not None, latencies
    buckets = stack.values(f"sum by (le) ({inner.group(1)})", "le")
    assert buckets[("+Inf",)] == 6


def test_the_http_panels_show_each_request_once(stack: Stack,
                                                traffic: dict[str, Any]) -> None:
    panel = panel_expr(HTTP_DASHBOARD, "Requests by workload and status", namespace="shop",
                       workload="web")
    expected = {("worker", "web", code): count for code, count in traffic["statuses"].items()}
    wait_until(lambda: stack.values(panel, "src_workload", "dst_workload", "status_code")
               == expected, 30, f"the HTTP requests to read {expected}")
    statuses = panel_expr(HTTP_DASHBOARD, "Requests by status", namespace="shop",
                          workload="web")
    assert stack.values(statuses, "status_code") == \
        {(code,): count for code, count in traffic["statuses"].items()}


def test_the_exporters_say_what_they_left_to_each_other(stack: Stack,
                                                        traffic: dict[str, Any]) -> None:
    left = stack.values('sum by (instance, signal) '
                        '(ebpf_net_exporter_counted_elsewhere_total)', "instance", "signal")
    node2 = stack.instance(1)
    # node 2 saw node 1's packets arrive, and its clients' queries and requests (Prometheus's
    # scrapes of node 2's exporter among them: HTTP from node 1)
    assert left[(node2, "flow_packets")] >= traffic["datagrams"]
    assert left[(node2, "dns_queries")] == sum(traffic["rcodes"].values())
    assert left[(node2, "http_requests")] >= sum(traffic["statuses"].values())
    # node 1 left nothing of the test's exchanges to node 2: its clients are its own
    node1 = stack.instance(0)
    assert left[(node1, "dns_queries")] == left[(node1, "http_requests")] == 0
    facing = stack.values("ebpf_net_exporter_network_interfaces", "instance")
    assert set(facing.values()) == {1}, facing          # the uplink, routed again


def test_the_exporter_health_panels_of_the_rule_return_data(
        stack: Stack, traffic: dict[str, Any]) -> None:
    queries = [query for query in monitoring.panel_queries()
               if monitoring.source_metrics(query.expr) & monitoring.CLUSTER_METRICS]
    assert len(queries) == 3
    for query in queries:
        expr = monitoring.fill(query.expr, rate_interval="10s")
        wait_until(lambda e=expr: stack.prometheus.query(e), 30, f"data for {query.where}")
    left = next(q for q in queries if "counted_elsewhere" in q.expr)
    by_instance = {r["metric"]["instance"] for r in
                   stack.prometheus.query(monitoring.fill(left.expr, rate_interval="1h"))}
    assert by_instance == {stack.instance(0), stack.instance(1)}
