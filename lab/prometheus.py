"""A real Prometheus (Debian's package) for end-to-end tests: run in a network namespace on its
loopback with its own temporary storage, scraping given targets every second and evaluating
given rule files every second; queried through its HTTP API."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lab.exporter_process import free_port, wait_until
from lab.testnode import TestNode, in_netns

FOR = re.compile(r"^(\s*for:\s*)\S+$", re.MULTILINE)
RANGE_5M = "[5m]"


def shortened_rules(sources: Sequence[Path], into: Path, hold: str = "2s",
                    window: str = "10s") -> list[Path]:
    """Copies of rule files with every `for` set to `hold` and every 5 m window to `window`,
    so a test sees alerts go pending within seconds of a fault."""
    out = []
    for source in sources:
        text = FOR.sub(rf"\g<1>{hold}", source.read_text()).replace(RANGE_5M, f"[{window}]")
        path = into / source.name
        path.write_text(text)
        out.append(path)
    return out


THRESHOLD_LINE = re.compile(r"^(\s*>\s*)[0-9.]+(\s*#.*)?$", re.MULTILINE)


def set_threshold(rule_file: Path, alert: str, value: float) -> None:
    """Sets the threshold of `alert` in a (copied) rule file: the number on its `> N` line."""
    text = rule_file.read_text()
    start = text.index(f"alert: {alert}")
    end = text.find("- alert:", start + 1)
    end = len(text) if end < 0 else end
    number = f"{value:f}".rstrip("0").rstrip(".")        # plain digits, as the rules write it
    part, count = THRESHOLD_LINE.subn(rf"\g<1>{number}\g<2>", text[start:end], count=1)
    assert count == 1, f"no `> N` threshold line in {alert}"
    rule_file.write_text(text[:start] + part + text[end:])


class Prometheus:
    """prometheus in namespace `ns`, listening on its 127.0.0.1; stopped with the node."""

    def __init__(self, node: TestNode, ns: str, job: str, targets: Sequence[str],
                 rule_files: Sequence[Path] = (), scrape: dict[str, Any] | None = None) -> None:
        """scrape: more settings of the job (scheme, authorization, tls_config, ...)."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus is not installed (Debian's prometheus package; "
                               "make setup)")
        self.node, self.ns = node, ns
        self.port = free_port(ns)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{node.prefix}-prometheus-",
                                             dir=node.tmpdir))
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": list(targets)}],
                                **(scrape or {})}],
        }
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log_path = self.workdir / "prometheus.log"
        with open(self.log_path, "w") as log:
            self.proc = node.spawn(ns, [
                binary, f"--config.file={config_path}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                # the Debian default points at /usr/share/prometheus, which may be absent
                f"--web.console.templates={self.workdir}",
                f"--web.console.libraries={self.workdir}",
            ], stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()[-4000:]

    def _get(self, path: str, params: dict[str, str] | None = None,
             timeout: float = 10) -> tuple[int, Any]:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with in_netns(self.ns):
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    body = response.read().decode()
                    status = response.status
            except urllib.error.HTTPError as e:
                body, status = e.read().decode(), e.code
            except OSError:
                return 0, None
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body

    def wait_ready(self, timeout: float = 30) -> Prometheus:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited with {self.proc.returncode}:\n"
                                     f"{self.log()}")
            return self._get("/-/ready", timeout=2)[0] == 200

        wait_until(ready, timeout, "Prometheus to be ready", interval=0.1)
        return self

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result; an error response fails with Prometheus's message."""
        status, body = self._get("/api/v1/query", {"query": expr})
        if status != 200 or not isinstance(body, dict) or body.get("status") != "success":
            raise AssertionError(f"query failed ({status}): {body}\n  {expr}")
        return list(body["data"]["result"])

    def series(self, selector: str) -> list[dict[str, str]]:
        status, body = self._get("/api/v1/series", {"match[]": selector})
        assert status == 200 and body["status"] == "success", (status, body, selector)
        return list(body["data"])

    def active_alerts(self) -> list[dict[str, Any]]:
        """The pending and firing alerts (labels, annotations, state)."""
        status, body = self._get("/api/v1/alerts")
        assert status == 200 and body["status"] == "success", (status, body)
        return list(body["data"]["alerts"])

    def alerts(self) -> dict[str, set[str]]:
        """alertname -> states ("pending", "firing") of its active alerts."""
        active: dict[str, set[str]] = {}
        for alert in self.active_alerts():
            active.setdefault(alert["labels"]["alertname"], set()).add(alert["state"])
        return active

    def rule_groups(self) -> list[dict[str, Any]]:
        status, body = self._get("/api/v1/rules")
        assert status == 200 and body["status"] == "success", (status, body)
        return list(body["data"]["groups"])

    def targets_up(self) -> bool:
        status, body = self._get("/api/v1/targets")
        return status == 200 and all(t["health"] == "up"
                                     for t in body["data"]["activeTargets"]) \
            and bool(body["data"]["activeTargets"])
