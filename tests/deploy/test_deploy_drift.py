"""deploy/ stays in step with what it is built from: alerts/ and dashboards/ (through
scripts/sync_deploy.py), the API calls the exporter makes (ClusterRole) and its default port."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from exporter.config import default_document, env_name
from exporter.k8s import RBAC_RULES
from scripts import sync_deploy
from tests.deploytools import (
    OVERLAYS,
    REPO,
    add_samples,
    of_kind,
    one,
    render,
    scratch_tree,
)


def permissions(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


@pytest.fixture(scope="module")
def sample_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = scratch_tree(tmp_path_factory.mktemp("deploy"))
    add_samples(root)
    return root


def test_generated_manifests_match_their_sources() -> None:
    assert sync_deploy.differences() == [], "run `make deploy-sync`"


def test_sync_notices_a_source_added_changed_or_removed(tmp_path: Path) -> None:
    root = scratch_tree(tmp_path)
    rules = root / "alerts/zz-deploy-test-sample.yaml"
    rules.write_text("groups:\n  - name: sample\n    rules: []\n")
    assert sync_deploy.differences(root) == [
        "deploy/base/generated/rules-zz-deploy-test-sample.yaml: missing",
        "deploy/base/generated/kustomization.yaml: differs from its source"]
    sync_deploy.write(root)
    assert sync_deploy.differences(root) == []
    rules.write_text("groups:\n  - name: sample\n    rules: [{record: a, expr: '1'}]\n")
    assert sync_deploy.differences(root) == [
        "deploy/base/generated/rules-zz-deploy-test-sample.yaml: differs from its source"]
    rules.unlink()
    assert "deploy/base/generated/rules-zz-deploy-test-sample.yaml: no source any more" in \
        sync_deploy.differences(root)
    sync_deploy.write(root)
    assert sync_deploy.differences() == sync_deploy.differences(root) == []


def test_prometheus_rules_equal_the_alert_files(sample_tree: Path) -> None:
    sources = sync_deploy.rule_files(sample_tree)
    assert sources[-1].name == "zz-deploy-test-sample.yml"
    for overlay in OVERLAYS:
        rendered = of_kind(render(sample_tree, overlay), "PrometheusRule")
        assert len(rendered) == len(sources)
        for source in sources:
            name = f"ebpf-net-exporter-{sync_deploy.object_name(source.stem)}"
            rule = one(rendered, "PrometheusRule", name)
            assert rule["spec"]["groups"] == yaml.safe_load(source.read_text())["groups"]


def test_dashboard_config_maps_equal_the_dashboard_files(sample_tree: Path) -> None:
    sources = sorted((sample_tree / "dashboards").glob("*.json"))
    assert sources[-1].name == "zz-deploy-test-sample.json"
    for overlay in OVERLAYS:
        rendered = [m for m in of_kind(render(sample_tree, overlay), "ConfigMap")
                    if m["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
        assert len(rendered) == len(sources)
        for source in sources:
            name = f"ebpf-net-exporter-dashboard-{sync_deploy.object_name(source.stem)}"
            config_map = one(rendered, "ConfigMap", name)
            assert config_map["data"] == {source.name: source.read_text()}


def test_sync_refuses_sources_it_cannot_embed(tmp_path: Path) -> None:
    root = scratch_tree(tmp_path)
    (root / "alerts/a.yaml").write_text("groups:\n  - name: same\n    rules: []\n")
    (root / "alerts/b.yaml").write_text("groups:\n  - name: same\n    rules: []\n")
    with pytest.raises(sync_deploy.SyncError, match=re.escape("group 'same' is also in a.yaml")):
        sync_deploy.expected_files(root)
    (root / "alerts/b.yaml").write_text("groups: [\n")
    with pytest.raises(sync_deploy.SyncError, match=re.escape("b.yaml: invalid YAML")):
        sync_deploy.expected_files(root)
    (root / "alerts/b.yaml").unlink()
    (root / "dashboards/broken.json").write_text("{")
    with pytest.raises(sync_deploy.SyncError, match=re.escape("broken.json: invalid JSON")):
        sync_deploy.expected_files(root)


def test_cluster_role_allows_exactly_the_calls_the_exporter_makes() -> None:
    wanted = permissions(RBAC_RULES)
    assert ("", "pods", "watch") in wanted
    for overlay in OVERLAYS:
        role = one(render(REPO, overlay), "ClusterRole", "ebpf-net-exporter")
        assert permissions(role["rules"]) == wanted


def effective(container: dict, config: dict, path: str) -> object:
    """A setting as the exporter in `container` sees it: its EBPF_NET_* variable, else the
    config file's value."""
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    section, key = path.split(".")
    return env.get(env_name(path), config[section].get(key))


def exporter_config(manifests: list) -> dict:
    config = next(m for m in of_kind(manifests, "ConfigMap")
                  if m["metadata"]["name"].startswith("ebpf-net-exporter-config"))
    return yaml.safe_load(config["data"]["exporter.yaml"])


