"""DNS metrics against a real server (dnsmasq) and real clients (dig, the C library
resolver) through a test node."""

from __future__ import annotations

import re
import socket
import time
from collections import Counter
from collections.abc import Iterator

import pytest

from lab import dnstools
from lab.exporter_process import ExporterProcess, Scrape, wait_until
from lab.testnode import TestNode, in_netns

pytestmark = pytest.mark.kernel

TIMEOUT_SECONDS = 1.0
SLOW_SECONDS = 0.3
FAIL_PORT, SLOW_PORT = 5301, 5302


@pytest.fixture(scope="module")
def dns(node: TestNode) -> Iterator[ExporterProcess]:
    upstreams = [dnstools.Upstream(node.b_ns, node.b_ip, FAIL_PORT, rcode=2),
                 dnstools.Upstream(node.b_ns, node.b_ip, SLOW_PORT, delay=SLOW_SECONDS)]
    node.spawn(node.b_ns, [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        "--bind-interfaces", f"--listen-address={node.b_ip}", f"--listen-address={node.b_ip6}",
        "--port=53", "--pid-file=", "--user=root", "--cache-size=0",
        "--log-facility=/dev/null",
        f"--address=/ok.test/{node.b_ip}", f"--address=/ok.test/{node.b_ip6}",
        "--address=/nx.test/",
        f"--server=/fail.test/{node.b_ip}#{FAIL_PORT}",
        f"--server=/slow.test/{node.b_ip}#{SLOW_PORT}"])
    wait_until(lambda: "NOERROR" in dig(node, "ok.test", check=False), 10, "dnsmasq")
    process = ExporterProcess(node, config={"dns": {"timeout": f"{TIMEOUT_SECONDS}s",
                                                    "query_names": ["*.ok.test", "ok.test"]}})
    try:
        yield process.wait_ready()
    finally:
        code = process.stop()
        for upstream in upstreams:
            upstream.close()
        assert code == 0, process.log()


def dig(node: TestNode, name: str, qtype: str = "A", server: str | None = None,
        tcp: bool = False, check: bool = True, timeout: int = 2) -> str:
    argv = ["dig", f"+time={timeout}", "+tries=1", "-t", qtype, f"@{server or node.b_ip}", name]
    if tcp:
        argv.append("+tcp")
    return node.run(node.a_ns, argv, check=check).stdout


def status(output: str) -> str:
    match = re.search(r"status: (\w+)", output)
    return match.group(1) if match else "none"


def dns_value(scrape: Scrape, metric: str, client: str, server: str, **labels: str) -> float:
    return scrape.value(f"ebpf_net_dns_{metric}", src_ip=client, dst_ip=server, dst_port="53",
                        **labels)


CASES = [  # name, qtype, tcp, family, expected status, times
    ("ok.test", "A", False, 4, "NOERROR", 3),
    ("ok.test", "AAAA", False, 4, "NOERROR", 2),
    ("x.nx.test", "A", False, 4, "NXDOMAIN", 2),
    ("a.fail.test", "A", False, 4, "SERVFAIL", 2),
    ("other.example", "A", False, 4, "REFUSED", 2),
    ("ok.test", "A", True, 4, "NOERROR", 2),
    ("x.nx.test", "MX", True, 4, "NXDOMAIN", 1),
    ("ok.test", "A", False, 6, "NOERROR", 2),
    ("x.nx.test", "AAAA", False, 6, "NXDOMAIN", 1),
    ("ok.test", "AAAA", True, 6, "NOERROR", 1),
]
RCODES = {"NOERROR": "NoError", "NXDOMAIN": "NXDomain", "SERVFAIL": "ServFail",
          "REFUSED": "Refused"}


