"""Renders deploy/ with a real kubectl (its built-in kustomize) for the deploy tests, and copies
the repository's deploy sources into a scratch tree where a test may add sample alerts and
dashboards without touching the working tree."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from scripts import sync_deploy
from tests.conftest import skip_or_fail

REPO = Path(__file__).resolve().parent.parent
OVERLAYS = ("default", "privileged", "rbac-proxy")
NAMESPACE = "ebpf-net-exporter"
# kustomize v4 brought `patches` with targets, used by overlays/privileged
MIN_KUSTOMIZE = (4, 0)

Manifest = dict[str, Any]


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        skip_or_fail("no kubectl with kustomize >= v4 (docs/deploy.md, 'Checks')")
    out = subprocess.run([path, "version", "--client"], capture_output=True, text=True).stdout
    match = re.search(r"Kustomize Version: v(\d+)\.(\d+)", out)
    if not match or (int(match.group(1)), int(match.group(2))) < MIN_KUSTOMIZE:
        skip_or_fail(f"{path} has no kustomize >= v{MIN_KUSTOMIZE[0]} (found: "
                     f"{match.group(0) if match else 'none'}); install a newer kubectl")
    return path  # type: ignore[return-value]


def render_text(root: Path, overlay: str) -> str:
    result = subprocess.run([kubectl(), "kustomize", str(root / "deploy/overlays" / overlay)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kustomize {overlay}: {result.stderr}"
    return result.stdout


def render(root: Path, overlay: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(render_text(root, overlay)) if doc]


def one(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [m for m in manifests
             if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def of_kind(manifests: list[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def scratch_tree(target: Path) -> Path:
    """A copy of what deploy/ is built from: deploy/, alerts/ and dashboards/."""
    for part in ("deploy", "alerts", "dashboards"):
        shutil.copytree(REPO / part, target / part)
    return target


SAMPLE_RULES = """\
groups:
  - name: deploy-test-sample
    rules:
      - alert: DeployTestSampleDown
        expr: |
          up{job="ebpf-net-exporter"}
            == 0
        for: 5m
        labels:
          severity: warning
        annotations:
          summary: "an exporter is down: {{ $labels.instance }}"
      - record: deploy_test:ebpf_net_flow_bytes:rate5m
        expr: sum by (node) (rate(ebpf_net_flow_bytes_total[5m]))
"""

SAMPLE_DASHBOARD = """{
  "title": "Deploy test sample",
  "uid": "deploy-test-sample",
  "panels": [{"type": "timeseries", "title": "bytes \\u00e9", "targets": [{"expr": "1"}]}],
  "schemaVersion": 39
}
"""


def add_samples(root: Path) -> None:
    """One sample rule file and one dashboard, then the generated manifests made anew."""
    (root / "alerts/zz-deploy-test-sample.yml").write_text(SAMPLE_RULES)
    (root / "dashboards/zz-deploy-test-sample.json").write_text(SAMPLE_DASHBOARD)
    sync_deploy.write(root)
