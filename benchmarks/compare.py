"""python -m benchmarks.compare TREE TREE [...]: part 1 of the benchmark (the kernel's accounting
of our programs over the floor) for the exporter of each source tree, alternated on one test
node in one session: A B, then B A, and so on.

Single runs of part 1 move by +/-15 ns per packet on a shared machine; a change worth a few ns
shows only as a shift of the medians over several alternated repetitions. Make the other tree a
git worktree of the revision to compare with (`git worktree add /tmp/base main`). Each tree's
exporter runs from that tree (its `exporter/` and `bpf/`) with this Python environment; the
node, the floor and the workloads are this tree's.

--side-by-side (two trees): both exporters attached at once (benchmarks/beside.py), so both
classifiers run on every packet of the same runs, one after the other, and each repetition
swaps which runs first (the second finds the packet's and the skb's lines in the cache the first
brought in: worth 40-70 ns per TCP skb here). The verdict is the difference second - first tree
on the same packets, averaged over a pair of repetitions (one in each order): what the
machine's other load does to a run moves both trees alike, and the order cancels. The
tracepoint figure is not taken this way (both trees' tracepoint programs run on every
connection)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from lab.exporter_process import ExporterProcess
from lab.testnode import TestNode

from . import connections, kernel_cost, part1, startup, throughput
from .machine import NICENESS
from .report import text_table
from .stats import summarize

BESIDE = Path(__file__).with_name("beside.py")
FIGURES = ("UDP ns per packet over the floor", "TCP ns per skb over the floor",
           "tracepoint ns per TCP connection")


def compare(node: TestNode, trees: list[Path], repetitions: int, seconds: float,
            say: Callable[[str], None] = print) -> list[list[tuple[float, float, float]]]:
    """For each tree, per repetition: (UDP over the floor, TCP over the floor, per connection)."""
    results: list[list[tuple[float, float, float]]] = [[] for _ in trees]
    for repetition in range(repetitions):
        order = list(range(len(trees)))
        if repetition % 2:
            order.reverse()         # neither tree always runs first
        for index in order:
            say(f"repetition {repetition + 1}/{repetitions}: {trees[index]}")
            measured = part1.run(node, seconds, 1, source=trees[index], say=say)
            udp, tcp = measured.kernel[0]
            results[index].append((udp.over_floor_per_packet, tcp.over_floor_per_packet,
                                   measured.per_connection[0].ns_per_connection))
    return results


def side_by_side(node: TestNode, trees: list[Path], repetitions: int, seconds: float,
                 say: Callable[[str], None] = print) -> list[list[tuple[float, float]]]:
    """Per repetition: [(UDP over the floor, TCP over the floor) of each tree], both trees'
    exporters attached together, the first slot swapped every repetition."""
    results: list[list[tuple[float, float]]] = []
    for repetition in range(repetitions):
        slots = [0, 1] if repetition % 2 == 0 else [1, 0]
        exporters = [ExporterProcess(node, source=tree, prefix=[sys.executable, str(BESIDE),
                                                                 str(slot)])
                     for tree, slot in zip(trees, slots, strict=True)]
        floor = kernel_cost.Floor(node, [node.veth_a, node.veth_b],
                                  priority=kernel_cost.BESIDE_FLOOR_PRIORITY)
        try:
            for exporter in exporters:
                exporter.wait_ready(timeout=startup.READY_TIMEOUT)
            floor.attach()
            pids = [e.proc.pid for e in exporters]
            with kernel_cost.run_time_statistics():
                udp = kernel_cost.measure_beside(pids, floor,
                                                 lambda: throughput.udp_kpps(node, seconds))
                tcp = kernel_cost.measure_beside(pids, floor,
                                                 lambda: throughput.tcp_gbits(node, seconds))
        finally:
            floor.detach()
            floor.close()
            for exporter in reversed(exporters):
                exporter.stop()
        results.append(list(zip(udp, tcp, strict=True)))
        say(f"repetition {repetition + 1}/{repetitions} (first: {trees[slots.index(0)]}): "
            + "; ".join(f"{tree}: udp {u:+.0f}, tcp {t:+.0f}"
                        for tree, (u, t) in zip(trees, results[-1], strict=True)))
    return results


def side_by_side_table(trees: list[Path], results: list[list[tuple[float, float]]]) -> str:
    """Each tree's figures, and the difference second - first tree per pair of repetitions:
    the mean of a repetition with the first tree in front and one with the second, so the
    order's own effect (some 40-70 ns per TCP skb for the one in front) cancels in each pair."""
    rows = []
    for index, tree in enumerate(trees):
        cells = []
        for figure in range(2):
            s = summarize([run[index][figure] for run in results])
            cells.append(f"{s.median:.0f} ({s.low:.0f}-{s.high:.0f})")
        rows.append([str(tree), *cells])
    for figure in range(2):
        differences = [run[1][figure] - run[0][figure] for run in results]
        pairs = [(a + b) / 2 for a, b in zip(differences[::2], differences[1::2],
                                                 strict=False)]  # an odd last one left out
        if pairs:
            s = summarize(pairs)
            plural = "s" if len(pairs) > 1 else ""
            rows[1].append(f"{s.median:+.0f} ({s.low:+.0f} to {s.high:+.0f}), "
                           f"{len(pairs)} pair{plural}")
        else:
            rows[1].append("needs 2 repetitions")
    rows[0].extend(["", ""])
    return text_table(("tree", *(f"{f}: median (range)" for f in FIGURES[:2]),
                       "UDP: second - first tree, per pair of repetitions", "TCP: the same"),
                      rows)


def table(trees: list[Path], results: list[list[tuple[float, float, float]]]) -> str:
    rows = []
    for tree, runs in zip(trees, results, strict=True):
        cells = []
        for figure in range(len(FIGURES)):
            s = summarize([run[figure] for run in runs])
            cells.append(f"{s.median:.0f} ({s.low:.0f}-{s.high:.0f})")
        rows.append([str(tree), *cells])
    return text_table(("tree", *(f"{f}: median (range)" for f in FIGURES)), rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="+", type=Path, help="source trees (two or more)")
    parser.add_argument("--repetitions", type=int, default=4,
                        help="alternated repetitions per tree (default 4)")
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="length of each workload run (default 3)")
    parser.add_argument("--side-by-side", action="store_true",
                        help="both trees' exporters attached at once (two trees; part 1's "
                             "UDP and TCP figures only)")
    args = parser.parse_args(argv)
    if len(args.trees) < 2:
        parser.error("give two or more source trees")
    if args.side_by_side and len(args.trees) != 2:
        parser.error("--side-by-side compares exactly two trees")
    missing = [t for t in args.trees if not (t / "exporter" / "__main__.py").is_file()]
    if missing:
        parser.error(f"not a source tree of the exporter: {', '.join(map(str, missing))}")
    if os.geteuid() != 0:
        print("benchmarks: must run as root (BPF, network namespaces)", file=sys.stderr)
        return 2
    os.setpriority(os.PRIO_PROCESS, 0, NICENESS)
    trees = [t.resolve() for t in args.trees]
    with TestNode() as node:
        node.iperf3_server(node.b_ns, node.b_ip)
        if args.side_by_side:
            paired = side_by_side(node, trees, args.repetitions, args.seconds)
        else:
            connections.prepare(node)
            results = compare(node, trees, args.repetitions, args.seconds)
    print()
    print(side_by_side_table(trees, paired) if args.side_by_side else table(trees, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
