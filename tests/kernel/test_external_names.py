"""External names (the dns_name label) against a real DNS server (dnsmasq) and real clients
(curl through the C library resolver, dig): a namespace plays "the internet", with addresses
that names, CNAME chains and bare addresses lead to."""

from __future__ import annotations

import signal
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import yaml

from lab import dnstools
from lab.exporter_process import ExporterProcess, Scrape, wait_until
from lab.testnode import TestNode

pytestmark = pytest.mark.kernel

WEB_PORT = 8080
BAD_DNS_PORT = 5399         # answers whose records are malformed
SHORT_TTL = 1               # seconds: short.ext.test's TTL and the exporter's name_min_ttl
BAD_NAME = "bad.ext.test"
ALLOWED = ["api.ext.test", "*.cdn.test", "short.ext.test", "tcp.ext.test"]


@dataclass
class Internet:
    exporter: ExporterProcess
    addresses: dict[str, str]       # role -> address in the internet namespace


@pytest.fixture(scope="module")
def internet(node: TestNode) -> Iterator[Internet]:
    n = node.b_ip.split(".")[1]
    addresses = {"api": f"10.{n}.2.10", "cdn": f"10.{n}.2.11", "unlisted": f"10.{n}.2.12",
                 "bare": f"10.{n}.2.13", "short": f"10.{n}.2.14", "tcp": f"10.{n}.2.15",
                 "bad": f"10.{n}.2.16", "api6": f"fd00:{n}:2::10"}
    for address in addresses.values():
        node.run(node.b_ns, ["ip", "addr", "add", f"{address}/{64 if ':' in address else 32}",
                             "dev", "eth0", *(["nodad"] if ":" in address else [])])
    node.nginx(node.b_ns, "0.0.0.0", WEB_PORT, {"/": 200})
    node.nginx(node.b_ns, "::", WEB_PORT, {"/": 200})
    a = addresses
    node.spawn(node.b_ns, [
        "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
        "--bind-interfaces", f"--listen-address={node.b_ip}", "--port=53", "--pid-file=",
        "--user=root", "--cache-size=0", "--log-facility=/dev/null",
        f"--host-record=api.ext.test,{a['api']},{a['api6']},300",
        # www.ext.test -> edge.cdn.test -> node1.cdn.test -> an address
        "--cname=www.ext.test,edge.cdn.test,300", "--cname=edge.cdn.test,node1.cdn.test,300",
        f"--host-record=node1.cdn.test,{a['cdn']},300",
        f"--host-record=unlisted.other.test,{a['unlisted']},300",
        f"--host-record=short.ext.test,{a['short']},{SHORT_TTL}",
        f"--host-record=tcp.ext.test,{a['tcp']},300"])
    wait_until(lambda: a["api"] in dig(node, "api.ext.test", check=False), 10, "dnsmasq")
    # an answer whose owner name is a pointer loop, in an A record naming the "bad" address
    start = 12 + len(dnstools.encode_name(BAD_NAME)) + 4
    loop = struct.pack("!HH", 0xC000 | (start + 2), 0xC000 | start)
    record = dnstools.record(loop, dnstools.QTYPE_A, 300, socket.inet_aton(a["bad"]))
    bad = dnstools.Upstream(node.b_ns, node.b_ip, BAD_DNS_PORT, answers=(1, record))
    process = ExporterProcess(node, config={
        "labels": {"external_names": ALLOWED},
        "dns": {"ports": [53, BAD_DNS_PORT], "name_min_ttl": f"{SHORT_TTL}s"}})
    try:
        with node.nameserver(node.a_ns, node.b_ip):
            yield Internet(process.wait_ready(), addresses)
    finally:
        code = process.stop()
        bad.close()
        for address in addresses.values():
            node.run(node.b_ns, ["ip", "addr", "del",
                                 f"{address}/{64 if ':' in address else 32}", "dev", "eth0"],
                     check=False)
        assert code == 0, process.log()


def dig(node: TestNode, name: str, port: int = 53, tcp: bool = False,
        check: bool = True) -> str:
    argv = ["dig", "+time=2", "+tries=1", "-p", str(port), f"@{node.b_ip}", name]
    return node.run(node.a_ns, [*argv, *(["+tcp"] if tcp else [])], check=check).stdout


def curl(node: TestNode, target: str, family: int = 4) -> None:
    host = f"[{target}]" if ":" in target else target
    node.run(node.a_ns, ["curl", f"-{family}", "-sS", "-o", "/dev/null", "--max-time", "5",
                         f"http://{host}:{WEB_PORT}/"])


def sent(scrape: Scrape, node: TestNode, address: str, name: str) -> float:
    """Bytes the client sent to `address` under dst_dns_name `name`."""
    client = node.a_ip6 if ":" in address else node.a_ip
    return scrape.value("ebpf_net_flow_bytes_total", src_ip=client, dst_ip=address,
                        dst_port=str(WEB_PORT), dst_dns_name=name, protocol="tcp")


