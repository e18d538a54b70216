"""Endpoint labels with Kubernetes names: allow/deny globs, pod namespaces, per-family sides,
the auto choice, and the README's worked example of what each control does to the series count
(the README's table is checked against what this computes)."""

from __future__ import annotations

import logging
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from exporter import config
from exporter.collectors.flows import CLIENT_END, FlowsCollector
from exporter.k8s.cluster import EXTERNAL_IDENTITY, ClusterState, Identity
from exporter.naming.endpoints import EndpointLabels, PortFolder
from exporter.naming.labelsets import EndpointLabelSets
from exporter.naming.namepolicy import OTHER, Globs, NamePolicy
from exporter.serving.selfmetrics import KernelStats
from lab import kubeapi

from .batches import QueueSource, flow_batch

README = Path(__file__).resolve().parents[2] / "README.md"
WEB = Identity("shop", "web", "Deployment", "web", "web-1")


class StateResolver:
    """What KubernetesMetadata gives the labels, over a ClusterState filled directly."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state

    def resolve(self, address: str) -> Identity:
        return self.state.resolve(address) or EXTERNAL_IDENTITY

    def version(self) -> int:
        return self.state.version

    def has_zones(self) -> bool:
        return self.state.has_zones()


def test_globs_match_names_or_namespace_slash_name() -> None:
    globs = Globs(["shop/*", "api-*"], ["*/canary"])
    assert globs.allows("web", "shop")
    assert globs.allows("api-v2", "payments")
    assert not globs.allows("web", "payments")
    assert not globs.allows("canary", "shop")
    assert Globs(["*"], []).open and Globs([], []).open
    assert not Globs([], ["kube-*"]).allows("kube-system")


def test_namespace_not_allowed_folds_every_name_of_the_endpoint() -> None:
    policy = NamePolicy(namespaces=Globs(["prod-*"], []), pod_namespaces=["shop"])
    assert policy.apply(WEB) == Identity(OTHER, OTHER, "Deployment", OTHER, "")
    assert policy.apply(EXTERNAL_IDENTITY) == EXTERNAL_IDENTITY      # no namespace: untouched
    node = Identity(workload="node-1", workload_kind="Node", node="node-1")
    assert policy.apply(node) == node


def test_pod_names_only_in_pod_namespaces_and_workload_and_service_globs() -> None:
    assert NamePolicy().apply(WEB).pod == ""
    assert NamePolicy(pod_namespaces=["sh*"]).apply(WEB).pod == "web-1"
    folded = NamePolicy(workloads=Globs([], ["web"]), pod_namespaces=["shop"]).apply(WEB)
    assert (folded.workload, folded.pod, folded.service) == (OTHER, "", "web")
    assert NamePolicy(services=Globs(["db"], [])).apply(WEB).service == OTHER


def test_each_side_carries_its_own_names_and_values_follow_the_cluster() -> None:
    state = ClusterState(60)
    state.apply("pods", "ADDED", kubeapi.pod("shop", "web-1", ["10.0.0.5"],
                                             owner=("StatefulSet", "web")))
    labels = EndpointLabels([], ["namespace", "workload", "ip_type", "port"],
                            StateResolver(state))
    assert labels.label_names("src") == []
    assert labels.label_names("dst") == ["dst_namespace", "dst_workload", "dst_ip_type",
                                         "dst_port"]
    labels.refresh()
    assert labels.values("src", "10.0.0.5", "*") == ()
    assert labels.values("dst", "10.0.0.5", "80") == ("shop", "web", "private", "80")
    assert labels.values("dst", "1.1.1.1", "53") == ("", "external", "public", "53")
    state.apply("pods", "DELETED", kubeapi.pod("shop", "web-1", []))
    state.apply("pods", "ADDED", kubeapi.pod("blog", "wp-1", ["10.0.0.5"]))
    assert labels.values("dst", "10.0.0.5", "80")[1] == "web"   # cached within a scrape
    labels.refresh()                                             # the next scrape
    assert labels.values("dst", "10.0.0.5", "80") == ("blog", "wp-1", "private", "80")


def test_kubernetes_names_without_kubernetes_are_refused() -> None:
    with pytest.raises(ValueError, match="need Kubernetes"):
        EndpointLabels(["workload", "port"])


def load(**labels: object) -> config.Config:
    return config.load(None, {}, {f"labels.{k}": v for k, v in labels.items()})


def test_auto_labels_depend_on_kubernetes() -> None:
    resolver = StateResolver(ClusterState(60))
    off = EndpointLabelSets(load(), None).of("flows")
    assert off.names["src"] == ("ip", "ip_type", "port")
    on = EndpointLabelSets(load(), resolver).of("flows")  # type: ignore[arg-type]
    assert on.names["dst"] == ("namespace", "workload", "workload_kind", "service", "node",
                               "ip_type", "port")
    pods = EndpointLabelSets(load(pod_namespaces=["shop"]), resolver).of("tcp")  # type: ignore[arg-type]
    assert "pod" in pods.names["src"]


def test_per_metric_sides_override_the_default() -> None:
    sets = EndpointLabelSets(load(per_metric={"flows": {"src": []}, "dns": {"dst": ["ip"]}}),
                             None)
    flows, dns, tcp = sets.of("flows"), sets.of("dns"), sets.of("tcp")
    assert (flows.names["src"], flows.names["dst"]) == ((), ("ip", "ip_type", "port"))
    assert (dns.names["src"], dns.names["dst"]) == (("ip", "ip_type", "port"), ("ip",))
    assert tcp.names["src"] == tcp.names["dst"] == ("ip", "ip_type", "port")


def test_kubernetes_names_asked_for_while_off_are_dropped_with_a_warning(caplog) -> None:
    with caplog.at_level(logging.WARNING):
        sets = EndpointLabelSets(load(endpoint=["workload", "port"]), None)
    assert sets.of("flows").names["src"] == ("port",)
    assert any("kubernetes labels off" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("key", "value", "error"), [
    ("labels.per_metric", {"flow": {"src": []}}, "flow: unknown metric family"),
    ("labels.per_metric", {"flows": {"source": []}}, "expected a mapping with src and/or dst"),
    ("labels.per_metric", {"flows": {"src": ["pod_ip"]}}, r"flows\.src: \[0\]: expected one of"),
    ("labels.endpoint", ["namespace", "team"], r"\[1\]: expected one of"),
    ("kubernetes.enabled", "maybe", "expected one of auto, true, false"),
    ("labels.namespace_allow", [""], "expected a name pattern"),
])
def test_bad_label_settings_name_the_field(key: str, value: object, error: str) -> None:
    with pytest.raises(config.ConfigError, match=rf"^{re.escape(key)} \(from flag\): .*{error}"):
        config.load(None, {}, {key: value})


def test_kubeconfig_and_node_name_come_from_the_usual_variables() -> None:
    cfg = config.load(None, {"KUBECONFIG": "/k", "NODE_NAME": "n1"}, {})
    assert (cfg.kubernetes.kubeconfig, cfg.kubernetes.node_name) == ("/k", "n1")
    cfg = config.load(None, {"KUBECONFIG": "/k", "EBPF_NET_KUBERNETES_KUBECONFIG": "/e"},
                      {"kubernetes.node_name": "flag"})
    assert (cfg.kubernetes.kubeconfig, cfg.kubernetes.node_name) == ("/e", "flag")
    assert config.load(None, {}, {"kubernetes.enabled": False}).kubernetes.enabled == "false"


# --- the README's worked example -------------------------------------------------------------

def example_cluster(zones: bool = False) -> tuple[ClusterState, list[dict]]:
    """4 namespaces, 10 workloads, 43 pods on 4 nodes (with `zones`, two in each of two zones),
    and the flows of one scrape interval: each client pod talks to every pod of its servers,
    and some to the internet."""
    state = ClusterState(60)
    for index in range(4):
        state.apply("nodes", "ADDED", kubeapi.node(
            f"node-{index}", [f"192.168.0.{index + 1}"], zone=f"zone-{'ab'[index // 2]}"
            if zones else ""))
    workloads = {  # (namespace, name, kind, pods, servers it calls, port)
        "frontend": ("shop", "StatefulSet", 8, ["cart"], 8080),
        "cart": ("shop", "StatefulSet", 6, ["db", "api"], 0),
        "db": ("shop", "StatefulSet", 3, [], 5432),
        "api": ("payments", "StatefulSet", 4, ["ledger"], 9000),
        "ledger": ("payments", "StatefulSet", 2, [], 7000),
        "report": ("batch", "StatefulSet", 5, ["db"], 0),
        "export": ("batch", "StatefulSet", 5, ["db", "api"], 0),
        "cleanup": ("batch", "StatefulSet", 5, ["db"], 0),
        "scraper": ("monitoring", "StatefulSet", 3, ["frontend", "api", "db"], 0),
        "prober": ("monitoring", "StatefulSet", 2, ["frontend", "api", "db"], 0),
    }
    ips: dict[str, list[str]] = {}
    for index, (name, (namespace, kind, count, _, _)) in enumerate(workloads.items()):
        ips[name] = [f"10.{index}.0.{pod + 1}" for pod in range(count)]
        for pod, ip in enumerate(ips[name]):
            state.apply("pods", "ADDED", kubeapi.pod(namespace, f"{name}-{pod}", [ip],
                                                     owner=(kind, name), labels={"app": name},
                                                     node=f"node-{pod % 4}"))
        if namespace in ("shop", "payments"):       # jobs and scrapers have no Service
            state.apply("services", "ADDED", kubeapi.service(namespace, name, {"app": name}))
    rows, ephemeral = [], 40000
    for name, (_, _, _, servers, _) in workloads.items():
        for server in servers:
            port = workloads[server][4]
            for client_ip in ips[name]:
                for server_ip in ips[server]:
                    ephemeral += 1
                    rows.append({"src": client_ip, "dst": server_ip, "sport": ephemeral,
                                 "dport": port, "bytes": 1000, "packets": 2, "handshake": 1})
                    rows.append({"src": server_ip, "dst": client_ip, "sport": port,
                                 "dport": ephemeral, "bytes": 5000, "packets": 4,
                                 "handshake": 2})
        if name in ("frontend", "export"):                  # to the internet, over HTTPS
            for client_ip in ips[name]:
                ephemeral += 1
                rows.append({"src": client_ip, "dst": "93.184.215.14", "sport": ephemeral,
                             "dport": 443, "bytes": 700, "packets": 1, "handshake": 1})
    return state, rows


EXAMPLE_CONTROLS = {   # README row -> (Kubernetes on, labels settings, series cap, zones)
    "Kubernetes off (`ip`, `ip_type`, `port`)": (False, {}, 10000),
    "Kubernetes on, defaults": (True, {}, 10000),
    "+ nodes in 2 zones (`zone` joins by auto)": (True, {}, 10000, True),
    "+ `pod_namespaces: [shop]`": (True, {"pod_namespaces": ["shop"]}, 10000),
    "+ `namespace_allow: [shop, payments]`": (True, {"namespace_allow": ["shop", "payments"]},
                                              10000),
    "+ `workload_deny: [\"batch/*\", \"monitoring/*\"]`": (
        True, {"workload_deny": ["batch/*", "monitoring/*"]}, 10000),
    "+ `per_metric: {flows: {src: []}}`": (True, {"per_metric": {"flows": {"src": []}}}, 10000),
    "+ `endpoint: [namespace, port]`": (True, {"endpoint": ["namespace", "port"]}, 10000),
    "+ `series.max_per_metric: 15`": (True, {}, 15),
}


def example_series(kubernetes: bool, labels: dict, cap: int,
                   zones: bool = False) -> tuple[int, float]:
    """Series of ebpf_net_flow_bytes_total after one scrape, and their sum."""
    state, rows = example_cluster(zones)
    resolver = StateResolver(state) if kubernetes else None
    endpoints = EndpointLabelSets(load(**labels), resolver).of("flows")  # type: ignore[arg-type]
    collector = FlowsCollector(QueueSource([flow_batch(rows)], flow_batch([])), endpoints,
                               PortFolder(32768), KernelStats(), cap, 300)
    registry = CollectorRegistry()
    registry.register(collector)
    samples = [s for m in registry.collect() if m.name == "ebpf_net_flow_bytes"
               for s in m.samples if s.name == "ebpf_net_flow_bytes_total"]
    return len(samples), sum(s.value for s in samples)


def readme_example_table() -> dict[str, int]:
    text = README.read_text()
    section = text[text.index("### Worked example: series per control"):]
    rows = re.findall(r"^\| (.+?) \| ([\d,]+) \|", section, re.MULTILINE)
    return {name: int(count.replace(",", "")) for name, count in rows}


def test_readme_worked_example_matches_what_the_controls_do() -> None:
    computed, totals = {}, set()
    for row, control in EXAMPLE_CONTROLS.items():
        computed[row], total = example_series(*control)  # type: ignore[arg-type]
        totals.add(total)
    assert len(totals) == 1, "a control changed the total bytes"
    assert readme_example_table() == computed


class AnsweredSource(QueueSource):
    """Flow batches, and the servers that answered clients' SYNs (bpf/flows.h)."""

    def __init__(self, batches: list, servers: dict[tuple[str, int], str]) -> None:
        super().__init__(batches, flow_batch([]))
        self.answers = servers

    def answering_servers(self) -> tuple[dict[bytes, bytes], int]:
        out = {}
        for (client, port), server in self.answers.items():
            end = np.zeros(1, dtype=CLIENT_END)
            end["family"], end["port"] = 4, port
            end["addr"][0][:4] = np.frombuffer(socket.inet_aton(client), dtype=np.uint8)
            out[end.tobytes()] = socket.inet_aton(server) + bytes(12)
        return out, 65536


