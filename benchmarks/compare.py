"""python -m benchmarks.compare TREE TREE [...]: part 1 of the benchmark (the kernel's accounting
of our programs over the floor) for the exporter of each source tree, alternated on one test
node in one session: A B, then B A, and so on.

Single runs of part 1 move by +/-15 ns per packet on a shared machine; a change worth a few ns
shows only as a shift of the medians over several alternated repetitions. Make the other tree a
git worktree of the revision to compare with (`git worktree add /tmp/base main`). Each tree's
exporter runs from that tree (its `exporter/` and `bpf/`) with this Python environment; the
node, the floor and the workloads are this tree's."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tests.testnode import TestNode

from . import connections, part1
from .report import text_table
from .stats import summarize

NICENESS = -10
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
            costs, per_connection = part1.run(node, seconds, 1, source=trees[index], say=say)
            udp, tcp = costs[0]
            results[index].append((udp.over_floor_per_packet, tcp.over_floor_per_packet,
                                   per_connection[0].ns_per_connection))
    return results


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
    args = parser.parse_args(argv)
    if len(args.trees) < 2:
        parser.error("give two or more source trees")
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
        connections.prepare(node)
        results = compare(node, trees, args.repetitions, args.seconds)
    print()
    print(table(trees, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
