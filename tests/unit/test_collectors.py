import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from exporter.collectors import flows
from exporter.collectors import tcp as tcpmod
from exporter.collectors.flows import FlowsCollector
from exporter.collectors.tcp import TcpBatch, TcpCollector
from exporter.naming.endpoints import EndpointLabels, PortFolder
from exporter.serving import histogram
from exporter.serving.selfmetrics import ExporterCollector, KernelStats

from .batches import QueueSource, flow_batch, tcp_batch

EMPTY_FLOWS = flow_batch([])
EMPTY_TCP = tcp_batch([])


def flows_registry(batches, max_series=100, labels=("ip", "ip_type", "port"), ports=None):
    source = QueueSource(list(batches), EMPTY_FLOWS)
    stats = KernelStats()
    collector = FlowsCollector(source, EndpointLabels(labels), ports or PortFolder(32768),
                               stats, max_series, 300)
    registry = CollectorRegistry()
    registry.register(ExporterCollector([collector], stats, {"version": "t"}, lambda: 2))
    return registry


def scrape(registry):
    """One scrape: {(sample name, labels as a frozen set): value}, looked up with a dict."""
    class Samples(dict):
        def __getitem__(self, key):
            name, labels = key
            return dict.__getitem__(self, (name, frozenset(labels.items())))

    return Samples({(s.name, frozenset(s.labels.items())): s.value
                    for m in registry.collect() for s in m.samples})


def flow_labels(src, sport, dst, dport, protocol="tcp", family="ipv4", src_type="private",
                dst_type="private"):
    return {"src_ip": src, "src_ip_type": src_type, "src_port": sport, "dst_ip": dst,
            "dst_ip_type": dst_type, "dst_port": dport, "protocol": protocol,
            "family": family}


def test_flows_fold_client_ports_and_accumulate_across_scrapes():
    rows = [
        {"src": "10.0.0.1", "sport": 41000, "dst": "10.0.0.2", "dport": 80, "bytes": 100,
         "packets": 2},
        {"src": "10.0.0.1", "sport": 41001, "dst": "10.0.0.2", "dport": 80, "bytes": 50,
         "packets": 1},
        {"src": "10.0.0.2", "sport": 80, "dst": "10.0.0.1", "dport": 41000, "bytes": 900,
         "packets": 3},
    ]
    registry = flows_registry([flow_batch(rows), flow_batch(rows[:1])])
    labels = flow_labels("10.0.0.1", "*", "10.0.0.2", "80")
    back = flow_labels("10.0.0.2", "80", "10.0.0.1", "*")
    first = scrape(registry)            # each scrape drains the kernel once
    assert first["ebpf_net_flow_bytes_total", labels] == 150
    assert first["ebpf_net_flow_packets_total", labels] == 3
    assert first["ebpf_net_flow_bytes_total", back] == 900
    second = scrape(registry)           # the next drain adds to the totals
    assert second["ebpf_net_flow_bytes_total", labels] == 250
    assert second["ebpf_net_flow_packets_total", labels] == 5
    third = scrape(registry)            # nothing new: the totals stay
    assert third["ebpf_net_flow_bytes_total", labels] == 250


def test_a_syn_teaches_the_server_even_when_both_ports_look_ephemeral():
    rows = [
        {"src": "10.0.0.1", "sport": 50000, "dst": "10.0.0.2", "dport": 45000, "bytes": 60,
         "packets": 1, "handshake": 1},     # SYN: the sender is the client
        {"src": "10.0.0.2", "sport": 45000, "dst": "10.0.0.1", "dport": 50000, "bytes": 60,
         "packets": 1, "handshake": 2},     # SYN+ACK: the sender is the server
    ]
    registry = flows_registry([flow_batch(rows)])
    assert registry.get_sample_value(
        "ebpf_net_flow_packets_total", flow_labels("10.0.0.1", "*", "10.0.0.2", "45000")) == 1
    assert registry.get_sample_value(
        "ebpf_net_flow_packets_total", flow_labels("10.0.0.2", "45000", "10.0.0.1", "*")) == 1


def test_ipv6_udp_and_icmp_flows():
    rows = [
        {"src": "fd00::1", "sport": 40000, "dst": "fd00::2", "dport": 53, "protocol": 17,
         "bytes": 70, "packets": 1},
        {"src": "10.0.0.1", "dst": "8.8.8.8", "protocol": 1, "bytes": 84, "packets": 1},
    ]
    registry = flows_registry([flow_batch(rows)])
    assert registry.get_sample_value("ebpf_net_flow_bytes_total", flow_labels(
        "fd00::1", "*", "fd00::2", "53", protocol="udp", family="ipv6")) == 70
    assert registry.get_sample_value("ebpf_net_flow_bytes_total", flow_labels(
        "10.0.0.1", "", "8.8.8.8", "", protocol="icmp", dst_type="public")) == 84


