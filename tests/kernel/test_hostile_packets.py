"""Fuzz: 100,000+ randomized and malformed frames through a monitored veth (tests/fuzzframes.py
makes them and says what each must count as). The exporter stays up, counts exactly the flows
and bytes the test's own account expects, counts the parse errors it expects, and invents no
DNS response, HTTP request or TCP event."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter

import pytest

from lab.exporter_process import ExporterProcess, Scrape
from lab.testnode import TestNode, in_netns
from tests import fuzzframes

pytestmark = pytest.mark.kernel

FRAMES = 110_000
SEED = 20261121


def link_stats(node: TestNode, ns: str, device: str) -> dict:
    out = node.run(ns, ["ip", "-j", "-s", "link", "show", "dev", device]).stdout
    return json.loads(out)[0]["stats64"]


def send_all(ns: str, frames: list[bytes]) -> float:
    """Sends every frame out of `ns`'s eth0 with one raw socket; returns the seconds taken."""
    with in_netns(ns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    with sock:
        sock.bind(("eth0", 0))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)
        send = sock.send
        started = time.monotonic()
        for frame in frames:
            while True:
                try:
                    send(frame)
                    break
                except BlockingIOError:
                    time.sleep(0.001)
                except OSError as e:
                    if e.errno != 105:      # ENOBUFS: the queue is full for a moment
                        raise
                    time.sleep(0.001)
        return time.monotonic() - started


def fuzz_flows(scrape: Scrape, metric: str) -> Counter:
    """Sums of a flow counter over series with a fuzz address, by (family, protocol)."""
    sums: Counter = Counter()
    for sample in scrape.select(f"ebpf_net_flow_{metric}_total"):
        labels = sample.labels
        if fuzzframes.in_fuzz_nets(labels.get("src_ip", "")) or \
                fuzzframes.in_fuzz_nets(labels.get("dst_ip", "")):
            sums[(labels["family"], labels["protocol"])] += sample.value
    return sums


def protocol_name(number: int) -> str:
    return {6: "tcp", 17: "udp"}.get(number, "")


def test_hostile_frames_are_counted_exactly_and_invent_nothing(node: TestNode):
    corpus = fuzzframes.build(FRAMES, SEED)
    assert len(corpus.frames) >= 100_000
    expected_bytes: Counter = Counter()
    expected_packets: Counter = Counter()
    for outcome in corpus.outcomes:
        if outcome.flow:
            expected_bytes[outcome.flow.family] += outcome.bytes
            expected_packets[outcome.flow.family] += 1
            name = protocol_name(outcome.flow.protocol)
            if name:
                expected_packets[(outcome.flow.family, name)] += 1
    dns = Counter(o.dns for o in corpus.outcomes)
    # every kind of frame is really in the corpus
    assert min(corpus.kinds[k] for k in ("flow", "ip_error", "not_ip", "unseen")) > 100
    assert min(dns[k] for k in ("query", "error", "response", "ignored")) > 100

    for ns, device in ((node.a_ns, "eth0"), (node.node_ns, node.veth_a)):
        node.run(ns, ["ip", "link", "set", "dev", device, "mtu", str(fuzzframes.MTU)])
    config = {"maps": {"flow_capacity": 262144}, "series": {"max_per_metric": 50000}}
    with ExporterProcess(node, config=config) as exporter:
        exporter.wait_ready()
        before = exporter.scrape()
        received = link_stats(node, node.node_ns, node.veth_a)["rx"]["packets"]
        dropped = link_stats(node, node.a_ns, "eth0")["tx"]["dropped"]

        took = send_all(node.a_ns, corpus.frames)

        # the veth delivered every frame (a frame lost before TC would spoil the account)
        assert link_stats(node, node.a_ns, "eth0")["tx"]["dropped"] == dropped
        delivered = link_stats(node, node.node_ns, node.veth_a)["rx"]["packets"] - received
        assert len(corpus.frames) <= delivered <= len(corpus.frames) + 20
        total = sum(v for k, v in expected_packets.items() if isinstance(k, str))
        scrape = exporter.wait_for(
            lambda s: sum(fuzz_flows(s, "packets").values()) >= total,
            f"{total} fuzz packets counted", timeout=60)
        assert exporter.proc.poll() is None
        assert exporter.get("/readyz")[0] == 200

        packets, byte_counts = fuzz_flows(scrape, "packets"), fuzz_flows(scrape, "bytes")
        for family in ("ipv4", "ipv6"):
            assert sum(v for (f, _), v in packets.items() if f == family) == \
                expected_packets[family], family
            assert sum(v for (f, _), v in byte_counts.items() if f == family) == \
                expected_bytes[family], family
            for name in ("tcp", "udp"):
                assert packets[(family, name)] == expected_packets[(family, name)], \
                    (family, name)
        assert scrape.value("ebpf_net_flow_packets_total", src_ip="overflow") == 0
        assert scrape.value("ebpf_net_exporter_bpf_map_update_failures_total", map="flows") == 0

        def moved(name: str, **labels: str) -> float:
            return scrape.value(name, **labels) - before.value(name, **labels)

        errors = "ebpf_net_exporter_parse_errors_total"
        assert moved(errors, protocol="ip") == corpus.kinds["ip_error"]
        # unanswered "responses" are errors too: no query of ours matches them
        assert moved(errors, protocol="dns") == dns["error"] + dns["response"]
        assert moved(errors, protocol="http") > 0
        assert moved("ebpf_net_dns_requests_total") == dns["query"]
        assert scrape.value("ebpf_net_dns_responses_total") == 0
        assert scrape.value("ebpf_net_dns_request_duration_seconds_count") == 0
        assert scrape.value("ebpf_net_http_requests_total") == 0, \
            [s for s in scrape.samples if s.name == "ebpf_net_http_requests_total"]
        assert scrape.value("ebpf_net_http_request_duration_seconds_count") == 0
        invented_tcp = [s for s in scrape.samples if s.name.startswith("ebpf_net_tcp_")
                        and any(fuzzframes.in_fuzz_nets(v) for v in s.labels.values())]
        assert invented_tcp == []
        assert "level=error" not in exporter.log() and "Traceback" not in exporter.log()
        print(f"fuzz: {len(corpus.frames)} frames in {took:.1f} s "
              f"({len(corpus.frames) / took:.0f}/s), {dict(corpus.kinds)}, dns {dict(dns)}")
        assert exporter.stop() == 0
