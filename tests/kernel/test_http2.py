"""HTTP/2 in clear (h2c) and gRPC against real implementations through a test node: nginx
with http2 and curl --http2-prior-knowledge, and a grpcio server and client."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hpack import Encoder

from exporter import config
from lab.certs import make_certs
from lab.exporter_process import ExporterProcess, Scrape, bpf_map_write, wait_until
from lab.testnode import TestNode, in_netns, nginx_config
from tests.kernel.test_http import (
    HTTP_START_HTTP1,
    HTTP_START_SLOTS,
    _direction_hash,
    _http_start,
)

pytestmark = pytest.mark.kernel

H2_PORT, GRPC_PORT, H2_TLS_PORT = 8090, 50051, 8453
HTTP_START_H2 = 1 << 33            # bpf/http_packets.h
LOCATIONS = {"/ok": 200, "/created": 201, "/error": 500}
PEER = str(Path(__file__).with_name("grpc_peer.py"))


@pytest.fixture(scope="module")
def h2(node: TestNode) -> Iterator[ExporterProcess]:
    root = Path(tempfile.mkdtemp(prefix=f"{node.prefix}-nginx2-"))
    certs = make_certs(root / "certs")
    config = nginx_config(str(root), [f"{node.b_ip}:{H2_PORT} http2",
                                      f"[{node.b_ip6}]:{H2_PORT} http2",
                                      f"{node.b_ip}:{H2_TLS_PORT} ssl http2"], LOCATIONS,
                          http_extra=f"ssl_certificate {certs.server_cert}; "
                                     f"ssl_certificate_key {certs.server_key};")
    (root / "nginx.conf").write_text(config)
    node.spawn(node.b_ns, ["nginx", "-c", str(root / "nginx.conf"), "-p", str(root)])
    grpc_server = node.spawn(node.b_ns, [sys.executable, PEER, "serve", node.b_ip,
                                         str(GRPC_PORT)], stdout=subprocess.PIPE, text=True)
    assert grpc_server.stdout is not None and grpc_server.stdout.readline().strip() == "ready"
    wait_until(lambda: curl(node, f"http://{node.b_ip}:{H2_PORT}/ok") == ["200"], 10, "nginx")
    process = ExporterProcess(node, config={"http": {"paths": ["/ok", "/test.Echo/"],
                                                     "grpc_services": ["test.*"]}})
    try:
        yield process.wait_ready()
    finally:
        code = process.stop()
        node.stop(grpc_server)
        node.run(node.b_ns, ["nginx", "-c", str(root / "nginx.conf"), "-p", str(root), "-s",
                             "stop"], check=False)
        shutil.rmtree(root, ignore_errors=True)
        assert code == 0, process.log()


def curl(node: TestNode, *urls: str) -> list[str]:
    """Status codes of the URLs, each fetched on a connection of its own: curl 7.88 fails
    ("Error in the HTTP2 framing layer") when it reuses an h2c prior-knowledge connection. Many
    requests on one connection come from the gRPC client."""
    return [node.run(node.a_ns, ["curl", "-s", "--http2-prior-knowledge", "-o", "/dev/null",
                                 "-w", "%{http_code}", url]).stdout for url in urls]


def curl_tls(node: TestNode, *urls: str) -> list[str]:
    """Status codes of the URLs over HTTP/2 inside TLS (ALPN h2), on one connection."""
    out = ["-o", "/dev/null"] * len(urls)
    return node.run(node.a_ns, ["curl", "-sk", "--http2", *out, "-w",
                                "%{http_code} %{http_version} ", *urls]).stdout.split()


def grpc_calls(node: TestNode, *plan: str) -> list[str]:
    """The status names the client saw, one per call, all on one channel."""
    return node.run(node.a_ns, [sys.executable, PEER, "call", node.b_ip, str(GRPC_PORT),
                                *plan], timeout=60).stdout.split()


def http_value(scrape: Scrape, metric: str, node: TestNode, port: int, **labels: str) -> float:
    return scrape.value(f"ebpf_net_http_{metric}", src_ip=node.a_ip, dst_ip=node.b_ip,
                        dst_port=str(port), **labels)


def grpc_value(scrape: Scrape, metric: str, node: TestNode, **labels: str) -> float:
    return scrape.value(f"ebpf_net_grpc_{metric}", src_ip=node.a_ip, dst_ip=node.b_ip,
                        dst_port=str(GRPC_PORT), **labels)


def _wait_http(h2: ExporterProcess, node: TestNode, before: Scrape, port: int,
               expected: Counter) -> Scrape:
    def done(s: Scrape) -> bool:
        return all(http_value(s, "requests_total", node, port, version="2", method=m,
                              status_code=c) - http_value(before, "requests_total", node, port,
                                                          version="2", method=m,
                                                          status_code=c) >= n
                   for (m, c), n in expected.items())

    return h2.wait_for(done, f"{sum(expected.values())} HTTP/2 requests")


def _grpc_delta(scrape: Scrape, before: Scrape, node: TestNode, status: str) -> float:
    return (grpc_value(scrape, "requests_total", node, grpc_status=status)
            - grpc_value(before, "requests_total", node, grpc_status=status))


def _wait_grpc(h2: ExporterProcess, node: TestNode, before: Scrape,
               expected: Counter) -> Scrape:
    return h2.wait_for(lambda s: all(_grpc_delta(s, before, node, status) >= n
                                     for status, n in expected.items()),
                       f"{sum(expected.values())} gRPC calls")


def test_nginx_h2c_requests_are_counted_exactly_with_version_2(node: TestNode,
                                                               h2: ExporterProcess):
    before = h2.scrape()
    base = f"http://{node.b_ip}:{H2_PORT}"
    codes = curl(node, base + "/ok", base + "/created", base + "/missing", base + "/error",
                 base + "/ok")
    assert codes == ["200", "201", "404", "500", "200"]
    expected = Counter({("GET", "200"): 2, ("GET", "201"): 1, ("GET", "404"): 1,
                        ("GET", "500"): 1})
    after = _wait_http(h2, node, before, H2_PORT, expected)
    for (method, code), n in expected.items():
        delta = (http_value(after, "requests_total", node, H2_PORT, version="2",
                            method=method, status_code=code)
                 - http_value(before, "requests_total", node, H2_PORT, version="2",
                              method=method, status_code=code))
        assert delta == n, (method, code)
    # the ring's size (maps.http2_ring_mib's default), in records of 200 bytes and their
    # 8-byte headers
    ring_bytes = config.load(None, {}, {}).maps.http2_ring_mib << 20
    assert after.value("ebpf_net_exporter_bpf_map_capacity", map="http2_records") == \
        ring_bytes // 208
    # nothing read as HTTP/1 on that port, and no parse error
    assert after.value("ebpf_net_http_requests_total", dst_port=str(H2_PORT),
                       version="1.1") == 0
    assert after.value("ebpf_net_exporter_parse_errors_total", protocol="http2") == \
        before.value("ebpf_net_exporter_parse_errors_total", protocol="http2")


def test_nginx_h2c_over_ipv6(node: TestNode, h2: ExporterProcess):
    def created(s: Scrape) -> float:
        return s.value("ebpf_net_http_requests_total", src_ip=node.a_ip6, dst_ip=node.b_ip6,
                       dst_port=str(H2_PORT), version="2", method="GET", status_code="201")

    before = h2.scrape()
    assert curl(node, f"http://[{node.b_ip6}]:{H2_PORT}/created") == ["201"]
    after = h2.wait_for(lambda s: created(s) > created(before), "the IPv6 request")
    assert created(after) - created(before) == 1


def test_grpc_calls_by_status_exactly(node: TestNode, h2: ExporterProcess):
    before = h2.scrape()
    seen = grpc_calls(node, "unary:OK", "unary:NOT_FOUND", "unary:UNAVAILABLE", "unary:OK",
                      "stream:5", "deadline")
    assert seen == ["OK", "NOT_FOUND", "UNAVAILABLE", "OK", "OK", "DEADLINE_EXCEEDED"]
    expected = Counter({"OK": 3, "NOT_FOUND": 1, "UNAVAILABLE": 1})
    after = _wait_grpc(h2, node, before, expected)
    for status, n in expected.items():
        assert _grpc_delta(after, before, node, status) == n, status
    # the opt-in grpc_method label, and the path label of the HTTP metrics, from :path
    assert grpc_value(after, "requests_total", node, grpc_status="NOT_FOUND",
                      grpc_method="/test.Echo/Unary") == \
        grpc_value(after, "requests_total", node, grpc_status="NOT_FOUND")
    assert http_value(after, "requests_total", node, GRPC_PORT, version="2",
                      path="/test.Echo/Stream") >= 1
    # the client gave up on the deadline: reset before the answer, or the server's own
    # DEADLINE_EXCEEDED, whichever came first on the wire; counted once either way
    late = h2.wait_for(lambda s: _grpc_delta(s, before, node, "DEADLINE_EXCEEDED")
                       + _grpc_delta(s, before, node, "none")
                       + _grpc_delta(s, before, node, "CANCELLED") >= 1, "the deadline")
    assert (_grpc_delta(late, before, node, "DEADLINE_EXCEEDED")
            + _grpc_delta(late, before, node, "none")
            + _grpc_delta(late, before, node, "CANCELLED")) == 1
    # every call also counts as an HTTP/2 POST
    posts = (http_value(late, "requests_total", node, GRPC_PORT, version="2", method="POST",
                        status_code="200")
             - http_value(before, "requests_total", node, GRPC_PORT, version="2",
                          method="POST", status_code="200"))
    assert posts in (5, 6)      # the deadline's call may have been reset before its headers


def test_a_slow_call_lands_in_the_right_latency_bucket(node: TestNode, h2: ExporterProcess):
    before = h2.scrape()
    assert grpc_calls(node, "slow") == ["OK"]
    after = _wait_grpc(h2, node, before, Counter({"OK": 1}))

    def bucket(s: Scrape, le: str) -> float:
        return grpc_value(s, "request_duration_seconds_bucket", node, grpc_status="OK", le=le)

    # 0.3 s lies in (0.262144, 0.524288]
    assert bucket(after, "0.524288") - bucket(before, "0.524288") == 1
    assert bucket(after, "0.262144") - bucket(before, "0.262144") == 0


def test_many_streams_on_one_connection_and_dynamic_table_reuse(node: TestNode,
                                                                h2: ExporterProcess):
    """200 concurrent calls and then 300 sequential ones on one channel: later headers are
    dynamic-table references, and every call still decodes to its status."""
    before = h2.scrape()
    seen = grpc_calls(node, "many:200", *["unary:OK"] * 150, *["unary:NOT_FOUND"] * 150)
    assert Counter(seen) == Counter({"OK": 350, "NOT_FOUND": 150})
    after = _wait_grpc(h2, node, before, Counter({"OK": 350, "NOT_FOUND": 150}))
    assert _grpc_delta(after, before, node, "OK") == 350
    assert _grpc_delta(after, before, node, "NOT_FOUND") == 150
    assert _grpc_delta(after, before, node, "unparsed") == 0


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, SETTINGS = 1, 4
END_STREAM, END_HEADERS = 0x1, 0x4


def _frame(ftype: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + struct.pack(">BBI", ftype, flags, stream) + payload


def _raw_h2(node: TestNode, frames: bytes) -> bytes:
    """A connection to nginx that sends the preface, an empty SETTINGS and `frames`, then
    reads what nginx answers until it closes or goes quiet."""
    with in_netns(node.a_ns):
        sock = socket.create_connection((node.b_ip, H2_PORT), timeout=5)
    with sock:
        sock.sendall(PREFACE + _frame(SETTINGS, 0, 0, b"") + frames)
        received = b""
        sock.settimeout(1)
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except TimeoutError:
            pass
        return received


def _get(path: str) -> bytes:
    block = Encoder().encode([(":method", "GET"), (":scheme", "http"), (":path", path),
                              (":authority", "b")])
    return _frame(HEADERS, END_HEADERS | END_STREAM, 1, block)


def test_malformed_frames_are_parse_errors_and_nothing_else(node: TestNode, h2: ExporterProcess):
    """A HEADERS frame whose length runs past what was sent, and a header block cut short
    (its last literal promises more bytes than the block holds), are parse errors and count no
    request; a frame of an unknown type is ignored (RFC 9113 5.5), and the request after it
    counts as usual. The exporter stays up and keeps counting. nginx answers the first with a
    400 on the stream whose request could not be read: a second parse error (a response to no
    request seen), three in all."""
    before = h2.scrape()
    _raw_h2(node, _frame(HEADERS, END_HEADERS, 1, b"\x82" * 20, length=0xFFFFFF))
    block = Encoder().encode([(":method", "GET"), (":path", "/" + "x" * 40)])
    _raw_h2(node, _frame(HEADERS, END_HEADERS | END_STREAM, 1, block[:-10]))
    answered = _raw_h2(node, _frame(0x42, 0, 0, b"hello") + _get("/ok"))
    assert answered, "nginx answered the request after the unknown frame"

    def errors(s: Scrape) -> float:
        return s.value("ebpf_net_exporter_parse_errors_total", protocol="http2")

    after = h2.wait_for(lambda s: errors(s) - errors(before) >= 3 and http_value(
        s, "requests_total", node, H2_PORT, version="2", method="GET", status_code="200")
        > http_value(before, "requests_total", node, H2_PORT, version="2", method="GET",
                     status_code="200"), "three parse errors and one request")
    assert errors(after) - errors(before) == 3
    counted = {(s.labels["method"], s.labels["status_code"]): s.value
               for s in after.select("ebpf_net_http_requests_total", dst_port=str(H2_PORT))}
    was = {(s.labels["method"], s.labels["status_code"]): s.value
           for s in before.select("ebpf_net_http_requests_total", dst_port=str(H2_PORT))}
    assert {k: v - was.get(k, 0) for k, v in counted.items() if v != was.get(k, 0)} == {
        ("GET", "200"): 1}
    assert after.value("ebpf_net_exporter_scrape_collector_success", collector="http") == 1


def test_http2_inside_tls_is_read_from_openssl_and_counted_once(node: TestNode,
                                                                h2: ExporterProcess):
    """curl and nginx, both OpenSSL, ALPN h2: the requests are read from the plaintext of
    both, and counted once, by the client, as scheme https, version 2."""
    def count(s: Scrape, code: str) -> float:
        return s.value("ebpf_net_http_requests_total", src_ip=node.a_ip, dst_ip=node.b_ip,
                       dst_port=str(H2_TLS_PORT), scheme="https", version="2", method="GET",
                       status_code=code)

    before = h2.scrape()
    base = f"https://{node.b_ip}:{H2_TLS_PORT}"
    seen = curl_tls(node, base + "/ok", base + "/created", base + "/missing", base + "/ok")
    assert seen[::2] == ["200", "201", "404", "200"] and set(seen[1::2]) == {"2"}
    expected = {"200": 2, "201": 1, "404": 1}
    after = h2.wait_for(lambda s: all(count(s, c) - count(before, c) >= n
                                      for c, n in expected.items()), "the HTTP/2 requests in TLS")
    assert {c: count(after, c) - count(before, c) for c in expected} == expected
    # nothing else on that port, in clear or in TLS, as HTTP/1 or 2
    assert after.value("ebpf_net_http_requests_total", dst_port=str(H2_TLS_PORT)) - \
        before.value("ebpf_net_http_requests_total", dst_port=str(H2_TLS_PORT)) == 4
    assert after.value("ebpf_net_exporter_parse_errors_total", protocol="http2") == \
        before.value("ebpf_net_exporter_parse_errors_total", protocol="http2")


def test_a_direction_whose_entry_another_connection_took_is_still_walked(node: TestNode,
                                                                         h2: ExporterProcess):
    """http_starts is direct-mapped: a new connection whose hash lands on a long-lived HTTP/2
    connection's slot overwrites its mark. The walk must go on: the direction takes its entry
    back at its next segment. Forced here by writing another connection's entry into both
    slots between calls on one channel."""
    before = h2.scrape()
    client = node.spawn(node.a_ns, [sys.executable, PEER, "call", node.b_ip, str(GRPC_PORT),
                                    "unary:OK", "pause", "unary:OK", "unary:NOT_FOUND",
                                    "unary:OK", "pause"], stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, text=True)
    assert client.stdin is not None and client.stdout is not None
    assert client.stdout.readline().strip() == "OK"
    # the channel's connection: the client's end of the one established to the server's port
    lines = node.run(node.a_ns, ["ss", "-Htn", "dst", f"{node.b_ip}:{GRPC_PORT}"]).stdout
    (line,) = [x for x in lines.splitlines() if "ESTAB" in x]
    sport = int(line.split()[3].rsplit(":", 1)[1])
    directions = ((node.a_ip, sport, node.b_ip, GRPC_PORT), (node.b_ip, GRPC_PORT, node.a_ip,
                                                              sport))
    for direction in directions:
        tag, value = _http_start(h2.proc.pid, *direction)
        assert value == tag | HTTP_START_H2
        other = (tag ^ (1 << 40)) | HTTP_START_HTTP1       # another connection's, decided
        index = _direction_hash(*direction) & (HTTP_START_SLOTS - 1)
        bpf_map_write(h2.proc.pid, "http_starts", index.to_bytes(4, "little"),
                      other.to_bytes(8, "little"))
    client.stdin.write("\n")
    client.stdin.flush()
    assert [client.stdout.readline().strip() for _ in range(3)] == ["OK", "NOT_FOUND", "OK"]
    after = _wait_grpc(h2, node, before, Counter({"OK": 3, "NOT_FOUND": 1}))
    assert _grpc_delta(after, before, node, "OK") == 3
    assert _grpc_delta(after, before, node, "NOT_FOUND") == 1
    for direction in directions:          # the marks are back (the connection still open)
        tag, value = _http_start(h2.proc.pid, *direction)
        assert value == tag | HTTP_START_H2
    client.stdin.write("\n")
    client.stdin.flush()
    assert client.wait(timeout=30) == 0


UPGRADE_PORT = 8094


class UpgradeServer:
    """Answers one HTTP/1.1 Upgrade: h2c as a server does: 101 and its first HTTP/2 frames at
    once (SETTINGS, and the upgraded request's answer, which adds an entry to its HPACK
    table), then, to the client's next request (stream 3), an answer that refers to that
    entry."""

    def __init__(self, node: TestNode) -> None:
        with in_netns(node.b_ns):
            self.sock = socket.create_server((node.b_ip, UPGRADE_PORT))
        self.sock.settimeout(10)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        encoder = Encoder()
        conn, _ = self.sock.accept()
        with conn:
            conn.settimeout(10)
            received = b""
            while b"\r\n\r\n" not in received:
                received += conn.recv(4096)
            first = encoder.encode([(":status", "200"), ("x-added", "to the table")])
            conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: h2c\r\n\r\n" + _frame(SETTINGS, 0, 0, b"")
                         + _frame(HEADERS, END_HEADERS | END_STREAM, 1, first))
            received = b""
            while len(received) < len(PREFACE) + 9 + 9 + 4:   # the preface, SETTINGS, HEADERS
                received += conn.recv(4096)
            later = encoder.encode([(":status", "200"), ("x-added", "to the table")])
            assert later[-1:] == bytes([0x80 | 62])           # a reference to that entry
            conn.sendall(_frame(HEADERS, END_HEADERS | END_STREAM, 3, later))
            while conn.recv(4096):
                pass

    def close(self) -> None:
        self.thread.join(timeout=10)
        self.sock.close()


def test_an_upgraded_connection_counts_its_requests_and_guesses_no_status(node: TestNode,
                                                                          h2: ExporterProcess):
    """HTTP/1.1 Upgrade: h2c: the upgrade request counts as HTTP/1.1 101, and the request after
    the client's preface is counted. The server's answer refers to a table entry its first
    frames added before the preface, which the exporter never saw: the answer cannot be
    decoded, and the request counts "unknown", never a guessed status."""
    def count(s: Scrape, version: str, code: str) -> float:
        return s.value("ebpf_net_http_requests_total", dst_port=str(UPGRADE_PORT),
                       version=version, method="GET", status_code=code)

    before = h2.scrape()
    server = UpgradeServer(node)
    try:
        with in_netns(node.a_ns):
            sock = socket.create_connection((node.b_ip, UPGRADE_PORT), timeout=5)
        with sock:
            sock.sendall(b"GET /up HTTP/1.1\r\nHost: b\r\nConnection: Upgrade, HTTP2-Settings"
                         b"\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
            received = b""
            while b"\r\n\r\n" not in received:
                received += sock.recv(4096)
            assert received.startswith(b"HTTP/1.1 101")
            block = Encoder().encode([(":method", "GET"), (":scheme", "http"),
                                      (":path", "/after"), (":authority", "b")])
            sock.sendall(PREFACE + _frame(SETTINGS, 0, 0, b"")
                         + _frame(HEADERS, END_HEADERS | END_STREAM, 3, block))
            received = b""
            while len(received) < 9 + 2:                   # the answer to stream 3: 2 bytes
                received += sock.recv(4096)
    finally:
        server.close()
    after = h2.wait_for(lambda s: count(s, "1.1", "101") > count(before, "1.1", "101")
                        and count(s, "2", "unknown") > count(before, "2", "unknown"),
                        "the upgrade and the request after it")
    assert count(after, "1.1", "101") - count(before, "1.1", "101") == 1
    assert count(after, "2", "unknown") - count(before, "2", "unknown") == 1
    assert after.value("ebpf_net_http_requests_total", dst_port=str(UPGRADE_PORT),
                       version="2") - before.value("ebpf_net_http_requests_total",
                                                   dst_port=str(UPGRADE_PORT), version="2") == 1
