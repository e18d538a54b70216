"""The pure parts of benchmarks/: summaries, tables and the sprayer's frames."""

import ipaddress
import subprocess
from pathlib import Path

import numpy as np
import pytest

from benchmarks.connections import LoopBuildError, build_loop
from benchmarks.document import Results, headlines, markdown
from benchmarks.interleaved import Rounds
from benchmarks.kernel_cost import ConnectionCost, ProgramCost, WorkloadCost
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
    memory = Memory(180.0, 132.0, 190.0)
    scrapes = [ScrapeRun(flows, flows // 10, [0.2, 0.21, 0.22], [0.15, 0.16, 0.17],
                         flows // 5, flows // 5, memory) for flows in (100_000, 1_000_000)]
    return Results(Machine("6.18", "AMD EPYC", 2, 23.5, "2026-12-03 01:31 UTC"), False, False,
                   (0.5, 0.5, 0.3), (1.3, 1.4, 0.9), 0.5,
                   [[workload("udp", 160.0), workload("tcp", 210.0)]] * 3,
                   [ConnectionCost(1000, [ProgramCost("tcp_probe", 3000, 130.0)], 1.0)] * 3,
                   rounds, scrapes, 10, 520.0)


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
