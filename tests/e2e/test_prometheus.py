"""End to end: the exporter on a test node with real traffic (HTTP, gRPC, DNS, TCP bulk,
refused connections) and Kubernetes labels (the node's pods registered in a test API server), a real
Prometheus scraping it every second with the rule files of alerts/ loaded
(`for` shortened to 2 s and 5 m windows to 10 s), then

- no alert on healthy traffic;
- faults on purpose, one at a time, each making exactly its alert go pending and then
  firing, no other alert active meanwhile:
  nftables dropping a share of a bulk transfer's packets (retransmits), a DNS server answering
  ServFail, an HTTP server answering 500, a gRPC server answering UNAVAILABLE, a forbidden
  Kubernetes watch, the exporter stopped;
- every dashboard panel query (variables filled in: All, and one workload) and every rule
  expression evaluated through Prometheus's HTTP API: no error, and data; every template
  variable lists the test's namespaces and workloads.

The tests of this module run in file order on one node, one exporter and one Prometheus."""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lab import dnstools, kubeapi
from lab.exporter_process import ExporterProcess, wait_until
from lab.httptools import RawServer
from lab.kubeapi import KubeAPI
from lab.prometheus import Prometheus, set_threshold, shortened_rules
from lab.testnode import TestNode, connect_refused, in_netns, tcp_transfer
from tests import monitoring

pytestmark = pytest.mark.kernel

JOB = "ebpf-net-exporter"
HTTP_PORT, HTTP_500_PORT, BULK_PORT, CLOSED_PORT, GRPC_PORT = 8080, 8081, 5001, 9, 50051
GRPC_PEER = str(Path(__file__).parents[1] / "kernel" / "grpc_peer.py")
BULK_BYTES = 8 << 20
RATE_INTERVAL = "10s"        # what Grafana's $__rate_interval would be at a 1 s scrape, roughly
RULE_WINDOW = "10s"          # the rules' 5 m windows, so a fault shows (and clears) in seconds
HTTP_500 = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
# Kubernetes names the test API server gives the test node's pods
CLIENT, SERVER = ("web", "front"), ("shop", "api")
SERVER_LABELS = {"dst_namespace": SERVER[0], "dst_workload": SERVER[1]}
NODE_NAME = "test-node"
OTHER_NODE = "test-node-b"
# a name pod a resolves, for an address outside the cluster it then sends a datagram to (the
# node has no route there: the datagram is counted leaving pod a, then dropped)
EXTERNAL_NAME, EXTERNAL_IP, EXTERNAL_PORT = "ok.test", "192.0.2.1", 443
OURS = (CLIENT[1], SERVER[1], NODE_NAME)
THRESHOLD = re.compile(r"\s*(?:>|==)\s*[0-9.]+\b")