def test_exact_counts_per_rcode_qtype_transport_and_family(node: TestNode,
                                                            dns: ExporterProcess):
    requests: Counter = Counter()
    responses: Counter = Counter()
    for name, qtype, tcp, family, expected, times in CASES:
        client, server = (node.a_ip, node.b_ip) if family == 4 else (node.a_ip6, node.b_ip6)
        transport = "tcp" if tcp else "udp"
        for _ in range(times):
            assert status(dig(node, name, qtype, server, tcp)) == expected
        requests[(client, server, qtype, transport)] += times
        responses[(client, server, qtype, RCODES[expected], transport)] += times

    def all_seen(s: Scrape) -> bool:
        return all(dns_value(s, "responses_total", c, sv, qtype=q, rcode=r, transport=t) >= n
                   for (c, sv, q, r, t), n in responses.items())

    scrape = dns.wait_for(all_seen, "every response")
    for (client, server, qtype, transport), count in requests.items():
        assert dns_value(scrape, "requests_total", client, server, qtype=qtype,
                         transport=transport) == count, (client, qtype, transport)
    for (client, server, qtype, rcode, transport), count in responses.items():
        assert dns_value(scrape, "responses_total", client, server, qtype=qtype, rcode=rcode,
                         transport=transport) == count, (client, qtype, rcode, transport)
        assert scrape.value("ebpf_net_dns_request_duration_seconds_count", src_ip=client,
                            dst_ip=server, rcode=rcode) >= count
    assert scrape.value("ebpf_net_exporter_parse_errors_total", protocol="dns") == 0


def test_the_c_library_resolver_is_counted(node: TestNode, dns: ExporterProcess):
    before = dns.scrape()
    with node.nameserver(node.a_ns, node.b_ip):
        out = node.run(node.a_ns, ["getent", "ahosts", "ok.test"]).stdout
    assert node.b_ip in out
    for qtype in ("A", "AAAA"):         # getaddrinfo asks both
        scrape = dns.wait_for(
            lambda s, q=qtype: dns_value(s, "responses_total", node.a_ip, node.b_ip, qtype=q,
                                         transport="udp") >
            dns_value(before, "responses_total", node.a_ip, node.b_ip, qtype=q,
                      transport="udp"), f"the resolver's {qtype} query")
        assert dns_value(scrape, "requests_total", node.a_ip, node.b_ip, qtype=qtype,
                         transport="udp") - dns_value(before, "requests_total", node.a_ip,
                                                      node.b_ip, qtype=qtype,
                                                      transport="udp") == 1


def test_unanswered_queries_time_out_exactly_once_and_the_pending_map_drains(
        node: TestNode, dns: ExporterProcess):
    node.nft(node.b_ns, """
        table inet ebpf_net_test_dns_drop {
            chain input { type filter hook input priority 0; udp dport 53 drop; }
        }""")
    try:
        for _ in range(3):
            assert status(dig(node, "lost.ok.test", "A", check=False, timeout=1)) == "none"
    finally:
        node.run(node.b_ns, ["nft", "delete", "table", "inet", "ebpf_net_test_dns_drop"])
    labels = {"qtype": "A", "transport": "udp"}
    scrape = dns.wait_for(
        lambda s: dns_value(s, "timeouts_total", node.a_ip, node.b_ip, **labels) >= 3,
        "3 timeouts", timeout=TIMEOUT_SECONDS + 10)
    assert dns_value(scrape, "timeouts_total", node.a_ip, node.b_ip, **labels) == 3
    dns.wait_for(lambda s: s.value("ebpf_net_exporter_bpf_map_entries", map="dns_pending") == 0,
                 "the pending map to drain")
    time.sleep(TIMEOUT_SECONDS)         # a later sweep must not count them again
    assert dns_value(dns.scrape(), "timeouts_total", node.a_ip, node.b_ip, **labels) == 3


