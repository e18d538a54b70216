"""Kubernetes authentication of scrapes (web.kubernetes_auth) against the test API server's
TokenReview and SubjectAccessReview, through the real `kubernetes` client and the exporter's
WSGI app: 401, 403, 200, the cache, and an API server that is down (503, then recovery)."""

from __future__ import annotations

import io
import logging
import ssl
import time
import urllib.request
from collections.abc import Iterator
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

from exporter.k8s.connection import connect
from exporter.serving import selfsigned
from exporter.serving.kubeauth import KubernetesAuth, bearer_token
from exporter.serving.server import WebServer, make_app
from lab.kubeapi import KubeAPI

READER = {"username": "system:serviceaccount:monitoring:prometheus-k8s", "uid": "u-1",
          "groups": ["system:serviceaccounts"]}
STRANGER = {"username": "system:serviceaccount:shop:web", "uid": "u-2", "groups": []}


@pytest.fixture
def api() -> Iterator[KubeAPI]:
    with KubeAPI() as server:
        server.tokens = {"reader-token": READER, "stranger-token": STRANGER}
        server.path_readers = {"/metrics": {READER["username"]}}
        yield server


def auth_for(api: KubeAPI, cache: float = 60.0) -> KubernetesAuth:
    client, _ = connect(str(api.kubeconfig))
    return KubernetesAuth(client, "/metrics", cache)


def call(app: Any, path: str, token: str | None = None) -> tuple[str, dict[str, str], bytes]:
    environ: dict[str, Any] = {"PATH_INFO": path}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    if token is not None:
        environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    answer: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
        answer["status"], answer["headers"] = status, dict(headers)
        return io.BytesIO().write

    body = b"".join(app(environ, start_response))
    return answer["status"], answer["headers"], body


@pytest.mark.parametrize("header, token", [
    ("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic YTpi", None), ("Bearer", None),
    ("", None), (None, None)])
def test_only_bearer_tokens_are_taken(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_each_kind_of_scraper_gets_its_answer(api: KubeAPI) -> None:
    app = make_app(CollectorRegistry(), "/metrics", lambda: True, auth=auth_for(api))
    status, headers, _ = call(app, "/metrics")
    assert status.startswith("401") and headers["WWW-Authenticate"].startswith("Bearer")
    assert api.reviews == []                    # no token: nothing to ask
    assert call(app, "/metrics", "made-up")[0].startswith("401")
    status, _, body = call(app, "/metrics", "stranger-token")
    assert status.startswith("403") and STRANGER["username"].encode() in body
    assert call(app, "/metrics", "reader-token")[0].startswith("200")
    # the probes stay open to the kubelet; the landing page does not
    assert call(app, "/healthz")[0].startswith("200")
    assert call(app, "/readyz")[0].startswith("200")
    assert call(app, "/")[0].startswith("401")
    # the access review asks what the scrapers are granted: get on the path
    access = [spec for kind, spec in api.reviews if kind == "subjectaccessreview"]
    assert access[-1]["user"] == READER["username"]
    assert access[-1]["groups"] == READER["groups"]
    assert access[-1]["nonResourceAttributes"] == {"path": "/metrics", "verb": "get"}


def test_answers_are_cached_per_token(api: KubeAPI) -> None:
    auth = auth_for(api, cache=0.3)
    for _ in range(20):
        assert auth.decide("Bearer reader-token").outcome == "allowed"
        assert auth.decide("Bearer stranger-token").outcome == "forbidden"
    assert [kind for kind, _ in api.reviews].count("tokenreview") == 2
    assert [kind for kind, _ in api.reviews].count("subjectaccessreview") == 2
    # past the cache's time the API server is asked again
    deadline = time.monotonic() + 5
    while len(api.reviews) == 4 and time.monotonic() < deadline:
        auth.decide("Bearer reader-token")
        time.sleep(0.05)
    assert [kind for kind, _ in api.reviews].count("tokenreview") == 3
    families = {f.name: {s.labels["outcome"]: s.value for s in f.samples}
                for f in auth.collect()}
    assert families["ebpf_net_exporter_auth_reviews"]["allowed"] == 2
    assert families["ebpf_net_exporter_auth_reviews"]["forbidden"] == 1
    assert families["ebpf_net_exporter_auth_requests"]["forbidden"] == 20


def test_an_api_server_that_cannot_answer_fails_closed_and_recovers(
        api: KubeAPI, caplog: pytest.LogCaptureFixture) -> None:
    auth = auth_for(api)
    api.stop()
    with caplog.at_level(logging.INFO, logger="ebpf_net_exporter.auth"):
        for _ in range(3):
            verdict = auth.decide("Bearer reader-token")
            assert verdict.outcome == "unavailable" and verdict.status.startswith("503")
        api.start()
        assert auth.decide("Bearer reader-token").outcome == "allowed"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot check scrape credentials" in m for m in messages) == 1    # logged once
    assert sum("checks scrape credentials again" in m for m in messages) == 1
    families = {f.name: {s.labels["outcome"]: s.value for s in f.samples}
                for f in auth.collect()}
    assert families["ebpf_net_exporter_auth_reviews"]["unavailable"] == 3
    assert families["ebpf_net_exporter_auth_requests"]["unavailable"] == 3


def test_the_certificate_made_at_start_serves_tls(api: KubeAPI) -> None:
    cert, _ = selfsigned.certificate(["node-1", "localhost"], ["127.0.0.1", "not-an-ip"])
    names = x509.load_pem_x509_certificate(cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["node-1", "localhost"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    context = selfsigned.server_context(["localhost"], ["127.0.0.1"])
    app = make_app(CollectorRegistry(), "/metrics", lambda: True, auth=auth_for(api))
    server = WebServer("127.0.0.1:0", app, context)
    server.start()
    try:
        client = ssl.create_default_context()
        client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
        request = urllib.request.Request(f"https://127.0.0.1:{server.port}/metrics",
                                         headers={"Authorization": "Bearer reader-token"})
        with urllib.request.urlopen(request, context=client, timeout=10) as response:
            assert response.status == 200
    finally:
        server.stop()


def test_a_web_config_s_headers_and_tls_stay_with_kubernetes_auth(api: KubeAPI) -> None:
    """--web.config.file's certificate and headers still apply; its basic auth is the one
    thing that cannot be combined (the exporter refuses it at start)."""
    from exporter.serving.webconfig import WebConfig

    web = WebConfig(tls=selfsigned.server_context(["localhost"], []),
                    headers=(("X-Content-Type-Options", "nosniff"),))
    app = make_app(CollectorRegistry(), "/metrics", lambda: True, web, auth_for(api))
    status, headers, _ = call(app, "/metrics")
    assert status.startswith("401") and headers["X-Content-Type-Options"] == "nosniff"
    status, headers, _ = call(app, "/metrics", "reader-token")
    assert status.startswith("200") and headers["X-Content-Type-Options"] == "nosniff"
