"""HTTP/1.x metrics against a real server (nginx) and real clients (curl, http.client, raw
sockets) through a test node."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import socket
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.exporter_process import ExporterProcess, Scrape, bpf_map_dump, wait_until
from lab.httptools import RawServer, SlowServer
from lab.testnode import TestNode, in_netns, nginx_config

pytestmark = pytest.mark.kernel

LOCATIONS = {"/ok": 200, "/created": 201, "/empty": 204, "/moved": 301, "/error": 500,
             "/unavailable": 503}
SLOW_PORT, PIPELINE_PORT, BAD_STATUS_PORT, SINK_PORT = 8081, 8082, 8083, 8084
SLOW_SECONDS = 0.3


def _connect(node: TestNode, port: int) -> socket.socket:
    """A TCP connection from pod a to pod b's `port`."""
    with in_netns(node.a_ns):
        return socket.create_connection((node.b_ip, port), timeout=5)


@contextlib.contextmanager
def _to_a_reader(node: TestNode, port: int) -> Iterator[socket.socket]:
    """A connection from pod a to a server of pod b on `port` that only reads (RawServer):
    the server goes once the block ends."""
    server = RawServer(node.b_ns, node.b_ip, port, None)
    try:
        with _connect(node, port) as client:
            yield client
    finally:
        server.close()


def web_config(node: TestNode, root: Path) -> str:
    return nginx_config(str(root), [f"{node.b_ip}:80", f"[{node.b_ip6}]:80"], LOCATIONS,
                        prefixes={"/api/": 200},
                        http_extra="large_client_header_buffers 4 32k;")


@pytest.fixture(scope="module")
def web(node: TestNode) -> Iterator[ExporterProcess]:
    root = Path(tempfile.mkdtemp(prefix=f"{node.prefix}-nginx-"))
    (root / "nginx.conf").write_text(web_config(node, root))
    node.spawn(node.b_ns, ["nginx", "-c", str(root / "nginx.conf"), "-p", str(root)])
    servers = [SlowServer(node.b_ns, node.b_ip, SLOW_PORT, SLOW_SECONDS),
               SlowServer(node.b_ns, node.b_ip, PIPELINE_PORT, 0.2),
               RawServer(node.b_ns, node.b_ip, BAD_STATUS_PORT, b"HTTP/1.1 2x0 Bad\r\n\r\n"),
               RawServer(node.b_ns, node.b_ip, SINK_PORT, None)]
    wait_until(lambda: node.run(node.a_ns, ["curl", "-s", "-o", "/dev/null", "-w",
                                            "%{http_code}", f"http://{node.b_ip}/ok"],
                                check=False).stdout == "200", 10, "nginx")
    process = ExporterProcess(node, config={"http": {"paths": ["/api/", "/ok"]}})
    try:
        yield process.wait_ready()
    finally:
        code = process.stop()
        for server in servers:
            server.close()
        node.run(node.b_ns, ["nginx", "-c", str(root / "nginx.conf"), "-p", str(root), "-s",
                             "stop"], check=False)
        shutil.rmtree(root, ignore_errors=True)
        assert code == 0, process.log()


def curl(node: TestNode, *args: str) -> str:
    return node.run(node.a_ns, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} ",
                                *args]).stdout


def http_value(scrape: Scrape, metric: str, port: str = "80", server: str | None = None,
               client: str | None = None, **labels: str) -> float:
    return scrape.value(f"ebpf_net_http_{metric}", src_ip=client or scrape.client,
                        dst_ip=server or scrape.server, dst_port=port, **labels)


def settle(web: ExporterProcess, node: TestNode, expected: Counter, port: str = "80",
           server: str | None = None, client: str | None = None) -> Scrape:
    def done(s: Scrape) -> bool:
        s.client, s.server = client or node.a_ip, server or node.b_ip  # type: ignore[attr-defined]
        return all(http_value(s, "requests_total", port, method=m, status_code=c) >= n
                   for (m, c), n in expected.items())

    return web.wait_for(done, f"{sum(expected.values())} requests")


