"""HTTPS from OpenSSL's own buffers (bpf/tls.c): a real nginx with TLS in pod b, real clients
(curl, Python's http.client over ssl) in pod a, both ends on this node and both OpenSSL, so
every exchange must be counted once, by its client."""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.certs import Certs, make_certs
from lab.exporter_process import ExporterProcess, Scrape, wait_until
from lab.httptools import SlowServer
from lab.testnode import TestNode, nginx_config

pytestmark = pytest.mark.kernel

LOCATIONS = {"/ok": 200, "/created": 201, "/error": 500}
SLOW_PORT = 8443
SLOW_SECONDS = 0.3
CLIENT = Path(__file__).with_name("tls_client.py")
STATIC_CLIENT = Path(__file__).parents[1] / "fixtures" / "static_tls_client.c"


def libssl_path() -> str:
    """The libssl this Python maps (the host's), from its own memory map."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        if re.search(r"/libssl\.so[.0-9]*$", line):
            return line.split()[-1]
    raise AssertionError("this Python maps no libssl")


class TlsWeb:
    """nginx with TLS in pod b on port 443 (IPv4 and IPv6), restartable."""

    def __init__(self, node: TestNode, root: Path, certs: Certs) -> None:
        self.node = node
        self.conf = root / "nginx.conf"
        self.conf.write_text(nginx_config(
            str(root), [f"{node.b_ip}:443 ssl", f"[{node.b_ip6}]:443 ssl"], LOCATIONS,
            http_extra=f"ssl_certificate {certs.server_cert}; "
                       f"ssl_certificate_key {certs.server_key};"))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = self.node.spawn(self.node.b_ns, ["nginx", "-c", str(self.conf), "-p",
                                                     str(self.conf.parent)])
        wait_until(lambda: curl(self.node, f"https://{self.node.b_ip}/ok") == "200", 10,
                   "nginx with TLS")

    def stop(self) -> None:
        if self.proc:
            self.node.stop(self.proc)
            self.proc = None


@pytest.fixture(scope="module")
def web(node: TestNode) -> Iterator[TlsWeb]:
    root = Path(tempfile.mkdtemp(prefix=f"{node.prefix}-tls-"))
    server = TlsWeb(node, root, make_certs(root / "certs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def exporter(node: TestNode, web: TlsWeb) -> Iterator[ExporterProcess]:
    process = ExporterProcess(node, config={"https": {"rescan_interval": "1s"}})
    try:
        yield process.wait_ready()
    finally:
        code = process.stop()
        assert code == 0, process.log()


def curl(node: TestNode, *args: str) -> str:
    return node.run(node.a_ns, ["curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                                *args], check=False).stdout


def python_client(node: TestNode, server: str, *requests: str, port: int = 443,
                  read_after: float = 0.0, memory_buffers: bool = False) -> list[str]:
    out = node.run(node.a_ns, [sys.executable, str(CLIENT), server, str(port), *requests,
                               "--read-after", str(read_after),
                               *(["--asyncio"] if memory_buffers else [])]).stdout
    return out.split()


def requests_by(scrape: Scrape, client: str, server: str, port: str = "443",
                scheme: str = "https") -> Counter:
    counts: Counter = Counter()
    for sample in scrape.select("ebpf_net_http_requests_total", src_ip=client, dst_ip=server,
                                dst_port=port, scheme=scheme):
        counts[(sample.labels["method"], sample.labels["status_code"])] += int(sample.value)
    return counts


def duration(scrape: Scrape, client: str, server: str, port: str = "443",
             **labels: str) -> tuple[float, float]:
    """(count, sum) of the HTTPS request durations from client to server."""
    pair = {"src_ip": client, "dst_ip": server, "dst_port": port, "scheme": "https", **labels}
    return (scrape.value("ebpf_net_http_request_duration_seconds_count", **pair),
            scrape.value("ebpf_net_http_request_duration_seconds_sum", **pair))


def sides(scrape: Scrape) -> Counter:
    return Counter({side: int(scrape.value("ebpf_net_exporter_https_requests_total", side=side))
                    for side in ("client", "server")})


def settled(exporter: ExporterProcess, before: Scrape, client: str, server: str,
            expected: Counter) -> Scrape:
    """The first scrape that holds at least `expected` more HTTPS requests than `before`."""
    base = requests_by(before, client, server)

    def done(scrape: Scrape) -> bool:
        now = requests_by(scrape, client, server)
        return all(now[key] - base[key] >= n for key, n in expected.items())

    return exporter.wait_for(done, f"{sum(expected.values())} HTTPS requests")


def test_exact_counts_by_method_status_and_scheme_counted_once(node: TestNode, web: TlsWeb,
                                                               exporter: ExporterProcess):
    before = exporter.scrape()
    expected: Counter = Counter()
    base = f"https://{node.b_ip}"
    for path, code in LOCATIONS.items():                      # one request per connection
        assert curl(node, base + path) == str(code)
        expected[("GET", str(code))] += 1
    assert curl(node, base + "/missing") == "404"
    expected[("GET", "404")] += 1
    assert curl(node, "-X", "POST", "-d", "x=1", base + "/created") == "201"
    expected[("POST", "201")] += 1
    # three requests on one keep-alive connection
    assert curl(node, base + "/ok", "-o", "/dev/null", base + "/created", "-o", "/dev/null",
                base + "/error") == "200201500"
    expected.update({("GET", "200"): 1, ("GET", "201"): 1, ("GET", "500"): 1})
    # Python's ssl (SSL_write_ex, SSL_read_ex), keep-alive, over IPv6
    statuses = python_client(node, node.b_ip6, "GET:/ok", "POST:/created", "GET:/error",
                             "GET:/missing", read_after=0.05)
    assert statuses == ["200", "201", "500", "404"]
    expected6 = Counter({("GET", "200"): 1, ("POST", "201"): 1, ("GET", "500"): 1,
                         ("GET", "404"): 1})

    settled(exporter, before, node.a_ip, node.b_ip, expected)
    after = settled(exporter, before, node.a_ip6, node.b_ip6, expected6)
    gained = requests_by(after, node.a_ip, node.b_ip) - requests_by(before, node.a_ip, node.b_ip)
    assert gained == expected, "each exchange once: client and server both run OpenSSL here"
    gained6 = requests_by(after, node.a_ip6, node.b_ip6) - \
        requests_by(before, node.a_ip6, node.b_ip6)
    assert gained6 == expected6
    # the classifier sees only ciphertext on port 443: never counted as plain HTTP too
    assert requests_by(after, node.a_ip, node.b_ip, scheme="http") == Counter()
    # every exchange has its latency, measured by the client: each waited 50 ms to read
    count, total = duration(after, node.a_ip6, node.b_ip6)
    count0, total0 = duration(before, node.a_ip6, node.b_ip6)
    assert count - count0 == 4
    assert total - total0 >= 4 * 0.05
    assert after.value("ebpf_net_exporter_https_unbound_requests_total") == \
        before.value("ebpf_net_exporter_https_unbound_requests_total")
    assert after.value("ebpf_net_exporter_tls_files", kind="shared") >= 1
    assert sides(after) - sides(before) == Counter({"client": sum(expected.values()) +
                                                    sum(expected6.values())})


def test_a_client_over_memory_buffers_has_its_endpoints_and_is_counted_once(
        node: TestNode, web: TlsWeb, exporter: ExporterProcess):
    """asyncio: OpenSSL reads and writes memory buffers, the event loop the socket. The
    connection is tied to the socket its thread received on before the handshake completed,
    so the client claims it before its first request leaves, and nginx does not count it."""
    before = exporter.scrape()
    statuses = python_client(node, node.b_ip, "GET:/ok", "POST:/created", "GET:/error",
                             read_after=0.05, memory_buffers=True)
    assert statuses == ["200", "201", "500"]
    expected = Counter({("GET", "200"): 1, ("POST", "201"): 1, ("GET", "500"): 1})
    after = settled(exporter, before, node.a_ip, node.b_ip, expected)
    gained = requests_by(after, node.a_ip, node.b_ip) - requests_by(before, node.a_ip, node.b_ip)
    assert gained == expected
    assert after.value("ebpf_net_exporter_https_unbound_requests_total") == \
        before.value("ebpf_net_exporter_https_unbound_requests_total")
    # counted by the client: asyncio decrypts a response as it arrives, whatever the
    # application does next, so its latency is the network's, not the application's wait
    assert sides(after) - sides(before) == Counter({"client": 3})


def test_latency_is_the_clients_time_to_first_byte(node: TestNode, exporter: ExporterProcess,
                                                   tmp_path: Path):
    certs = make_certs(tmp_path / "certs")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    slow = SlowServer(node.b_ns, node.b_ip, SLOW_PORT, SLOW_SECONDS, tls=context)
    try:
        before = exporter.scrape()
        out = node.run(node.a_ns, ["curl", "-sk", "-o", "/dev/null", "-w",
                                   "%{http_code} %{time_pretransfer} %{time_starttransfer}",
                                   f"https://{node.b_ip}:{SLOW_PORT}/slow"]).stdout
        code, pretransfer, starttransfer = out.split()
        assert code == "200"
        pair = dict(client=node.a_ip, server=node.b_ip, port=str(SLOW_PORT), method="GET",
                    status_code="200")
        after = exporter.wait_for(lambda s: duration(s, **pair)[0] > duration(before, **pair)[0],
                                  "the slow request's latency")
    finally:
        slow.close()
    count = duration(after, **pair)[0] - duration(before, **pair)[0]
    seconds = duration(after, **pair)[1] - duration(before, **pair)[1]
    assert count == 1
    assert seconds >= SLOW_SECONDS
    # curl's time to first byte, less its connection and handshake, within a few ms
    assert abs(seconds - (float(starttransfer) - float(pretransfer))) < 0.005


def test_a_restarted_server_and_new_clients_are_seen(node: TestNode, web: TlsWeb,
                                                     exporter: ExporterProcess):
    web.stop()
    web.start()                     # a new nginx process, started after the exporter
    before = exporter.scrape()
    for _ in range(3):
        assert curl(node, f"https://{node.b_ip}/created") == "201"
    after = settled(exporter, before, node.a_ip, node.b_ip, Counter({("GET", "201"): 3}))
    gained = requests_by(after, node.a_ip, node.b_ip) - requests_by(before, node.a_ip, node.b_ip)
    assert gained == Counter({("GET", "201"): 3})


def run_once_probed(node: TestNode, exporter: ExporterProcess, argv: list[str], kind: str,
                    requests: int) -> list[str]:
    """Starts a client that prints "ready" and waits for a line (the -w/--wait of the test
    clients), waits until the exporter probes one more file of `kind` for it, lets it send its
    requests, and returns their status codes once it exits."""
    files = exporter.scrape().value("ebpf_net_exporter_tls_files", kind=kind)
    client = node.spawn(node.a_ns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                        text=True)
    try:
        assert client.stdout.readline().strip() == "ready"
        exporter.wait_for(lambda s: s.value("ebpf_net_exporter_tls_files", kind=kind) ==
                          files + 1, f"the client's {kind} OpenSSL probed")
        client.stdin.write("go\n")
        client.stdin.flush()
        statuses = [client.stdout.readline().strip() for _ in range(requests)]
        assert client.wait(timeout=10) == 0
    finally:
        node.stop(client)
    # no process maps the file any more: the next full scan detaches it
    exporter.wait_for(lambda s: s.value("ebpf_net_exporter_tls_files", kind=kind) == files,
                      f"the client's {kind} OpenSSL detached")
    return statuses


def test_a_libssl_reached_only_through_the_process_root_is_probed(node: TestNode, web: TlsWeb,
                                                                  exporter: ExporterProcess):
    """A container's own libssl: a copy on a tmpfs that only the client's mount namespace
    has. The client waits 0.3 s before reading each response, so a latency of 0.3 s shows
    that the client's side, on the copy, counted the exchange (nginx's would be ~0)."""
    hidden = Path(tempfile.mkdtemp(prefix=f"{node.prefix}-libs-"))
    script = (f"mount -t tmpfs tmpfs {hidden} && cp {libssl_path()} {hidden}/ && "
              f"LD_LIBRARY_PATH={hidden} exec {sys.executable} {CLIENT} {node.b_ip} 443 "
              f"GET:/ok GET:/ok GET:/created --read-after 0.3 --wait")
    before = exporter.scrape()
    try:
        statuses = run_once_probed(node, exporter, ["unshare", "-m", "--propagation",
                                                    "private", "sh", "-c", script], "shared", 3)
        assert not any(hidden.iterdir()), "the copy was in the client's mount namespace only"
    finally:
        hidden.rmdir()
    assert statuses == ["200", "200", "201"]
    expected = Counter({("GET", "200"): 2, ("GET", "201"): 1})
    after = settled(exporter, before, node.a_ip, node.b_ip, expected)
    gained = requests_by(after, node.a_ip, node.b_ip) - requests_by(before, node.a_ip, node.b_ip)
    assert gained == expected
    count = duration(after, node.a_ip, node.b_ip)[0] - duration(before, node.a_ip, node.b_ip)[0]
    seconds = duration(after, node.a_ip, node.b_ip)[1] - \
        duration(before, node.a_ip, node.b_ip)[1]
    assert count == 3
    assert seconds >= 3 * 0.3, "measured by the client, through its own copy of libssl"


def test_an_executable_with_openssl_linked_in_is_probed(node: TestNode, web: TlsWeb,
                                                        exporter: ExporterProcess,
                                                        tmp_path: Path):
    """OpenSSL inside the executable itself (as in Node.js): the scan finds SSL_write and
    SSL_read in it when it starts, and its own side counts its requests."""
    binary = tmp_path / "static_tls_client"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(binary), str(STATIC_CLIENT), "-lssl",
                    "-lcrypto"], check=True, capture_output=True)
    before = exporter.scrape()
    statuses = run_once_probed(node, exporter, [str(binary), "-w", node.b_ip, "443", "/ok",
                                                "/created", "/error"], "static", 3)
    assert statuses == ["200", "201", "500"]
    expected = Counter({("GET", "200"): 1, ("GET", "201"): 1, ("GET", "500"): 1})
    after = settled(exporter, before, node.a_ip, node.b_ip, expected)
    gained = requests_by(after, node.a_ip, node.b_ip) - requests_by(before, node.a_ip, node.b_ip)
    assert gained == expected
    assert sides(after) - sides(before) == Counter({"client": 3})
