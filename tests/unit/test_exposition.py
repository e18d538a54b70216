"""The exposition, byte for byte against tests/fixtures/golden.prom (names, HELP, TYPE, label
sets, bucket layout), and promtool's lint over everything the exporter serves.
UPDATE_GOLDEN=1 rewrites the fixture after a deliberate change."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from kubernetes.client import ApiClient
from prometheus_client import CollectorRegistry, generate_latest

from exporter import config
from exporter.collectors import dns as dnsmod
from exporter.collectors import http as httpmod
from exporter.collectors import tcp as tcpmod
from exporter.collectors.bash import BashCollector, CommandLog
from exporter.collectors.dns import DnsCollector
from exporter.collectors.drops import DropsCollector
from exporter.collectors.flows import FlowsCollector
from exporter.collectors.grpc import GrpcCollector
from exporter.collectors.http import HttpCollector, SchemeSources
from exporter.collectors.tcp import TcpCollector
from exporter.k8s.metadata import KubernetesMetadata
from exporter.kernel.clustermap import KernelClusterMap
from exporter.kernel.oncepercluster import ClusterCounting
from exporter.kernel.tlsprobes import HttpsMetrics
from exporter.logs import LogFailuresCollector
from exporter.naming.endpoints import EndpointLabels, PortFolder
from exporter.naming.externalnames import ExternalNames, NameTable
from exporter.serving import histogram
from exporter.serving.kubeauth import KubernetesAuth
from exporter.serving.selfmetrics import ExporterCollector, KernelStats

from ..conftest import skip_or_fail
from .batches import (
    BashSource,
    FakeLeft,
    FakeTrie,
    QueueSource,
    bash_record,
    dns_batch,
    drop_batch,
    flow_batch,
    grpc_counts,
    http_batch,
    tcp_batch,
    timeout,
)

GOLDEN = Path(__file__).resolve().parent.parent / "fixtures" / "golden.prom"

FLOWS = [
    {"src": "10.1.0.5", "sport": 40522, "dst": "10.1.1.7", "dport": 8080, "bytes": 1460,
     "packets": 3, "handshake": 1},
    {"src": "10.1.1.7", "sport": 8080, "dst": "10.1.0.5", "dport": 40522, "bytes": 52000,
     "packets": 40, "handshake": 2},
    {"src": "fd00::5", "sport": 53000, "dst": "fd00::53", "dport": 53, "protocol": 17,
     "bytes": 90, "packets": 1},
    {"src": "10.1.0.5", "dst": "1.1.1.1", "protocol": 1, "bytes": 84, "packets": 1},
]
CLIENT = {"local": "10.1.0.5", "remote": "10.1.1.7", "rport": 8080, "role": tcpmod.ROLE_CLIENT}
TCP = [
    {**CLIENT, "metric": tcpmod.OPENED, "count": 4},
    {**CLIENT, "metric": tcpmod.CLOSED, "count": 3},
    {**CLIENT, "metric": tcpmod.CONNECT_FAILURES, "variant": 0, "count": 1},
    {**CLIENT, "metric": tcpmod.RETRANSMITS, "count": 2},
    {**CLIENT, "metric": tcpmod.RESETS, "variant": 1, "count": 1},
    {**CLIENT, "metric": tcpmod.RTT, "variant": histogram.slot_of(40), "count": 3},
    {**CLIENT, "metric": tcpmod.RTT, "variant": histogram.slot_of(900), "count": 1},
    {**CLIENT, "metric": tcpmod.RTT, "variant": histogram.SUM_SLOT, "count": 1020},
]
DNS_ENDS = {"client": "10.1.0.5", "server": "10.96.0.10"}
DNS = [
    {**DNS_ENDS, "kind": dnsmod.REQUEST, "qtype": 1, "count": 10},
    {**DNS_ENDS, "kind": dnsmod.RESPONSE, "qtype": 1, "rcode": 0, "count": 8},
    {**DNS_ENDS, "kind": dnsmod.RESPONSE, "qtype": 1, "rcode": 3, "count": 1},
    {**DNS_ENDS, "kind": dnsmod.LATENCY, "rcode": 0, "variant": histogram.slot_of(350),
     "count": 8},
    {**DNS_ENDS, "kind": dnsmod.LATENCY, "rcode": 0, "variant": histogram.SUM_SLOT,
     "count": 2900},
]
HTTP = [
    {"client": "10.1.0.5", "server": "10.1.1.7", "port": 8080, "kind": httpmod.REQUEST,
     "method": 1, "status": 200, "count": 3},
    {"client": "10.1.0.5", "server": "10.1.1.7", "port": 8080, "kind": httpmod.REQUEST,
     "method": 3, "status": 0, "count": 1},
    {"client": "10.1.0.5", "server": "10.1.1.7", "port": 8080, "kind": httpmod.LATENCY,
     "method": 1, "status": 200, "variant": histogram.slot_of(1200), "count": 3},
    {"client": "10.1.0.5", "server": "10.1.1.7", "port": 8080, "kind": httpmod.LATENCY,
     "method": 1, "status": 200, "variant": histogram.SUM_SLOT, "count": 3500},
]
GRPC_ENDS = {"client": "10.1.0.5", "server": "10.1.1.7", "port": 50051}
GRPC = [
    {**GRPC_ENDS, "kind": httpmod.REQUEST, "status": "OK", "count": 9},
    {**GRPC_ENDS, "kind": httpmod.REQUEST, "status": "UNAVAILABLE", "count": 1},
    {**GRPC_ENDS, "kind": httpmod.LATENCY, "status": "OK", "variant": histogram.slot_of(2500),
     "count": 9},
    {**GRPC_ENDS, "kind": httpmod.LATENCY, "status": "OK", "variant": histogram.SUM_SLOT,
     "count": 21000},
]
DROPS = [
    {"reason": 12, "src": "10.1.0.5", "sport": 40522, "dst": "10.1.1.7", "dport": 8080,
     "protocol": 6, "count": 2},
    {"reason": 2, "count": 1},
]
DROP_REASONS = {2: "NOT_SPECIFIED", 12: "NETFILTER_DROP"}


def collectors(stats: KernelStats) -> list:
    endpoints = EndpointLabels(["ip", "ip_type", "port"])
    ports = PortFolder(32768)
    flows = FlowsCollector(QueueSource([flow_batch(FLOWS, entries=4, capacity=65536)],
                                       flow_batch([])), endpoints, ports, stats, 100, 300)
    tcp = TcpCollector(QueueSource([tcp_batch(TCP, entries=8, capacity=65536,
                                              sockets=1, socket_capacity=131072)],
                                   tcp_batch([])), endpoints, ports, stats, 100, 300)
    dns = DnsCollector(QueueSource([dns_batch(DNS, timeouts=[timeout("10.1.0.5", "10.96.0.10")],
                                              entries=5, capacity=16384, pending=0,
                                              pending_capacity=65536)], dns_batch([])),
                       endpoints, ports, stats, 100, 300)
    https = [{**row, "port": 443} for row in HTTP[:2]] + [
        {"client": "", "server": "", "port": 0, "kind": httpmod.REQUEST, "method": 1,
         "status": 200, "count": 1}]       # a connection whose socket was not seen
    http = HttpCollector(SchemeSources([
        QueueSource([http_batch(HTTP, entries=3, capacity=16384, conns=1, conn_capacity=65536)],
                    http_batch([])),
        QueueSource([http_batch(https, entries=3, capacity=16384, conns=0, conn_capacity=65536,
                                scheme="https")], http_batch([], scheme="https"))]),
        endpoints, ports, stats, 100, 300)
    grpc = GrpcCollector(QueueSource([grpc_counts(GRPC)], {}), endpoints, ports, stats, 100, 300)
    drops = DropsCollector(QueueSource([drop_batch(DROPS, entries=2, capacity=16384)],
                                       drop_batch([])), endpoints, ports, stats, 100, 300,
                           reasons=DROP_REASONS)
    bash = BashCollector(BashSource([bash_record(b"ls -l", uid=0)]), CommandLog(os.devnull),
                         stats, 100, 300)
    return [flows, tcp, dns, http, grpc, drops, bash]


def test_exposition_matches_the_golden_file():
    registry = CollectorRegistry()
    for collector in collectors(KernelStats()):
        registry.register(collector)
    text = generate_latest(registry).decode()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def full_exposition() -> str:
    stats = KernelStats()
    registry = CollectorRegistry()
    registry.register(ExporterCollector(collectors(stats), stats,
                                        {"version": "0", "bcc_version": "0", "kernel": "k"},
                                        lambda: 2))
    registry.register(KubernetesMetadata(ApiClient(), 60.0))     # never started: no calls
    cluster_map = KernelClusterMap(FakeTrie(16), FakeLeft([{}]))
    registry.register(ClusterCounting(cluster_map, config.load(None, {}, {}), None, stats))
    registry.register(KubernetesAuth(ApiClient(), "/metrics", 60.0))  # asks nothing unasked
    registry.register(HttpsMetrics())
    registry.register(ExternalNames(NameTable(65536, 60, 3600), ["*"], stats))
    stats.add_failures("flows", 0)
    stats.add_parse_errors("ip", 0)
    stats.add_parse_errors("dns", 0)
    stats.add_parse_errors("http", 0)
    registry.register(LogFailuresCollector())
    return generate_latest(registry).decode()


def test_promtool_accepts_every_metric_the_exporter_serves(tmp_path):
    promtool = shutil.which("promtool")
    if not promtool:
        skip_or_fail("promtool is not installed (Debian's prometheus package; make setup)")
    for text in (GOLDEN.read_text(), full_exposition(), fast_and_library(None)[0]):
        result = subprocess.run([promtool, "check", "metrics"], input=text,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


SELF_METRICS = [
    "ebpf_net_exporter_build_info", "ebpf_net_exporter_scrape_collector_success",
    "ebpf_net_exporter_scrape_collector_duration_seconds", "ebpf_net_exporter_bpf_map_entries",
    "ebpf_net_exporter_bpf_map_capacity", "ebpf_net_exporter_bpf_map_update_failures_total",
    "ebpf_net_exporter_attached_interfaces", "ebpf_net_exporter_series_overflow_total",
    "ebpf_net_exporter_parse_errors_total",
]


def test_every_self_metric_of_the_spec_is_served_with_per_collector_labels():
    text = full_exposition()
    for name in SELF_METRICS:
        assert f"# TYPE {name} " in text, name
    for collector in ("flows", "tcp", "dns", "http", "drops", "bash"):
        assert f'ebpf_net_exporter_scrape_collector_success{{collector="{collector}"}} 1.0' \
            in text
    assert 'ebpf_net_exporter_bpf_map_capacity{map="tcp_sockets"} 131072.0' in text
    assert 'ebpf_net_exporter_series_overflow_total{metric="ebpf_net_flow_bytes_total"} 0.0' \
        in text


# The /metrics fast path (exporter/serving/exposition.py) against prometheus_client's own encoders.
HOSTILE = ['a "quoted" name', "back\\slash\\", "two\nlines", 'all\\"\n\\n', "", "ünïcode"]


def hostile_collectors(stats: KernelStats) -> list:
    """Every fast-path family with label values that need escaping (the bash collector's
    family goes through the library and sits between them)."""
    found = collectors(stats)
    flows, tcp = found[:2]
    for index, value in enumerate(HOSTILE):
        labels = tuple(f"{value}{i}" for i in range(len(flows._bytes.label_names)))
        flows._bytes.add(labels, (1e21 + index,))
        flows._packets.add(labels, (0.5,))
        rtt_labels = tuple(value for _ in tcp._rtt.label_names)
        tcp._rtt.add(rtt_labels, [float(i * index) for i in range(histogram.WIDTH)])
        tcp._opened.add(tuple(value for _ in tcp._opened.label_names), (3.0,))
    return found


def fast_and_library(accept: str | None) -> tuple[str, str, str]:
    from prometheus_client.exposition import choose_encoder

    from exporter.serving.exposition import generate

    registry = CollectorRegistry()
    for collector in hostile_collectors(KernelStats()):
        registry.register(collector)
    registry.register(LogFailuresCollector())
    fast, content_type = generate(registry, accept)
    encoder, _ = choose_encoder(accept or "")
    return fast.decode(), encoder(registry).decode(), content_type


def test_fast_path_writes_what_prometheus_client_writes():
    fast, library, content_type = fast_and_library(None)
    assert content_type.startswith("text/plain; version=0.0.4")
    assert 'src_ip="a \\"quoted\\" name0"' in fast
    assert 'src_ip="two\\nlines0"' in fast
    assert 'le="+Inf",src_ip="back\\\\slash\\\\"' in fast      # le sorts among the labels
    assert fast.count("ebpf_net_tcp_rtt_seconds_bucket{") == 27 * (len(HOSTILE) + 1)
    assert fast == library


def test_fast_path_matches_openmetrics_when_negotiated():
    fast, library, content_type = fast_and_library(
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    assert fast.endswith("# EOF\n") and fast.count("# EOF") == 1
    assert fast == library


def test_the_served_metrics_are_the_fast_path_gzipped_or_not(monkeypatch):
    import gzip
    from wsgiref.util import setup_testing_defaults

    from exporter.serving import exposition
    from exporter.serving.exposition import make_metrics_app

    released: list = []
    monkeypatch.setattr(exposition, "_release_free_memory", lambda: released.append(1))

    stats = KernelStats()
    registry = CollectorRegistry()
    registry.register(ExporterCollector(hostile_collectors(stats), stats, {}, lambda: 2))
    app = make_metrics_app(registry)
    for encoding in ("", "gzip"):
        environ: dict = {"HTTP_ACCEPT_ENCODING": encoding}
        setup_testing_defaults(environ)
        replies: list = []
        response = app(environ, lambda status, headers, found=replies:
                       found.append((status, headers)))
        body = b"".join(response)
        response.close()        # what the server does once the body is sent
        status, headers = replies[0]
        assert status == "200 OK"
        if encoding:
            assert ("Content-Encoding", "gzip") in headers
            body = gzip.decompress(body)
        text = body.decode()
        assert text.count("ebpf_net_flow_bytes_total{") == len(FLOWS) + len(HOSTILE)
        assert "ebpf_net_flow_bytes_total{" in text and "1e+21" in text
    assert len(released) == 2       # the freed pages went back after each response


def test_value_text_is_floattogostring():
    import math

    from prometheus_client.utils import floatToGoString

    from exporter.serving.exposition import value_text

    values = [0.0, -0.0, 1.0, 0.5, 1e-7, 2.5e-05, 999999.0, 999999.99, 1e6, 1234567.0, 1e21,
              -3.0, math.inf, -math.inf, math.nan, 7, 0, 10**7]
    values += [float(1 << i) for i in range(64)] + [(1 << i) * 1e-6 for i in range(27)]
    for value in values:
        assert value_text(value) == floatToGoString(value), value