def test_exact_counts_by_method_and_status_from_curl_and_http_client(node: TestNode,
                                                                     web: ExporterProcess,
                                                                     tmp_path: Path):
    before = web.scrape()
    expected: Counter = Counter()
    base = f"http://{node.b_ip}"
    for path, code in LOCATIONS.items():                       # one request per connection
        assert curl(node, base + path).strip() == str(code)
        expected[("GET", str(code))] += 1
    assert curl(node, base + "/missing").strip() == "404"
    expected[("GET", "404")] += 1
    # several URLs on one keep-alive connection
    assert curl(node, "-o", "/dev/null", "-o", "/dev/null", base + "/ok", base + "/error",
                base + "/ok").split() == ["200", "500", "200"]
    expected[("GET", "200")] += 2
    expected[("GET", "500")] += 1
    # POST with a 200 KB body (many segments after the request line), HEAD
    body = tmp_path / "body"
    body.write_bytes(os.urandom(200_000))
    assert curl(node, "--data-binary", f"@{body}", base + "/created").strip() == "201"
    expected[("POST", "201")] += 1
    assert curl(node, "-I", base + "/ok").strip() == "200"
    expected[("HEAD", "200")] += 1
    # Python's http.client: three methods on one connection
    with in_netns(node.a_ns):
        conn = http.client.HTTPConnection(node.b_ip, 80, timeout=5)
        conn.connect()
    for method, path in (("PUT", "/ok"), ("DELETE", "/missing"), ("OPTIONS", "/ok")):
        conn.request(method, path)
        response = conn.getresponse()
        response.read()
        expected[(method, str(response.status))] += 1
    conn.close()

    scrape = settle(web, node, expected)
    before.client, before.server = node.a_ip, node.b_ip          # type: ignore[attr-defined]
    for (method, code), count in expected.items():
        got = http_value(scrape, "requests_total", method=method, status_code=code) - \
            http_value(before, "requests_total", method=method, status_code=code)
        assert got == count, (method, code)
    total = sum(s.value for s in scrape.select("ebpf_net_http_requests_total",
                                                src_ip=node.a_ip, dst_port="80"))
    assert total == sum(expected.values()) + sum(
        s.value for s in before.select("ebpf_net_http_requests_total", src_ip=node.a_ip,
                                       dst_port="80"))
    assert scrape.value("ebpf_net_exporter_parse_errors_total", protocol="http") == \
        before.value("ebpf_net_exporter_parse_errors_total", protocol="http")


def test_ipv6_and_a_16_kib_header(node: TestNode, web: ExporterProcess):
    assert curl(node, "-g", f"http://[{node.b_ip6}]/created").strip() == "201"
    big = "X-Big: " + "a" * 16384
    assert curl(node, "-H", big, f"http://{node.b_ip}/empty").strip() == "204"
    s6 = settle(web, node, Counter({("GET", "201"): 1}), server=node.b_ip6, client=node.a_ip6)
    assert http_value(s6, "requests_total", method="GET", status_code="201") == 1
    s4 = settle(web, node, Counter({("GET", "204"): 2}))
    assert http_value(s4, "requests_total", method="GET", status_code="204") == 2


def test_the_version_is_the_request_lines_or_past_its_scan_the_responses(node: TestNode,
                                                                         web: ExporterProcess):
    before = web.scrape()
    # "/missing" + 200 bytes of query: the request line runs past the 128 bytes examined
    long_target = f"http://{node.b_ip}/missing?" + "q" * 200
    assert curl(node, "--http1.0", f"http://{node.b_ip}/unavailable").strip() == "503"
    assert curl(node, "--http1.0", long_target).strip() == "404"
    assert curl(node, f"http://{node.b_ip}/unavailable").strip() == "503"

    def versions(s: Scrape) -> Counter:
        got: Counter = Counter()
        for sample in s.select("ebpf_net_http_requests_total", src_ip=node.a_ip,
                               dst_port="80", method="GET"):
            if sample.labels["status_code"] in ("503", "404"):
                got[(sample.labels["version"], sample.labels["status_code"])] += sample.value
        return got

    base = versions(before)
    # nginx answers an HTTP/1.0 request with an HTTP/1.1 status line
    expected = Counter({("1.0", "503"): 1, ("1.1", "404"): 1, ("1.1", "503"): 1})
    scrape = web.wait_for(lambda s: versions(s) - base == expected, "3 requests by version")
    assert versions(scrape) - base == expected


