"""The dashboards and rule files as tests see them: every panel query and rule expression, the
metric names they use, and the template variables filled in."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DASHBOARDS = REPO / "dashboards"
ALERTS = REPO / "alerts"
RUNBOOK = REPO / "docs" / "runbook.md"
RULE_TESTS = ALERTS / "tests"
RUNBOOK_URL = "https://github.com/ebpf-net-exporter/ebpf-net-exporter/blob/main/docs/runbook.md"

# stable names: the deploy manifests embed these files under these names
DASHBOARD_UIDS = {
    "network-overview.json": "ebpf-net-overview",
    "tcp-health.json": "ebpf-net-tcp",
    "dns.json": "ebpf-net-dns",
    "http.json": "ebpf-net-http",
    "grpc.json": "ebpf-net-grpc",
    "exporter-health.json": "ebpf-net-exporter",
    "drops.json": "ebpf-net-drops",
}
# the dashboards with namespace and workload variables (drops.json selects nodes)
WORKLOAD_DASHBOARDS = tuple(name for name in DASHBOARD_UIDS if name != "drops.json")
RULE_FILES = ("tcp.yaml", "dns.yaml", "http.yaml", "grpc.yaml", "exporter.yaml",
              "kubernetes.yaml", "drops.yaml", "zones.yaml")
# served only when their collector is switched on
OPT_IN_METRICS = {"ebpf_net_drops_total", "ebpf_net_bash_commands_total"}
# served only when counting once per cluster (tests/e2e/test_prometheus_cluster.py reads them)
CLUSTER_METRICS = {"ebpf_net_exporter_counted_elsewhere_total",
                   "ebpf_net_exporter_network_interfaces", "ebpf_net_exporter_cluster_addresses"}
# served only with web.kubernetes_auth (tests/kernel/test_scrape_auth.py reads them)
AUTH_METRICS = {"ebpf_net_exporter_auth_requests_total", "ebpf_net_exporter_auth_reviews_total"}

# Grafana's "All" for our variables, and what $__rate_interval is replaced with when a query
# goes to Prometheus directly (Grafana computes it from the scrape interval).
ALL = ".*"
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
OUR_PREFIXES = ("ebpf_net_", "ebpf_net:", "process_", "python_")


@dataclass(frozen=True)
class Query:
    where: str      # "dashboard / panel / refId"
    expr: str       # as written, with Grafana variables


@dataclass(frozen=True)
class Rule:
    file: str
    group: str
    spec: dict[str, Any]

    @property
    def name(self) -> str:
        return self.spec.get("alert") or self.spec["record"]


def dashboards() -> dict[str, dict[str, Any]]:
    return {name: json.loads((DASHBOARDS / name).read_text()) for name in DASHBOARD_UIDS}


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))        # panels inside collapsed rows
    return [p for p in out if p.get("type") != "row"]


def panel_queries() -> list[Query]:
    return [Query(f"{name} / {panel['title']} / {target['refId']}", target["expr"])
            for name, dashboard in dashboards().items()
            for panel in panels(dashboard) for target in panel.get("targets", [])]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


LABEL_VALUES = re.compile(r"^label_values\((?:(.+), )?([a-zA-Z_]+)\)$")


def variable_query(variable: dict[str, Any]) -> tuple[str, str]:
    """(series selector, label) of a label_values(...) variable."""
    query = variable["query"]
    text = query["query"] if isinstance(query, dict) else query
    match = LABEL_VALUES.match(text)
    assert match, f"variable {variable['name']}: not a label_values() query: {text}"
    return match[1] or "", match[2]


def fill(expr: str, values: dict[str, str] | None = None, rate_interval: str = "15s",
         time_range: str = "1m") -> str:
    """The query Grafana would send: variables replaced (default: All)."""
    values = {"namespace": ALL, "workload": ALL, "instance": ALL, "scheme": ALL, "version": ALL,
              **(values or {})}
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__range", time_range)
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    # inside label matchers too ($scheme in scheme=~"$scheme"); a regex's $ anchor is no name
    assert not re.search(r"\$\{?[A-Za-z_]", expr), f"unfilled variable in {expr}"
    return expr


def rules() -> list[Rule]:
    out = []
    for name in RULE_FILES:
        for group in yaml.safe_load((ALERTS / name).read_text())["groups"]:
            out.extend(Rule(name, group["name"], spec) for spec in group["rules"])
    return out


def alerts() -> list[Rule]:
    return [r for r in rules() if "alert" in r.spec]


def recorded() -> dict[str, str]:
    """Recording rule name -> its expression."""
    return {r.spec["record"]: r.spec["expr"] for r in rules() if "record" in r.spec}


def metric_names(expr: str) -> set[str]:
    """Names of the series an expression reads (ours, process_*, python_*, and up)."""
    bare = STRING.sub('""', expr)
    names = set()
    for match in IDENTIFIER.finditer(bare):
        token = match[0]
        if token.startswith(OUR_PREFIXES) or (token == "up" and _is_selector(bare, match.end())):
            names.add(token)
    return names


def _is_selector(text: str, end: int) -> bool:
    rest = text[end:].lstrip()
    return not rest.startswith("(")


def source_metrics(expr: str) -> set[str]:
    """metric_names, with recorded series replaced by what their rules read."""
    records = recorded()
    out: set[str] = set()
    todo = list(metric_names(expr))
    while todo:
        name = todo.pop()
        if name in records:
            todo.extend(metric_names(records[name]) - out)
        elif name not in out:
            out.add(name)
    return out


TYPE_LINE = re.compile(r"^# TYPE (\S+) (\S+)$", re.MULTILINE)


def series_names(exposition: str) -> set[str]:
    """Every series name an exposition can hold, from its TYPE lines (a histogram's _bucket,
    _sum and _count; a counter as written, with _total)."""
    names = set()
    for name, kind in TYPE_LINE.findall(exposition):
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "counter" and not name.endswith("_total"):
            names.add(f"{name}_total")
        else:
            names.add(name)
    return names
