"""dashboards/: stable uids, the datasource/namespace/workload variables, $__rate_interval in
rates, queries promtool parses, and every metric a dashboard or a rule reads is one the
exporter serves (and every family it serves is on a dashboard)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml
from kubernetes.client import ApiClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from exporter import config
from exporter.k8s.metadata import KubernetesMetadata
from exporter.kernel.clustermap import KernelClusterMap
from exporter.kernel.oncepercluster import ClusterCounting
from exporter.kernel.tlsprobes import HttpsMetrics
from exporter.serving.kubeauth import KubernetesAuth
from exporter.serving.selfmetrics import ExporterCollector, KernelStats
from tests import monitoring
from tests.unit.batches import FakeLeft, FakeTrie

from ..conftest import skip_or_fail

GOLDEN = monitoring.REPO / "tests" / "fixtures" / "golden.prom"
# Prometheus's own series about the scrape
PROMETHEUS = {"up"}
DASHBOARDS = monitoring.dashboards()
RANGE = re.compile(r"\[([^\]]*)\]")
# rates over Grafana's interval; increases over the dashboard's time range
WINDOWS = {"$__rate_interval", "$__range"}


def served() -> set[str]:
    """Series names of the exporter's exposition: traffic (the golden file), its own metrics,
    its Kubernetes metrics and the standard process/python collectors it registers."""
    registry = CollectorRegistry()
    registry.register(ExporterCollector([], KernelStats(), {"version": "0"}, lambda: 0))
    registry.register(KubernetesMetadata(ApiClient(), 60.0))     # never started: no calls
    cluster_map = KernelClusterMap(FakeTrie(1), FakeLeft([{}]))   # counting once per cluster
    registry.register(ClusterCounting(cluster_map, config.load(None, {}, {}), None,
                                      KernelStats()))
    registry.register(KubernetesAuth(ApiClient(), "/metrics", 60.0))  # web.kubernetes_auth
    registry.register(HttpsMetrics())                                # collectors.https
    for standard in (ProcessCollector, PlatformCollector, GCCollector):
        standard(registry=registry)
    return monitoring.series_names(GOLDEN.read_text() + generate_latest(registry).decode())


TRAFFIC = {n for n in served() if n.startswith("ebpf_net_") and "exporter" not in n} \
    - monitoring.OPT_IN_METRICS


def used_by_dashboards() -> set[str]:
    return {name for q in monitoring.panel_queries() for name in monitoring.metric_names(q.expr)}


def used_by_rules() -> set[str]:
    return {name for rule in monitoring.rules()
            for name in monitoring.metric_names(rule.spec["expr"])}


def test_every_metric_a_dashboard_or_rule_reads_is_served_or_recorded():
    known = served() | set(monitoring.recorded()) | PROMETHEUS
    assert (used_by_dashboards() | used_by_rules()) - known == set()


def test_every_served_family_is_on_a_dashboard():
    on_dashboards = {name for q in monitoring.panel_queries()
                     for name in monitoring.source_metrics(q.expr)}
    ours = {n for n in served() if n.startswith("ebpf_net_")}
    # a histogram is shown through its buckets
    shown = {n for n in ours if not n.endswith(("_sum", "_count"))} - on_dashboards
    assert shown == set()
    for family in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                   "python_gc_collections_total"):
        assert family in on_dashboards


def test_files_and_uids_are_stable():
    assert sorted(p.name for p in monitoring.DASHBOARDS.glob("*.json")) == \
        sorted(monitoring.DASHBOARD_UIDS)
    for name, dashboard in DASHBOARDS.items():
        assert dashboard["uid"] == monitoring.DASHBOARD_UIDS[name]
        assert dashboard["title"].startswith("ebpf-net-exporter / ")


@pytest.mark.parametrize("name", sorted(monitoring.WORKLOAD_DASHBOARDS))
def test_datasource_namespace_and_workload_variables(name):
    variables = monitoring.variables(DASHBOARDS[name])
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    sides = set()
    for var in ("namespace", "workload"):
        selector, label = monitoring.variable_query(variables[var])
        side, _, what = label.partition("_")
        assert (side in ("src", "dst")) and what == var, label
        sides.add(side)
        assert monitoring.metric_names(selector) <= served(), selector
        assert variables[var]["allValue"] == ".*" and variables[var]["includeAll"]
        assert variables[var]["datasource"]["uid"] == "${datasource}"
    assert len(sides) == 1, "namespace and workload select the same end"
    assert '$namespace' in monitoring.variable_query(variables["workload"])[0]


@pytest.mark.parametrize("name", sorted(monitoring.DASHBOARD_UIDS))
def test_every_panel_uses_the_datasource_variable_and_rate_interval(name):
    for panel in monitoring.panels(DASHBOARDS[name]):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            for window in RANGE.findall(target["expr"]):
                assert window in WINDOWS, (panel["title"], target["expr"])
            # the variables narrow every traffic query
            if name in monitoring.WORKLOAD_DASHBOARDS and \
                    monitoring.metric_names(target["expr"]) & TRAFFIC:
                assert '$namespace' in target["expr"] and '$workload' in target["expr"]


def test_the_service_map_is_a_node_graph_of_nodes_and_edges():
    maps = [p for p in monitoring.panels(DASHBOARDS["network-overview.json"])
            if p["type"] == "nodegraph"]
    assert len(maps) == 1
    exprs = {t["refId"]: t["expr"] for t in maps[0]["targets"]}
    assert set(exprs) == {"nodes", "edges"}
    assert '"id"' in exprs["nodes"]
    for field in ('"id"', '"source"', '"target"'):
        assert field in exprs["edges"]
    assert all(t.get("format") == "table" and t.get("instant") for t in maps[0]["targets"])


def test_promtool_parses_every_query_with_its_variables_filled(tmp_path):
    """promtool has no query linter of its own: every query becomes a recording rule."""
    promtool = shutil.which("promtool")
    if not promtool:
        skip_or_fail("promtool is not installed (Debian's prometheus package; make setup)")
    queries = monitoring.panel_queries()
    rules = [{"record": f"dashboard:query_{i}:check", "expr": monitoring.fill(q.expr)}
             for i, q in enumerate(queries)]
    for dashboard in DASHBOARDS.values():
        for var in monitoring.variables(dashboard).values():
            if var["type"] == "query":
                selector, _ = monitoring.variable_query(var)
                rules.append({"record": f"dashboard:variable_{len(rules)}:check",
                              "expr": monitoring.fill(selector)})
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(queries) >= 50
