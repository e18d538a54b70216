"""web.kubernetes_auth end to end: the real exporter on a test node with its metrics behind
the test API server's TokenReview and SubjectAccessReview, read with curl (no token, a wrong
one, one not allowed, one allowed; the probes without any) and scraped by a real Prometheus
with its bearer token over the TLS the exporter sets up itself; its scrapes cost one review
per cache period, and an API server that goes away closes the metrics (503) until it is
back."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lab.exporter_process import ExporterProcess, wait_until
from lab.kubeapi import KubeAPI
from lab.prometheus import Prometheus
from lab.testnode import TestNode
from tests import monitoring

pytestmark = pytest.mark.kernel

PROMETHEUS = {"username": "system:serviceaccount:monitoring:prometheus-k8s", "uid": "p",
              "groups": ["system:serviceaccounts"]}
OTHER = {"username": "system:serviceaccount:shop:web", "uid": "w", "groups": []}


@pytest.fixture(scope="module")
def api(node: TestNode) -> Iterator[KubeAPI]:
    with KubeAPI(netns=node.node_ns) as server:
        server.tokens = {"prometheus-token": PROMETHEUS, "other-token": OTHER}
        server.path_readers = {"/metrics": {PROMETHEUS["username"]}}
        yield server


@pytest.fixture(scope="module")
def guarded(node: TestNode, api: KubeAPI) -> Iterator[ExporterProcess]:
    process = ExporterProcess(node, ["--kubeconfig", str(api.kubeconfig), "--node-name", "n",
                                     "--web.kubernetes-auth"],
                              config={"web": {"kubernetes_auth_cache": "2s"}})
    try:
        yield process
    finally:
        code = process.stop()
        assert code == 0, f"exporter exited with {code}:\n{process.log()}"


def curl(node: TestNode, exporter: ExporterProcess, path: str,
         token: str | None = None, scheme: str = "https") -> int:
    argv = ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
            f"{scheme}://127.0.0.1:{exporter.port}{path}"]
    if token:
        argv += ["-H", f"Authorization: Bearer {token}"]
    return int(node.run(node.node_ns, argv, check=False).stdout or 0)


def test_the_probes_are_open_and_the_metrics_need_an_allowed_token(
        node: TestNode, api: KubeAPI, guarded: ExporterProcess) -> None:
    wait_until(lambda: curl(node, guarded, "/readyz") == 200, 60, "the exporter to be ready")
    assert curl(node, guarded, "/healthz") == 200
    assert curl(node, guarded, "/metrics") == 401
    assert curl(node, guarded, "/metrics", "made-up") == 401
    assert curl(node, guarded, "/metrics", "other-token") == 403
    assert curl(node, guarded, "/metrics", "prometheus-token") == 200
    # the token never travels in clear: plain HTTP gets the TLS port's 400
    assert curl(node, guarded, "/metrics", "prometheus-token", scheme="http") == 400
    assert 'certificate="made at start"' in guarded.log()


def test_prometheus_scrapes_with_its_token_and_the_cache_spares_the_api_server(
        node: TestNode, api: KubeAPI, guarded: ExporterProcess) -> None:
    wait_until(lambda: curl(node, guarded, "/readyz") == 200, 60, "the exporter to be ready")
    token_file = node.tmpdir + "/prometheus-token"
    with open(token_file, "w") as fh:
        fh.write("prometheus-token")
    prometheus = Prometheus(node, node.node_ns, "guarded", [f"127.0.0.1:{guarded.port}"],
                            scrape={"scheme": "https",
                                    "authorization": {"credentials_file": token_file},
                                    "tls_config": {"insecure_skip_verify": True}}).wait_ready()
    try:
        wait_until(prometheus.targets_up, 30, "Prometheus to scrape", interval=0.5)
        before = sum(kind == "tokenreview" for kind, _ in api.reviews)

        def scrapes() -> float:
            result = prometheus.query('ebpf_net_exporter_auth_requests_total'
                                      '{outcome="allowed"}')
            return float(result[0]["value"][1]) if result else 0

        start = scrapes()
        wait_until(lambda: scrapes() >= start + 6, 30, "six more scrapes")
        # a scrape a second, answers cached for 2 s: a handful of reviews, not one a scrape
        reviews = sum(kind == "tokenreview" for kind, _ in api.reviews) - before
        assert 1 <= reviews <= (scrapes() - start) / 2 + 1
        assert prometheus.query('up{job="guarded"} == 1')
        # the exporter health dashboard's panel of it has data
        for query in monitoring.panel_queries():
            if monitoring.source_metrics(query.expr) & monitoring.AUTH_METRICS:
                expr = monitoring.fill(query.expr, rate_interval="10s")
                assert prometheus.query(expr), query.where
    finally:
        node.stop(prometheus.proc)


def test_an_unreachable_api_server_closes_the_metrics_until_it_is_back(
        node: TestNode, api: KubeAPI, guarded: ExporterProcess) -> None:
    wait_until(lambda: curl(node, guarded, "/readyz") == 200, 60, "the exporter to be ready")
    api.stop()
    try:
        # a token not yet in the cache must be reviewed: the API server is gone
        api.tokens["fresh-token"] = PROMETHEUS
        assert curl(node, guarded, "/metrics", "fresh-token") == 503
        assert curl(node, guarded, "/healthz") == 200
    finally:
        api.start()
    wait_until(lambda: curl(node, guarded, "/metrics", "fresh-token") == 200, 20,
               "the metrics to open again")
    assert guarded.log().count("cannot check scrape credentials") == 1
