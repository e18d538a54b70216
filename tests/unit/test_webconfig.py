"""--web.config.file: real TLS (openssl-made certificates), real clients (curl), and one line
with exit 2 for every bad file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter

from exporter.serving import webconfig
from exporter.serving.server import WebServer, make_app
from lab.certs import Certs, bcrypt_hash, make_certs

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "s3cret-scrape"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def hashed() -> str:
    return bcrypt_hash(PASSWORD)


def serve(tmp_path: Path, document: dict):
    path = tmp_path / "web.yml"
    path.write_text(yaml.safe_dump(document))
    web = webconfig.load(path)
    registry = CollectorRegistry()
    Counter("secret_scrapes", "a metric only an authenticated client may read",
            registry=registry).inc(7)
    server = WebServer("127.0.0.1:0", make_app(registry, "/metrics", lambda: True, web),
                       web.tls)
    server.start()
    return server


def curl(url: str, *args: str) -> tuple[int, int, str]:
    """(curl's exit code, HTTP status, body)."""
    result = subprocess.run(["curl", "-sS", "--max-time", "10", "-o", "-",
                             "-w", "\n%{http_code}", *args, url],
                            capture_output=True, text=True, timeout=20)
    body, _, status = result.stdout.rpartition("\n")
    return result.returncode, int(status or 0), body


def tls_auth(certs: Certs, hashed: str, **tls: str) -> dict:
    return {"tls_server_config": {"cert_file": str(certs.server_cert),
                                  "key_file": str(certs.server_key), **tls},
            "basic_auth_users": {"prometheus": hashed},
            "http_server_config": {"headers": {"X-Content-Type-Options": "nosniff"}}}


def test_tls_and_basic_auth_answer_each_client_rightly(tmp_path, certs, hashed):
    server = serve(tmp_path, tls_auth(certs, hashed))
    try:
        url = f"https://127.0.0.1:{server.port}"
        ca = ["--cacert", str(certs.ca)]
        code, status, body = curl(url + "/metrics", *ca, "-u", f"prometheus:{PASSWORD}")
        assert (code, status) == (0, 200)
        assert "secret_scrapes_total 7.0" in body
        assert curl(url + "/metrics", *ca)[1] == 401                       # no credentials
        assert curl(url + "/metrics", *ca, "-u", "prometheus:wrong")[1] == 401
        assert curl(url + "/metrics", *ca, "-u", f"mallory:{PASSWORD}")[1] == 401
        assert curl(url + "/metrics", *ca, "-u", "prometheus:" + "x" * 100)[1] == 401
        # like exporter-toolkit: every path is behind the auth, probes included
        assert curl(url + "/healthz", *ca)[1] == 401
        assert curl(url + "/readyz", *ca, "-u", f"prometheus:{PASSWORD}")[1] == 200
        headers = subprocess.run(["curl", "-sS", "-D", "-", "-o", "/dev/null", *ca,
                                  url + "/metrics"], capture_output=True, text=True).stdout
        assert "WWW-Authenticate: Basic" in headers
        assert "X-Content-Type-Options: nosniff" in headers
        # a server we cannot verify: curl refuses (exit 60), nothing is sent
        assert curl(url + "/metrics", "-u", f"prometheus:{PASSWORD}")[0] == 60
        # plain HTTP to the TLS port: Go's answer, not a reset
        plain = curl(f"http://127.0.0.1:{server.port}/metrics")
        assert plain[1] == 400
        assert "HTTP request to an HTTPS server" in plain[2]
        # still serving after all that
        assert curl(url + "/metrics", *ca, "-u", f"prometheus:{PASSWORD}")[1] == 200
    finally:
        server.stop()


def test_excluded_paths_let_probes_through_without_credentials(tmp_path, certs, hashed):
    document = {**tls_auth(certs, hashed), "auth_excluded_paths": ["/healthz", "/readyz"]}
    server = serve(tmp_path, document)
    try:
        url = f"https://127.0.0.1:{server.port}"
        ca = ["--cacert", str(certs.ca)]
        assert curl(url + "/healthz", *ca)[1:] == (200, "ok\n")
        assert curl(url + "/readyz", *ca)[1:] == (200, "ready\n")
        assert curl(url + "/metrics", *ca)[1] == 401
    finally:
        server.stop()


def test_required_client_certificates(tmp_path, certs, hashed):
    document = tls_auth(certs, hashed, client_ca_file=str(certs.ca),
                        client_auth_type="RequireAndVerifyClientCert")
    server = serve(tmp_path, document)
    try:
        url = f"https://127.0.0.1:{server.port}/metrics"
        base = ["--cacert", str(certs.ca), "-u", f"prometheus:{PASSWORD}"]
        mine = ["--cert", str(certs.client_cert), "--key", str(certs.client_key)]
        stranger = ["--cert", str(certs.stranger_cert), "--key", str(certs.stranger_key)]
        assert curl(url, *base, *mine)[:2] == (0, 200)
        assert curl(url, "--cacert", str(certs.ca), *mine)[1] == 401   # cert and password
        no_cert = curl(url, *base)
        stranger_cert = curl(url, *base, *stranger)
        assert no_cert[1] == 0 and no_cert[0] in (35, 55, 56), no_cert     # handshake refused
        assert stranger_cert[1] == 0 and stranger_cert[0] in (35, 55, 56), stranger_cert
    finally:
        server.stop()


def test_tls_only_without_users_needs_no_credentials(tmp_path, certs):
    server = serve(tmp_path, {"tls_server_config": {"cert_file": str(certs.server_cert),
                                                    "key_file": str(certs.server_key)}})
    try:
        code, status, body = curl(f"https://127.0.0.1:{server.port}/metrics",
                                  "--cacert", str(certs.ca))
        assert (code, status) == (0, 200)
        assert "secret_scrapes_total 7.0" in body
    finally:
        server.stop()


def check(web_config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exporter", "--config.check",
                           "--web.config.file", str(web_config)],
                          capture_output=True, text=True, cwd=REPO, timeout=60)


