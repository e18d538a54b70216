"""External names: the DNS answer parser (CNAME chains, compression, malformed and cut
messages), the (client, address) -> name table and its rules, and the dns_name label on the
flow metrics."""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from exporter import config
from exporter.collectors.flows import FlowsCollector
from exporter.decoding.dnsanswers import DnsAnswerError, parse_response, read_name
from exporter.naming.endpoints import PortFolder
from exporter.naming.externalnames import (
    ANSWER_RECORD,
    CAPTURE,
    ExternalNames,
    NameLabel,
    NameTable,
)
from exporter.naming.labelsets import EndpointLabelSets
from exporter.serving.selfmetrics import KernelStats
from lab.dnstools import QTYPE_A, QTYPE_AAAA, encode_name, record, response

from .batches import QueueSource, flow_batch

CNAME = 5
QUESTION_PTR = b"\xc0\x0c"          # the question's name, at offset 12


def a(address: str) -> bytes:
    return socket.inet_aton(address)


def aaaa(address: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, address)


def test_a_cname_chain_names_each_address_with_the_whole_chain_and_least_ttl() -> None:
    message = response(1, "www.shop.example", [
        record(QUESTION_PTR, CNAME, 300, encode_name("shop.cdn.example")),
        record(encode_name("shop.cdn.example"), CNAME, 60, encode_name("edge.cdn.example")),
        record(encode_name("edge.cdn.example"), QTYPE_A, 120, a("203.0.113.7")),
        record(encode_name("edge.cdn.example"), QTYPE_A, 20, a("203.0.113.8")),
        record(encode_name("unrelated.example"), QTYPE_A, 999, a("198.51.100.1")),
    ])
    parsed = parse_response(message)
    assert parsed.question == "www.shop.example"
    chain = ("www.shop.example", "shop.cdn.example", "edge.cdn.example")
    assert [(x.address, x.family, x.ttl, x.names) for x in parsed.answers] == [
        ("203.0.113.7", 4, 60, chain), ("203.0.113.8", 4, 20, chain)]


def test_aaaa_and_compressed_owner_names() -> None:
    cname_at = 12 + len(encode_name("api.example")) + 4 + 12     # the CNAME's rdata
    message = response(2, "api.example", [
        record(QUESTION_PTR, CNAME, 50, b"\x02eu" + QUESTION_PTR),   # eu.api.example
        record(struct.pack("!H", 0xC000 | cname_at), QTYPE_AAAA, 40, aaaa("2001:db8::7")),
    ], qtype=QTYPE_AAAA)
    (answer,) = parse_response(message).answers
    assert (answer.address, answer.family, answer.ttl) == ("2001:db8::7", 6, 40)
    assert answer.names == ("api.example", "eu.api.example")


@pytest.mark.parametrize("answers, reason", [
    ([b"\xc0\x30" + struct.pack("!HHIH", QTYPE_A, 1, 5, 4) + a("192.0.2.1")], "backwards"),
    ([record(QUESTION_PTR, QTYPE_A, 5, b"\x01\x02\x03\x04\x05")], "5 bytes"),
    ([record(QUESTION_PTR, QTYPE_A, 5, a("192.0.2.1"))[:-2]], "past the end"),
    ([record(b"\x80abc", QTYPE_A, 5, a("192.0.2.1"))], "reserved"),
    ([record(QUESTION_PTR, CNAME, 5, b"\x3f" + b"x" * 63 + b"\xc0\x0c")] * 1, None),
])
def test_malformed_answers_are_errors(answers: list[bytes], reason: str | None) -> None:
    message = response(3, "bad.example", answers)
    if reason is None:          # a pointer inside rdata to the question is fine
        assert parse_response(message).answers == ()
        return
    with pytest.raises(DnsAnswerError, match=reason):
        parse_response(message)


def test_a_pointer_loop_is_an_error_not_a_hang() -> None:
    # two names pointing at each other: the second pointer is not backwards
    message = bytearray(response(4, "loop.example", []))
    message[7] = 1                                   # ancount
    start = len(message)
    message += struct.pack("!H", 0xC000 | (start + 2)) + struct.pack("!H", 0xC000 | start)
    message += struct.pack("!HHIH", QTYPE_A, 1, 5, 4) + a("192.0.2.9")
    with pytest.raises(DnsAnswerError, match="backwards"):
        parse_response(bytes(message))
    with pytest.raises(DnsAnswerError, match="backwards"):
        read_name(b"\xc0\x00", 0)                     # a pointer to itself


def test_a_cname_loop_stops_with_what_was_found() -> None:
    message = response(5, "a.example", [
        record(QUESTION_PTR, QTYPE_A, 30, a("192.0.2.5")),
        record(QUESTION_PTR, CNAME, 30, encode_name("b.example")),
        record(encode_name("b.example"), CNAME, 30, encode_name("a.example")),
    ])
    assert [x.address for x in parse_response(message).answers] == ["192.0.2.5"]


