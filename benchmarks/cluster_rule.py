"""Part 1's counting rule (`cluster.cidrs`, -DONCE_PER_CLUSTER, bpf/cluster.h): the classifier
with the rule on, on a second test node beside part 1's.

- Pod-facing: with no route through a gateway, both veths are pod-facing and the rule's only
  work per packet is one flag test. Part 1's UDP and TCP runs go through both nodes, one after
  the other, so each repetition gives a pair (rule off, rule on) seconds apart.
- Uplink: a route through a gateway on vb makes vb face the network (exporter/kernel/netroles.py),
  and pod b plays another node with an exporter: UDP from b to a arrives on vb's ingress from
  an address in `cluster.cidrs` that is not the node's own, and is left to b's node after the
  trie lookup. TCP always sends ACKs back on the other veth, so for TCP a second route makes va
  face the network too: every ingress run of TCP a -> b is then on an uplink.

Why a second node: the exporter refuses a second one in its network namespace
(exporter/kernel/singleton.py) and compiles the rule in at start-up (a SIGHUP reloads no
program), so on one node the rule-off and rule-on figures would come from exporters started
one after the other, a minute or more apart, and this machine's noise drifts over minutes. On
two nodes built alike both exporters run throughout.

The rule's exporter runs without the tcp collector: its tracepoints see every TCP socket of the
host, so part 1's runs on either node would pay both exporters' tracepoints. The classifier does
not depend on that collector (exporter/kernel/classifier.py's cflags; tests/unit/test_benchmarks.py
checks it), so it is part 1's plus the rule. Whether the rule did what the runs assume is read
off the exporter's /metrics around each run, and a run that it did not fails the benchmark."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from lab.exporter_process import ExporterProcess, Scrape
from lab.testnode import TestNode

from . import kernel_cost, throughput

# the rule on, pod-facing: its figure over the floor at most this times the rule off's
RULE_TARGET = 1.10
FACING = "ebpf_net_exporter_network_interfaces"
LEFT = "ebpf_net_exporter_counted_elsewhere_total"
FACING_TIMEOUT = 10.0       # a route event reaches the exporter's interface monitor at once
# the iperf3 control connection's last packets may pass vb after the accounting is read
CONTROL_PACKETS = 16
# TCP: every IPv4 skb on an uplink's ingress is left; ARP and neighbour discovery are not
TCP_LEFT_SHARE = 0.99


class RuleNotApplied(RuntimeError):
    """The exporter's /metrics say the rule did not do what a measurement assumed."""


def config(node: TestNode) -> dict[str, Any]:
    """The rule on: the node's whole /16 sends through exporters, but for the node's own
    networks (its addresses, and its pod-facing veths' subnets); no tracepoints (above)."""
    return {"cluster": {"cidrs": [f"10.{node.n}.0.0/16"]}, "collectors": {"tcp": False}}


def prepare(node: TestNode) -> None:
    """iperf3 servers on pod b (the streams a -> b) and on pod a (UDP b -> a)."""
    node.iperf3_server(node.b_ns, node.b_ip)
    node.iperf3_server(node.a_ns, node.a_ip)


@dataclass(frozen=True)
class Uplink:
    device: str
    destination: str        # a network behind the gateway, nowhere else on the node
    gateway: str


def uplinks(node: TestNode) -> tuple[Uplink, Uplink]:
    """vb's route (UDP b -> a), then va's (TCP, with vb's)."""
    return (Uplink(node.veth_b, f"10.{node.n}.200.0/24", node.b_ip),
            Uplink(node.veth_a, f"10.{node.n}.201.0/24", node.a_ip))


@contextlib.contextmanager
def facing_network(node: TestNode, uplink: Uplink) -> Iterator[None]:
    """A route through a gateway on the uplink's device, removed on leaving: the exporter then
    reads the device as facing the network, and its connected subnet as not the node's own."""
    route = [uplink.destination, "via", uplink.gateway, "dev", uplink.device]
    node.run(node.node_ns, ["ip", "route", "add", *route])
    try:
        yield
    finally:
        node.run(node.node_ns, ["ip", "route", "del", *route], check=False)


@dataclass(frozen=True)
class RuleState:
    """What the exporter's /metrics say of the rule."""
    facing: int | None      # network-facing interfaces; None: not served (the rule is off)
    left: float             # packets left to the node that counts them (flow_packets)


def state_of(scrape: Scrape) -> RuleState:
    served = scrape.select(FACING)
    return RuleState(int(served[0].value) if served else None,
                     scrape.value(LEFT, signal="flow_packets"))


def rule_problem(stream: str, before: RuleState, after: RuleState, facing: int,
                 least: float, most: float) -> str | None:
    """Why the runs between two scrapes did not measure what they were meant to (None: they
    did): `facing` interfaces facing the network throughout, and between `least` and `most`
    packets left to other nodes."""
    for state in (before, after):
        if state.facing is None:
            return (f"{stream}: the exporter serves no {FACING}: it is not counting once per "
                    f"cluster")
        if state.facing != facing:
            return (f"{stream}: the exporter had {state.facing} interfaces facing the network, "
                    f"not {facing}")
    grew = after.left - before.left
    if not least <= grew <= most:
        wanted = f"{least:,.0f}" if least == most else (
            f"at least {least:,.0f}" if math.isinf(most) else f"{least:,.0f} to {most:,.0f}")
        return (f"{stream}: {LEFT}{{signal=\"flow_packets\"}} grew by {grew:,.0f}, not "
                f"{wanted}")
    return None


def require(problem: str | None) -> None:
    if problem is not None:
        raise RuleNotApplied(problem)


