"""A real Prometheus scrapes the real exporter over TLS with basic auth."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest
import yaml

from lab.certs import bcrypt_hash, make_certs
from lab.exporter_process import ExporterProcess, free_port, wait_until
from lab.testnode import TestNode, in_netns

pytestmark = pytest.mark.kernel

PASSWORD = "prometheus-scrapes-here"


def test_prometheus_scrapes_over_tls_with_basic_auth(node: TestNode, tmp_path):
    if shutil.which("prometheus") is None:
        pytest.skip("prometheus is not installed (make setup installs it)")
    certs = make_certs(tmp_path / "certs")
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump({
        "tls_server_config": {"cert_file": str(certs.server_cert),
                              "key_file": str(certs.server_key)},
        "basic_auth_users": {"prometheus": bcrypt_hash(PASSWORD)}}))
    exporter = ExporterProcess(node, args=["--web.config.file", str(web)], tls_ca=certs.ca,
                               basic_auth=("prometheus", PASSWORD))
    try:
        exporter.wait_ready()
        assert exporter.scrape().value("ebpf_net_exporter_attached_interfaces") == 2
        prom_port = free_port(node.node_ns)
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {"job_name": "good", "scheme": "https",
                 "tls_config": {"ca_file": str(certs.ca)},
                 "basic_auth": {"username": "prometheus", "password": PASSWORD},
                 "static_configs": [{"targets": [f"127.0.0.1:{exporter.port}"]}]},
                {"job_name": "wrong_password", "scheme": "https",
                 "tls_config": {"ca_file": str(certs.ca)},
                 "basic_auth": {"username": "prometheus", "password": "guess"},
                 "static_configs": [{"targets": [f"127.0.0.1:{exporter.port}"]}]},
                {"job_name": "plain_http",
                 "static_configs": [{"targets": [f"127.0.0.1:{exporter.port}"]}]},
            ]}))
        prometheus = node.spawn(node.node_ns, [
            "prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            def query(expr: str) -> dict[str, float]:
                url = (f"http://127.0.0.1:{prom_port}/api/v1/query?"
                       + urllib.parse.urlencode({"query": expr}))
                try:
                    with in_netns(node.node_ns), urllib.request.urlopen(url, timeout=5) as r:
                        result = json.load(r)["data"]["result"]
                except OSError:
                    return {}
                return {s["metric"].get("job", ""): float(s["value"][1]) for s in result}

            ups = wait_until(lambda: (lambda u: u if len(u) == 3 else None)(query("up")), 60,
                             "Prometheus to scrape all three jobs")
            assert ups == {"good": 1.0, "wrong_password": 0.0, "plain_http": 0.0}
            # the data came through: the exporter's own metrics, as Prometheus stored them
            attached = wait_until(
                lambda: query('ebpf_net_exporter_attached_interfaces{job="good"}'), 30,
                "a stored sample of the exporter's metrics")
            assert attached == {"good": 2.0}
        finally:
            node.stop(prometheus)
    finally:
        assert exporter.stop() == 0, exporter.log()