def test_latency_histogram_agrees_with_the_client(node: TestNode, dns: ExporterProcess):
    measured = []
    for _ in range(3):
        out = dig(node, "x.slow.test")
        assert status(out) == "NOERROR"
        measured.append(int(re.search(r"Query time: (\d+) msec", out).group(1)) / 1000)
    labels = {"src_ip": node.a_ip, "dst_ip": node.b_ip, "rcode": "NoError"}

    def slow_samples(s: Scrape) -> float:
        return s.value("ebpf_net_dns_request_duration_seconds_count", **labels) - \
            s.value("ebpf_net_dns_request_duration_seconds_bucket", le="0.262144", **labels)

    scrape = dns.wait_for(lambda s: slow_samples(s) >= 3, "3 slow responses")
    assert slow_samples(scrape) == 3
    # all three fall between 262 ms and 524 ms, like the client's measurements
    assert all(0.262144 < m <= 0.524288 for m in measured)
    fast = scrape.value("ebpf_net_dns_request_duration_seconds_bucket", le="0.262144", **labels)
    assert scrape.value("ebpf_net_dns_request_duration_seconds_bucket", le="0.524288",
                        **labels) == fast + 3
    # the kernel measures between the veths, the client around its own socket: within 5 ms
    # each (dig reports whole milliseconds), so the sums agree within 3 * 5 ms
    total = scrape.value("ebpf_net_dns_request_duration_seconds_sum", **labels)
    fast_sum_bound = fast * 0.262144
    assert sum(measured) - 0.015 <= total <= sum(measured) + 0.015 + fast_sum_bound


MALFORMED = [
    b"\x12\x34\x01\x00\x00",                                                 # truncated header
    dnstools.message(1, "zero.test", qdcount=0),                             # no question
    dnstools.message(2, "two.test", qdcount=2),                              # two questions
    dnstools.message(3, "", raw_name=b"\x05abc"),                            # name past the end
    dnstools.message(4, "", raw_name=b"\xc0\x0c"),                           # pointer (a loop)
    dnstools.message(5, "", raw_name=b"\x40" + b"a" * 64 + b"\x00"),         # label > 63
    dnstools.message(6, "", raw_name=(b"\x3f" + b"a" * 63) * 4 + b"\x00"),   # name > 255
    dnstools.message(7, "ok.test")[:-3],                                     # qtype cut short
    dnstools.message(8, "stray.test", response=True),                        # nobody asked
]


def test_malformed_packets_are_counted_as_parse_errors_and_nothing_else(
        node: TestNode, dns: ExporterProcess):
    before = dns.scrape()
    with in_netns(node.a_ns):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # to the node's own address: nobody answers on port 53 there, so no reply is parsed
        for payload in MALFORMED:
            sender.sendto(payload, (node.node_ip_a, 53))
    finally:
        sender.close()
    errors_before = before.value("ebpf_net_exporter_parse_errors_total", protocol="dns")
    scrape = dns.wait_for(
        lambda s: s.value("ebpf_net_exporter_parse_errors_total", protocol="dns") >=
        errors_before + len(MALFORMED), "parse errors")
    assert scrape.value("ebpf_net_exporter_parse_errors_total", protocol="dns") == \
        errors_before + len(MALFORMED)
    for metric in ("requests_total", "responses_total"):
        assert scrape.value(f"ebpf_net_dns_{metric}", dst_ip=node.node_ip_a) == 0
    assert dns.get("/healthz")[0] == 200
    assert status(dig(node, "ok.test")) == "NOERROR"       # still parsing real traffic


def test_allowlisted_query_names_become_the_query_label_and_others_fold(node: TestNode,
                                                                       dns: ExporterProcess):
    assert status(dig(node, "api.ok.test")) == "NOERROR"
    assert status(dig(node, "API.Ok.Test", "AAAA")) == "NOERROR"        # case folds
    assert status(dig(node, "www.nx.test")) == "NXDOMAIN"
    long_name = ".".join(["x" * 60] * 3) + ".ok.test"                   # past 128 bytes
    assert status(dig(node, long_name)) == "NOERROR"

    def labelled(s: Scrape) -> float:
        return dns_value(s, "responses_total", node.a_ip, node.b_ip, query="api.ok.test")

    scrape = dns.wait_for(lambda s: labelled(s) >= 2, "labelled responses")
    assert labelled(scrape) == 2
    assert dns_value(scrape, "requests_total", node.a_ip, node.b_ip, query="api.ok.test",
                     qtype="AAAA") == 1
    assert dns_value(scrape, "responses_total", node.a_ip, node.b_ip, query="other",
                     rcode="NXDomain", qtype="A") >= 1
    names = {s.labels["query"] for s in scrape.select("ebpf_net_dns_requests_total")}
    assert names <= {"ok.test", "api.ok.test", "lost.ok.test", "other"}, names
