"""Every overlay renders with a real kustomize, every object it renders validates against the
Kubernetes schemas, and checkov finds nothing that is not fixed or justified.

The prometheus-operator CRDs (ServiceMonitor, PrometheusRule) have no schema in
kubernetes-validate, and no package of their schemas installs cleanly here (cloudcoil's models,
the one on PyPI, register a pytest plugin that breaks pytest), so they are checked by what uses
them instead: promtool checks every PrometheusRule's groups as Prometheus loads them, and
test_deploy_drift checks the ServiceMonitor's selector, port and path against the Service."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from scripts import sync_deploy
from tests.conftest import skip_or_fail
from tests.deploytools import (
    NAMESPACE,
    OVERLAYS,
    REPO,
    Manifest,
    add_samples,
    of_kind,
    one,
    render,
    render_text,
    scratch_tree,
)

# the oldest and newest Kubernetes whose schemas kubernetes-validate ships
SCHEMA_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
CRDS = {"ServiceMonitor", "PrometheusRule"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}
CORE_OBJECTS = {("Namespace", "ebpf-net-exporter"), ("ServiceAccount", "ebpf-net-exporter"),
                ("ClusterRole", "ebpf-net-exporter"), ("ClusterRoleBinding", "ebpf-net-exporter"),
                ("DaemonSet", "ebpf-net-exporter"), ("Service", "ebpf-net-exporter"),
                ("ServiceMonitor", "ebpf-net-exporter"),
                # who may read the metrics (web.kubernetes_auth)
                ("ClusterRole", "ebpf-net-exporter-metrics-reader"),
                ("ClusterRoleBinding", "ebpf-net-exporter-metrics-reader")}
# Checkov graph checks cannot be skipped by annotation; each one skipped here says why.
CHECKOV_SKIPS = {
    # a NetworkPolicy does not select hostNetwork pods with most CNIs: port 9814 is guarded
    # by the nodes' firewall instead (docs/deploy.md, "Security")
    "CKV2_K8S_6",
}


@pytest.fixture(scope="module")
def sample_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = scratch_tree(tmp_path_factory.mktemp("deploy"))
    add_samples(root)
    return root


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_object_in_its_namespace(overlay: str) -> None:
    manifests = render(REPO, overlay)
    names = {(m["kind"], m["metadata"]["name"]) for m in manifests}
    assert CORE_OBJECTS <= names
    config = [n for k, n in names if k == "ConfigMap" and n.startswith("ebpf-net-exporter-config")]
    assert len(config) == 1
    rules = len(sync_deploy.rule_files())
    dashboards = len(list((REPO / "dashboards").glob("*.json")))
    assert len(names) == len(CORE_OBJECTS) + 1 + rules + dashboards, sorted(names)
    for m in manifests:
        namespace = m["metadata"].get("namespace")
        assert namespace == (None if m["kind"] in CLUSTER_SCOPED else NAMESPACE), m["kind"]


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("tree", ["repository", "with samples"])
def test_every_object_validates_against_its_schema(overlay: str, tree: str,
                                                   sample_tree: Path) -> None:
    manifests = render(REPO if tree == "repository" else sample_tree, overlay)
    for m in manifests:
        where = f"{m['kind']} {m['metadata']['name']}"
        if m["kind"] in CRDS:
            assert m["apiVersion"] == "monitoring.coreos.com/v1", where
            continue
        for version in SCHEMA_VERSIONS:
            try:
                kubernetes_validate.validate(m, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{where} against Kubernetes {version}: {e.message}")


def test_a_misspelt_field_fails_validation() -> None:
    """The validation above can fail: a typo in the DaemonSet."""
    daemonset = one(render(REPO, "default"), "DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, SCHEMA_VERSIONS[0], strict=True)


def test_prometheus_rules_pass_promtool(sample_tree: Path, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        skip_or_fail("promtool is missing (Debian's prometheus; make setup installs it)")
    rules = of_kind(render(sample_tree, "default"), "PrometheusRule")
    assert rules, "the sample rule file rendered no PrometheusRule"
    files = []
    for rule in rules:
        path = tmp_path / f"{rule['metadata']['name']}.yaml"
        path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
        files.append(str(path))
    result = subprocess.run([promtool, "check", "rules", *files], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _checkov() -> Path:
    for candidate in (REPO / ".venv-checkov/bin/checkov", shutil.which("checkov")):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    skip_or_fail("checkov is missing (make setup installs it in .venv-checkov)")
    raise AssertionError  # unreachable


def _run_checkov(paths: list[Path]) -> dict:
    argv = [str(_checkov()), "--framework", "kubernetes", "--skip-download", "--output", "json",
            "--skip-check", ",".join(sorted(CHECKOV_SKIPS))]
    for path in paths:
        argv += ["--file", str(path)]
    # BC_SKIP_MAPPING: no call home for guidelines (there is no network here anyway)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    assert result.stdout, result.stderr
    report = json.loads(result.stdout)
    return report[0] if isinstance(report, list) else report


def test_checkov_finds_nothing_unjustified(tmp_path: Path) -> None:
    paths = []
    for overlay in OVERLAYS:
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(render_text(REPO, overlay))
        paths.append(path)
    report = _run_checkov(paths)
    summary, results = report["summary"], report["results"]
    failed = [f"{c['check_id']} {c['check_name']} ({c['resource']}, {Path(c['file_path']).name})"
              for c in results["failed_checks"]]
    assert failed == [], "\n".join(failed)
    assert summary["parsing_errors"] == 0
    assert summary["passed"] >= 50 * len(OVERLAYS), summary   # it did check the objects
    unexplained = [c["check_id"] for c in results["skipped_checks"]
                   if len(c["check_result"].get("suppress_comment", "")) < 20]
    assert unexplained == [], "skips need a reason in their checkov.io/skip annotation"


def test_checkov_fails_an_unsafe_daemonset(tmp_path: Path) -> None:
    """The linter run above can fail: hostIPC added with no justification."""
    manifests = render(REPO, "default")
    daemonset = one(manifests, "DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostIPC"] = True
    path = tmp_path / "unsafe.yaml"
    path.write_text(yaml.safe_dump(daemonset))
    report = _run_checkov([path])
    assert "CKV_K8S_18" in {c["check_id"] for c in report["results"]["failed_checks"]}


def test_config_map_holds_a_config_the_exporter_accepts(tmp_path: Path) -> None:
    manifests: list[Manifest] = render(REPO, "default")
    config = next(m for m in of_kind(manifests, "ConfigMap")
                  if m["metadata"]["name"].startswith("ebpf-net-exporter-config"))
    path = tmp_path / "exporter.yaml"
    path.write_text(config["data"]["exporter.yaml"])
    result = subprocess.run([sys.executable, "-m", "exporter", "--config.file", str(path),
                             "--config.check"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["log"]["format"] == "json"


def test_the_overlay_docs_show_renders_as_they_say(tmp_path: Path) -> None:
    """docs/deploy.md's own overlay (image, no ServiceMonitor, a label for the operator's
    selector), its YAML blocks merged into one kustomization."""
    blocks = re.findall(r"```yaml\n(.*?)```", (REPO / "docs/deploy.md").read_text(), re.S)
    kustomization: dict = {}
    for block in blocks:
        kustomization.update(yaml.safe_load(block))
    assert kustomization["kind"] == "Kustomization"
    root = scratch_tree(tmp_path)
    mine = root / "deploy/overlays/mine"
    mine.mkdir()
    (mine / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    manifests = render(root, "mine")
    image = one(manifests, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.com/ebpf-net-exporter:0.1.0"
    assert of_kind(manifests, "ServiceMonitor") == []
    assert all(m["metadata"]["labels"]["release"] == "kube-prometheus-stack" for m in manifests)