def test_kernel_overflow_counts_land_in_the_overflow_series():
    overflow = np.zeros((8, 3), dtype=np.uint64)
    overflow[1] = [1000, 10, 0]         # ipv4 udp
    overflow[4] = [500, 5, 0]           # ipv6 tcp
    registry = flows_registry([flow_batch([], overflow=overflow)])
    over = {k: "overflow" for k in flow_labels("", "", "", "")}
    assert registry.get_sample_value("ebpf_net_flow_bytes_total",
                                     {**over, "protocol": "udp", "family": "ipv4"}) == 1000
    assert registry.get_sample_value("ebpf_net_flow_packets_total",
                                     {**over, "protocol": "tcp", "family": "ipv6"}) == 5


def test_program_wide_counters_are_reported_once_per_scrape():
    def report(stats):
        stats.add_failures("flows", 15)
        stats.add_parse_errors("dns", 2)

    stats = KernelStats()
    registry = CollectorRegistry()
    registry.register(ExporterCollector([], stats, {"version": "t"}, lambda: 0, [report]))
    assert registry.get_sample_value("ebpf_net_exporter_bpf_map_update_failures_total",
                                     {"map": "flows"}) == 15
    assert registry.get_sample_value("ebpf_net_exporter_parse_errors_total",
                                     {"protocol": "dns"}) == 4     # second scrape: totals grow


def test_series_cap_folds_the_excess_and_keeps_the_total():
    rows = [{"src": f"10.0.0.{i}", "sport": 40000, "dst": "10.0.1.1", "dport": 80,
             "bytes": i, "packets": 1} for i in range(1, 11)]
    registry = flows_registry([flow_batch(rows)], max_series=4)
    samples = [s for m in registry.collect() if m.name == "ebpf_net_flow_bytes"
               for s in m.samples]
    assert len(samples) == 5                            # 4 kept + 1 overflow
    assert sum(s.value for s in samples) == sum(range(1, 11))
    assert registry.get_sample_value("ebpf_net_exporter_series_overflow_total",
                                     {"metric": "ebpf_net_flow_bytes_total"}) >= 6


def test_collector_failure_is_reported_and_other_collectors_still_serve():
    class Broken:
        def drain(self):
            raise RuntimeError("map gone")

    stats = KernelStats()
    broken = FlowsCollector(Broken(), EndpointLabels(["ip"]), PortFolder(32768), stats, 10, 60)
    working = TcpCollector(QueueSource([], EMPTY_TCP), EndpointLabels(["ip"]), PortFolder(32768),
                           stats, 10, 60)
    registry = CollectorRegistry()
    registry.register(ExporterCollector([broken, working], stats, {"version": "t"}, lambda: 0))
    assert registry.get_sample_value("ebpf_net_exporter_scrape_collector_success",
                                     {"collector": "flows"}) == 0
    assert registry.get_sample_value("ebpf_net_exporter_scrape_collector_success",
                                     {"collector": "tcp"}) == 1
    assert registry.get_sample_value("ebpf_net_exporter_attached_interfaces") == 0


def tcp_registry(batches):
    source = QueueSource(list(batches), EMPTY_TCP)
    stats = KernelStats()
    collector = TcpCollector(source, EndpointLabels(["ip", "port"]), PortFolder(32768), stats,
                             100, 300)
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


CLIENT = {"local": "10.0.0.1", "remote": "10.0.0.2", "lport": 0, "rport": 80,
          "role": tcpmod.ROLE_CLIENT}
SERVER = {"local": "10.0.0.2", "remote": "10.0.0.1", "lport": 80, "rport": 0,
          "role": tcpmod.ROLE_SERVER}
PAIR = {"src_ip": "10.0.0.1", "dst_ip": "10.0.0.2", "dst_port": "80"}


def test_client_and_server_views_of_a_connection_share_endpoint_labels():
    registry = tcp_registry([tcp_batch([
        {**CLIENT, "metric": tcpmod.OPENED, "count": 3},
        {**SERVER, "metric": tcpmod.OPENED, "count": 3},
        {**CLIENT, "metric": tcpmod.CLOSED, "count": 2},
    ])])
    client = {**PAIR, "role": "client"}
    server = {**PAIR, "role": "server"}
    assert registry.get_sample_value("ebpf_net_tcp_connections_opened_total", client) == 3
    assert registry.get_sample_value("ebpf_net_tcp_connections_opened_total", server) == 3
    assert registry.get_sample_value("ebpf_net_tcp_connections_closed_total", client) == 2
    assert registry.get_sample_value("ebpf_net_tcp_active_connections", client) == 1
    assert registry.get_sample_value("ebpf_net_tcp_active_connections", server) == 3


