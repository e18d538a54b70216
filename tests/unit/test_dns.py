import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from exporter.collectors import dns as dnsmod
from exporter.collectors.dns import DnsCollector
from exporter.kernel.maps import older_than
from exporter.naming.dnsnames import QueryLabel, decode_name, qtype_name, rcode_name, transport_name
from exporter.naming.endpoints import EndpointLabels, PortFolder
from exporter.serving import histogram
from exporter.serving.selfmetrics import KernelStats

from .batches import QueueSource, dns_batch, timeout


@pytest.mark.parametrize("code,name", [(0, "NoError"), (1, "FormErr"), (2, "ServFail"),
                                       (3, "NXDomain"), (4, "NotImp"), (5, "Refused"),
                                       (6, "YXDomain"), (9, "NotAuth"), (12, "unknown:12"),
                                       (15, "unknown:15")])
def test_rcode_names(code, name):
    assert rcode_name(code) == name


@pytest.mark.parametrize("code,name", [(1, "A"), (28, "AAAA"), (5, "CNAME"), (15, "MX"),
                                       (2, "NS"), (12, "PTR"), (6, "SOA"), (33, "SRV"),
                                       (16, "TXT"), (65, "HTTPS"), (64, "SVCB"), (255, "ANY"),
                                       (99, "other"), (0, "other")])
def test_qtype_names(code, name):
    assert qtype_name(code) == name


def test_transport_names():
    assert [transport_name(t) for t in (0, 1, 7)] == ["udp", "tcp", "other"]


def test_expiry_takes_queries_older_than_the_timeout_only():
    now, timeout_ns = 10_000_000_000, 5_000_000_000
    queried = np.array([now - 6e9, now - 5e9, now - 4e9, now - 5e9 - 1], dtype=np.uint64)
    assert older_than(queried, now, timeout_ns).tolist() == [0, 3]


def registry_with(batches):
    collector = DnsCollector(QueueSource(list(batches), dns_batch([])),
                             EndpointLabels(["ip", "port"]), PortFolder(32768), KernelStats(),
                             100, 300)
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


PAIR = {"src_ip": "10.0.0.1", "dst_ip": "10.0.0.53", "dst_port": "53"}
ENDS = {"client": "10.0.0.1", "server": "10.0.0.53"}


def test_requests_responses_latency_and_timeouts():
    registry = registry_with([dns_batch([
        {**ENDS, "kind": dnsmod.REQUEST, "qtype": 1, "count": 5},
        {**ENDS, "kind": dnsmod.REQUEST, "qtype": 28, "transport": 1, "count": 2},
        {**ENDS, "kind": dnsmod.RESPONSE, "qtype": 1, "rcode": 0, "count": 3},
        {**ENDS, "kind": dnsmod.RESPONSE, "qtype": 1, "rcode": 3, "count": 1},
        {**ENDS, "kind": dnsmod.LATENCY, "rcode": 0, "variant": histogram.slot_of(800),
         "count": 3},
        {**ENDS, "kind": dnsmod.LATENCY, "rcode": 0, "variant": histogram.SUM_SLOT,
         "count": 2400},
    ], timeouts=[timeout("10.0.0.1", "10.0.0.53")])])
    get = registry.get_sample_value
    assert get("ebpf_net_dns_requests_total", {**PAIR, "qtype": "A", "transport": "udp"}) == 5
    assert get("ebpf_net_dns_requests_total", {**PAIR, "qtype": "AAAA", "transport": "tcp"}) == 2
    assert get("ebpf_net_dns_responses_total",
               {**PAIR, "qtype": "A", "rcode": "NoError", "transport": "udp"}) == 3
    assert get("ebpf_net_dns_responses_total",
               {**PAIR, "qtype": "A", "rcode": "NXDomain", "transport": "udp"}) == 1
    assert get("ebpf_net_dns_timeouts_total", {**PAIR, "qtype": "A", "transport": "udp"}) == 1
    latency = {**PAIR, "rcode": "NoError"}
    assert get("ebpf_net_dns_request_duration_seconds_count", latency) == 3
    assert get("ebpf_net_dns_request_duration_seconds_sum", latency) == pytest.approx(0.0024)
    assert get("ebpf_net_dns_request_duration_seconds_bucket", {**latency, "le": "0.001024"}) == 3
    assert get("ebpf_net_dns_request_duration_seconds_bucket", {**latency, "le": "0.000512"}) == 0


def test_counts_that_found_the_kernel_map_full_go_to_overflow_series():
    overflow = np.zeros(3 * 16, dtype=np.uint64)
    overflow[dnsmod.REQUEST * 16] = 7
    overflow[dnsmod.RESPONSE * 16 + 2] = 4          # ServFail
    registry = registry_with([dns_batch([], overflow=overflow)])
    over = {"src_ip": "overflow", "dst_ip": "overflow", "dst_port": "overflow"}
    get = registry.get_sample_value
    assert get("ebpf_net_dns_requests_total",
               {**over, "qtype": "overflow", "transport": "overflow"}) == 7
    assert get("ebpf_net_dns_responses_total",
               {**over, "qtype": "overflow", "rcode": "ServFail", "transport": "overflow"}) == 4


def wire(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"


def test_wire_names_decode_and_bad_ones_do_not():
    assert decode_name(wire("Api.Example.COM") + b"\xff\xff") == "api.example.com"
    assert decode_name(b"\0") == ""
    assert decode_name(wire("a.example.com")[:-1]) is None          # cut short, no final zero
    assert decode_name(b"\x03abc\xc0\x0c") is None                  # compression pointer
    assert decode_name(b"\x09abc") is None                           # label past the end


def test_query_label_keeps_allowlisted_names_only():
    label = QueryLabel(["*.svc.cluster.local", "api.example.com."])
    assert label(wire("web.shop.svc.cluster.local")) == "web.shop.svc.cluster.local"
    assert label(wire("API.example.com")) == "api.example.com"
    assert label(wire("example.com")) == "other"
    assert label(wire("svc.cluster.local")) == "other"
    assert label(wire("x.svc.cluster.local")[:10]) == "other"       # truncated in the kernel


def test_the_query_label_on_requests_responses_and_timeouts():
    name = np.zeros(dnsmod.NAME_CAPTURE, dtype=np.uint8)
    raw = wire("web.shop.svc.cluster.local")
    name[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    batch = dns_batch([{**ENDS, "kind": dnsmod.REQUEST, "count": 2}], named=True,
                      timeouts=[timeout("10.0.0.1", "10.0.0.53", name=raw)])
    batch.keys["name"][0] = name
    collector = DnsCollector(QueueSource([batch], dns_batch([], named=True)),
                             EndpointLabels(["ip", "port"]), PortFolder(32768), KernelStats(),
                             100, 300, query_label=QueryLabel(["*.svc.cluster.local"]))
    registry = CollectorRegistry()
    registry.register(collector)
    labels = {**PAIR, "qtype": "A", "transport": "udp", "query": "web.shop.svc.cluster.local"}
    assert registry.get_sample_value("ebpf_net_dns_requests_total", labels) == 2
    assert registry.get_sample_value("ebpf_net_dns_timeouts_total", labels) == 1