@dataclass
class Traffic:
    """Loops of real traffic from pod a to pod b (and the node) until stopped. `faults` adds
    traffic to the faulty servers: "dns" (ServFail), "http" (500), "grpc" (UNAVAILABLE: a
    gRPC client of its own in pod a calls on its own loop, and asks for it while `fault_file`
    exists)."""

    node: TestNode
    faults: set[str] = field(default_factory=set)
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    iterations: int = 0
    fault_file: Path | None = None

    def start(self) -> None:
        for loop in (self._requests, self._bulk):
            threading.Thread(target=self._guard, args=(loop,), daemon=True).start()

    def _guard(self, loop) -> None:
        try:
            loop()
        except BaseException as e:
            self.errors.append(e)

    def _http_get(self, port: int, path: str) -> int:
        with in_netns(self.node.a_ns):
            conn = http.client.HTTPConnection(self.node.b_ip, port, timeout=5)
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                return response.status
            except TimeoutError as e:   # say which exchange, should it ever happen again
                raise TimeoutError(f"GET {path} from {self.node.b_ip}:{port}: no answer in 5 s "
                                   f"(iteration {self.iterations})") from e
            finally:
                conn.close()

    def _dns(self, server: str, name: str, qid: int) -> None:
        with in_netns(self.node.a_ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with sock:
            sock.settimeout(2)
            sock.sendto(dnstools.message(qid, name), (server, 53))
            try:
                sock.recv(512)
            except TimeoutError as e:
                raise TimeoutError(f"DNS query {qid} for {name} to {server}: no answer in 2 s "
                                   f"(iteration {self.iterations})") from e

    def _requests(self) -> None:
        node = self.node
        # one query nobody answers (dnsmasq listens on pod b's IPv4 address only), so the
        # timeouts series exists (a fault of its own would take dns.timeout to show)
        with in_netns(node.a_ns):
            lost = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        with lost:
            lost.sendto(dnstools.message(1, "lost.test"), (node.b_ip6, 53))
        while not self.stop.wait(0.05):
            i = self.iterations = self.iterations + 1
            assert self._http_get(HTTP_PORT, "/index.html") == 200
            self._dns(node.b_ip, "nx.test" if i % 5 == 0 else EXTERNAL_NAME, i & 0xFFFF)
            if i % 10 == 1:
                with in_netns(node.a_ns), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
                    out.sendto(b"ping", (EXTERNAL_IP, EXTERNAL_PORT))
            if "http" in self.faults:
                assert self._http_get(HTTP_500_PORT, "/") == 500
            if "dns" in self.faults:
                self._dns(node.node_ip_b, "ok.test", (i + 1) & 0xFFFF)
            if self.fault_file is not None:
                if "grpc" in self.faults:
                    self.fault_file.touch()
                else:
                    self.fault_file.unlink(missing_ok=True)
            if i % 40 == 0:
                connect_refused(node.a_ns, node.b_ip, CLOSED_PORT, 1)

    def _bulk(self) -> None:
        while not self.stop.is_set():
            try:
                tcp_transfer(self.node.a_ns, self.node.b_ns, self.node.b_ip, BULK_PORT,
                             BULK_BYTES)
            except TimeoutError as e:
                raise TimeoutError(f"bulk transfer to {self.node.b_ip}:{BULK_PORT}: {e}") from e

    def check(self) -> None:
        assert not self.errors, f"traffic failed: {self.errors[0]!r}"


@dataclass
class Stack:
    node: TestNode
    exporter: ExporterProcess
    prometheus: Prometheus
    traffic: Traffic
    api: KubeAPI

    def active(self) -> dict[str, set[str]]:
        """alertname -> states of the active alerts about this test's endpoints. The TCP
        tracepoints see every socket of the machine, other tests' included, which show as
        workload "external": alerts about those are not this test's business."""
        self.traffic.check()
        active: dict[str, set[str]] = {}
        for alert in self.prometheus.active_alerts():
            labels = alert["labels"]
            if labels.get("dst_workload", OURS[0]) in OURS:
                active.setdefault(labels["alertname"], set()).add(alert["state"])
        return active

    def wait_quiet(self, timeout: float = 40) -> None:
        """No alert active for three rule evaluations in a row."""
        quiet = [0]

        def three_quiet() -> bool:
            quiet[0] = quiet[0] + 1 if not self.active() else 0
            return quiet[0] >= 3

        try:
            wait_until(three_quiet, timeout, "no active alert", interval=1)
        except AssertionError as e:
            raise AssertionError(f"{e}; active: {self.active()}") from None

    def wait_only(self, alertname: str, timeout: float = 40) -> dict[str, set[str]]:
        """Polls until `alertname` fires (pending first, then firing once its shortened `for`
        has passed), failing as soon as any other alert is active meanwhile; returns the
        active alerts when it fires."""
        seen: list[dict[str, set[str]]] = [{}]

        def fired() -> bool:
            seen[0] = self.active()
            others = set(seen[0]) - {alertname}
            assert not others, f"other alerts active while waiting for {alertname}: {seen[0]}"
            return "firing" in seen[0].get(alertname, set())

        try:
            wait_until(fired, timeout, f"{alertname} to fire", interval=0.5)
        except AssertionError as e:
            raise AssertionError(f"{e}; active: {seen[0]}") from None
        return seen[0]

    def firing_labels(self, alertname: str) -> list[dict[str, str]]:
        """The labels of each firing alert of that name about this test's endpoints, without
        alertname and severity (checked against the rule file)."""
        rule = next(r for r in monitoring.alerts() if r.name == alertname)
        out = []
        for alert in self.prometheus.active_alerts():
            labels = dict(alert["labels"])
            if labels.get("dst_workload", OURS[0]) not in OURS:
                continue
            if labels.pop("alertname") == alertname and alert["state"] == "firing":
                assert labels.pop("severity") == rule.spec["labels"]["severity"]
                assert alert["annotations"]["summary"] == rule.spec["annotations"]["summary"]
                out.append(labels)
        return out


def register_pods(api: KubeAPI, node: TestNode) -> None:
    """Pod a is web/front, pod b shop/api (Deployments, through their ReplicaSets); the node
    addresses are the node test-node, in zone-a. Pod b is registered on a node of zone-b, so
    that the zone rules and panels have traffic across zones (the exporter of test-node sees
    it all: without its own pod's name it counts once per node)."""
    for (namespace, workload), ips, on in ((CLIENT, [node.a_ip, node.a_ip6], NODE_NAME),
                                           (SERVER, [node.b_ip, node.b_ip6], OTHER_NODE)):
        replicaset = f"{workload}-5d8f7"
        api.create("replicasets", kubeapi.replicaset(namespace, replicaset, workload))
        api.create("pods", kubeapi.pod(namespace, f"{replicaset}-x2x9z", ips,
                                       owner=("ReplicaSet", replicaset), node=on))
    api.create("nodes", kubeapi.node(NODE_NAME, [node.node_ip_a, node.node_ip_b], zone="zone-a"))
    api.create("nodes", kubeapi.node(OTHER_NODE, [], zone="zone-b"))


@pytest.fixture(scope="module")
def stack(kernel_ready, tmp_path_factory) -> Iterator[Stack]:
    rules_dir = tmp_path_factory.mktemp("rules")
    rules = shortened_rules([monitoring.ALERTS / name for name in monitoring.RULE_FILES],
                            rules_dir, window=RULE_WINDOW)
    # the bulk transfers from pod a to pod b cross zones far above the cross-zone alert's
    # threshold all the time: here it stays out of the way of the other alerts, and
    # tests/e2e/test_prometheus_cluster.py fires it
    set_threshold(rules_dir / "zones.yaml", "EbpfNetCrossZoneTrafficHigh", 1e15)
    with TestNode() as node, contextlib.ExitStack() as stack:
        api = stack.enter_context(KubeAPI(node.node_ns))
        register_pods(api, node)
        # thousands of short client connections a minute: reuse TIME_WAIT ports
        node.run(node.a_ns, ["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
        node.http_server(node.b_ns, node.b_ip, HTTP_PORT)
        node.dns_server(node.b_ns, node.b_ip, {EXTERNAL_NAME: EXTERNAL_IP, "nx.test": ""})
        servfail = dnstools.Upstream(node.node_ns, node.node_ip_b, 53, rcode=2)
        stack.callback(servfail.close)
        errors = RawServer(node.b_ns, node.b_ip, HTTP_500_PORT, HTTP_500)
        stack.callback(errors.close)
        grpc_server = node.spawn(node.b_ns, [sys.executable, GRPC_PEER, "serve", node.b_ip,
                                             str(GRPC_PORT)], stdout=subprocess.PIPE, text=True)
        assert grpc_server.stdout is not None and grpc_server.stdout.readline().strip() == "ready"
        exporter = stack.enter_context(ExporterProcess(
            node, ["--kubeconfig", str(api.kubeconfig), "--node-name", NODE_NAME],
            config={"labels": {"external_names": [EXTERNAL_NAME]}}))
        exporter.wait_ready()
        prometheus = Prometheus(node, node.node_ns, JOB, [f"127.0.0.1:{exporter.port}"],
                                rules).wait_ready()
        traffic = Traffic(node, fault_file=tmp_path_factory.mktemp("grpc") / "unavailable")
        traffic.start()
        stack.callback(traffic.stop.set)
        # gRPC (HTTP/2 in clear) from pod a, on a loop of its own; stopped with the node
        node.spawn(node.a_ns, [sys.executable, GRPC_PEER, "loop", node.b_ip, str(GRPC_PORT),
                               str(traffic.fault_file)])
        wait_until(prometheus.targets_up, 30, "Prometheus to scrape the exporter", interval=0.5)
        yield Stack(node, exporter, prometheus, traffic, api)


def test_healthy_traffic_fires_no_alert(stack):
    wait_until(lambda: stack.prometheus.query('sum(rate(ebpf_net_http_requests_total[10s])) > 5'),
               30, "HTTP traffic in Prometheus", interval=0.5)
    stack.wait_quiet()
    assert stack.prometheus.query('ebpf_net_exporter_scrape_collector_success == 1')


def test_dropped_packets_fire_the_retransmit_alert_only(stack):
    node = stack.node
    node.nft(node.node_ns, f"""
table inet ebpf_net_e2e {{
    chain forward {{
        type filter hook forward priority 0;
        tcp dport {BULK_PORT} numgen random mod 100 < 20 drop
    }}
}}
""")
    try:
        active = stack.wait_only("EbpfNetTCPRetransmitRatioHigh")
        ratio = stack.prometheus.query("ebpf_net:tcp_retransmit_ratio:rate5m")
    finally:
        node.run(node.node_ns, ["nft", "delete", "table", "inet", "ebpf_net_e2e"])
    assert set(active) == {"EbpfNetTCPRetransmitRatioHigh"}
    assert stack.firing_labels("EbpfNetTCPRetransmitRatioHigh") == [SERVER_LABELS]
    assert float(ratio[0]["value"][1]) > 0.01
    stack.wait_quiet()


@pytest.mark.parametrize("fault, alert, labels, errors", [
    # the ServFail server listens on the node's address: the node is its workload
    ("dns", "EbpfNetDNSErrorRatioHigh", {"dst_workload": NODE_NAME},
     'sum(ebpf_net_dns_responses_total{rcode="ServFail"})'),
    ("http", "EbpfNetHTTPErrorRatioHigh", SERVER_LABELS,
     'sum(ebpf_net_http_requests_total{status_code="500"})'),
    ("grpc", "EbpfNetGRPCErrorRatioHigh", SERVER_LABELS,
     'sum(ebpf_net_grpc_requests_total{grpc_status="UNAVAILABLE"})'),
], ids=["dns-servfail", "http-500", "grpc-unavailable"])
def test_error_responses_fire_their_error_alert_only(stack, fault, alert, labels, errors):
    stack.traffic.faults.add(fault)
    try:
        active = stack.wait_only(alert)
    finally:
        stack.traffic.faults.discard(fault)
    assert set(active) == {alert}
    assert stack.firing_labels(alert) == [labels]
    assert float(stack.prometheus.query(errors)[0]["value"][1]) > 0
    stack.wait_quiet()


def test_a_forbidden_watch_fires_the_kubernetes_watch_alert_only(stack):
    stack.api.forbidden.add("jobs")
    stack.api.drop_watches()
    try:
        active = stack.wait_only("EbpfNetKubernetesWatchFailing")
    finally:
        stack.api.forbidden.discard("jobs")
    assert set(active) == {"EbpfNetKubernetesWatchFailing"}
    # cutting the watches may count an error for every kind; jobs is among them
    instance = f"127.0.0.1:{stack.exporter.port}"
    assert {"job": JOB, "instance": instance, "kind": "jobs"} in \
        stack.firing_labels("EbpfNetKubernetesWatchFailing")
    stack.wait_quiet()


def opened(expr: str) -> str:
    """An alert's expression with its thresholds opened (`x > 0.05` -> `x > -Inf`), so it
    returns data whenever what it compares exists."""
    return THRESHOLD.sub(" > -Inf", expr)


def all_queries() -> list[tuple[str, str]]:
    queries = [(q.where, monitoring.fill(q.expr, rate_interval=RATE_INTERVAL))
               for q in monitoring.panel_queries()]
    for rule in monitoring.rules():
        expr = rule.spec["expr"].replace("[5m]", f"[{RATE_INTERVAL}]")
        if "record" in rule.spec:
            queries.append((f"{rule.file} {rule.name} (recorded)", rule.name))
            queries.append((f"{rule.file} {rule.name}", expr))
        else:
            queries.append((f"{rule.file} {rule.name} (threshold opened)", opened(expr)))
    # the drops and bash collectors are opt-in and off here, one node counts once per node and
    # serves its metrics without Kubernetes authentication
    left_out = monitoring.OPT_IN_METRICS | monitoring.CLUSTER_METRICS | monitoring.AUTH_METRICS
    return [(where, expr) for where, expr in queries
            if not monitoring.source_metrics(expr) & left_out]


def test_every_dashboard_query_and_rule_expression_returns_data(stack):
    """After the faults every series exists (retransmits, ServFail, 500s), idle ones at 0."""
    queries = all_queries()
    empty: list[str] = []

    def all_have_data() -> bool:
        empty[:] = [f"{where}: {expr}" for where, expr in queries
                    if not stack.prometheus.query(expr)]
        return not empty

    with contextlib.suppress(AssertionError):
        wait_until(all_have_data, 20, "data for every query", interval=1)
    assert empty == []
    assert len(queries) > 80


def test_every_template_variable_lists_the_test_pods(stack):
    for name in monitoring.WORKLOAD_DASHBOARDS:
        variables = monitoring.variables(monitoring.dashboards()[name])
        selector, label = monitoring.variable_query(variables["namespace"])
        side = label.split("_")[0]
        namespace, workload = CLIENT if side == "src" else SERVER
        values = {s.get(label) for s in stack.prometheus.series(monitoring.fill(selector))}
        assert namespace in values, (name, label, values)
        selector, label = monitoring.variable_query(variables["workload"])
        filled = monitoring.fill(selector, {"namespace": namespace})
        values = {s.get(label) for s in stack.prometheus.series(filled)}
        assert workload in values, (name, label, values)


def test_panel_queries_narrowed_to_one_workload_return_data(stack):
    empty = []
    for name in monitoring.WORKLOAD_DASHBOARDS:
        dashboard = monitoring.dashboards()[name]
        _, label = monitoring.variable_query(monitoring.variables(dashboard)["namespace"])
        namespace, workload = CLIENT if label.startswith("src") else SERVER
        for panel in monitoring.panels(dashboard):
            for target in panel["targets"]:
                expr = monitoring.fill(target["expr"], {"namespace": namespace,
                                                        "workload": workload},
                                       RATE_INTERVAL)
                if "$namespace" in target["expr"] and not stack.prometheus.query(expr):
                    empty.append(f"{name} / {panel['title']}: {expr}")
    assert empty == []


def test_a_stopped_exporter_fires_the_exporter_down_alert_only(stack):
    stack.exporter.stop()
    active = stack.wait_only("EbpfNetExporterDown")
    assert set(active) == {"EbpfNetExporterDown"}
    assert stack.firing_labels("EbpfNetExporterDown") == [
        {"job": JOB, "instance": f"127.0.0.1:{stack.exporter.port}"}]
    assert stack.prometheus.query(f'up{{job="{JOB}"}} == 0')
