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
from pathlib import Path
from typing import Any

import pytest

from lab import kubeapi
from lab.clusterexporters import (
    DAEMONSET,
    DNS_VIP,
    WEB_VIP,
    WORKLOADS,
    ZONES,
    ClusterExporters,
    cluster_exporters,
)
from lab.exporter_process import ExporterProcess, wait_until
from lab.prometheus import Prometheus, set_threshold, shortened_rules
from lab.testcluster import TestCluster
from lab.testnode import udp_send
from tests import monitoring

pytestmark = pytest.mark.kernel

JOB = DAEMONSET
DATAGRAMS = [400] * 30
UDP_PORT, NGINX_PORT = 7401, 80
RATE = re.compile(r"rate\((.+?)\[\$__rate_interval\]\)")
OVERVIEW, DNS_DASHBOARD, HTTP_DASHBOARD = "network-overview.json", "dns.json", "http.json"
RULE_WINDOW = "10s"
RULE_RATE = re.compile(r"rate\((.+?)\[" + RULE_WINDOW + r"\]\)", re.DOTALL)
CROSS_ZONE_ALERT = "EbpfNetCrossZoneTrafficHigh"
CROSS_ZONE_THRESHOLD = 300_000      # bytes/s over the 10 s window: 3 MB in it
BURST = [1200] * 8000               # 9.8 MB of datagrams, sent as fast as they go


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
    # the zone rules, their 5 m windows and `for` shortened, the alert's threshold lowered
    rules = shortened_rules([monitoring.ALERTS / "zones.yaml"], Path(cluster.tmpdir),
                            window=RULE_WINDOW)
    set_threshold(rules[0], CROSS_ZONE_ALERT, CROSS_ZONE_THRESHOLD)
    with cluster_exporters(cluster, hosts=hosts) as exporters:
        # a second pod of web, scheduled on node 1 and waiting for its address: the Service
        # web has backends in both zones now, and the zone of a connection to its ClusterIP
        # is that of the backend that answered it
        exporters.create("pods", kubeapi.pod("shop", "web-1", [], owner=("StatefulSet", "web"),
                                             node=cluster.nodes[0].name, labels={"app": "web"},
                                             phase="Pending", ready=False))
        targets = [f"{p.host}:{p.port}" for p in exporters.processes]
        prometheus = Prometheus(cluster, cluster.nodes[0].ns, JOB, targets,
                                rules).wait_ready()
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
    node2 = stack.instance(1)

    def left_by_node2() -> dict[tuple[str, ...], float] | None:
        """Once node 2's latest scrape holds the test's last exchanges (it may lag node 1's
        by a scrape)."""
        left = stack.values('sum by (instance, signal) '
                            '(ebpf_net_exporter_counted_elsewhere_total)', "instance", "signal")
        done = left.get((node2, "dns_queries"), 0) >= sum(traffic["rcodes"].values()) and \
            left.get((node2, "http_requests"), 0) >= sum(traffic["statuses"].values())
        return left if done else None

    left = wait_until(left_by_node2, 30, "node 2 to say what it left to node 1")
    # node 2 saw node 1's packets arrive, and its clients' queries and requests (Prometheus's
    # scrapes of node 2's exporter among them: HTTP from node 1)
    assert left[(node2, "flow_packets")] >= traffic["datagrams"]
    assert left[(node2, "dns_queries")] == sum(traffic["rcodes"].values())
    assert left[(node2, "http_requests")] >= sum(traffic["statuses"].values())
    # node 1 left nothing of the test's exchanges to node 2: its clients are its own
    node1 = stack.instance(0)
    assert left[(node1, "dns_queries")] == left[(node1, "http_requests")] == 0
    # the uplink, routed again (each exporter read the routes before the traffic fixture
    # returned; Prometheus's latest sample of it may be a scrape older)
    facing: dict[tuple[str, ...], float] = {}

    def routed_again() -> bool:
        facing.update(stack.values("ebpf_net_exporter_network_interfaces", "instance"))
        return set(facing.values()) == {1}

    wait_until(routed_again, 10, "one interface facing the network on each node")


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


def rule_counts(record: str) -> str:
    """A recording rule's expression over counts since start instead of rates (the rules it
    reads, recorded by Prometheus, stay rates: here they only select pairs)."""
    expr = next(r.spec["expr"] for r in monitoring.rules() if r.name == record)
    return RULE_RATE.sub(r"\1", expr.replace("[5m]", f"[{RULE_WINDOW}]"))


