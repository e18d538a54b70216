"""Part 1: the kernel's own accounting of our programs (run_time_ns / run_cnt) under small-packet
UDP, TCP bulk and a TCP connection loop, with the do-nothing floor on the same packets; and,
given a second test node, the same classifier with the counting rule on (cluster_rule.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab.exporter_process import REPO, ExporterProcess
from lab.testnode import TestNode

from . import cluster_rule, connections, kernel_cost, startup, throughput

# part 1's workloads through a node, in the order they run
WORKLOADS: tuple[tuple[str, Callable[[TestNode, float], object]], ...] = (
    ("udp, 64-byte frames", throughput.udp_kpps),
    ("tcp bulk", throughput.tcp_gbits),
)


@dataclass
class Part1:
    kernel: list[list[kernel_cost.WorkloadCost]]        # per repetition: [udp, tcp]
    per_connection: list[kernel_cost.ConnectionCost]    # per repetition
    rule: list[cluster_rule.RuleCosts] = field(default_factory=list)   # empty: not measured


@dataclass(frozen=True)
class _Side:
    """A node whose exporter part 1 measures, with its floor."""
    node: TestNode
    exporter: ExporterProcess
    floor: kernel_cost.Floor


def _started(stack: contextlib.ExitStack, node: TestNode, source: Path,
             config: dict[str, Any] | None = None) -> ExporterProcess:
    exporter = startup.start(node, config=config, source=source).exporter
    stack.callback(exporter.stop)
    return exporter


def _floor(stack: contextlib.ExitStack, node: TestNode) -> kernel_cost.Floor:
    floor = kernel_cost.Floor(node, [node.veth_a, node.veth_b])
    stack.callback(floor.close)
    floor.attach()
    stack.callback(floor.detach)
    return floor


def _measure(side: _Side, name: str, workload: Callable[[TestNode, float], object],
             seconds: float) -> kernel_cost.WorkloadCost:
    return kernel_cost.measure(name, side.exporter.proc.pid, side.floor,
                               lambda: workload(side.node, seconds))


def run(node: TestNode, seconds: float, repetitions: int, source: Path = REPO,
        say: Callable[[str], None] = print, settle: float = startup.SETTLE_SECONDS,
        rule_node: TestNode | None = None) -> Part1:
    """Per repetition: [udp, tcp] workload costs and the connection loop's cost, measured on one
    exporter of the `source` tree. The node needs its iperf3 server and connections.prepare().
    With `rule_node` (cluster_rule.prepare()), the exporter with the counting rule on runs
    there throughout: each workload runs through both nodes in turn (which goes first
    alternates by repetition), then the rule's uplinks are measured."""
    result = Part1([], [])
    with contextlib.ExitStack() as stack:
        exporter = _started(stack, node, source)
        rule_exporter = (_started(stack, rule_node, source, cluster_rule.config(rule_node))
                         if rule_node else None)
        time.sleep(settle)
        off = _Side(node, exporter, _floor(stack, node))
        on = (_Side(rule_node, rule_exporter, _floor(stack, rule_node))
              if rule_node and rule_exporter else None)
        rule = cluster_rule.RuleSide(on.node, on.exporter, on.floor) if on else None
        stack.enter_context(kernel_cost.run_time_statistics())
        for repetition in range(repetitions):
            before = rule.with_facing(0) if rule else None
            sides = [off] if on is None else [off, on]
            if repetition % 2:
                sides.reverse()     # neither configuration always runs first
            costs: list[list[kernel_cost.WorkloadCost]] = [[] for _ in sides]
            for name, workload in WORKLOADS:
                for index, side in enumerate(sides):
                    costs[index].append(_measure(side, name, workload, seconds))
            result.kernel.append(costs[sides.index(off)])
            result.per_connection.append(kernel_cost.measure_connections(
                exporter.proc.pid, lambda: connections.loop(node, seconds)))
            udp, tcp = result.kernel[-1]
            say(f"  over the floor: udp {udp.over_floor_per_packet:+.0f} ns per packet, tcp "
                f"{tcp.over_floor_per_packet:+.0f} ns per skb; tracepoints "
                f"{result.per_connection[-1].ns_per_connection:.0f} ns per TCP connection")
            if on is not None and rule is not None and before is not None:
                back = rule.measure_udp_b_to_a(seconds)
                rule.check_pod_facing(before)
                uplink, left = rule.measure_uplinks(seconds)
                result.rule.append(cluster_rule.RuleCosts(costs[sides.index(on)], back, uplink,
                                                          left))
                say(f"  {cluster_rule.progress(result.rule[-1], udp, tcp)}")
    return result
