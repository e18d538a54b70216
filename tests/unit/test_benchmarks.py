"""The pure parts of benchmarks/: summaries, tables and the sprayer's frames."""

import ipaddress
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks.cluster_rule import RuleCosts
from benchmarks.connections import LoopBuildError, build_loop
from benchmarks.document import Results, headlines, markdown
from benchmarks.interleaved import Rounds
from benchmarks.kernel_cost import ConnectionCost, ProgramCost, WorkloadCost
from benchmarks.kubernetes_memory import KubernetesMemory
from benchmarks.machine import Machine
from benchmarks.procstat import Memory
from benchmarks.report import Headline, against, at_most, markdown_table, text_table, verdict
from benchmarks.scrape import ScrapeRun
from benchmarks.sprayer import FRAME, SOURCE_PORT_BASE, frames
from benchmarks.stats import median_interval, paired_ratios, percentile, summarize
from benchmarks.streams import STREAMS


def test_summary_median_quartiles_and_spread():
    s = summarize([10, 1, 4, 3, 2])
    assert (s.median, s.p25, s.p75, s.low, s.high, s.count) == (3, 2, 4, 1, 10, 5)
    assert s.spread == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        summarize([])


def test_the_median_interval_narrows_with_more_samples_and_never_assumes_too_much():
    # with 8 samples or fewer, only min..max covers the median with 95% confidence
    assert median_interval([5, 1, 3]) == (1, 5)
    assert median_interval(range(1, 9)) == (1, 8)
    # the binomial tail: P(at most 1 of 10 below the median) = 11/1024 <= 2.5% < 56/1024
    assert median_interval(range(1, 11)) == (2, 9)
    assert median_interval(range(1, 21)) == (6, 15)
    assert median_interval(range(1, 41)) == (14, 27)
    s = summarize(list(range(20, 0, -1)))
    assert (s.median_low, s.median_high) == (6, 15)
    with pytest.raises(ValueError):
        median_interval([])


def test_percentile_interpolates_and_p99_of_few_samples_is_near_the_slowest():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([0.1] * 9 + [1.0], 99) == pytest.approx(0.919)


def test_paired_ratios_compare_round_by_round():
    assert paired_ratios([10, 20, 0], [9, 22, 5]) == [0.9, 1.1]
    with pytest.raises(ValueError):
        paired_ratios([1, 2], [1])


def test_tables():
    assert markdown_table(("a", "b"), [["1", "22"]]) == "| a | b |\n| --- | --- |\n| 1 | 22 |"
    assert text_table(("a", "bb"), [["333", "4"]]).splitlines() == [
        "a    bb", "---  --", "333  4 "]
    verdicts = [verdict(Headline("f", "1", target, met))
                for target, met in (("< 2", True), ("< 2", False), ("< 2", None), ("-", None))]
    assert verdicts == ["met", "MISSED", "not resolved", "-"]


def test_a_spread_that_straddles_the_target_does_not_decide():
    assert [against(0.98, 1.2, 0.97), against(0.90, 0.96, 0.97), against(0.9, 1.1, 0.97)] == [
        True, False, None]
    assert [at_most(80, 95, 100), at_most(120, 140, 100), at_most(90, 110, 100)] == [
        True, False, None]


def test_sprayed_frames_are_distinct_valid_udp_flows():
    out = frames(2500, 10, b"\x02" * 6, b"\x04" * 6, "10.1.1.1")
    assert out.shape == (2500, FRAME)
    ip = out[:, 14:34]
    words = np.ascontiguousarray(ip).view(">u2").astype(np.uint32).sum(axis=1)
    while (words >> 16).any():
        words = (words & 0xFFFF) + (words >> 16)
    assert (words == 0xFFFF).all()          # every IPv4 header checksum verifies
    sources = [str(ipaddress.IPv4Address(bytes(row[26:30]))) for row in out]
    ports = out[:, 34:36].copy().view(">u2").reshape(-1)
    assert len(set(zip(sources, ports.tolist(), strict=True))) == 2500
    assert len(set(sources)) == 250 and sources[0] == "172.16.0.0"
    assert ports.min() == SOURCE_PORT_BASE and ports.max() == SOURCE_PORT_BASE + 9
    assert bytes(out[0, 30:34]) == bytes([10, 1, 1, 1])