def test_duration_histogram_agrees_with_the_client(node: TestNode, web: ExporterProcess):
    url = f"http://{node.b_ip}:{SLOW_PORT}/slow"
    measured = []
    for _ in range(3):
        out = node.run(node.a_ns, ["curl", "-s", "-o", "/dev/null", "-w",
                                   "%{time_pretransfer} %{time_starttransfer}", url]).stdout
        sent, first_byte = map(float, out.split())
        measured.append(first_byte - sent)
    port = str(SLOW_PORT)
    scrape = settle(web, node, Counter({("GET", "200"): 3}), port=port)
    labels = {"method": "GET", "status_code": "200"}
    assert http_value(scrape, "request_duration_seconds_count", port, **labels) == 3
    assert http_value(scrape, "request_duration_seconds_bucket", port, le="0.262144",
                      **labels) == 0
    assert http_value(scrape, "request_duration_seconds_bucket", port, le="0.524288",
                      **labels) == 3
    # the kernel times first byte to first byte between the veths; curl from sending to its
    # first byte received: they agree within 5 ms per request
    total = http_value(scrape, "request_duration_seconds_sum", port, **labels)
    assert abs(total - sum(measured)) < 0.015, (total, measured)


def test_pipelining_past_the_depth_is_counted_as_pipelined(node: TestNode,
                                                           web: ExporterProcess):
    """12 requests sent at once, each in its own segment, to a server answering one every
    200 ms: the first 8 wait in the connection's queue and pair with their responses; the 4
    past the depth are counted as pipelined, and the pairing stays in order."""
    with in_netns(node.a_ns):
        sock = socket.create_connection((node.b_ip, PIPELINE_PORT), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        for i in range(12):
            sock.sendall(f"GET /p{i} HTTP/1.1\r\nHost: b\r\n\r\n".encode())
            time.sleep(0.005)      # its own segment (no autocorking), all sent within 60 ms
        received = b""
        while received.count(b"HTTP/1.1 200") < 12:
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
    finally:
        sock.close()
    port = str(PIPELINE_PORT)
    scrape = settle(web, node, Counter({("GET", "200"): 8, ("GET", "pipelined"): 4}),
                    port=port)
    assert http_value(scrape, "requests_total", port, method="GET", status_code="200") == 8
    assert http_value(scrape, "requests_total", port, method="GET",
                      status_code="pipelined") == 4
    assert http_value(scrape, "request_duration_seconds_count", port, method="GET",
                      status_code="200") == 8


def test_a_request_without_response_counts_as_none_when_the_connection_resets(
        node: TestNode, web: ExporterProcess):
    with in_netns(node.a_ns):
        sock = socket.create_connection((node.b_ip, SLOW_PORT), timeout=5)
    sock.sendall(b"GET /never HTTP/1.1\r\nHost: b\r\n\r\n")
    time.sleep(0.05)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()                        # a reset, before the server's answer
    port = str(SLOW_PORT)
    scrape = settle(web, node, Counter({("GET", "none"): 1}), port=port)
    assert http_value(scrape, "requests_total", port, method="GET", status_code="none") == 1


def test_junk_and_malformed_lines_are_parse_errors_and_nothing_else(node: TestNode,
                                                                    web: ExporterProcess):
    before = web.scrape()
    requests_before = sum(s.value for s in before.select("ebpf_net_http_requests_total")
                          if s.labels["status_code"] != "none")

    def send(port: int, payload: bytes) -> None:
        sock = _connect(node, port)
        sock.sendall(payload)
        time.sleep(0.05)
        sock.close()

    # a non-HTTP stream on port 80 (nginx answers 400 to it: a response to no request seen)
    send(80, bytes(range(256)) * 400)
    # lines that start like HTTP and do not hold together, to a server that only reads
    malformed = [b"GET /index.ht", b"GET /x HTTP/3.0\r\n\r\n", b"POST  HTTP/1.1\r\n\r\n",
                 b"HTTP/1.1 20", b"HTTP/1.1 abc Nope\r\n\r\n", b"DELETE"]
    for payload in malformed:
        send(SINK_PORT, payload)
    # a valid request answered with a malformed status line
    send(BAD_STATUS_PORT, b"GET /ok HTTP/1.1\r\nHost: b\r\n\r\n")

    expected_errors = 1 + 5 + 1      # nginx's 400; 5 malformed lines ("DELETE" < 8 bytes is
    # too short to tell from a body fragment); the bad status line
    errors_before = before.value("ebpf_net_exporter_parse_errors_total", protocol="http")
    scrape = web.wait_for(
        lambda s: s.value("ebpf_net_exporter_parse_errors_total", protocol="http") >=
        errors_before + expected_errors, "parse errors")
    assert scrape.value("ebpf_net_exporter_parse_errors_total", protocol="http") == \
        errors_before + expected_errors
    requests_after = sum(s.value for s in scrape.select("ebpf_net_http_requests_total")
                         if s.labels["status_code"] != "none")
    assert requests_after == requests_before
    # the request answered with junk got no response: it counts as none when the server closes
    scrape = web.wait_for(lambda s: s.value("ebpf_net_http_requests_total",
                                            dst_port=str(BAD_STATUS_PORT),
                                            status_code="none") == 1, "the unanswered request")
    assert web.get("/healthz")[0] == 200


def test_allowlisted_paths_become_the_path_label_with_ids_templated(node: TestNode,
                                                                   web: ExporterProcess):
    base = f"http://{node.b_ip}"
    for path in ("/api/users/123?x=1", "/api/users/456",
                 "/api/items/550e8400-e29b-41d4-a716-446655440000", "/missing/42"):
        curl(node, base + path)
    expected = {"/api/users/{id}": 2, "/api/items/{id}": 1}

    def seen(s: Scrape) -> bool:
        return all(s.value("ebpf_net_http_requests_total", path=p, dst_ip=node.b_ip) >= n
                   for p, n in expected.items())

    scrape = web.wait_for(seen, "labelled requests")
    for path, count in expected.items():
        assert scrape.value("ebpf_net_http_requests_total", path=path, method="GET",
                            status_code="200", dst_ip=node.b_ip) == count
        assert scrape.value("ebpf_net_http_request_duration_seconds_count", path=path,
                            dst_ip=node.b_ip) == count
    assert scrape.value("ebpf_net_http_requests_total", path="other", status_code="404",
                        dst_ip=node.b_ip) >= 1
    paths = {s.labels["path"] for s in scrape.select("ebpf_net_http_requests_total")}
    assert all(p == "other" or p.startswith(("/api/", "/ok")) for p in paths), paths


# http_starts (bpf/http.h): a direction's entry at the slot its endpoints hash to holds the
# hash's high bits as a tag, a not-HTTP bit and, while pending, its first payload's sequence
HTTP_START_SLOTS = 16384
HTTP_START_NOT = 1 << 32
HTTP_START_HTTP1 = 1 << 34       # bpf/http_packets.h
TLS_CLIENT_HELLO_START = bytes.fromhex("160301020001000200fc0303")
_U64 = (1 << 64) - 1


def _direction_hash(src: str, sport: int, dst: str, dport: int) -> int:
    """http_direction_hash() of bpf/http.h for an IPv4 direction."""
    def words(address: str) -> tuple[int, int]:
        raw = socket.inet_aton(address).ljust(16, b"\0")
        return int.from_bytes(raw[:8], "little"), int.from_bytes(raw[8:], "little")

    (s0, s1), (d0, d1) = words(src), words(dst)
    h = ((sport | dport << 16 | 4 << 32) * 0x9E3779B97F4A7C15) & _U64
    for word, factor in ((s0, 0xC2B2AE3D27D4EB4F), (s1, 0x165667B19E3779F9),
                         (d0, 0xD6E8FEB86659FD93), (d1, 0xFF51AFD7ED558CCD)):
        h ^= (word * factor) & _U64
    return h ^ (h >> 29)


def _http_start(pid: int, src: str, sport: int, dst: str, dport: int) -> tuple[int, int]:
    """The direction's tag and what its slot of http_starts holds."""
    h = _direction_hash(src, sport, dst, dport)
    index = h & (HTTP_START_SLOTS - 1)
    tag = (h & (_U64 << 35) & _U64) | 1 << 35     # HTTP_START_TAG_MASK, HTTP_START_TAG_BIT
    for key, (value, *_) in bpf_map_dump(pid, "http_starts"):
        if int.from_bytes(key, "little") == index:
            return tag, int.from_bytes(value, "little")
    raise AssertionError(f"no slot {index} in http_starts")


@pytest.mark.parametrize("first, decided", [
    (TLS_CLIENT_HELLO_START, "not http"),
    (b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n", "http/1"),
], ids=["not-http", "request"])
def test_a_connections_first_payload_decides_whether_its_segments_are_looked_at(
        node: TestNode, web: ExporterProcess, first: bytes, decided: str):
    """The SYN leaves where the client's first payload starts in the direction's http_starts
    entry; that payload, when it cannot start an HTTP message, marks the direction as not HTTP
    (its later segments skip the look at their payload), and when it can, as HTTP/1 (each of
    its segments is looked at)."""
    port = 8085
    with _to_a_reader(node, port) as client:
        sport = client.getsockname()[1]

        def start() -> tuple[int, int]:
            return _http_start(web.proc.pid, node.a_ip, sport, node.b_ip, port)

        tag, pending = start()
        assert pending & ~0xFFFFFFFF == tag     # the SYN's: the tag, no verdict yet
        client.sendall(first)
        expected = tag | (HTTP_START_NOT if decided == "not http" else HTTP_START_HTTP1)
        wait_until(lambda: start()[1] == expected, 5, f"the entry to be {decided}")


# the 12-byte signature, PROXY + TCP over IPv4, 12 bytes of addresses and ports
PROXY_V2_HEADER = (bytes.fromhex("0d0a0d0a000d0a515549540a") + bytes([0x21, 0x11, 0, 12])
                   + bytes([10, 0, 0, 1, 10, 0, 0, 2, 0x1F, 0x90, 0x00, 0x50]))


def test_requests_after_a_proxy_v2_header_are_counted(node: TestNode, web: ExporterProcess):
    """A load balancer's binary PROXY v2 header comes before the first request: it must not
    mark the connection as not HTTP, or the requests that follow would go uncounted."""
    port = 8086
    with _to_a_reader(node, port) as client:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sendall(PROXY_V2_HEADER)
        time.sleep(0.05)        # a segment of its own, as a balancer sends it
        client.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        client.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        client.close()
        # never answered: both count as none once the connection ends
        scrape = web.wait_for(lambda s: s.value("ebpf_net_http_requests_total",
                                                dst_port=str(port)) >= 2, "the two requests")
        assert scrape.value("ebpf_net_http_requests_total", dst_port=str(port), method="GET",
                            status_code="none") == 2


def test_http_ports_limit_detection_to_the_listed_ports():
    """With http.ports set, an exchange on a listed port is counted and the same exchange on
    another port is not (the classifier's port check, compiled from the list)."""
    listed, other = 8091, 8092
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    with TestNode() as own:
        servers = [RawServer(own.b_ns, own.b_ip, port, reply) for port in (listed, other)]
        exporter = ExporterProcess(own, config={"http": {"ports": [listed]}})
        try:
            exporter.wait_ready()
            for port in (listed, other):
                with _connect(own, port) as client:
                    client.sendall(b"GET /x HTTP/1.1\r\nHost: b\r\n\r\n")
                    assert client.recv(4096).startswith(b"HTTP/1.1 200")

            def counted(s: Scrape) -> bool:
                return s.value("ebpf_net_http_requests_total", dst_port=str(listed),
                               method="GET", status_code="200") >= 1

            scrape = exporter.wait_for(counted, "the request on the listed port")
            assert scrape.value("ebpf_net_http_requests_total", dst_port=str(listed),
                                method="GET", status_code="200") == 1
            assert scrape.select("ebpf_net_http_requests_total", dst_port=str(other)) == []
        finally:
            code = exporter.stop()
            for server in servers:
                server.close()
        assert code == 0, exporter.log()
