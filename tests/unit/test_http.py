import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from exporter.collectors import http as httpmod
from exporter.collectors.http import HttpCollector, queued_slots
from exporter.kernel.maps import older_than
from exporter.naming.endpoints import EndpointLabels, PortFolder
from exporter.naming.httpnames import PathLabel, method_name, status_label, template, version_label
from exporter.serving import histogram
from exporter.serving.selfmetrics import KernelStats

from .batches import QueueSource, http_batch, unanswered


@pytest.mark.parametrize("code,name", [(1, "GET"), (2, "HEAD"), (3, "POST"), (4, "PUT"),
                                       (5, "DELETE"), (6, "PATCH"), (7, "OPTIONS"),
                                       (8, "CONNECT"), (9, "TRACE"), (10, "other"),
                                       (0, "other")])
def test_method_names(code, name):
    assert method_name(code) == name


@pytest.mark.parametrize("byte,method,version", [(0x01, "GET", "1.x"), (0x13, "POST", "1.0"),
                                                 (0x21, "GET", "1.1"), (0x34, "PUT", "2"),
                                                 (0x2A, "other", "1.1")])
def test_the_method_byte_carries_the_version(byte, method, version):
    assert (method_name(byte), version_label(byte)) == (method, version)


@pytest.mark.parametrize("code,label", [(200, "200"), (404, "404"), (599, "599"), (0, "none"),
                                        (1, "pipelined"), (2, "untracked"), (3, "unknown"),
                                        (700, "other")])
def test_status_labels(code, label):
    assert status_label(code) == label


def test_idle_connections_and_their_queued_requests():
    now = 1_000_000_000_000
    seen = np.array([now - 301e9, now - 299e9, now - 400e9], dtype=np.uint64)
    assert older_than(seen, now, int(300e9)).tolist() == [0, 2]
    conn = np.zeros(1, dtype=httpmod.CONN)[0]
    conn["method"][:] = [1, 3, 4, 5, 1, 1, 1, 1]
    conn["requested"], conn["answered"] = 10, 7        # slots 7, 0, 1 still wait
    assert queued_slots(conn) == [7, 0, 1]


def test_requests_durations_unanswered_and_overflow():
    overflow = np.zeros(64, dtype=np.uint64)
    overflow[3 | 2 << 4] = 6                           # HTTP/1.1 POSTs that found the map full
    batch = http_batch([
        {"kind": httpmod.REQUEST, "method": 1, "status": 200, "count": 5},
        {"kind": httpmod.REQUEST, "method": 1, "status": 1, "count": 2},
        {"kind": httpmod.LATENCY, "method": 1, "status": 200,
         "variant": histogram.slot_of(3000), "count": 5},
        {"kind": httpmod.LATENCY, "method": 1, "status": 200, "variant": histogram.SUM_SLOT,
         "count": 15000},
        {"kind": httpmod.REQUEST, "method": 1, "status": 200, "count": 4, "version": 1},
        {"kind": httpmod.REQUEST, "method": 1, "status": 0, "count": 1, "version": 0},
    ], swept=[unanswered("10.0.0.1", "10.0.0.80", [3, 1])],
        overflow=overflow)
    collector = HttpCollector(QueueSource([batch], http_batch([])),
                              EndpointLabels(["ip", "port"]), PortFolder(32768), KernelStats(),
                              100, 300)
    registry = CollectorRegistry()
    registry.register(collector)
    pair = {"src_ip": "10.0.0.1", "dst_ip": "10.0.0.80", "dst_port": "80", "scheme": "http",
            "version": "1.1"}
    get = registry.get_sample_value
    assert get("ebpf_net_http_requests_total",
               {**pair, "method": "GET", "status_code": "200"}) == 5
    assert get("ebpf_net_http_requests_total",
               {**pair, "version": "1.0", "method": "GET", "status_code": "200"}) == 4
    assert get("ebpf_net_http_requests_total",
               {**pair, "version": "1.x", "method": "GET", "status_code": "none"}) == 1
    assert get("ebpf_net_http_requests_total",
               {**pair, "method": "GET", "status_code": "pipelined"}) == 2
    assert get("ebpf_net_http_requests_total",
               {**pair, "method": "POST", "status_code": "none"}) == 1
    assert get("ebpf_net_http_requests_total",
               {**pair, "method": "GET", "status_code": "none"}) == 1
    over = {"src_ip": "overflow", "dst_ip": "overflow", "dst_port": "overflow", "scheme": "http",
            "version": "1.1"}
    assert get("ebpf_net_http_requests_total",
               {**over, "method": "POST", "status_code": "overflow"}) == 6
    labels = {**pair, "method": "GET", "status_code": "200"}
    assert get("ebpf_net_http_request_duration_seconds_count", labels) == 5
    assert get("ebpf_net_http_request_duration_seconds_sum", labels) == pytest.approx(0.015)
    assert get("ebpf_net_http_request_duration_seconds_bucket", {**labels, "le": "0.004096"}) == 5


@pytest.mark.parametrize("path,templated", [
    ("/api/users/123", "/api/users/{id}"),
    ("/api/items/550e8400-e29b-41d4-a716-446655440000/tags", "/api/items/{id}/tags"),
    ("/blobs/0123456789abcdef0123", "/blobs/{id}"),
    ("/v1/cafe", "/v1/cafe"),                     # short hex stays: it may be a word
    ("/", "/"),
])
def test_ids_are_templated(path, templated):
    assert template(path) == templated


def test_path_label_cuts_templates_and_allowlists():
    label = PathLabel(["/api/", "/health"], max_length=20)
    assert label(b"/api/users/42?debug=1 HTTP/1.1\r\n") == "/api/users/{id}"
    assert label(b"/api/orders/7#frag") == "/api/orders/{id}"
    assert label(b"/api/very/long/path/that/goes/on HTTP") == "/api/very/long/path/"
    assert label(b"/healthz HTTP/1.1") == "/healthz"
    assert label(b"/admin HTTP/1.1") == "other"
    assert label(b"http://example.com/api/x HTTP/1.1") == "/api/x"
    assert label(b"*") == "other"
    assert label(b"/api/\xff\xfe") == "other"