def test_a_cut_message_keeps_the_records_that_fit_and_says_so() -> None:
    full = response(6, "many.example", [record(QUESTION_PTR, QTYPE_A, 30, a(f"192.0.2.{i}"))
                                        for i in range(1, 40)])
    cut = full[:CAPTURE]
    parsed = parse_response(cut, cut=True)
    assert parsed.cut
    kept = (CAPTURE - 12 - len(encode_name("many.example")) - 4) // 16
    assert [x.address for x in parsed.answers] == [f"192.0.2.{i}" for i in range(1, kept + 1)]
    with pytest.raises(DnsAnswerError):
        parse_response(cut)                 # the same bytes, said to be whole: malformed
    assert not parse_response(full).cut


def test_name_label_is_the_first_allowlisted_name_of_the_chain() -> None:
    label = NameLabel(["*.cdn.example", "api.github.com."])
    assert label(("api.github.com",)) == "api.github.com"
    assert label(("www.shop.example", "shop.cdn.example", "edge.cdn.example")) == \
        "shop.cdn.example"
    assert label(("www.shop.example",)) == "other"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def learn(table: NameTable, client: str, name: str, address: str, ttl: int) -> None:
    table.learn(client, parse_response(response(7, name, [
        record(QUESTION_PTR, QTYPE_A, ttl, a(address))])))


def test_table_ttl_bounds_per_client_latest_answer_and_traffic_keeps_a_name() -> None:
    clock = Clock()
    table = NameTable(capacity=100, min_ttl=30, max_ttl=600, clock=clock)
    learn(table, "10.0.0.1", "api.example", "192.0.2.1", ttl=5)        # raised to 30
    learn(table, "10.0.0.1", "big.example", "192.0.2.2", ttl=86400)    # cut to 600
    learn(table, "10.0.0.2", "cdn-a.example", "192.0.2.9", ttl=60)
    learn(table, "10.0.0.3", "cdn-b.example", "192.0.2.9", ttl=60)     # a shared address
    # each client its own answer; a client that resolved none, the latest answer to any
    assert table.names("10.0.0.2", "192.0.2.9", clock.now) == ("cdn-a.example",)
    assert table.names("10.0.0.3", "192.0.2.9", clock.now) == ("cdn-b.example",)
    assert table.names("10.0.0.4", "192.0.2.9", clock.now) == ("cdn-b.example",)
    clock.now += 29
    assert table.names("10.0.0.1", "192.0.2.1", clock.now) == ("api.example",)
    # that scrape saw traffic: the name is kept min_ttl from then
    clock.now += 29
    assert table.names("10.0.0.1", "192.0.2.1", clock.now) == ("api.example",)
    since = clock.now
    clock.now += 31
    assert table.names("10.0.0.1", "192.0.2.1", clock.now) is None
    # expired during the interval that began at `since`: it still names that interval
    assert table.names("10.0.0.1", "192.0.2.1", since) == ("api.example",)
    assert table.names("10.0.0.1", "192.0.2.2", clock.now) == ("big.example",)
    clock.now += 600
    assert table.names("10.0.0.1", "192.0.2.2", clock.now - 1) is None
    # the most recent answer to a client wins
    learn(table, "10.0.0.1", "old.example", "192.0.2.3", ttl=60)
    learn(table, "10.0.0.1", "new.example", "192.0.2.3", ttl=60)
    assert table.names("10.0.0.1", "192.0.2.3", clock.now) == ("new.example",)


def test_table_capacity_evicts_least_recently_used_and_counts_it() -> None:
    clock = Clock()
    table = NameTable(capacity=4, min_ttl=30, max_ttl=600, clock=clock)
    learn(table, "c", "one.example", "192.0.2.1", 60)
    learn(table, "c", "two.example", "192.0.2.2", 60)
    table.names("c", "192.0.2.1", clock.now)                  # used: kept
    learn(table, "c", "three.example", "192.0.2.3", 60)
    # each answer takes two entries, the client's and the address's for any client: the two
    # least recently used went, one.example's for any client and two.example's for "c"
    assert (len(table), table.evictions) == (4, 2)
    assert table.names("c", "192.0.2.1", clock.now) == ("one.example",)
    assert table.names("d", "192.0.2.1", clock.now) is None
    assert table.names("c", "192.0.2.2", clock.now) == ("two.example",)     # for any client
    assert table.names("c", "192.0.2.3", clock.now) == ("three.example",)


def answer_records(client: str, messages: list[bytes], cut: bool = False) -> np.ndarray:
    records = np.zeros(len(messages), dtype=ANSWER_RECORD)
    for row, message in enumerate(messages):
        records[row]["family"], records[row]["cut"] = 4, cut
        records[row]["length"] = min(len(message), CAPTURE)
        records[row]["client"][:4] = np.frombuffer(socket.inet_aton(client), dtype=np.uint8)
        kept = message[:CAPTURE]
        records[row]["message"][:len(kept)] = np.frombuffer(kept, dtype=np.uint8)
    return records


