"""docs/benchmarks.md and the printed table, from the results of one run."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import grpc_load, kubernetes_memory
from .cluster_rule import RULE_TARGET, RuleCosts, pod_facing_twins, uplink_extra
from .grpc_load import TARGET_CALLS_PER_SECOND, TARGET_CORES, GrpcLoad
from .interleaved import Rounds
from .kernel_cost import TC_PROGRAMS, ConnectionCost, WorkloadCost
from .kubernetes_memory import KubernetesMemory
from .machine import Machine
from .report import (
    HEADLINE_HEADER,
    NO_TARGET,
    RATIO_TARGETS,
    Headline,
    against,
    at_most,
    headline_rows,
    markdown_table,
    spread_text,
    verdict,
)
from .scrape import ScrapeRun
from .stats import Summary, paired_ratios, percentile, summarize
from .streams import STREAMS

NOTES = Path(__file__).with_name("notes.md")
# the latest `make soak` run (issue 9), written up by hand: appended so `make bench` keeps it
SOAK = Path(__file__).with_name("soak.md")


@dataclass
class Results:
    machine: Machine
    quick: bool
    long: bool
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    window_seconds: float                   # part 2's
    kernel: list[list[WorkloadCost]]        # per repetition: [udp, tcp]
    per_connection: list[ConnectionCost]    # per repetition
    rounds: Rounds
    scrapes: list[ScrapeRun]
    ports_per_source: int
    wall_seconds: float
    # the verdicts over every saved run of this datapath, this one's pairs included: the
    # datapath and benchmarks.pool's rows; None when the run's pairs were not saved
    pooled: tuple[str, list[list[str]]] | None = None
    # part 1 with the counting rule on, per repetition (paired with `kernel`'s); empty: not run
    rule: list[RuleCosts] = field(default_factory=list)
    # part 7: runs at the target rate, then one unpaced; empty: not run
    grpc: list[GrpcLoad] = field(default_factory=list)
    # part 8: memory with Kubernetes labels on, against a large test cluster; None: not run
    kubernetes: KubernetesMemory | None = None


def _ratios(rounds: Rounds, name: str) -> Summary:
    return summarize(paired_ratios(rounds.without[name], rounds.attached[name]))


def _median_repetition(costs: list[WorkloadCost]) -> WorkloadCost:
    ordered = sorted(costs, key=lambda c: c.over_floor_per_packet)
    return ordered[len(ordered) // 2]


RULE_UNITS = ("UDP packet", "TCP skb")     # part 1's workloads, by index


def rule_ratios(r: Results, index: int) -> Summary | None:
    """The rule on's figure over the floor per packet (pod-facing) over the rule off's of the
    same repetition, for workload `index` (0 UDP, 1 TCP): their median and its 95% CI. None
    when no repetition had a positive figure with the rule off to divide by."""
    ratios = paired_ratios([repetition[index].over_floor_per_packet for repetition in r.kernel],
                           [rule.pod_facing[index].over_floor_per_packet for rule in r.rule])
    return summarize(ratios) if ratios else None


def _ratio_text(ratio: Summary | None) -> str:
    if ratio is None:
        return "no pair to divide: the rule off was never above the floor"
    return f"{ratio.median:.3f} (95% CI {ratio.median_low:.3f}-{ratio.median_high:.3f})"


def _rule_met(ratio: Summary | None) -> bool | None:
    return None if ratio is None else at_most(ratio.median_low, ratio.median_high,
                                              RULE_TARGET)


def _rule_headlines(r: Results) -> list[Headline]:
    out = []
    for index, unit in enumerate(RULE_UNITS):
        on = summarize([rule.pod_facing[index].over_floor_per_packet for rule in r.rule])
        ratio = rule_ratios(r, index)
        of_off = "no pair to divide" if ratio is None else f"{_ratio_text(ratio)} of the rule off"
        out.append(Headline(f"classifier over the floor, rule on (pod-facing), per {unit}",
                            f"{on.median:+.0f} ns; {of_off}",
                            f"<= {RULE_TARGET:.2f} of the rule off", _rule_met(ratio)))
    pod = [summarize([pod_facing_twins(rule)[i].ingress_over_floor_per_run for rule in r.rule])
           for i in range(2)]
    uplink = [summarize([rule.uplink[i].ingress_over_floor_per_run for rule in r.rule])
              for i in range(2)]
    out.append(Headline("rule on: an uplink's ingress over the floor per run, UDP / TCP",
                        f"{uplink[0].median:+.0f} / {uplink[1].median:+.0f} ns "
                        f"(the same streams pod-facing {pod[0].median:+.0f} / "
                        f"{pod[1].median:+.0f})", NO_TARGET, None))
    return out


def headlines(r: Results) -> list[Headline]:
    out = []
    for index, target in ((0, 100), (1, 150)):
        costs = [repetition[index] for repetition in r.kernel]
        over = summarize([c.over_floor_per_packet for c in costs])
        unit = "UDP packet" if index == 0 else "TCP skb"
        out.append(Headline(f"classifier over the floor, per {unit}",
                            f"+{over.median:.0f} ns (95% CI {over.median_low:.0f}-"
                            f"{over.median_high:.0f})",
                            f"<= +{target} ns", at_most(over.median_low, over.median_high,
                                                        target)))
    if r.rule:
        out += _rule_headlines(r)
    for name, label in (("tcp", "TCP bulk"), ("udp", "64-byte UDP")):
        ratio, target = _ratios(r.rounds, name), RATIO_TARGETS[name]
        out.append(Headline(f"throughput with exporter, {label}",
                            f"{ratio.median:.3f} of without (95% CI {ratio.median_low:.3f}-"
                            f"{ratio.median_high:.3f})",
                            f">= {target}", against(ratio.median_low, ratio.median_high, target)))
    by_size = {s.flows: s for s in r.scrapes}
    if 100_000 in by_size:
        s = by_size[100_000]
        p50 = percentile(s.latencies, 50)
        cpu = percentile(s.cpu_seconds, 50)
        assert s.memory is not None
        out += [Headline("scrape p50, 100k flows", f"{p50 * 1000:.0f} ms", "< 250 ms", p50 < 0.25),
                Headline("CPU per scrape, 100k flows", f"{cpu:.3f} s", "< 0.25 s", cpu < 0.25),
                Headline("RSS (PSS) at 100k flows", f"{s.memory.rss_mib:.1f} MiB "
                         f"({s.memory.pss_mib:.0f})", "<= 80 MiB", s.memory.rss_mib <= 80)]
    if 1_000_000 in by_size:
        p50 = percentile(by_size[1_000_000].latencies, 50)
        out.append(Headline("scrape p50, 1M flows", f"{p50:.2f} s", "< 2.5 s", p50 < 2.5))
    start = summarize(r.rounds.startup_seconds)
    rss = summarize([m.rss_mib for m in r.rounds.startup_memory])
    out.append(Headline("start-up to /readyz", f"{start.median:.2f} s", NO_TARGET, None))
    out.append(Headline("RSS when ready (idle)", f"{rss.median:.0f} MiB", "<= 60 MiB",
                        rss.median <= 60))
    if r.rounds.startup_peak_mib:
        peak = summarize(r.rounds.startup_peak_mib)
        out.append(Headline("start-up peak, exporter + compiler", f"{peak.high:.0f} MiB",
                            NO_TARGET, None))
    if r.kubernetes is not None:
        k = r.kubernetes
        out.append(Headline(f"RSS with Kubernetes on ({k.pods // 1000}k pods, "
                            f"{k.services // 1000}k services)", f"{k.memory.rss_mib:.0f} MiB",
                            NO_TARGET, None))
    ratio = _ratios(r.rounds, "connections")
    out.append(Headline("connect/accept/close loop slowdown",
                        f"{(1 - ratio.median) * 100:.1f}% (95% CI "
                        f"{(1 - ratio.median_high) * 100:.1f} to "
                        f"{(1 - ratio.median_low) * 100:.1f}%)", "< 5%",
                        against(ratio.median_low, ratio.median_high,
                                RATIO_TARGETS["connections"])))
    if r.rounds.without.get("tls"):
        ratio = _ratios(r.rounds, "tls")
        out.append(Headline("HTTPS request loop slowdown",
                            f"{(1 - ratio.median) * 100:.1f}% (95% CI "
                            f"{(1 - ratio.median_high) * 100:.1f} to "
                            f"{(1 - ratio.median_low) * 100:.1f}%)", "< 5%",
                            against(ratio.median_low, ratio.median_high, RATIO_TARGETS["tls"])))
    paced = [g for g in r.grpc if g.rate]
    if paced:
        worst = max(paced, key=lambda g: g.cores)
        exact = all(g.counted == g.calls for g in paced)
        out.append(Headline(
            f"exporter CPU at {TARGET_CALLS_PER_SECOND:,} gRPC calls/s",
            f"{worst.cores:.2f} cores, worst of {len(paced)} ({worst.us_per_call:.0f} us a "
            f"call); every call counted: {'yes' if exact else 'no'}",
            f"< {TARGET_CORES} core, exact", worst.cores < TARGET_CORES and exact))
    return out


def _kubernetes_section(r: Results) -> str:
    k = r.kubernetes
    if k is None:
        return ""
    table = markdown_table(["pods", "services", "nodes", "launch to cached (s)", "RSS MiB",
                            "PSS MiB", "peak RSS MiB"],
                           [[f"{k.pods:,}", f"{k.services:,}", f"{k.nodes:,}",
                             f"{k.sync_seconds:.1f}", f"{k.memory.rss_mib:.0f}",
                             f"{k.memory.pss_mib:.0f}", f"{k.memory.peak_rss_mib:.0f}"]])
    return f"""
