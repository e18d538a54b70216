"""The drop alert and dashboard: promtool's unit tests on both sides of the alert's `for`, and
every metric they use is one the exporter serves (in the golden exposition)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from ..conftest import skip_or_fail

ALERTS = Path(__file__).resolve().parents[2] / "alerts"
GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden.prom"
METRIC = re.compile(r"\b(ebpf_net_[a-z0-9_]+)")


def test_promtool_unit_tests_of_the_drop_alert_pass():
    promtool = shutil.which("promtool")
    if not promtool:
        skip_or_fail("promtool is not installed (Debian's prometheus package; make setup)")
    result = subprocess.run([promtool, "test", "rules", "drops_test.yaml"], cwd=ALERTS / "tests",
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_drop_alert_uses_only_served_metrics():
    rules = yaml.safe_load((ALERTS / "drops.yaml").read_text())
    used = {name for group in rules["groups"] for rule in group["rules"]
            for name in METRIC.findall(rule["expr"])}
    assert used == {"ebpf_net_drops_total"}
    served = GOLDEN.read_text()     # the exposition, checked against the collectors
    assert all(f"# TYPE {name} counter" in served for name in used)


def test_the_drops_dashboard_uses_only_served_metrics_and_a_datasource_variable():
    dashboard = json.loads((ALERTS.parent / "dashboards" / "drops.json").read_text())
    assert dashboard["uid"] == "ebpf-net-drops"
    assert "datasource" in [v["name"] for v in dashboard["templating"]["list"]]
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert "sum by (reason)" in exprs[0]
    used = {name for expr in exprs for name in METRIC.findall(expr)}
    assert used == {"ebpf_net_drops_total"}
    assert f"# TYPE {used.pop()} counter" in GOLDEN.read_text()