def test_a_connection_to_a_service_across_zones_takes_the_zone_of_its_backend() -> None:
    state = ClusterState(60)
    for name, zone in (("node-a", "zone-a"), ("node-b", "zone-b")):
        state.apply("nodes", "ADDED", kubeapi.node(name, [], zone=zone))
    for index, node in enumerate(("node-a", "node-b", "node-a")):
        name = ("cart", "web", "web")[index]
        state.apply("pods", "ADDED", kubeapi.pod("shop", f"{name}-{index}", [f"10.0.0.{index + 1}"],
                                                 owner=("StatefulSet", name), node=node,
                                                 labels={"app": name}))
    state.apply("services", "ADDED", kubeapi.service("shop", "web", {"app": "web"}, "10.96.0.1"))
    endpoints = EndpointLabelSets(load(), StateResolver(state)).of("flows")  # type: ignore[arg-type]
    assert endpoints.wants_server_zones and endpoints.zoneless_service("10.96.0.1")
    rows = [  # cart (zone a) to the ClusterIP: one connection answered by each web pod, and
              # one whose SYN+ACK was not seen; a reply straight from a backend
        {"src": "10.0.0.1", "dst": "10.96.0.1", "sport": 40001, "dport": 80, "bytes": 100,
         "packets": 1, "handshake": 1},
        {"src": "10.0.0.1", "dst": "10.96.0.1", "sport": 40002, "dport": 80, "bytes": 200,
         "packets": 1, "handshake": 1},
        {"src": "10.0.0.1", "dst": "10.96.0.1", "sport": 40003, "dport": 80, "bytes": 400,
         "packets": 1, "handshake": 1},
        {"src": "10.0.0.2", "dst": "10.0.0.1", "sport": 80, "dport": 40001, "bytes": 800,
         "packets": 1, "handshake": 2},
    ]
    source = AnsweredSource([flow_batch(rows)], {("10.0.0.1", 40001): "10.0.0.2",
                                                ("10.0.0.1", 40002): "10.0.0.3"})
    collector = FlowsCollector(source, endpoints, PortFolder(32768), KernelStats(), 10000, 300)
    registry = CollectorRegistry()
    registry.register(collector)
    sent = {(s.labels["dst_workload"], s.labels["dst_service"], s.labels["dst_zone"]): s.value
            for m in registry.collect() if m.name == "ebpf_net_flow_bytes"
            for s in m.samples if s.name == "ebpf_net_flow_bytes_total"
            and s.labels["src_workload"] == "cart"}
    # still named after the Service (its one workload), with the zone of the answering pod
    assert sent == {("web", "web", "zone-b"): 100, ("web", "web", "zone-a"): 200,
                    ("web", "web", ""): 400}
