"""Parts 2, 4 and 5. Part 4 starts the exporter afresh a few times (launch to ready, memory).
Parts 2 and 5 then run on one exporter whose programs are switched off (A) and on (B) between
windows of a stream that runs throughout (benchmarks/switchable.py, benchmarks/streams.py):
each pair is one window each way, A B in odd pairs and B A in even ones, so neither side always
runs second.

Before the switch, every round started an exporter of its own for B. A start-up's 3.5
CPU-seconds of compiling left the host running this VM some 8% slower for seconds after (TCP
bulk at 0.92 of A right after /readyz, 1.03 five seconds later, the machine inside idle), and
each round's start-up, settling and stop took 7 s: 20 rounds of 2 s runs fitted in the budget,
and their ratios spread so far (0.91-1.05 for TCP) that no verdict could be reached. Switching
takes milliseconds and compiles nothing."""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lab.testnode import TestNode

from . import connections, startup, tls_requests
from .procstat import Memory
from .stats import paired_ratios, summarize
from .streams import STOP_MARGIN_SECONDS, STREAMS
from .switchable import Switch

# per switch, half of them off, measured on Linux 6.18: off 0.35 s (closing the tracepoints,
# side by side), on 0.06 s; the HTTPS stream's switch closes and makes uprobe_multi links too,
# which adds little (on kernels without them, 15 perf events: 1.6 s)
SWITCH_SECONDS = 0.25
UPROBE_SWITCH_SECONDS = 0.1
SWITCHABLE = Path(__file__).with_name("switchable.py")


@dataclass
class Rounds:
    without: dict[str, list[float]] = field(
        default_factory=lambda: {name: [] for name in STREAMS})
    attached: dict[str, list[float]] = field(
        default_factory=lambda: {name: [] for name in STREAMS})
    startup_seconds: list[float] = field(default_factory=list)
    startup_memory: list[Memory] = field(default_factory=list)
    startup_peak_mib: list[float] = field(default_factory=list)    # exporter + compiler
    attach: str = "unknown"         # how the switched exporter attached: tcx or clsact


def prepare_streams(node: TestNode) -> None:
    """What the streams other than iperf3's need on the node: the connection loop and the
    HTTPS loop built, nginx with TLS on pod a."""
    connections.prepare(node)
    tls_requests.prepare(node)


def measure_startups(node: TestNode, starts: int, into: Rounds) -> None:
    for _ in range(starts):
        started = startup.start(node)
        started.exporter.stop()
        into.startup_seconds.append(started.seconds)
        into.startup_memory.append(started.memory)
        into.startup_peak_mib.append(started.peak_mib)


def measure_pairs(node: TestNode, switch: Switch, pairs_of: Mapping[str, int], window: float,
                  into: Rounds, progress: Callable[[str], None]) -> None:
    """`pairs_of` each stream named (by name in STREAMS), in STREAMS' order."""
    for name, stream in STREAMS.items():
        if name not in pairs_of:
            continue
        pairs = pairs_of[name]
        switching = SWITCH_SECONDS + (UPROBE_SWITCH_SECONDS if stream.uprobes else 0.0)
        seconds = pairs * 2 * (window + switching) + STOP_MARGIN_SECONDS
        with stream.running(node, seconds) as rate:
            for number in range(1, pairs + 1):
                for on in ((False, True) if number % 2 else (True, False)):
                    switch.set(on, uprobes=stream.uprobes)
                    (into.attached if on else into.without)[name].append(rate(window))
        ratio = summarize(paired_ratios(into.without[name][-pairs:], into.attached[name][-pairs:]))
        progress(f"  {name}: {pairs} pairs, with/without {ratio.median:.3f} "
                 f"(95% CI {ratio.median_low:.3f}-{ratio.median_high:.3f})")


@contextlib.contextmanager
def switched_exporter(node: TestNode, settle: float = startup.SETTLE_SECONDS,
                      ) -> Iterator[tuple[Switch, str]]:
    """An exporter (every collector on) with its programs switchable, and how it attached
    them (tcx or clsact, from its log); stopped on leaving."""
    with tempfile.TemporaryDirectory(prefix="switch-") as directory:
        path = Path(directory) / "socket"
        started = startup.start(node, prefix=[sys.executable, str(SWITCHABLE), str(path)])
        try:
            attach = "tcx" if "attaching with tcx links" in started.exporter.log() else "clsact"
            time.sleep(settle)
            switch = Switch(path)
            try:
                yield switch, attach
            finally:
                switch.close()
        finally:
            started.exporter.stop()


def measure_switched(node: TestNode, pairs_of: Mapping[str, int], window: float, into: Rounds,
                     progress: Callable[[str], None] = print,
                     settle: float = startup.SETTLE_SECONDS) -> None:
    """The pairs on one switched exporter, and how it attached (into.attach). The caller has
    started an iperf3 server on pod b and prepared the node's streams (prepare_streams)."""
    with switched_exporter(node, settle) as (switch, attach):
        into.attach = attach
        measure_pairs(node, switch, pairs_of, window, into, progress)


def run(node: TestNode, pairs_of: Mapping[str, int], window: float, starts: int,
        progress: Callable[[str], None] = print, settle: float = startup.SETTLE_SECONDS) -> Rounds:
    """The caller has started an iperf3 server on pod b."""
    prepare_streams(node)
    result = Rounds()
    measure_startups(node, starts, result)
    progress(f"  {starts} start-ups: ready in " + ", ".join(
        f"{s:.2f}" for s in result.startup_seconds) + " s")
    measure_switched(node, pairs_of, window, result, progress, settle)
    return result