BAD = [
    ("tls_server_config:\n  cert_file: {cert}\n", "cert_file and key_file are both required"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: nowhere.key\n",
     "tls_server_config.key_file"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {ca}\n", "cert_file"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireAndVerifyClientCert\n", "needs client_ca_file"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireAnyClientCert\n", "without verifying them"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  client_auth_type: Maybe\n",
     "client_auth_type: expected one of"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  min_version: TLS9\n",
     "min_version"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  cipher_suites: [x]\n",
     "cipher_suites: not supported"),
    ("basic_auth_users:\n  alice: plaintext\n", "basic_auth_users.alice: expected a bcrypt"),
    ("basic_auth_users: [alice]\n", "basic_auth_users: expected a mapping"),
    ("rate_limit:\n  burst: 3\n", "rate_limit: not supported"),
    ("tls_config:\n  cert_file: x\n", "tls_config: unknown key"),
    ("auth_excluded_paths: healthz\n", "auth_excluded_paths"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: always\n", "X-Frame-Options"),
    ("tls_server_config: [\n", "invalid YAML"),
    ("- a\n", "web config: expected a mapping"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m for _, m in BAD])
def test_a_bad_web_config_is_one_line_and_exit_2(tmp_path, certs, text, message):
    path = tmp_path / "web.yml"
    path.write_text(text.format(cert=certs.server_cert, key=certs.server_key, ca=certs.ca))
    result = check(path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"ebpf-net-exporter: --web.config.file: web config file {path}")
    assert message in lines[0]


def test_a_missing_web_config_file_is_one_line(tmp_path):
    result = check(tmp_path / "absent.yml")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("No such file or directory")
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_toolkit_sample_hashes_are_accepted(tmp_path, certs):
    # the $2y$ hashes of exporter-toolkit's docs/web-config.yml (htpasswd's flavour)
    path = tmp_path / "web.yml"
    path.write_text("basic_auth_users:\n  alice: $2y$10$mDwo.lAisC94iLAyP81MCesa29IzH37oigHC/"
                    "42V2pdJlUprsJPze\n")
    assert set(webconfig.load(path).users) == {"alice"}
    assert check(path).returncode == 0