def received(scrape: Scrape, node: TestNode, address: str, name: str) -> float:
    client = node.a_ip6 if ":" in address else node.a_ip
    return scrape.value("ebpf_net_flow_bytes_total", src_ip=address, dst_ip=client,
                        src_port=str(WEB_PORT), src_dns_name=name, protocol="tcp")


@pytest.mark.parametrize("target, family, role, label", [
    ("api.ext.test", 4, "api", "api.ext.test"),
    ("api.ext.test", 6, "api6", "api.ext.test"),
    ("www.ext.test", 4, "cdn", "edge.cdn.test"),        # the first allowlisted name of the chain
    ("unlisted.other.test", 4, "unlisted", "other"),
    (None, 4, "bare", ""),                              # by address: no answer named it
])
def test_flows_to_the_internet_carry_the_name_the_client_resolved(
        node: TestNode, internet: Internet, target: str | None, family: int, role: str,
        label: str) -> None:
    address = internet.addresses[role]
    curl(node, target or address, family)
    scrape = internet.exporter.wait_for(lambda s: sent(s, node, address, label) > 0 and
                                        received(s, node, address, label) > 0,
                                        f"flows to {address} named {label!r}")
    # every byte of the exchange carries that one name, both ways
    for direction in ("src", "dst"):
        peer = f"{direction}_ip"
        named = {s.labels[f"{direction}_dns_name"] for s in scrape.select(
            "ebpf_net_flow_bytes_total", **{peer: address}) if s.value}
        assert named == {label}, direction
    assert scrape.value("ebpf_net_exporter_parse_errors_total", protocol="dns") == 0


def test_an_answer_over_tcp_names_the_address_for_the_client_that_asked(
        node: TestNode, internet: Internet) -> None:
    address = internet.addresses["tcp"]
    assert address in dig(node, "tcp.ext.test", tcp=True)
    curl(node, address)                         # by address, after the client resolved it
    internet.exporter.wait_for(lambda s: sent(s, node, address, "tcp.ext.test") > 0,
                               "a flow named by a TCP answer")


def test_ttl_expiry_moves_later_flows_back_to_no_name(node: TestNode,
                                                      internet: Internet) -> None:
    exporter, address = internet.exporter, internet.addresses["short"]
    curl(node, "short.ext.test")
    exporter.wait_for(lambda s: sent(s, node, address, "short.ext.test") > 0, "a named flow")
    labelled = time.monotonic()
    # the scrape that labelled the flow kept the name SHORT_TTL longer: let it lapse, with a
    # scrape in between so that the next interval begins after it expired
    time.sleep(SHORT_TTL + 0.5)
    exporter.scrape()
    assert time.monotonic() - labelled > SHORT_TTL
    named = sent(exporter.scrape(), node, address, "short.ext.test")
    curl(node, address)
    scrape = exporter.wait_for(lambda s: sent(s, node, address, "") > 0, "an unnamed flow")
    assert sent(scrape, node, address, "short.ext.test") == named


def test_malformed_answers_are_parse_errors_and_nothing_else(node: TestNode,
                                                             internet: Internet) -> None:
    exporter, address = internet.exporter, internet.addresses["bad"]
    before = exporter.scrape()
    for _ in range(3):
        dig(node, BAD_NAME, port=BAD_DNS_PORT, check=False)
    scrape = exporter.wait_for(
        lambda s: s.value("ebpf_net_exporter_parse_errors_total", protocol="dns") -
        before.value("ebpf_net_exporter_parse_errors_total", protocol="dns") >= 3,
        "three parse errors")
    assert scrape.value("ebpf_net_exporter_parse_errors_total", protocol="dns") - \
        before.value("ebpf_net_exporter_parse_errors_total", protocol="dns") == 3
    # the responses themselves are counted as answered queries
    assert scrape.value("ebpf_net_dns_responses_total", dst_ip=node.b_ip,
                        dst_port=str(BAD_DNS_PORT), rcode="NoError") - before.value(
        "ebpf_net_dns_responses_total", dst_ip=node.b_ip, dst_port=str(BAD_DNS_PORT),
        rcode="NoError") == 3
    assert scrape.value("ebpf_net_exporter_dns_answers_read_total") == \
        before.value("ebpf_net_exporter_dns_answers_read_total")
    curl(node, address)
    exporter.wait_for(lambda s: sent(s, node, address, "") > 0, "the address, unnamed")


def test_sighup_applies_new_globs_to_later_traffic(node: TestNode, internet: Internet) -> None:
    exporter, address = internet.exporter, internet.addresses["api"]
    path = exporter.workdir / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["labels"]["external_names"] = ["*.cdn.test"]         # api.ext.test no longer
    path.write_text(yaml.safe_dump(config))
    reloads = exporter.log().count("configuration reloaded")
    exporter.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: exporter.log().count("configuration reloaded") > reloads, 10,
               "the reload")
    assert "take effect after a restart" not in exporter.log()
    curl(node, "api.ext.test")
    exporter.wait_for(lambda s: sent(s, node, address, "other") > 0, "api.ext.test as other")
