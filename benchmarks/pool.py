"""python -m benchmarks.pool [--run tcp=600 ...]: the throughput and connection-loop verdicts
over every saved run of the current datapath (benchmarks/pairs.py), after measuring more pairs
first with --run (a test node and a switched exporter, as `make bench` builds them)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lab.testnode import TestNode

from . import interleaved, pairs
from .document import POOLED_HEADER
from .machine import NICENESS, load_average
from .report import RATIO_TARGETS, Headline, against, text_table, verdict
from .streams import STREAMS

DEFAULT_WINDOW = 0.5        # as `make bench`
STREAM_LABELS = {"tcp": "TCP bulk", "udp": "64-byte UDP",
                 "connections": "connect/close loop (rate)",
                 "tls": "HTTPS request loop (rate)"}


def _pair_counts(text: str) -> dict[str, int]:
    counts = {}
    for item in text.split(","):
        name, _, count = item.partition("=")
        if name not in STREAMS or not count.isdecimal() or int(count) < 1:
            raise argparse.ArgumentTypeError(
                f"expected STREAM=PAIRS with STREAM one of {', '.join(STREAMS)}: {item!r}")
        counts[name] = int(count)
    return counts


def measure(pairs_of: dict[str, int], window: float) -> pairs.Record:
    load = load_average()
    rounds = interleaved.Rounds()
    with TestNode() as node:
        node.iperf3_server(node.b_ns, node.b_ip)
        interleaved.prepare_streams(node)
        interleaved.measure_switched(node, pairs_of, window, rounds)
    return pairs.record_of(rounds, window, load)


def pooled_rows(records: list[pairs.Record], datapath: str) -> list[list[str]]:
    rows = []
    for stream, target in RATIO_TARGETS.items():
        result = pairs.pool(records, stream, datapath)
        if result is None:
            continue
        s = result.ratios
        measured = (f"{s.median:.3f} of without (95% CI {s.median_low:.3f}-"
                    f"{s.median_high:.3f}), {s.count} pairs")
        headline = Headline(stream, measured, f">= {target}",
                             against(s.median_low, s.median_high, target))
        runs = ", ".join(f"{r.date} ({len(r.ratios(stream))})" for r in result.runs)
        rows.append([STREAM_LABELS[stream], measured, headline.target, verdict(headline), runs])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pool", description=__doc__)
    parser.add_argument("--run", type=_pair_counts, metavar="STREAM=PAIRS[,...]",
                        help="measure so many more pairs of these streams first and save them")
    parser.add_argument("--window", type=float, default=DEFAULT_WINDOW,
                        help="seconds per window (default %(default)s, as make bench)")
    parser.add_argument("--pairs-dir", type=Path, default=pairs.PAIRS_DIR,
                        help="where the runs are saved (default benchmarks/pairs)")
    args = parser.parse_args(argv)
    if args.run:
        if os.geteuid() != 0:
            print("benchmarks.pool: --run must run as root (BPF, network namespaces)",
                  file=sys.stderr)
            return 2
        os.setpriority(os.PRIO_PROCESS, 0, NICENESS)
        record = measure(args.run, args.window)
        if record.datapath is None:
            print("uncommitted changes to the datapath: the pairs are not saved",
                  file=sys.stderr)
        else:
            print(f"saved to {pairs.save(record, args.pairs_dir)}")
    tree = pairs.tree_identity()
    records = pairs.load_all(args.pairs_dir)
    # every attach mode measured with this tree's programs and defaults
    datapaths = sorted({r.datapath for r in records if tree and r.datapath
                        and r.datapath.startswith(f"{tree} ")})
    if not datapaths:
        print("no saved runs of this tree's datapath (committed) to pool", file=sys.stderr)
        return 1
    for datapath in datapaths:
        print(f"pooled runs of {datapath}:")
        print(text_table(POOLED_HEADER, pooled_rows(records, datapath)))
    return 0

if __name__ == "__main__":
    sys.exit(main())