def test_failures_resets_and_retransmits_by_variant():
    registry = tcp_registry([tcp_batch([
        {**CLIENT, "metric": tcpmod.CONNECT_FAILURES, "variant": 0, "count": 4},
        {**CLIENT, "metric": tcpmod.CONNECT_FAILURES, "variant": 1, "count": 1},
        {**CLIENT, "metric": tcpmod.RESETS, "variant": 1, "count": 4},
        # a reset sent for a closed port: no socket, role unknown, ports as on the wire
        {"local": "10.0.0.2", "remote": "10.0.0.1", "lport": 80, "rport": 51000,
         "metric": tcpmod.RESETS, "variant": 0, "count": 4},
        {**SERVER, "metric": tcpmod.RETRANSMITS, "count": 7},
    ])])
    get = registry.get_sample_value
    assert get("ebpf_net_tcp_connect_failures_total", {**PAIR, "reason": "refused"}) == 4
    assert get("ebpf_net_tcp_connect_failures_total", {**PAIR, "reason": "timeout"}) == 1
    assert get("ebpf_net_tcp_resets_total", {**PAIR, "direction": "received"}) == 4
    assert get("ebpf_net_tcp_resets_total", {**PAIR, "direction": "sent"}) == 4
    assert get("ebpf_net_tcp_retransmits_total", PAIR) == 7


def test_rtt_slots_become_a_histogram_in_seconds():
    registry = tcp_registry([tcp_batch([
        {**CLIENT, "metric": tcpmod.RTT, "variant": histogram.slot_of(50), "count": 2},
        {**CLIENT, "metric": tcpmod.RTT, "variant": histogram.slot_of(3000), "count": 1},
        {**CLIENT, "metric": tcpmod.RTT, "variant": histogram.SUM_SLOT, "count": 3100},
    ])])
    get = registry.get_sample_value
    assert get("ebpf_net_tcp_rtt_seconds_count", PAIR) == 3
    assert get("ebpf_net_tcp_rtt_seconds_sum", PAIR) == pytest.approx(0.0031)
    assert get("ebpf_net_tcp_rtt_seconds_bucket", {**PAIR, "le": "6.4e-05"}) == 2
    assert get("ebpf_net_tcp_rtt_seconds_bucket", {**PAIR, "le": "0.002048"}) == 2
    assert get("ebpf_net_tcp_rtt_seconds_bucket", {**PAIR, "le": "0.004096"}) == 3


def test_tcp_kernel_overflow_is_kept_by_role_and_reason():
    overflow = np.zeros(tcpmod.METRIC_COUNT * 3 * 64, dtype=np.uint64)
    overflow[(tcpmod.OPENED * 3 + tcpmod.ROLE_SERVER) * 64] = 9
    overflow[(tcpmod.CONNECT_FAILURES * 3 + tcpmod.ROLE_CLIENT) * 64 + 1] = 2
    registry = tcp_registry([TcpBatch(EMPTY_TCP.keys, EMPTY_TCP.counts, overflow=overflow)])
    over = {"src_ip": "overflow", "dst_ip": "overflow", "dst_port": "overflow"}
    assert registry.get_sample_value("ebpf_net_tcp_connections_opened_total",
                                     {**over, "role": "server"}) == 9
    assert registry.get_sample_value("ebpf_net_tcp_connect_failures_total",
                                     {**over, "reason": "timeout"}) == 2


def test_open_connections_keep_their_series_past_the_ttl():
    clock = [0.0]
    source = QueueSource([tcp_batch([{**CLIENT, "metric": tcpmod.OPENED, "count": 1}])],
                         EMPTY_TCP)
    collector = TcpCollector(source, EndpointLabels(["ip", "port"]), PortFolder(32768),
                             KernelStats(), 100, 60)
    for store in collector.stores():
        store._clock = lambda: clock[0]
    list(collector.collect())
    clock[0] = 3600
    families = {m.name: m for m in collector.collect()}
    assert [s.value for s in families["ebpf_net_tcp_active_connections"].samples] == [1]


@pytest.mark.parametrize("packed_bits", [62, 20], ids=["packed", "ends-numbered-first"])
def test_flows_from_thousands_of_addresses_fold_like_a_few(monkeypatch, packed_bits):
    # with too many distinct addresses and ports for one integer, each end is numbered first
    monkeypatch.setattr(flows, "PACKED_BITS", packed_bits)
    rng = np.random.default_rng(5)
    rows = [{"src": f"10.2.{i // 250}.{i % 250 + 1}", "dst": "10.9.0.1",
             "sport": int(rng.integers(40000, 60000)), "dport": 80 + i % 3,
             "protocol": 6 if i % 2 else 17, "bytes": 100 + i, "packets": 1}
            for i in range(3000)]
    rows += rows[:50]           # the same flows again on another CPU's row
    samples = scrape(flows_registry([flow_batch(rows)], max_series=10000))
    expected = {}
    for row in rows:
        key = flow_labels(row["src"], "*", "10.9.0.1", str(row["dport"]),
                          protocol="tcp" if row["protocol"] == 6 else "udp")
        frozen = frozenset(key.items())
        expected[frozen] = expected.get(frozen, 0) + row["bytes"]
    assert len(expected) == 3000
    for labels, total in expected.items():
        assert samples["ebpf_net_flow_bytes_total", dict(labels)] == total
