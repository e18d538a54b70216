"""Parts 2, 4 and 5 in one interleaved run: each round measures the workloads without the
exporter (A) and with it attached (B: started, measured, stopped), in the order A B in odd
rounds and B A in even ones, so that neither side always runs second (after a start-up, or
later in a drift of the machine's load). Every start is a part 4 sample.

B is measured startup.SETTLE_SECONDS after the exporter is ready: measured right after its start-up
(3.5 CPU-seconds of compiling), TCP bulk ran at 0.92 of A in 10 rounds (9 below 1) on these VMs,
5 s later at 1.03, while the machine inside sat idle in between (0-1% busy, the exporter 0.00
CPU-seconds per 0.5 s): the host's doing after the burst, not the exporter's cost once running."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.testnode import TestNode

from . import connections, startup, throughput
from .procstat import Memory

WORKLOADS: dict[str, Callable[[TestNode, float], float]] = {
    "tcp": throughput.tcp_gbits,
    "udp": throughput.udp_kpps,
    "connections": connections.connections_per_second,
}


@dataclass
class Rounds:
    without: dict[str, list[float]] = field(
        default_factory=lambda: {name: [] for name in WORKLOADS})
    attached: dict[str, list[float]] = field(
        default_factory=lambda: {name: [] for name in WORKLOADS})
    startup_seconds: list[float] = field(default_factory=list)
    startup_memory: list[Memory] = field(default_factory=list)


def _measure_all(node: TestNode, seconds: float, into: dict[str, list[float]]) -> None:
    for name, workload in WORKLOADS.items():
        into[name].append(workload(node, seconds))


def run(node: TestNode, rounds: int, seconds: float,
        progress: Callable[[str], None] = print, settle: float = startup.SETTLE_SECONDS) -> Rounds:
    """The caller has started an iperf3 server on pod b."""
    connections.prepare(node)
    result = Rounds()
    for number in range(1, rounds + 1):
        if number % 2:
            _measure_all(node, seconds, result.without)
        started = startup.start(node)
        try:
            result.startup_seconds.append(started.seconds)
            result.startup_memory.append(started.memory)
            time.sleep(settle)
            _measure_all(node, seconds, result.attached)
        finally:
            started.exporter.stop()
        if not number % 2:
            _measure_all(node, seconds, result.without)
        progress(f"  round {number}/{rounds}: " + ", ".join(
            f"{name} {result.without[name][-1]:.4g} -> {result.attached[name][-1]:.4g}"
            for name in WORKLOADS) + f", ready in {started.seconds:.2f} s")
    return result