def load(**labels: object) -> config.Config:
    return config.build({**config.flatten(config.default_document(), "defaults"),
                         **{f"labels.{key}": value for key, value in labels.items()}})


def test_flows_carry_dns_name_of_the_client_that_resolved_the_far_end() -> None:
    stats = KernelStats()
    external = ExternalNames(NameTable(100, 60, 3600), ["api.example", "*.cdn.example"], stats)
    external.feed(answer_records("10.0.0.1", [
        response(1, "api.example", [record(QUESTION_PTR, QTYPE_A, 60, a("192.0.2.1"))]),
        response(2, "www.example", [
            record(QUESTION_PTR, CNAME, 60, encode_name("edge.cdn.example")),
            record(encode_name("edge.cdn.example"), QTYPE_A, 60, a("192.0.2.2"))]),
        response(3, "unlisted.example", [record(QUESTION_PTR, QTYPE_A, 60, a("192.0.2.3"))]),
        response(4, "bad.example", [record(QUESTION_PTR, QTYPE_A, 5, b"\x01")]),
    ]))
    assert stats.parse_errors["dns"] == 1 and external.read == 3
    endpoints = EndpointLabelSets(load(external_names=["api.example"]), None,
                                  external).of("flows")
    assert endpoints.label_names("dst") == ["dst_ip", "dst_ip_type", "dst_dns_name", "dst_port"]
    rows = [{"src": "10.0.0.1", "dst": address, "sport": 40000 + i, "dport": 443,
             "bytes": 100, "packets": 1, "handshake": 1}
            for i, address in enumerate(["192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"])]
    rows.append({"src": "192.0.2.1", "dst": "10.0.0.1", "sport": 443, "dport": 40000,
                 "bytes": 700, "packets": 1, "handshake": 2})
    rows.append({"src": "10.0.0.9", "dst": "192.0.2.1", "sport": 40100, "dport": 443,
                 "bytes": 50, "packets": 1, "handshake": 1})   # resolved nothing: any client's
    collector = FlowsCollector(QueueSource([flow_batch(rows)], flow_batch([])), endpoints,
                               PortFolder(32768), stats, 10000, 300)
    registry = CollectorRegistry()
    registry.register(collector)
    value = registry.get_sample_value
    common = {"protocol": "tcp", "family": "ipv4"}

    def sent(src: str, dst: str, name: str) -> float | None:
        return value("ebpf_net_flow_bytes_total", {
            "src_ip": src, "src_ip_type": "private", "src_dns_name": "", "src_port": "*",
            "dst_ip": dst, "dst_ip_type": "private", "dst_dns_name": name, "dst_port": "443",
            **common})

    assert sent("10.0.0.1", "192.0.2.1", "api.example") == 100
    assert sent("10.0.0.1", "192.0.2.2", "edge.cdn.example") == 100
    assert sent("10.0.0.1", "192.0.2.3", "other") == 100
    assert sent("10.0.0.1", "192.0.2.4", "") == 100
    assert sent("10.0.0.9", "192.0.2.1", "api.example") == 50
    assert value("ebpf_net_flow_bytes_total", {
        "src_ip": "192.0.2.1", "src_ip_type": "private", "src_dns_name": "api.example",
        "src_port": "443", "dst_ip": "10.0.0.1", "dst_ip_type": "private", "dst_dns_name": "",
        "dst_port": "*", **common}) == 700
    assert value("ebpf_net_exporter_dns_names", {}) is None     # registered by the exporter
    names = {m.name: m.samples[0].value for m in external.collect()}
    assert names["ebpf_net_exporter_dns_names"] == 6
    assert names["ebpf_net_exporter_dns_answers_read"] == 3


def test_dns_name_needs_external_names_and_external_names_need_dns() -> None:
    with pytest.raises(config.ConfigError, match=r"dns_name needs labels\.external_names"):
        load(endpoint=["ip", "dns_name"])
    # the error names the field that was set
    with pytest.raises(config.ConfigError, match=r"^labels\.external_names \(from "
                       r"EBPF_NET_LABELS_EXTERNAL_NAMES\): .*turn collectors\.dns on"):
        config.load(None, {"EBPF_NET_LABELS_EXTERNAL_NAMES": "*.example.com"},
                    {"collectors.dns": False})
    with pytest.raises(config.ConfigError, match=r"^dns\.name_max_ttl \(from flag\): "
                       r"dns\.name_min_ttl \(60s\) is above dns\.name_max_ttl \(30s\)"):
        config.load(None, {}, {"dns.name_max_ttl": "30s"})
    with pytest.raises(config.ConfigError, match=r"^dns\.name_min_ttl \(from flag\)"):
        config.load(None, {}, {"dns.name_min_ttl": "2h"})