## 8. Memory with Kubernetes labels on

The exporter with a kubeconfig for a test API server (lab/kubeapi.py) holding
{k.pods:,} pods of {k.pods // kubernetes_memory.PODS_PER_REPLICASET:,} ReplicaSets on
{k.nodes} nodes in two zones, and {k.services:,} Services: it lists and watches them all, as
every node's exporter does. RSS once its cache holds every object and
{kubernetes_memory.SCRAPES} scrapes have run. The kubernetes client and the cache are what it
adds to the figures of part 4; no target.

{table}
"""


def _grpc_section(r: Results) -> str:
    if not r.grpc:
        return ""
    rows = [[f"{g.rate:,}/s" if g.rate else "unpaced", f"{g.calls:,}",
             f"{g.calls_per_second:,.0f}", f"{g.counted:,.0f}", f"{g.other_statuses:,.0f}",
             f"{g.records_lost:,.0f}", f"{g.cpu_seconds:.2f}", f"{g.cores:.2f}",
             f"{g.us_per_call:.1f}"] for g in r.grpc]
    table = markdown_table(["h2load", "calls", "calls/s", "counted OK", "other", "records lost",
                            "exporter CPU s", "cores", "us a call"], rows)
    return f"""
## 7. HTTP/2 and gRPC in user space

h2load (nghttp2, C) sends unary calls with `content-type: application/grpc` on
{grpc_load.CONNECTIONS} connections of up to {grpc_load.STREAMS} streams each from pod a to an
nginx on pod b that answers each as a gRPC server does
(response HEADERS, DATA, trailers with `grpc-status: 0`, and a RST_STREAM NO_ERROR): three
or four records per call to the exporter's user space, which decodes their headers. The
exporter's CPU time over the load (its threads only: the kernel walks the frames in the
senders' context) and what it counted. Target: {TARGET_CALLS_PER_SECOND:,} calls a second
within {TARGET_CORES} of a core, every call counted. The unpaced run shows where user space
stops keeping up on this machine (h2load, nginx and the exporter share its cores).

{table}
"""


def _kernel_section(r: Results) -> str:
    parts = []
    for index in range(len(r.kernel[0])):
        costs = [repetition[index] for repetition in r.kernel]
        cost = _median_repetition(costs)
        rows = [[p.name, f"{p.runs:,}", f"{p.ns_per_run:.0f}" if p.runs else "-",
                 f"{p.ns_per_run - cost.floor_ns_per_run:+.0f}"
                 if p.runs and p.name in TC_PROGRAMS else "-"]
                for p in cost.programs]
        rows.append(["floor (benchmarks/floor.c)", f"{cost.floor_runs:,}",
                     f"{cost.floor_ns_per_run:.0f}", "0"])
        table = markdown_table(("program", "runs", "ns per run", "over the floor"), rows)
        all_runs = ", ".join(f"{c.over_floor_per_packet:+.0f}" for c in costs)
        parts.append(
            f"**{cost.workload}**, the median of {len(costs)} repetitions ({cost.packets:,.0f} "
            f"packets through the node, each run once at ingress and once at egress):\n\n"
            f"{table}\n\n"
            f"Per packet (both hooks): classifier {cost.tc_ns_per_packet:.0f} ns, floor "
            f"{cost.floor_ns_per_packet:.0f} ns, **over the floor "
            f"{cost.over_floor_per_packet:+.0f} ns** (every repetition: {all_runs} ns); per run "
            f"{cost.over_floor_per_run:+.0f} ns. At the {cost.packets / cost.seconds / 1e3:,.0f}"
            f"k packets/s of this run, all our programs (tracepoints included) added "
            f"**{cost.core_share * 100:.1f}% of one core** over the floor's cost.")
    per_connection = sorted(r.per_connection, key=lambda c: c.ns_per_connection)
    c = per_connection[len(per_connection) // 2]
    rows = [[p.name, f"{p.runs:,}", f"{p.ns_per_run:.0f}", f"{p.runs / c.connections:.2f}"]
            for p in c.programs if p.runs]
    all_runs = ", ".join(f"{x.ns_per_connection:.0f}" for x in r.per_connection)
    parts.append(
        f"**TCP connections on loopback**, the median of {len(per_connection)} repetitions "
        f"({c.connections:,} connect, 1 byte, close; no TC program runs on loopback, the few "
        f"classifier runs are other traffic of the node):\n\n"
        f"{markdown_table(('program', 'runs', 'ns per run', 'runs per connection'), rows)}\n\n"
        f"Tracepoint programs per connection (both ends): **{c.ns_per_connection:.0f} ns** "
        f"(every repetition: {all_runs} ns): {c.core_share * 100:.1f}% of one core at "
        f"{c.connections / c.seconds:,.0f} connections/s.")
    return "\n\n".join(parts)


def _ci(summary: Summary, sign: str = "") -> str:
    return (f"{summary.median:{sign}.0f} (95% CI {summary.median_low:{sign}.0f} to "
            f"{summary.median_high:{sign}.0f})")


def _ingress_row(stream: str, hooks: str, costs: list[WorkloadCost],
                 left: list[float] | None) -> list[str]:
    """A stream's classify_ingress per run, over the floor, and what the rule left to other
    nodes per ingress run (TCP: GSO segments per skb; None: no rule)."""
    runs = summarize([c.program("classify_ingress").runs for c in costs])
    per_run = summarize([c.program("classify_ingress").ns_per_run for c in costs])
    over = summarize([c.ingress_over_floor_per_run for c in costs])
    if left is None:
        share = "-"
    else:
        shares = [x / c.program("classify_ingress").runs if c.program("classify_ingress").runs
                  else 0.0 for x, c in zip(left, costs, strict=True)]
        share = f"{summarize(shares).median:.2f}"
    return [stream, hooks, f"{runs.median:,.0f}", _ci(per_run), _ci(over, "+"), share]


def _rule_section(r: Results) -> str:
    if not r.rule:
        return ""
    verdicts = []
    for index, unit in enumerate(("per 64-byte UDP packet", "per TCP skb")):
        off = summarize([repetition[index].over_floor_per_packet for repetition in r.kernel])
        on = summarize([rule.pod_facing[index].over_floor_per_packet for rule in r.rule])
        ratio = rule_ratios(r, index)
        target = f"<= {RULE_TARGET:.2f}"
        verdicts.append([f"classifier over the floor, {unit}", _ci(off, "+"), _ci(on, "+"),
                         _ratio_text(ratio), target,
                         verdict(Headline(unit, "", target, _rule_met(ratio)))])
    verdict_table = markdown_table(("both hooks, ns per packet", "rule off (part 1)",
                                    "rule on, pod-facing", "paired ratio on/off", "target", ""),
                                   verdicts)
    no_left = [0.0] * len(r.rule)
    tcp_hooks = "va (data), vb (ACKs)"
    ingress = [
        _ingress_row("UDP a -> b, rule off (part 1)", "va, pod-facing",
                     [repetition[0] for repetition in r.kernel], None),
        _ingress_row("UDP a -> b, rule on", "va, pod-facing",
                     [rule.pod_facing[0] for rule in r.rule], no_left),
        _ingress_row("UDP b -> a, rule on", "vb, pod-facing",
                     [rule.udp_b_to_a for rule in r.rule], no_left),
        _ingress_row("UDP b -> a, rule on", "vb, an uplink",
                     [rule.uplink[0] for rule in r.rule], [rule.left[0] for rule in r.rule]),
        _ingress_row("TCP a -> b, rule off (part 1)", f"{tcp_hooks}, pod-facing",
                     [repetition[1] for repetition in r.kernel], None),
        _ingress_row("TCP a -> b, rule on", f"{tcp_hooks}, pod-facing",
                     [rule.pod_facing[1] for rule in r.rule], no_left),
        _ingress_row("TCP a -> b, rule on", f"{tcp_hooks}, both uplinks",
                     [rule.uplink[1] for rule in r.rule], [rule.left[1] for rule in r.rule]),
    ]
    ingress_table = markdown_table(("stream", "ingress hook", "classify_ingress runs",
                                    "ns per run", "over the floor per run",
                                    "left to another node per ingress run"), ingress)
    extra = [summarize([uplink_extra(rule)[i] for rule in r.rule]) for i in range(2)]
    return f"""

### With the counting rule on (`cluster.cidrs`)

The same {len(r.rule)} repetitions also ran through a second test node built like the first,
whose exporter counts once per cluster (bpf/cluster.h): `cluster.cidrs` is that node's whole
/16, and its tcp collector is off (tracepoints see every socket of the host, and part 1's
exporter already runs them on both nodes' TCP), which leaves its classifier part 1's plus the
rule. An exporter refuses a second one in its namespace and compiles the rule in at start-up,
so the two exporters ran on the two nodes throughout, each with its floor, and each workload
went through one node and then the other, which one first alternating by repetition: a
repetition's two figures are seconds apart and share the machine's noise, which moves single
repetitions by tens of percent. With no route through a gateway both veths are pod-facing
(`ebpf_net_exporter_network_interfaces` 0) and the rule's work is one flag test per packet.
The target, within 10% of the rule off, is judged on the ratio on / off of each repetition's
figures over the floor: met when the 95% confidence interval of the ratios' median lies at or
below {RULE_TARGET:.2f}, missed when it lies above, not resolved when it straddles it.

{verdict_table}

Then UDP ran from pod b to pod a, first with vb pod-facing, then with a route through a
gateway on vb (`10.N.200.0/24 via` pod b) that made vb an uplink and pod b a node with an
exporter: its datagrams arrive on vb's ingress from an address of `cluster.cidrs` that is not
the node's own, and are left to that node after the trie lookup. The kernel accounts per
program, not per interface, and every ingress run of this stream is on vb. TCP sends ACKs back
the other way, so for TCP a second route (via pod a) made va an uplink as well, and TCP
a -> b ran on uplinks only (its pod-facing twin is the paired run above). Around every run the
exporter's `/metrics` were checked: 0, 1 and 2 interfaces facing the network, and
`ebpf_net_exporter_counted_elsewhere_total{{signal="flow_packets"}}` unchanged by the
pod-facing runs, grown by at least the datagrams pod a received (and at most the ingress
runs) for UDP, by at least 99% of the ingress runs for TCP (it counts GSO segments); a run
that was not as meant stops the benchmark. Medians of the {len(r.rule)} repetitions; over the
floor is classify_ingress's ns per run less its node's floor's, on the same packets. TCP's
runs mix data skbs and ACKs, whose shares move from run to run (the runs column):

{ingress_table}

An uplink's ingress run cost **{_ci(extra[0], "+")} ns** more than the same stream's
pod-facing one for UDP b -> a, **{_ci(extra[1], "+")} ns** for TCP (the medians of the
per-repetition differences)."""


def _pair_counts(r: Results) -> str:
    counts = [f"{len(r.rounds.without[name])} ({name})" for name in STREAMS]
    return ", ".join(counts[:-1]) + " and " + counts[-1]


def _interleaved_section(r: Results) -> str:
    rows = []
    for name, stream in STREAMS.items():
        unit = stream.unit
        without = summarize(r.rounds.without[name])
        attached = summarize(r.rounds.attached[name])
        ratios = summarize(paired_ratios(r.rounds.without[name], r.rounds.attached[name]))
        rows.append([unit, spread_text(without), spread_text(attached),
                     f"{ratios.median:.3f} (95% CI {ratios.median_low:.3f}-"
                     f"{ratios.median_high:.3f}; IQR {ratios.p25:.3f}-{ratios.p75:.3f})",
                     f"{attached.median / without.median:.3f}"])
    table = markdown_table(("workload", "without exporter", "with exporter",
                            "paired ratio with/without", "ratio of medians"), rows)
    without = summarize(r.rounds.without["connections"])
    attached = summarize(r.rounds.attached["connections"])
    added_us = (1 / attached.median - 1 / without.median) * 1e6
    text = f"{table}\n\nAdded per TCP connection (from the medians): {added_us:.1f} us."
    if r.rounds.without.get("tls"):
        without = summarize(r.rounds.without["tls"])
        attached = summarize(r.rounds.attached["tls"])
        added_us = (1 / attached.median - 1 / without.median) * 1e6
        text += (f" Added per HTTPS request (a SSL_write and its SSL_reads, from the medians): "
                 f"{added_us:.1f} us.")
    return text


def _startup_section(r: Results) -> str:
    start = summarize(r.rounds.startup_seconds)
    rss = summarize([m.rss_mib for m in r.rounds.startup_memory])
    pss = summarize([m.pss_mib for m in r.rounds.startup_memory])
    rows = [
        ["launch to /readyz 200 (s)", spread_text(start), f"{start.low:.2f}", f"{start.high:.2f}"],
        ["RSS when ready (MiB)", spread_text(rss), f"{rss.low:.0f}", f"{rss.high:.0f}"],
        ["PSS when ready (MiB)", spread_text(pss), f"{pss.low:.0f}", f"{pss.high:.0f}"]]
    if r.rounds.startup_peak_mib:
        peak = summarize(r.rounds.startup_peak_mib)
        rows.append(["start-up peak RSS, exporter + compiler (MiB)", spread_text(peak),
                     f"{peak.low:.0f}", f"{peak.high:.0f}"])
    return markdown_table(("", "median (IQR, n)", "min", "max"), rows)


def _scrape_section(r: Results) -> str:
    rows = []
    for s in r.scrapes:
        assert s.memory is not None
        rows.append([f"{s.flows:,}", f"{s.sources:,}", str(len(s.latencies)),
                     f"{percentile(s.latencies, 50) * 1000:.0f}",
                     f"{percentile(s.latencies, 99) * 1000:.0f}",
                     f"{percentile(s.cpu_seconds, 50):.3f}", f"{s.flow_series:,}",
                     f"{s.series:,}", f"{s.memory.rss_mib:.0f}", f"{s.memory.pss_mib:.0f}",
                     f"{s.memory.peak_rss_mib:.0f}", str(s.missing_packets)])
    return markdown_table(("flows", "sources", "scrapes", "p50 ms", "p99 ms", "CPU s/scrape",
                           "flow series", "all series", "RSS MiB", "PSS MiB", "peak RSS MiB",
                           "packets missing"), rows)


POOLED_HEADER = ("stream", "pooled ratio", "target", "", "runs (pairs)")


def _pooled_section(r: Results) -> str:
    if r.pooled is None:
        return ""
    datapath, rows = r.pooled
    return f"""
Part 2 and 5's verdicts over every saved run of this datapath (`{datapath}`), this one
included (`benchmarks/pairs/`, `make bench-pool`; the method says why they pool):

{markdown_table(POOLED_HEADER, rows)}
"""


def markdown(r: Results) -> str:
    m = r.machine
    written = "`make bench` (`python -m benchmarks`)"
    if r.quick:
        written += " (quick mode: few rounds, small flow counts)"
    if r.long:
        written = ("`make bench-long` (`python -m benchmarks --long`: `make bench` with the "
                   "pairs of part 2 and 5 that their verdicts need at this machine's noise)")
    load = ", ".join(f"{x:.2f}" for x in r.load_before)
    load_after = ", ".join(f"{x:.2f}" for x in r.load_after)
    notes = NOTES.read_text() if NOTES.exists() else ""
    if SOAK.exists():
        notes = f"{notes.rstrip()}\n\n{SOAK.read_text()}"
    return f"""# Benchmarks

Written by {written}; {r.wall_seconds / 60:.1f} minutes.
The method, and what was tried where a target was missed, follow the results.

**Machine**: Linux {m.kernel}, {m.cpu}, {m.cores} cores, {m.memory_gib} GiB; {m.date}.
Load average (1, 5, 15 min) before: {load}; after: {load_after}. The machine is shared with
other agents running test suites, so every figure carries their noise: read the spreads.

## Headline

{markdown_table(HEADLINE_HEADER, headline_rows(headlines(r)))}
{_pooled_section(r)}
## 1. Per-packet kernel cost

Every collector on (flows, tcp, dns, http). ns per run as the kernel accounts it
(run_time_ns / run_cnt over the workload), the floor measured on the same packets. The
verdict on the figure over the floor is the 95% confidence interval of its median over the
repetitions (as for part 2's ratios), so one repetition caught in a noisy spell does not
decide it.

{_kernel_section(r)}{_rule_section(r)}

## 2, 5 and 6. Throughput, connection rate and HTTPS requests, with and without the exporter

{_pair_counts(r)} pairs of {r.window_seconds:g}-second windows, on one stream of each workload
and one running exporter, its programs switched off (A, without) and on (B, with) between the
windows of a pair (A B, then B A). Median (IQR p25-p75, n). The verdict on a ratio is the 95%
confidence interval of the median of the per-pair ratios (order statistics, no assumption
about the noise's shape): an interval that straddles its target is "not resolved", the run
cannot tell at this machine's noise. Part 1's share of a core is the steadier figure. Part 6's
stream is HTTPS requests on one keep-alive connection to nginx on pod a's loopback, by a C
client on the host's libssl (benchmarks/tls_loop.c): "with" adds the HTTPS program's uprobe
and uretprobe on every SSL_write and SSL_read and its socket tracepoints.

{_interleaved_section(r)}

## 3. Scrape cost

One packet of each of N distinct UDP flows (from N / {r.ports_per_source} source addresses,
{r.ports_per_source} ephemeral source ports each) sprayed through the node before each scrape;
the scrape drains them from the kernel map, folds them and serves every series. With few
scrapes, p99 is close to the slowest one.

{_scrape_section(r)}

## 4. Start-up

{_startup_section(r)}
{_grpc_section(r)}{_kubernetes_section(r)}
{notes}"""