def test_side_by_side_difference_cancels_the_order_in_each_pair():
    from pathlib import Path

    from benchmarks.compare import side_by_side_table

    # the tree in front pays 60 ns more per TCP skb; the second tree is 10 ns cheaper
    a, b = Path("/a"), Path("/b")
    results = [[(50.0, 200.0), (45.0, 130.0)],     # a in front
               [(50.0, 140.0), (45.0, 190.0)],     # b in front
               [(50.0, 200.0), (45.0, 130.0)]]     # an odd one: left out of the pairs
    rendered = side_by_side_table([a, b], results)
    row = next(line for line in rendered.splitlines() if line.startswith("/b"))
    assert "-5 (-5 to -5), 1 pair" in row and "-10 (-10 to -10), 1 pair" in row


def test_the_connection_loop_builds_and_a_broken_one_says_what_the_compiler_said(
        tmp_path: Path) -> None:
    build_loop(str(tmp_path / "loop"))
    usage = subprocess.run([str(tmp_path / "loop")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: connection_loop SECONDS" in usage.stderr
    broken = tmp_path / "broken.c"
    broken.write_text("int main(void) { return undeclared; }\n")
    with pytest.raises(LoopBuildError, match="undeclared"):
        build_loop(str(tmp_path / "broken"), broken)


def _synthetic_results(loop_ratios: list[float]) -> Results:
    """A run's results made up: every part with a few samples, the connection loop's pairs
    with the given ratios (with / without)."""
    def workload(name: str, tc_ns: float) -> WorkloadCost:
        return WorkloadCost(name, [ProgramCost("classify_ingress", 1000, tc_ns / 2)], 2000, 60.0,
                            tc_ns / 2, 1000, tc_ns, 120.0, 1.0, 1e5)

    rounds = Rounds()
    for name in STREAMS:
        ratios = loop_ratios if name == "connections" else [1.0] * len(loop_ratios)
        rounds.without[name] = [1000.0] * len(ratios)
        rounds.attached[name] = [1000.0 * ratio for ratio in ratios]
    rounds.startup_seconds = [2.5, 2.7, 2.9]
    rounds.startup_memory = [Memory(200.0, 130.0, 210.0)] * 3
    rounds.startup_peak_mib = [290.0, 310.0, 300.0]
    memory = Memory(180.0, 132.0, 190.0)
    scrapes = [ScrapeRun(flows, flows // 10, [0.2, 0.21, 0.22], [0.15, 0.16, 0.17],
                         flows // 5, flows // 5, memory) for flows in (100_000, 1_000_000)]
    return Results(Machine("6.18", "AMD EPYC", 2, 23.5, "2026-12-03 01:31 UTC"), False, False,
                   (0.5, 0.5, 0.3), (1.3, 1.4, 0.9), 0.5,
                   [[workload("udp", 160.0), workload("tcp", 210.0)]] * 3,
                   [ConnectionCost(1000, [ProgramCost("tcp_probe", 3000, 130.0)], 1.0)] * 3,
                   rounds, scrapes, 10, 520.0,
                   kubernetes=KubernetesMemory(10_000, 2_000, 100, 7.2,
                                               Memory(144.0, 128.0, 157.0)))


def test_the_document_gives_every_interval_to_the_decimal_its_verdict_turns_on():
    # pairs whose ratios put the loop's interval just past 5%: rounded to whole percents it
    # would read "1 to 5%" beside "not resolved"
    low, high = (int(i) for i in median_interval(list(range(60))))   # the interval's ranks
    ratios = ([0.9] * low + [0.946] + [0.965] * (high - low - 1) + [0.985]
              + [1.02] * (59 - high))
    results = _synthetic_results(ratios)
    loop = next(h for h in headlines(results) if h.figure.startswith("connect/accept/close"))
    assert loop.measured == "3.5% (95% CI 1.5 to 5.4%)" and loop.met is None
    rendered = markdown(results)
    assert "| connect/accept/close loop slowdown | 3.5% (95% CI 1.5 to 5.4%) | < 5% |" in rendered
    assert "1.000 of without (95% CI 1.000-1.000)" in rendered   # three decimals, not two
    assert "## 3. Scrape cost" in rendered and "| 100,000 | 10,000 | 3 |" in rendered
    assert rendered.count("Written by `make bench` (`python -m benchmarks`);") == 1
    # the memory targets of the compiler process's issue, and the start-up peak a container
    # limit must hold (the highest of the rounds)
    by_figure = {h.figure: h for h in headlines(results)}
    assert (by_figure["RSS when ready (idle)"].measured, by_figure["RSS when ready (idle)"].met
            ) == ("200 MiB", False)
    assert by_figure["RSS (PSS) at 100k flows"].target == "<= 80 MiB"
    assert by_figure["start-up peak, exporter + compiler"].measured == "310 MiB"
    assert "| start-up peak RSS, exporter + compiler (MiB) |" in rendered
    assert by_figure["RSS with Kubernetes on (10k pods, 2k services)"].measured == "144 MiB"
    assert "## 8. Memory with Kubernetes labels on" in rendered
    assert "| 10,000 | 2,000 | 100 | 7.2 | 144 | 128 | 157 |" in rendered
    results.long = True
    assert "Written by `make bench-long` (`python -m benchmarks --long`" in markdown(results)


def _record(datapath, date, tcp_without, tcp_attached):
    from benchmarks.pairs import Record
    return Record(date, "abc1234", datapath, 0.5, (0.5, 0.5, 0.5),
                  {"tcp": tcp_without}, {"tcp": tcp_attached})


def test_saved_pairs_load_as_they_were_and_pool_only_with_their_datapath(tmp_path):
    from benchmarks import pairs
    tcx = "bpf=1111111 config=2222222 attach=tcx"
    saved = [pairs.save(_record(tcx, "2026-12-03T11:27Z", [10.0] * 20, [9.9] * 20), tmp_path),
             pairs.save(_record(tcx, "2026-12-03T12:02Z", [10.0] * 20, [9.7] * 20), tmp_path),
             pairs.save(_record(tcx.replace("tcx", "clsact"), "2026-12-03T12:30Z",
                                [10.0] * 5, [5.0] * 5), tmp_path),
             pairs.save(_record(None, "2026-12-03T13:00Z", [10.0] * 5, [1.0] * 5), tmp_path)]
    assert [p.name for p in saved] == ["2026-12-03T1127Z.json", "2026-12-03T1202Z.json",
                                       "2026-12-03T1230Z.json", "2026-12-03T1300Z.json"]
    # two runs of one date: neither is lost
    again = pairs.save(_record(None, "2026-12-03T13:00Z", [10.0] * 5, [1.0] * 5), tmp_path)
    assert again.name == "2026-12-03T1300Z-1.json"
    records = pairs.load_all(tmp_path)
    assert len(records) == 5
    assert records[0] == _record(tcx, "2026-12-03T11:27Z", [10.0] * 20, [9.9] * 20)
    pooled = pairs.pool(records, "tcp", tcx)
    assert pooled is not None and [r.date for r in pooled.runs] == [
        "2026-12-03T11:27Z", "2026-12-03T12:02Z"]       # not clsact's, nor the dirty tree's
    assert pooled.ratios.count == 40
    assert (pooled.ratios.median_low, pooled.ratios.median_high) == pytest.approx((0.97, 0.99))
    assert pairs.pool(records, "udp", tcx) is None


def test_a_tree_with_changes_to_its_datapath_has_no_identity(monkeypatch):
    from benchmarks import pairs
    answers = {"status": " M bpf/flows.h", "rev-parse": "9ef3f64"}
    monkeypatch.setattr(pairs, "_git", lambda *args: answers[args[0]])
    assert pairs.tree_identity() is None and pairs.datapath("tcx") is None
    answers["status"] = ""
    assert pairs.datapath("tcx") == "bpf=9ef3f64 config=9ef3f64 attach=tcx"


def test_the_pooled_verdict_and_what_more_pairs_are_asked_for():
    from benchmarks.pool import _pair_counts, pooled_rows
    tcx = "bpf=1111111 config=2222222 attach=tcx"
    records = [_record(tcx, "2026-12-03T11:27Z", [10.0] * 20, [9.9] * 20),
               _record(tcx, "2026-12-03T12:02Z", [10.0] * 20, [9.6] * 20)]
    ((stream, measured, target, met, runs),) = pooled_rows(records, tcx)
    assert (stream, target, met) == ("TCP bulk", ">= 0.97", "not resolved")   # 0.96..0.99
    assert measured.startswith("0.975 of without (95% CI 0.960-0.990), 40 pairs")
    assert runs == "2026-12-03T11:27Z (20), 2026-12-03T12:02Z (20)"
    # make bench puts them under its own headline
    results = _synthetic_results([1.0] * 20)
    assert "every saved run of this datapath (`" not in markdown(results)
    results.pooled = (tcx, pooled_rows(records, tcx))
    rendered = markdown(results)
    assert f"every saved run of this datapath (`{tcx}`)" in rendered
    assert ("| TCP bulk | 0.975 of without (95% CI 0.960-0.990), 40 pairs | >= 0.97 | "
            "not resolved | 2026-12-03T11:27Z (20), 2026-12-03T12:02Z (20) |") in rendered
    assert _pair_counts("tcp=600,udp=10") == {"tcp": 600, "udp": 10}
    for bad in ("tcp", "tcp=0", "dns=5", "tcp=x"):
        with pytest.raises(Exception, match="expected STREAM=PAIRS"):
            _pair_counts(bad)


def _workload(name: str, tc_ns: float, ingress_runs: int = 1000) -> WorkloadCost:
    """A workload whose classifier costs tc_ns per packet over 1000 packets, against a floor
    of 60 ns per run (120 per packet): tc_ns - 120 over the floor per packet, and an ingress
    hook of tc_ns / 2 per run, tc_ns / 2 - 60 over the floor."""
    return WorkloadCost(name, [ProgramCost("classify_egress", 1000, tc_ns / 2),
                               ProgramCost("classify_ingress", ingress_runs, tc_ns / 2)],
                        2000, 60.0, tc_ns / 2, 1000, tc_ns, 120.0, 1.0, 1e5)


def test_a_workload_names_its_programs_and_the_ingress_hook_over_the_floor():
    cost = _workload("udp", 260.0)
    assert cost.program("classify_ingress") == ProgramCost("classify_ingress", 1000, 130.0)
    assert cost.program("parse_dns") == ProgramCost("parse_dns", 0, 0.0)    # no runs
    assert cost.ingress_over_floor_per_run == 70.0
    assert cost.over_floor_per_packet == 140.0


def test_the_rule_node_compiles_part_1s_classifier_plus_the_rule(tmp_path: Path) -> None:
    # the rule's exporter runs without the tcp collector: the classifier must not notice
    import yaml

    from benchmarks import cluster_rule
    from exporter.config import load
    from exporter.kernel import classifier, oncepercluster

    node = SimpleNamespace(n=231)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cluster_rule.config(node)))
    on, off = load(str(path), {}, {}), load(None, {}, {})
    assert on.cluster.cidrs == ("10.231.0.0/16",) and not on.collectors.tcp
    assert oncepercluster.wanted(on, None) == (True, "cluster.cidrs")
    assert classifier.cflags(on, True) == [*oncepercluster.cflags(on),
                                           *classifier.cflags(off, False)]


def test_uplink_routes_go_through_a_gateway_outside_the_pods_subnets():
    from benchmarks.cluster_rule import uplinks

    node = SimpleNamespace(n=231, veth_a="pva", veth_b="pvb", a_ip="10.231.1.2",
                           b_ip="10.231.2.2")
    via_b, via_a = uplinks(node)
    assert (via_b.device, via_b.gateway, via_b.destination) == ("pvb", "10.231.2.2",
                                                                 "10.231.200.0/24")
    assert (via_a.device, via_a.gateway) == ("pva", "10.231.1.2")
    for uplink in (via_b, via_a):
        destination = ipaddress.ip_network(uplink.destination)
        assert destination.subnet_of(ipaddress.ip_network("10.231.0.0/16"))
        assert not destination.overlaps(ipaddress.ip_network("10.231.1.0/24"))
        assert not destination.overlaps(ipaddress.ip_network("10.231.2.0/24"))


def test_the_rule_state_is_read_off_the_exporters_metrics():
    from benchmarks.cluster_rule import RuleState, state_of
    from lab.exporter_process import Scrape

    text = ('# TYPE ebpf_net_exporter_network_interfaces gauge\n'
            'ebpf_net_exporter_network_interfaces 1.0\n'
            '# TYPE ebpf_net_exporter_counted_elsewhere counter\n'
            'ebpf_net_exporter_counted_elsewhere_total{signal="flow_packets"} 1234.0\n'
            'ebpf_net_exporter_counted_elsewhere_total{signal="flow_bytes"} 99999.0\n')
    assert state_of(Scrape(text)) == RuleState(1, 1234.0)
    # an exporter counting once per node serves neither
    assert state_of(Scrape("# TYPE up gauge\nup 1.0\n")) == RuleState(None, 0.0)


def test_a_run_the_rule_did_not_shape_as_meant_is_named():
    from benchmarks.cluster_rule import RuleNotApplied, RuleState, require, rule_problem

    before, after = RuleState(1, 100.0), RuleState(1, 1100.0)
    assert rule_problem("udp", before, after, 1, 1000, 1016) is None
    assert rule_problem("udp", before, after, 1, 900, math.inf) is None
    problems = [
        rule_problem("udp", RuleState(None, 0.0), RuleState(None, 0.0), 1, 0, 0),
        rule_problem("udp", before, RuleState(0, 1100.0), 1, 1000, 1016),
        rule_problem("udp", before, after, 1, 1001, 1016),
        rule_problem("pod", before, after, 1, 0, 0),
        rule_problem("tcp", before, after, 1, 2000, math.inf),
    ]
    assert "serves no ebpf_net_exporter_network_interfaces" in problems[0]
    assert "had 0 interfaces facing the network, not 1" in problems[1]
    assert problems[2].endswith('{signal="flow_packets"} grew by 1,000, not 1,001 to 1,016')
    assert problems[3].endswith("grew by 1,000, not 0")
    assert problems[4].endswith("grew by 1,000, not at least 2,000")
    require(None)
    with pytest.raises(RuleNotApplied, match="not 0"):
        require(problems[3])


def _rule(udp_on: float, tcp_on: float) -> RuleCosts:
    """A repetition with the rule on: the uplinks' ingress 70 (UDP) and 110 (TCP) ns per run
    over the floor, every packet left; the same streams pod-facing 20 and 45."""
    return RuleCosts([_workload("udp", udp_on), _workload("tcp", tcp_on)],
                     _workload("udp b -> a", 160.0),
                     [_workload("udp uplink", 260.0), _workload("tcp uplink", 340.0, 500)],
                     [1000.0, 16000.0])


def test_the_rule_on_is_judged_on_paired_ratios_and_the_uplink_stands_beside():
    from benchmarks.cluster_rule import uplink_extra
    from benchmarks.document import rule_ratios

    results = _synthetic_results([1.0] * 20)      # part 1: +40 UDP, +90 TCP over the floor
    assert "With the counting rule on" not in markdown(results)
    assert not [h for h in headlines(results) if "rule on" in h.figure]
    # UDP on: +42, +44, +46 (1.05, 1.10, 1.15 of off): the interval straddles 1.10
    results.rule = [_rule(162.0, 210.0), _rule(164.0, 210.0), _rule(166.0, 210.0)]
    assert uplink_extra(results.rule[0]) == [50.0, 65.0]
    udp = rule_ratios(results, 0)
    assert udp is not None and (udp.median, udp.median_low, udp.median_high) == \
        pytest.approx((1.10, 1.05, 1.15))
    rows = {h.figure: h for h in headlines(results)}
    udp_row = rows["classifier over the floor, rule on (pod-facing), per UDP packet"]
    assert udp_row.measured == "+44 ns; 1.100 (95% CI 1.050-1.150) of the rule off"
    assert udp_row.target == "<= 1.10 of the rule off" and udp_row.met is None
    tcp_row = rows["classifier over the floor, rule on (pod-facing), per TCP skb"]
    assert tcp_row.measured.startswith("+90 ns; 1.000 (95% CI 1.000-1.000)") and tcp_row.met
    uplink = rows["rule on: an uplink's ingress over the floor per run, UDP / TCP"]
    assert uplink.measured == "+70 / +110 ns (the same streams pod-facing +20 / +45)"
    assert uplink.met is None and uplink.target == "-"

    rendered = markdown(results)
    assert "### With the counting rule on (`cluster.cidrs`)" in rendered
    assert rendered.index("### With the counting rule on") < rendered.index("## 2, 5 and 6.")
    assert ("| classifier over the floor, per 64-byte UDP packet | +40 (95% CI +40 to +40) | "
            "+44 (95% CI +42 to +46) | 1.100 (95% CI 1.050-1.150) | <= 1.10 | not resolved |"
            ) in rendered
    assert "| per TCP skb | +90 (95% CI +90 to +90) | +90 (95% CI +90 to +90) | 1.000" in \
        rendered.replace("classifier over the floor, per TCP skb", "per TCP skb")
    assert ("| UDP b -> a, rule on | vb, an uplink | 1,000 | 130 (95% CI 130 to 130) | "
            "+70 (95% CI +70 to +70) | 1.00 |") in rendered
    assert "| va (data), vb (ACKs), both uplinks | 500 |" in rendered
    assert rendered.rstrip().count("| 32.00 |") == 1          # TCP: GSO segments per skb
    assert "**+50 (95% CI +50 to +50) ns** more than" in rendered


def test_no_pair_to_divide_leaves_the_rule_unjudged():
    from benchmarks.document import rule_ratios

    results = _synthetic_results([1.0] * 20)
    results.kernel = [[_workload("udp", 100.0), _workload("tcp", 210.0)]] * 3   # -20: below
    results.rule = [_rule(162.0, 210.0)] * 3
    assert rule_ratios(results, 0) is None
    row = next(h for h in headlines(results) if h.figure.endswith("(pod-facing), per UDP packet"))
    assert "no pair" in row.measured and row.met is None


def test_iperf3_runs_to_pod_b_unless_told_another_server():
    from benchmarks.throughput import UDP_OPTIONS, iperf3_argv

    node = SimpleNamespace(b_ip="10.231.2.2")
    assert iperf3_argv(node, 1.5) == ["iperf3", "-c", "10.231.2.2", "-t", "2"]
    assert iperf3_argv(node, 2, *UDP_OPTIONS, server="10.231.1.2")[:3] == [
        "iperf3", "-c", "10.231.1.2"]
