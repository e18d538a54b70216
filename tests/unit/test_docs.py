"""docs/metrics.md lists exactly the metrics the exporter serves."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .test_exposition import full_exposition

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
ROW = re.compile(r"^\| `(ebpf_net_[a-z0-9_]+)` \|", re.MULTILINE)


def served_names() -> set[str]:
    names = set()
    for family in text_string_to_metric_families(full_exposition()):
        names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def test_docs_list_every_served_metric_and_nothing_else():
    documented = set(ROW.findall(DOC.read_text()))
    served = served_names()
    assert served - documented == set(), "served but not in docs/metrics.md"
    assert documented - served == set(), "in docs/metrics.md but not served"