def test_the_cross_zone_rules_and_panels_show_the_bytes_sent_across_zones_once(
        stack: Stack, traffic: dict[str, Any]) -> None:
    expected = traffic["datagrams"] * (DATAGRAMS[0] + 28)
    pair = ("infra", "dns", ZONES[1], "shop", "frontend", ZONES[0])
    labels = ("src_namespace", "src_workload", "src_zone", "dst_namespace", "dst_workload",
              "dst_zone")
    by_workload = rule_counts("ebpf_net:flow_bytes_cross_zone_by_workload:rate5m")
    wait_until(lambda: stack.values(by_workload, *labels).get(pair) == expected, 30,
               f"the cross-zone pair {pair} to read {expected} bytes")
    # what crossed zones is between the two nodes' ends only: no pair within one zone
    pairs = stack.values(by_workload, *labels)
    assert all(src_zone != dst_zone for _, _, src_zone, _, _, dst_zone in pairs), pairs
    # the panel of the zone pairs, narrowed to the dns workload, reads the sum of its pairs
    # (the datagrams, and its answers to the worker's queries)
    panel = panel_expr(OVERVIEW, "Cross-zone traffic by zone pair", namespace="infra",
                       workload="dns")
    from_dns = sum(value for key, value in pairs.items() if key[:2] == ("infra", "dns"))
    assert stack.values(panel, "src_zone", "dst_zone") == {(ZONES[1], ZONES[0]): from_dns}
    assert from_dns > expected
    # node 2 sent them: the sum over both exporters is node 2's count, not twice it
    by_instance = stack.values(
        'sum by (instance) (ebpf_net_flow_bytes_total{src_workload="dns", '
        f'dst_workload="frontend", src_zone="{ZONES[1]}", dst_zone="{ZONES[0]}"}})',
        "instance")
    assert by_instance == {(stack.instance(1),): expected}


def test_the_cross_zone_alert_fires_past_its_threshold_and_not_before(
        stack: Stack, traffic: dict[str, Any]) -> None:
    cluster = stack.cluster
    frontend, dns = cluster.pod("pod-1a"), cluster.pod("pod-2b")
    ours = {"src_namespace": "infra", "src_workload": "dns", "src_zone": ZONES[1],
            "dst_namespace": "shop", "dst_workload": "frontend", "dst_zone": ZONES[0]}

    def ours_active() -> list[dict[str, Any]]:
        return [a for a in stack.prometheus.active_alerts()
                if a["labels"].get("alertname") == CROSS_ZONE_ALERT
                and all(a["labels"].get(k) == v for k, v in ours.items())]

    rate = 'ebpf_net:flow_bytes_cross_zone_by_workload:rate5m{src_workload="dns"}'
    wait_until(lambda: stack.prometheus.query(rate), 30, "the recorded cross-zone rate")
    # the test's datagrams so far are far below the threshold: nothing pending or firing
    assert float(stack.prometheus.query(rate)[0]["value"][1]) < CROSS_ZONE_THRESHOLD
    assert ours_active() == []
    assert udp_send(dns.ns, frontend.ns, frontend.ip, UDP_PORT, BURST) == len(BURST)
    wait_until(lambda: any(a["state"] == "firing" for a in ours_active()), 30,
               f"{CROSS_ZONE_ALERT} to fire for dns -> frontend")
    (alert,) = ours_active()
    assert alert["labels"]["severity"] == "info"
    assert float(alert["value"]) > CROSS_ZONE_THRESHOLD


def test_connections_to_a_service_across_zones_take_their_backends_zone(
        stack: Stack, traffic: dict[str, Any]) -> None:
    # the worker (zone a) reached web (zone b) directly and through the ClusterIP of the
    # Service web, whose backends span both zones: every byte it sent reads web's zone
    sent = 'sum by (dst_zone) (ebpf_net_flow_bytes_total{src_workload="worker", ' \
        'dst_workload="web", dst_service="web"})'
    assert stack.values(sent, "dst_zone").keys() == {(ZONES[1],)}
    # ... and the requests through the ClusterIP are among them: the 503s come only that way
    busy = 'sum(ebpf_net_http_requests_total{src_workload="worker", status_code="503"})'
    assert stack.values(busy) == {(): traffic["statuses"]["503"]}
