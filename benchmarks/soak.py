"""Soak: the real exporter on a test node under continuous churn, scraped every second.

Churn: new TCP connections (a client that connects, echoes and closes in a loop), DNS queries
over UDP to dnsmasq (answered and unanswered names), HTTP requests each on a new connection to
an http.server, and UDP from a new source port every time (new flows, so the flow map fills and
drains every interval; its capacity is set low so it also overflows). Checked on every scrape:
counters never decrease, kernel maps stay within capacity; at the end: RSS flat after warm-up,
scrape time bounded, and the churn counted.

    make soak                          # 10 minutes; write the run up in benchmarks/soak.md
                                       # (make bench copies it into docs/benchmarks.md)
    .venv/bin/python -m benchmarks.soak --seconds 60

tests/kernel/test_soak.py runs it for 60 s."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lab.dnstools import message
from lab.exporter_process import ExporterProcess, Scrape
from lab.testnode import TestNode, in_netns

ECHO_PORT, UDP_PORT, HTTP_PORT = 7601, 7602, 8080
CONFIG = {"maps": {"flow_capacity": 256}}      # small: overflows every interval under churn
WARMUP_FRACTION = 0.25


@dataclass
class Samples:
    rss_mib: list[tuple[float, float]] = field(default_factory=list)     # (seconds, MiB)
    series: list[tuple[float, int]] = field(default_factory=list)        # (seconds, samples)
    scrape_seconds: list[float] = field(default_factory=list)
    decreases: list[str] = field(default_factory=list)
    over_capacity: list[str] = field(default_factory=list)
    scrapes: int = 0


@dataclass
class Result:
    seconds: float
    scrapes: int
    rss_warm_mib: float             # median RSS over the first minute after warm-up
    rss_end_mib: float              # median RSS over the last minute
    rss_growth_mib_per_hour: float  # least-squares slope after warm-up
    scrape_p50_ms: float
    scrape_p99_ms: float
    scrape_max_ms: float
    # samples served: TCP tracepoints see every socket of the host, so other namespaces' TCP
    # churn adds series (until series.ttl drops them) and memory with them
    series_warm: int
    series_end: int
    load_average: tuple[float, float]   # 1-minute load average at the start and at the end
    decreases: list[str]
    over_capacity: list[str]
    tcp_connections: float
    dns_responses: float
    dns_timeouts: float
    http_requests: float
    udp_flows_overflowed: float
    churn: dict[str, int]


class Churn:
    """Client loops in pod a against servers in pod b, each in its own thread."""

    def __init__(self, node: TestNode) -> None:
        self.node = node
        self.stop = threading.Event()
        self.counts = {"tcp": 0, "dns": 0, "http": 0, "http_sent": 0, "udp": 0}
        self._threads = [threading.Thread(target=loop, daemon=True) for loop in
                         (self._echo_server, self._tcp, self._dns, self._http, self._udp)]

    def __enter__(self) -> Churn:
        with in_netns(self.node.b_ns):
            self._listener = socket.create_server((self.node.b_ip, ECHO_PORT), backlog=128)
            self._sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sink.bind((self.node.b_ip, UDP_PORT))
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._listener.close()
        self._sink.close()
        for thread in self._threads:
            thread.join(timeout=10)

    def _echo_server(self) -> None:
        self._listener.settimeout(0.5)
        while not self.stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    conn.sendall(conn.recv(64))
                except OSError:
                    pass

    def _tcp(self) -> None:
        while not self.stop.wait(0.01):
            with in_netns(self.node.a_ns):
                client = socket.socket()
            with client:
                client.settimeout(2)
                try:
                    client.connect((self.node.b_ip, ECHO_PORT))
                    client.sendall(b"ping")
                    client.recv(4)
                    self.counts["tcp"] += 1
                except OSError:
                    pass

    def _dns(self) -> None:
        qid = 0
        while not self.stop.wait(0.02):
            qid = (qid + 1) % 65536
            # one name in 10 is not served: dnsmasq, with no upstream, refuses it
            name = "soak.test" if qid % 10 else "unknown.example"
            with in_netns(self.node.a_ns):
                client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with client:
                client.settimeout(0.5)
                try:
                    client.sendto(message(qid, name), (self.node.b_ip, 53))
                    client.recv(512)
                    self.counts["dns"] += 1
                except OSError:
                    pass

    def _http(self) -> None:
        paths = ["/index.html", "/missing", "/data.bin"]
        n = 0
        while not self.stop.wait(0.02):
            n += 1
            with in_netns(self.node.a_ns):
                connection = http.client.HTTPConnection(self.node.b_ip, HTTP_PORT, timeout=5)
                try:
                    connection.connect()
                except OSError:
                    continue
            try:
                connection.request("GET", paths[n % 3] if n % 50 else "/data.bin")
                # sent: the exporter counts it even if its answer is late for the client
                self.counts["http_sent"] += 1
                connection.getresponse().read()
                self.counts["http"] += 1
            except (OSError, http.client.HTTPException):
                pass
            finally:
                connection.close()

    def _udp(self) -> None:
        while not self.stop.wait(0.002):
            with in_netns(self.node.a_ns):
                sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with sender:                # a new source port: a new flow every time
                try:
                    sender.sendto(b"u" * 100, (self.node.b_ip, UDP_PORT))
                    self.counts["udp"] += 1
                except OSError:
                    pass


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def check(scrape: Scrape, previous: dict[tuple, float], samples: Samples) -> None:
    current = {}
    for sample in scrape.samples:
        if sample.name.endswith(("_total", "_count", "_sum", "_bucket")) and \
                sample.name.startswith("ebpf_net_"):
            key = (sample.name, tuple(sorted(sample.labels.items())))
            current[key] = sample.value
            if key in previous and sample.value < previous[key]:
                samples.decreases.append(f"{key}: {previous[key]} -> {sample.value}")
    previous.clear()
    previous.update(current)
    capacity = {s.labels["map"]: s.value for s in scrape.select(
        "ebpf_net_exporter_bpf_map_capacity")}
    for sample in scrape.select("ebpf_net_exporter_bpf_map_entries"):
        limit = capacity.get(sample.labels["map"])
        if limit is not None and sample.value > limit:
            samples.over_capacity.append(f"{sample.labels['map']}: {sample.value} > {limit}")


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    if len(points) < 2:
        return 0.0
    return statistics.linear_regression([t for t, _ in points], [v for _, v in points]).slope \
        * 3600


def run(seconds: float, progress: bool = False) -> Result:
    with TestNode() as node:
        node.http_server(node.b_ns, node.b_ip, HTTP_PORT)
        node.dns_server(node.b_ns, node.b_ip, {"soak.test": node.b_ip})
        exporter = ExporterProcess(node, config=CONFIG)
        try:
            exporter.wait_ready()
            samples = Samples()
            previous: dict[tuple, float] = {}
            load_start = os.getloadavg()[0]
            with Churn(node) as churn:
                started = time.monotonic()
                next_scrape = started
                scrape = exporter.scrape()
                while (now := time.monotonic()) - started < seconds:
                    next_scrape += 1.0
                    time.sleep(max(0.0, next_scrape - now))
                    before = time.monotonic()
                    scrape = exporter.scrape()
                    samples.scrape_seconds.append(time.monotonic() - before)
                    samples.scrapes += 1
                    samples.rss_mib.append((before - started, rss_mib(exporter.proc.pid)))
                    samples.series.append((before - started, len(scrape.samples)))
                    check(scrape, previous, samples)
                    if exporter.proc.poll() is not None:
                        raise AssertionError(f"the exporter exited:\n{exporter.log()}")
                    if progress and samples.scrapes % 60 == 0:
                        print(f"{samples.scrapes} s: rss {samples.rss_mib[-1][1]:.1f} MiB, "
                              f"scrape {samples.scrape_seconds[-1] * 1000:.0f} ms, "
                              f"{len(scrape.samples)} samples, load {os.getloadavg()[0]:.1f}",
                              file=sys.stderr, flush=True)
                churn_counts = dict(churn.counts)
            warm = [p for p in samples.rss_mib if p[0] >= seconds * WARMUP_FRACTION]
            series = [n for t, n in samples.series if t >= seconds * WARMUP_FRACTION]
            window = max(1, min(60, len(warm) // 4))
            ms = sorted(s * 1000 for s in samples.scrape_seconds)
            result = Result(
                seconds=seconds, scrapes=samples.scrapes,
                rss_warm_mib=statistics.median(v for _, v in warm[:window]),
                rss_end_mib=statistics.median(v for _, v in warm[-window:]),
                rss_growth_mib_per_hour=slope_per_hour(warm),
                scrape_p50_ms=statistics.median(ms),
                scrape_p99_ms=ms[min(len(ms) - 1, int(len(ms) * 0.99))],
                scrape_max_ms=ms[-1],
                series_warm=series[0], series_end=series[-1],
                load_average=(load_start, os.getloadavg()[0]),
                decreases=samples.decreases[:20], over_capacity=samples.over_capacity[:20],
                tcp_connections=scrape.value("ebpf_net_tcp_connections_closed_total",
                                             role="client", dst_port=str(ECHO_PORT)),
                dns_responses=scrape.value("ebpf_net_dns_responses_total"),
                dns_timeouts=scrape.value("ebpf_net_dns_timeouts_total"),
                http_requests=scrape.value("ebpf_net_http_requests_total"),
                udp_flows_overflowed=scrape.value("ebpf_net_flow_packets_total",
                                                  src_ip="overflow", protocol="udp"),
                churn=churn_counts)
            if exporter.stop() != 0:
                raise AssertionError(f"the exporter exited badly:\n{exporter.log()}")
            return result
        finally:
            exporter.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--json", metavar="FILE", help="also write the result here")
    args = parser.parse_args()
    result = run(args.seconds, progress=True)
    text = json.dumps(asdict(result), indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    ok = not result.decreases and not result.over_capacity
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
