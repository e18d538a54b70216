"""The live view's pieces on fixtures: merging flow directions, ending flows on close, idle and
interval, filters, and the lines it prints."""

from __future__ import annotations

import json

import numpy as np
import pytest

from exporter.live.events import LIVE_EVENT, LIVE_HTTP, LIVE_TCP_CLOSE, End, TcpClose, decode
from exporter.live.filters import FilterError, LineFilter, parse_host
from exporter.live.flowtable import CLOSE_GRACE_SECONDS, FlowTable
from exporter.live.identity import AddressIdentity
from exporter.live.output import Formatter
from exporter.naming.endpoints import PortFolder

from .batches import flow_batch

CLIENT, SERVER = End("10.0.0.1", 41000), End("10.0.0.2", 8080)


def table(idle=2.0, interval=10.0) -> FlowTable:
    return FlowTable(PortFolder(32768), idle, interval)


def tcp_rows(handshake=True):
    return [
        {"src": CLIENT.ip, "sport": CLIENT.port, "dst": SERVER.ip, "dport": SERVER.port,
         "bytes": 500, "packets": 5, "handshake": 1 if handshake else 0},
        {"src": SERVER.ip, "sport": SERVER.port, "dst": CLIENT.ip, "dport": CLIENT.port,
         "bytes": 9000, "packets": 7, "handshake": 2 if handshake else 0},
    ]


def add(flows: FlowTable, rows, now):
    batch = flow_batch(rows)
    flows.add_counts(batch.keys, batch.values, now)


def test_both_directions_make_one_flow_printed_once_after_its_sockets_close():
    flows = table()
    add(flows, tcp_rows(), 0.0)
    add(flows, tcp_rows()[:1], 0.25)
    assert list(flows.due(0.5)) == []
    flows.add_close(TcpClose(4, CLIENT, SERVER, "client", "closed", 120, "curl", 7), 1.0)
    flows.add_close(TcpClose(4, CLIENT, SERVER, "server", "closed", 90, "nginx", 8), 1.1)
    assert list(flows.due(1.0 + CLOSE_GRACE_SECONDS / 2)) == []
    (line,) = flows.due(1.0 + CLOSE_GRACE_SECONDS)
    assert (line.src, line.dst, line.state) == (CLIENT, SERVER, "closed")
    assert (line.src_bytes, line.src_packets, line.dst_bytes, line.dst_packets) == \
        (1000, 10, 9000, 7)
    assert (line.rtt_us, line.process, line.cgroup_id) == (120, "curl", 7)
    # a late packet of the ended flow does not start a new one
    add(flows, tcp_rows()[:1], 2.0)
    assert list(flows.due(10.0)) == []


def test_a_refused_connect_ends_as_refused():
    flows = table()
    flows.add_close(TcpClose(4, CLIENT, SERVER, "client", "refused", 0, "curl"), 0.0)
    (line,) = flows.due(1.0)
    assert (line.state, line.src, line.rtt_us) == ("refused", CLIENT, None)
    # known from its sockets only: no packet crossed a monitored interface
    assert (line.src_bytes, line.src_packets, line.dst_bytes) == (None, None, None)
    text = Formatter(AddressIdentity(), as_json=False).flow(line, 0.0)
    assert text.endswith("FLOW tcp 10.0.0.1:41000 -> 10.0.0.2:8080 refused packets=unseen "
                         "process=curl")


def test_flows_without_sockets_end_when_idle_and_long_ones_print_each_interval():
    flows = table(idle=2.0, interval=5.0)
    udp = [{"src": "10.0.0.1", "sport": 50000, "dst": "10.0.0.9", "dport": 53, "bytes": 60,
            "packets": 1, "protocol": 17}]
    add(flows, udp, 0.0)
    add(flows, tcp_rows(handshake=False), 0.0)
    for t in (1.0, 2.0, 3.0, 4.0, 5.0):
        add(flows, tcp_rows(handshake=False)[:1], t)
    lines = {(line.flow.protocol, line.state): line for t in (1.0, 2.5, 5.0)
             for line in flows.due(t)}
    assert set(lines) == {(17, "idle"), (6, "active")}
    assert lines[(17, "idle")].src == End("10.0.0.1", 50000)      # by the port rule
    active = lines[(6, "active")]
    assert (active.src, active.src_bytes) == (CLIENT, 3000)      # without a handshake too