def test_one_metrics_port_from_the_exporter_default_to_the_service_monitor() -> None:
    default_port = int(default_document()["web"]["listen_address"].rsplit(":", 1)[1])
    for overlay in OVERLAYS:
        manifests = render(REPO, overlay)
        service = one(manifests, "Service")
        monitor = one(manifests, "ServiceMonitor")
        pod = one(manifests, "DaemonSet")["spec"]["template"]
        exporter = pod["spec"]["containers"][0]
        listen = str(effective(exporter, exporter_config(manifests), "web.listen_address"))
        # one container serves the metrics port: the exporter, or a proxy in front of it
        serving = [c for c in pod["spec"]["containers"]
                   if any(p["name"] == "metrics" for p in c.get("ports", []))]
        assert len(serving) == 1, overlay
        assert [(p["name"], p["containerPort"]) for p in serving[0]["ports"]] == \
            [("metrics", default_port)]
        if serving[0] is exporter:
            assert int(listen.rsplit(":", 1)[1]) == default_port
        else:       # the exporter on the node's loopback only, the proxy's upstream
            assert listen.startswith("127.0.0.1:"), overlay
            assert f"--upstream=http://{listen}/" in serving[0]["args"]
            assert f"--secure-listen-address=:{default_port}" in serving[0]["args"]

        assert [(p["name"], p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == \
            [("metrics", default_port, "metrics")]
        assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
        assert monitor["spec"]["endpoints"][0]["path"] == default_document()["web"][
            "telemetry_path"]
        for probe in ("livenessProbe", "readinessProbe"):
            assert exporter[probe]["httpGet"]["port"] in ("metrics", default_port)
        # the ServiceMonitor finds the Service, and the Service the exporter's pods
        labels = service["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == \
            [service["metadata"]["namespace"]]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        assert service["spec"]["clusterIP"] == "None"
        # the operator names the scrape job after the Service: alerts/ and dashboards/ query
        # job="ebpf-net-exporter"
        assert service["metadata"]["name"] == "ebpf-net-exporter"
        assert "jobLabel" not in monitor["spec"]


def test_daemonset_runs_everywhere_with_the_least_privilege_of_its_overlay() -> None:
    for overlay in OVERLAYS:
        pod = one(render(REPO, overlay), "DaemonSet")["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert pod["hostNetwork"] is True
        assert pod["hostPID"] is True         # HTTPS: the node's processes
        assert pod["tolerations"] == [{"operator": "Exists"}]
        # its node and its own pod: what counting once per cluster needs (oncepercluster.py)
        for name, path in (("NODE_NAME", "spec.nodeName"), ("POD_NAME", "metadata.name"),
                           ("POD_NAMESPACE", "metadata.namespace")):
            assert {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}} \
                in container["env"]
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        if overlay == "privileged":
            assert security["privileged"] is True
        else:
            assert security["capabilities"] == {
                "drop": ["ALL"],
                "add": ["BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE", "SYS_RESOURCE"]}
            assert "privileged" not in security
        host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
        writable = {m["name"] for m in container["volumeMounts"] if not m.get("readOnly")}
        # only the qdisc ownership file under /run is written on the host
        assert {n: p for n, p in host_paths.items() if n in writable} == \
            {"state": "/run/ebpf-net-exporter"}


def test_scrapes_are_authenticated_over_tls_with_a_token_allowed_to_read_the_path() -> None:
    path = default_document()["web"]["telemetry_path"]
    for overlay in OVERLAYS:
        manifests = render(REPO, overlay)
        containers = one(manifests, "DaemonSet")["spec"]["template"]["spec"]["containers"]
        checked = effective(containers[0], exporter_config(manifests), "web.kubernetes_auth")
        # the exporter checks tokens itself, or a kube-rbac-proxy in front of it does (its
        # TokenReview and SubjectAccessReview for the request's path are what the exporter's
        # own check asks, with the same RBAC)
        proxies = [c for c in containers[1:] if "kube-rbac-proxy" in c["image"]]
        assert (checked in (True, "true")) != bool(proxies), overlay
        for proxy in proxies:
            # probes through unchecked, nothing else (the two flags exclude each other)
            assert "--ignore-paths=/healthz,/readyz" in proxy["args"]
            assert not any(arg.startswith("--allow-paths") for arg in proxy["args"])
        endpoint = one(manifests, "ServiceMonitor")["spec"]["endpoints"][0]
        assert endpoint["scheme"] == "https"
        assert endpoint["bearerTokenFile"] == \
            "/var/run/secrets/kubernetes.io/serviceaccount/token"
        container = one(manifests, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
        for probe in ("livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"]["scheme"] == "HTTPS"
        # the reader role grants what the exporter's access review asks: get on the path
        reader = one(manifests, "ClusterRole", "ebpf-net-exporter-metrics-reader")
        assert reader["rules"] == [{"nonResourceURLs": [path], "verbs": ["get"]}]
        binding = one(manifests, "ClusterRoleBinding", "ebpf-net-exporter-metrics-reader")
        assert binding["roleRef"]["name"] == reader["metadata"]["name"]
        assert binding["subjects"]
