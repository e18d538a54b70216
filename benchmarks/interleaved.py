"""Parts 2, 4 and 5. Part 4 starts the exporter afresh a few times (launch to ready, memory).
Parts 2 and 5 then run on one exporter whose programs are switched off (A) and on (B) between
runs (benchmarks/switchable.py): each pair runs every workload once each way, A B in odd pairs
and B A in even ones, so neither side always runs second, and the two runs of a workload are a
second apart.

Before the switch, every round started an exporter of its own for B. A start-up's 3.5
CPU-seconds of compiling left the host running this VM some 8% slower for seconds after (TCP
bulk at 0.92 of A right after /readyz, 1.03 five seconds later, the machine inside idle), and
each round's start-up, settling and stop took 7 s: 20 rounds of 2 s runs fitted in the budget,
and their ratios spread so far (0.91-1.05 for TCP) that no verdict could be reached. Switching
takes milliseconds and compiles nothing."""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tests.testnode import TestNode

from . import connections, startup, throughput
from .procstat import Memory
from .switchable import Switch

WORKLOADS: dict[str, Callable[[TestNode, float], float]] = {
    "tcp": throughput.tcp_gbits,
    "udp": throughput.udp_kpps,
    "connections": connections.connections_per_second,
}
SWITCHABLE = Path(__file__).with_name("switchable.py")


@dataclass
class Rounds:
    without: dict[str, list[float]] = field(
        default_factory=lambda: {name: [] for name in WORKLOADS})
    attached: dict[str, list[float]] = field(
        default_factory=lambda: {name: [] for name in WORKLOADS})
    startup_seconds: list[float] = field(default_factory=list)
    startup_memory: list[Memory] = field(default_factory=list)

    @property
    def pairs(self) -> int:
        return len(self.without["tcp"])


def measure_startups(node: TestNode, starts: int, into: Rounds) -> None:
    for _ in range(starts):
        started = startup.start(node)
        started.exporter.stop()
        into.startup_seconds.append(started.seconds)
        into.startup_memory.append(started.memory)


def measure_pairs(node: TestNode, switch: Switch, pairs: int, seconds: float, into: Rounds,
                  progress: Callable[[str], None]) -> None:
    for number in range(1, pairs + 1):
        order = (False, True) if number % 2 else (True, False)
        for name, workload in WORKLOADS.items():
            for on in order:
                switch.set(on)
                (into.attached if on else into.without)[name].append(workload(node, seconds))
        progress(f"  pair {number}/{pairs}: " + ", ".join(
            f"{name} {into.without[name][-1]:.4g} -> {into.attached[name][-1]:.4g}"
            for name in WORKLOADS))


def run(node: TestNode, pairs: int, seconds: float, starts: int,
        progress: Callable[[str], None] = print, settle: float = startup.SETTLE_SECONDS) -> Rounds:
    """The caller has started an iperf3 server on pod b."""
    connections.prepare(node)
    result = Rounds()
    measure_startups(node, starts, result)
    progress(f"  {starts} start-ups: ready in " + ", ".join(
        f"{s:.2f}" for s in result.startup_seconds) + " s")
    with tempfile.TemporaryDirectory(prefix="switch-") as directory:
        path = Path(directory) / "socket"
        started = startup.start(node, prefix=[sys.executable, str(SWITCHABLE), str(path)])
        try:
            time.sleep(settle)
            switch = Switch(path)
            try:
                measure_pairs(node, switch, pairs, seconds, result, progress)
            finally:
                switch.close()
        finally:
            started.exporter.stop()
    return result