def test_filters_by_kind_host_port_and_namespace():
    ends = (CLIENT, SERVER)
    assert LineFilter(frozenset()).wants("dns", ends)
    assert LineFilter(frozenset({"tcp"})).wants("tcp", ends)
    assert not LineFilter(frozenset({"tcp"})).wants("udp", ends)
    assert LineFilter(frozenset(), hosts=[parse_host("10.0.0.0/30")]).wants("tcp", ends)
    assert not LineFilter(frozenset(), hosts=[parse_host("10.0.1.1")]).wants("tcp", ends)
    assert LineFilter(frozenset(), ports=[8080]).wants("http", ends)
    assert LineFilter(frozenset({"http"})).wants("https", ends)       # --http: HTTPS too
    assert not LineFilter(frozenset({"dns"})).wants("https", ends)
    assert not LineFilter(frozenset(), ports=[53]).wants("http", ends)
    with pytest.raises(FilterError, match="--host"):
        parse_host("not-an-address")
    with pytest.raises(FilterError, match="Kubernetes"):
        LineFilter(frozenset(), namespaces=["default"], identity=AddressIdentity())

    class Cluster:
        kubernetes = True

        def describe(self, ip):
            return {"namespace": "shop" if ip == SERVER.ip else ""}

    assert LineFilter(frozenset(), namespaces=["shop"], identity=Cluster()).wants("tcp", ends)
    assert not LineFilter(frozenset(), namespaces=["db"], identity=Cluster()).wants("tcp", ends)


def record(**fields) -> bytes:
    raw = np.zeros(1, dtype=LIVE_EVENT)
    for name, value in fields.items():
        raw[0][name] = value
    return raw.tobytes()


def test_records_decode_and_print_as_json_and_text():
    client = np.frombuffer(bytes([10, 0, 0, 1]).ljust(16, b"\0"), dtype=np.uint8)
    server = np.frombuffer(bytes([10, 0, 0, 2]).ljust(16, b"\0"), dtype=np.uint8)
    path = np.frombuffer(b"/api/x?q=1 HTTP/1.1".ljust(128, b"\0"), dtype=np.uint8)
    http = decode(record(kind=LIVE_HTTP, family=4, client=client, server=server,
                         client_port=41000, server_port=8080, latency_us=1500, code=404, what=1,
                         name=path))
    formatter = Formatter(AddressIdentity(), as_json=True)
    line = json.loads(formatter.exchange(http, 0.0))
    assert line == {"time": "1970-01-01T00:00:00.000Z", "type": "http",
                    "src": {"ip": "10.0.0.1", "port": 41000},
                    "dst": {"ip": "10.0.0.2", "port": 8080},
                    "method": "GET", "path": "/api/x?q=1", "status": 404,
                    "latency_seconds": 0.0015}
    text = Formatter(AddressIdentity(), as_json=False).exchange(http, 0.0)
    assert text.endswith("HTTP 10.0.0.1:41000 -> 10.0.0.2:8080 GET /api/x?q=1 404 1500us")

    # the HTTPS program marks its records with transport 1
    https = decode(record(kind=LIVE_HTTP, transport=1, family=4, client=client, server=server,
                          client_port=41000, server_port=443, latency_us=2500, code=200, what=3,
                          name=path))
    assert json.loads(formatter.exchange(https, 0.0))["type"] == "https"
    text = Formatter(AddressIdentity(), as_json=False).exchange(https, 0.0)
    assert text.endswith("HTTPS 10.0.0.1:41000 -> 10.0.0.2:443 POST /api/x?q=1 200 2500us")

    comm = np.frombuffer(b"curl".ljust(16, b"\0"), dtype=np.uint8)
    close = decode(record(kind=LIVE_TCP_CLOSE, family=4, transport=1, client=client,
                          server=server, client_port=41000, server_port=8080, latency_us=80,
                          code=0, comm=comm, cgroup_id=99))
    assert close == TcpClose(4, CLIENT, SERVER, "client", "closed", 80, "curl", 99)
    assert decode(b"short") is None