@dataclass(frozen=True)
class RuleCosts:
    """One repetition with the rule on."""
    pod_facing: list[kernel_cost.WorkloadCost]  # [udp, tcp] a -> b, both veths pod-facing
    udp_b_to_a: kernel_cost.WorkloadCost        # the uplink's UDP stream, vb pod-facing
    uplink: list[kernel_cost.WorkloadCost]      # [udp b -> a: vb an uplink; tcp: both]
    left: list[float]                           # packets each uplink run left to other nodes


UDP_B_TO_A = "udp b -> a, pod-facing"
UDP_UPLINK = "udp b -> a, vb an uplink"
TCP_UPLINK = "tcp a -> b, va and vb uplinks"


def wait_facing(exporter: ExporterProcess, count: int) -> RuleState:
    """The rule's state once the exporter reads `count` interfaces as facing the network (a
    route change reaches it at once); RuleNotApplied when it does not count once per
    cluster."""
    def reached(scrape: Scrape) -> bool:
        state = state_of(scrape)
        if state.facing is None:
            raise RuleNotApplied(f"the exporter serves no {FACING}: it is not counting once "
                                 f"per cluster")
        return state.facing == count
    return state_of(exporter.wait_for(reached, f"{count} interfaces facing the network",
                                      timeout=FACING_TIMEOUT))


class RuleSide:
    """The exporter with the rule on, on its own test node, with that node's floor."""

    def __init__(self, node: TestNode, exporter: ExporterProcess, floor: kernel_cost.Floor
                 ) -> None:
        self.node = node
        self.exporter = exporter
        self.floor = floor

    def state(self) -> RuleState:
        return state_of(self.exporter.scrape())

    def with_facing(self, count: int) -> RuleState:
        return wait_facing(self.exporter, count)

    def measure_udp_b_to_a(self, seconds: float) -> kernel_cost.WorkloadCost:
        """The uplink's UDP stream with vb pod-facing: what its ingress costs without the
        rule's work, on the same hook, for the uplink's figure to stand beside."""
        node = self.node
        return kernel_cost.measure(UDP_B_TO_A, self.exporter.proc.pid, self.floor,
                                   lambda: throughput.udp_datagrams(node, seconds, node.b_ns,
                                                                    node.a_ip))

    def check_pod_facing(self, before: RuleState) -> None:
        """Nothing was left to another node by the pod-facing runs since `before`."""
        require(rule_problem("pod-facing runs", before, self.state(), 0, 0, 0))

    def measure_uplinks(self, seconds: float) -> tuple[list[kernel_cost.WorkloadCost],
                                                      list[float]]:
        """UDP b -> a with vb an uplink, then TCP a -> b with both veths uplinks; each checked
        against the exporter's count of what it left to other nodes."""
        node, pid = self.node, self.exporter.proc.pid
        via_b, via_a = uplinks(node)
        received: list[int] = []
        with facing_network(node, via_b):
            before = self.with_facing(1)
            udp = kernel_cost.measure(UDP_UPLINK, pid, self.floor, lambda: received.append(
                throughput.udp_datagrams(node, seconds, node.b_ns, node.a_ip)))
            after = self.state()
            # every datagram pod a received was left on vb's ingress; nothing but pod b's
            # packets on vb's ingress can be
            runs = udp.program("classify_ingress").runs
            require(rule_problem(UDP_UPLINK, before, after, 1, received[0],
                                 runs + CONTROL_PACKETS))
            udp_left = after.left - before.left
            with facing_network(node, via_a):
                before = self.with_facing(2)
                tcp = kernel_cost.measure(TCP_UPLINK, pid, self.floor,
                                          lambda: throughput.tcp_gbits(node, seconds))
                after = self.state()
                runs = tcp.program("classify_ingress").runs
                require(rule_problem(TCP_UPLINK, before, after, 2, runs * TCP_LEFT_SHARE,
                                     math.inf))
                tcp_left = after.left - before.left
        return [udp, tcp], [udp_left, tcp_left]


def ratio(off: kernel_cost.WorkloadCost, on: kernel_cost.WorkloadCost) -> float:
    """The rule on's figure over the floor per packet, as a multiple of the rule off's."""
    baseline = off.over_floor_per_packet
    return on.over_floor_per_packet / baseline if baseline > 0 else math.nan


def progress(costs: RuleCosts, udp_off: kernel_cost.WorkloadCost,
             tcp_off: kernel_cost.WorkloadCost) -> str:
    """One repetition's line: the rule on beside part 1's figures (the rule off)."""
    udp, tcp = costs.pod_facing
    udp_uplink, tcp_uplink = costs.uplink
    return (f"rule on, pod-facing: udp {udp.over_floor_per_packet:+.0f} ns per packet "
            f"({ratio(udp_off, udp):.2f} of off), tcp {tcp.over_floor_per_packet:+.0f} ns per "
            f"skb ({ratio(tcp_off, tcp):.2f}); ingress over the floor per run, pod-facing / "
            f"uplink: udp b -> a {costs.udp_b_to_a.ingress_over_floor_per_run:+.0f} / "
            f"{udp_uplink.ingress_over_floor_per_run:+.0f}, tcp "
            f"{tcp.ingress_over_floor_per_run:+.0f} / "
            f"{tcp_uplink.ingress_over_floor_per_run:+.0f} ns")


def pod_facing_twins(costs: RuleCosts) -> list[kernel_cost.WorkloadCost]:
    """The uplinks' streams [udp b -> a, tcp a -> b] with every veth pod-facing."""
    return [costs.udp_b_to_a, costs.pod_facing[1]]


def uplink_extra(costs: RuleCosts) -> list[float]:
    """ns per ingress run an uplink costs over the same stream pod-facing: [udp, tcp]."""
    return [uplink.ingress_over_floor_per_run - twin.ingress_over_floor_per_run
            for uplink, twin in zip(costs.uplink, pod_facing_twins(costs), strict=True)]
