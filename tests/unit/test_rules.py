"""alerts/: promtool accepts every rule file, the promtool unit tests in alerts/tests/ pass (every
alert silent before its `for` runs out and firing after, with labels and annotations), and every
alert has what an on-call needs (severity, summary, templated description, a runbook section)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from tests import monitoring

from ..conftest import skip_or_fail

RULE_TESTS = monitoring.RULE_TESTS
SEVERITIES = {"critical", "warning", "info"}


def promtool() -> str:
    path = shutil.which("promtool")
    if not path:
        skip_or_fail("promtool is not installed (Debian's prometheus package; make setup)")
    return str(path)


@pytest.mark.parametrize("name", monitoring.RULE_FILES)
def test_promtool_checks_the_rule_file(name):
    result = subprocess.run([promtool(), "check", "rules", str(monitoring.ALERTS / name)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_rule_file_per_area_and_nothing_else():
    assert sorted(p.name for p in monitoring.ALERTS.glob("*.yaml")) == \
        sorted(monitoring.RULE_FILES)
    assert not list(monitoring.ALERTS.glob("*.yml"))


@pytest.mark.parametrize("name", monitoring.RULE_FILES)
def test_promtool_unit_tests_pass(name):
    tests = RULE_TESTS / name.replace(".yaml", "_test.yaml")
    result = subprocess.run([promtool(), "test", "rules", tests.name], cwd=RULE_TESTS,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def unit_test_checks() -> dict[str, list[tuple[int, list]]]:
    """alertname -> [(eval minutes, expected alerts)] over alerts/tests/*_test.yaml."""
    checks: dict[str, list[tuple[int, list]]] = {}
    for path in RULE_TESTS.glob("*_test.yaml"):
        for test in yaml.safe_load(path.read_text())["tests"]:
            for check in test.get("alert_rule_test", []):
                minutes = int(check["eval_time"].removesuffix("m"))
                checks.setdefault(check["alertname"], []).append(
                    (minutes, check.get("exp_alerts") or []))
    return checks


@pytest.mark.parametrize("alert", monitoring.alerts(), ids=lambda r: r.name)
def test_every_alert_is_unit_tested_on_both_sides_of_its_for(alert):
    checks = sorted(unit_test_checks().get(alert.name, []), key=lambda c: c[0])
    silent = [m for m, expected in checks if not expected]
    firing = [(m, expected) for m, expected in checks if expected]
    assert silent and firing, f"{alert.name}: needs a silent and a firing check"
    # one evaluation apart: the last silent minute right before the first firing one
    assert max(silent) + 1 == firing[0][0], checks
    for _, expected in firing:
        for exp in expected:
            assert exp["exp_labels"]["severity"] == alert.spec["labels"]["severity"]
            assert set(exp["exp_annotations"]) == {"summary", "description", "runbook_url"}
            assert exp["exp_annotations"]["summary"] == alert.spec["annotations"]["summary"]


@pytest.mark.parametrize("alert", monitoring.alerts(), ids=lambda r: r.name)
def test_every_alert_has_for_severity_summary_description_and_runbook(alert):
    spec = alert.spec
    assert re.fullmatch(r"\d+[smh]", spec.get("for", "")), f"{alert.name}: no `for`"
    assert spec["labels"]["severity"] in SEVERITIES
    annotations = spec["annotations"]
    assert "{{" not in annotations["summary"], "the summary is fixed text"
    assert "$labels." in annotations["description"], "the description names its labels"
    anchor = alert.name.lower()
    assert annotations["runbook_url"] == f"{monitoring.RUNBOOK_URL}#{anchor}"
    assert f"\n## {alert.name}\n" in monitoring.RUNBOOK.read_text()


def test_the_runbook_has_a_section_for_every_alert_and_no_other():
    sections = re.findall(r"^## (\S+)$", monitoring.RUNBOOK.read_text(), re.MULTILINE)
    assert sorted(sections) == sorted(a.name for a in monitoring.alerts())


def test_alert_names_are_unique_and_recording_rules_follow_the_naming_convention():
    names = [a.name for a in monitoring.alerts()]
    assert len(names) == len(set(names))
    for record in monitoring.recorded():
        assert re.fullmatch(r"ebpf_net:[a-z0-9_]+:[a-z0-9_]+", record), record
