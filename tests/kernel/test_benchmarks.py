"""Smoke test of the benchmark harness (benchmarks/, `make bench`) against the real kernel: the
floor attaches beside the exporter, the kernel's run-time accounting is read back per program,
and sprayed flows reach the exporter's counters. It checks the harness, not performance."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from benchmarks import cluster_rule, compare, connections, interleaved, kernel_cost, part1, startup
from benchmarks.sprayer import DISCARD_PORT, Sprayer
from benchmarks.streams import STREAMS
from benchmarks.switchable import Switch
from lab.exporter_process import REPO, ExporterProcess, Scrape, attachments_on
from lab.testnode import TestNode

pytestmark = pytest.mark.kernel

FLOWS = 2000


def test_sprayed_flows_are_accounted_per_program_and_counted(node: TestNode,
                                                             exporter: ExporterProcess):
    floor = kernel_cost.Floor(node, [node.veth_a, node.veth_b])
    sprayer = Sprayer(node, FLOWS, 10)

    def traffic() -> None:
        sprayer.spray()
        node.tcp_transfer(node.a_ns, node.b_ns, node.b_ip, 7301, 1 << 20)

    try:
        floor.attach()
        with kernel_cost.run_time_statistics():
            cost = kernel_cost.measure("smoke", exporter.proc.pid, floor, traffic)
    finally:
        sprayer.close()
        floor.detach()
        floor.close()

    runs = {p.name: p.runs for p in cost.programs}
    # every sprayed frame ran the classifier and the floor once, at the node's ingress
    assert runs["classify_ingress"] >= FLOWS + 10
    assert cost.floor_runs >= runs["classify_ingress"]
    # the TCP segments were tail-called into parse_http, which is never a run of its own
    assert runs["parse_http"] == 0 and runs["parse_dns"] == 0
    assert 0 < cost.floor_ns_per_run < cost.tc_ns_per_run

    def sprayed(scrape) -> float:
        return scrape.value("ebpf_net_flow_packets_total", dst_ip=node.node_ip_a,
                            dst_port=str(DISCARD_PORT), protocol="udp")

    scrape = exporter.wait_for(lambda s: sprayed(s) >= FLOWS, "the sprayed flows")
    assert sprayed(scrape) == FLOWS
    assert len(scrape.select("ebpf_net_flow_packets_total", dst_ip=node.node_ip_a,
                             dst_port=str(DISCARD_PORT))) == FLOWS // 10


def test_pool_measures_saves_and_pools_more_pairs(tmp_path, capsys):
    from benchmarks import pairs, pool

    if pairs.tree_identity() is None:
        pytest.skip("uncommitted changes to bpf/ or the default configuration: nothing to pool")
    for _ in range(2):
        assert pool.main(["--run", "udp=2", "--window", "0.2", "--pairs-dir",
                          str(tmp_path)]) == 0
    records = pairs.load_all(tmp_path)
    assert len(records) == 2 and all(r.datapath == f"{pairs.tree_identity()} attach=tcx"
                                     for r in records)
    assert all(len(r.without["udp"]) == len(r.attached["udp"]) == 2 for r in records)
    assert all(0 < x for r in records for x in r.ratios("udp"))
    # each call prints the pooled table: after the first run its 2 pairs, then both runs' 4
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("64-byte UDP ")]
    assert len(rows) == 2 and ", 2 pairs" in rows[0] and ", 4 pairs" in rows[1]


def test_compare_alternates_trees_and_reports_each():
    # a node of its own: part 1 changes pod a's port range and TIME_WAIT limit, and needs the
    # iperf3 port that the shared node's tests may hold
    said: list[str] = []
    with TestNode() as node:
        node.iperf3_server(node.b_ns, node.b_ip)
        connections.prepare(node)
        # iperf3 takes whole seconds
        results = compare.compare(node, [REPO, REPO], 1, 1.0, say=said.append)
    started = [line for line in said if line.startswith("repetition")]
    assert len(started) == 2
    for tree_runs in results:
        assert len(tree_runs) == 1
        for udp, tcp, per_connection in tree_runs:
            # our programs do more than the do-nothing floor on every packet and connection
            assert udp > 0 and tcp > 0 and per_connection > 0
    rendered = compare.table([REPO, REPO], results)
    assert rendered.count(str(REPO)) == 2 and "TCP ns per skb" in rendered


def test_side_by_side_attaches_both_trees_on_the_same_packets():
    said: list[str] = []
    with TestNode() as node:
        node.iperf3_server(node.b_ns, node.b_ip)
        results = compare.side_by_side(node, [REPO, REPO], 2, 1.0, say=said.append)
        # each exporter removed its own filters: only the qdisc's owner's are gone with it
        filters = node.run(node.node_ns, ["tc", "filter", "show", "dev", node.veth_a,
                                          "ingress"]).stdout
    assert len(said) == 2 and "first: " in said[0]
    for repetition in results:
        # both classifiers ran on the workloads' packets: each costs more than the floor
        assert [udp > 0 and tcp > 0 for udp, tcp in repetition] == [True, True]
    assert "beside" not in filters
    rendered = compare.side_by_side_table([REPO, REPO], results)
    assert "1 pair" in rendered and "1 pairs" not in rendered


def test_switched_off_the_programs_see_nothing_and_switched_on_all_again():
    def seen(scrape: Scrape, port: int) -> tuple[float, float]:
        labels = {"dst_ip": node.b_ip, "dst_port": str(port)}
        return (scrape.value("ebpf_net_flow_bytes_total", **labels),
                scrape.value("ebpf_net_tcp_connections_opened_total", role="server", **labels))

    with TestNode() as node, tempfile.TemporaryDirectory(prefix="switch-") as directory:
        node.iperf3_server(node.b_ns, node.b_ip)
        interleaved.prepare_streams(node)   # the connection loop's and HTTPS's streams
        path = Path(directory) / "socket"
        veths = [node.veth_a, node.veth_b]
        with ExporterProcess(node, prefix=[sys.executable, str(interleaved.SWITCHABLE),
                                           str(path)]) as exporter:
            exporter.wait_ready(timeout=startup.READY_TIMEOUT)
            switch = Switch(path)
            try:
                off = switch.set(False, uprobes=True)
                assert set(attachments_on(node, veths).values()) == {0}
                node.tcp_transfer(node.a_ns, node.b_ns, node.b_ip, 7401, 1 << 16)
                on = switch.set(True, uprobes=True)
                assert set(attachments_on(node, veths).values()) == {1}
                node.tcp_transfer(node.a_ns, node.b_ns, node.b_ip, 7402, 1 << 16)
                # four filters, at least inet_sock_set_state, tcp_probe and the resets, and the
                # HTTPS program's tracepoints, and its uprobes on the libssl of nginx (the HTTPS
                # stream's): 11 uprobe_multi links (15 perf events on kernels without them)
                assert on == off >= 4 + 4 + 4 + 11
                assert switch.set(True) == switch.set(True, uprobes=True) == 0
                plain = switch.set(False)               # the uprobes stay on
                assert plain == switch.set(True) and off - plain >= 11
                scrape = exporter.wait_for(lambda s: seen(s, 7402)[1] == 1,
                                           "the connection made with the programs on")
                assert seen(scrape, 7401) == (0, 0)
                assert seen(scrape, 7402)[0] > 1 << 16
                rounds = interleaved.Rounds()
                said: list[str] = []
                interleaved.measure_pairs(node, switch, dict.fromkeys(STREAMS, 2), 0.2, rounds,
                                          said.append)
            finally:
                switch.close()
    # one line per stream; every window of each saw its workload run
    assert len(said) == len(STREAMS)
    for name in STREAMS:
        assert len(rounds.without[name]) == len(rounds.attached[name]) == 2
        assert min(rounds.without[name] + rounds.attached[name]) > 0


def test_part_1_measures_the_counting_rule_beside_it_on_a_second_node():
    said: list[str] = []
    with TestNode() as node, TestNode() as rule_node:
        node.iperf3_server(node.b_ns, node.b_ip)
        connections.prepare(node)
        cluster_rule.prepare(rule_node)
        # two repetitions: each configuration runs first once
        measured = part1.run(node, 1.0, 2, say=said.append, settle=0.5, rule_node=rule_node)
        routes = rule_node.run(rule_node.node_ns, ["ip", "-4", "route"]).stdout
    assert " via " not in routes, routes        # the uplinks' routes are gone again
    assert len(measured.kernel) == len(measured.rule) == len(measured.per_connection) == 2
    assert len([line for line in said if "rule on, pod-facing" in line]) == 2
    for off, rule in zip(measured.kernel, measured.rule, strict=True):
        # the same workloads through both nodes, each costing more than its floor
        assert [c.workload for c in rule.pod_facing] == [c.workload for c in off]
        for cost in [*off, *rule.pod_facing, rule.udp_b_to_a, *rule.uplink]:
            assert cost.over_floor_per_packet > 0 and cost.ingress_over_floor_per_run > 0
        # on the uplinks every ingress run was a packet left to another node (part1.run has
        # checked it against the exporter's /metrics, or it would have raised)
        udp, tcp = rule.uplink
        assert rule.left[0] >= 0.99 * udp.program("classify_ingress").runs > 1000
        assert rule.left[1] >= tcp.program("classify_ingress").runs > 1000


def test_an_exporter_that_does_not_count_once_per_cluster_fails_the_rule_check(
        exporter: ExporterProcess):
    with pytest.raises(cluster_rule.RuleNotApplied, match="not counting once per cluster"):
        cluster_rule.wait_facing(exporter, 0)
