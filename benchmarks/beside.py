"""Runs a source tree's exporter in a network namespace that holds another one, for
`benchmarks.compare --side-by-side`: `python beside.py SLOT python -m exporter ARGS...`, with the
tree as the working directory.

Two exporters in one namespace would replace each other's filters, so the exporter refuses the
second one (exporter/kernel/singleton.py). Here each slot gets a filter priority, handle, name and
qdisc-ownership record of its own, and a claim name of its own; everything else (programs,
maps, flags) is the tree's, unchanged. Both trees' classifiers then run on the same packets in
the same seconds, which is what makes their difference steadier than alternated runs."""

from __future__ import annotations

import sys

# priorities 1 and 2 run before the floor's (kernel_cost.BESIDE_FLOOR_PRIORITY)
PRIORITY_OF_SLOT = (1, 2)
HANDLE_BASE = 0xEB50


def main() -> None:
    from wrapping import exporter_arguments, run_exporter

    slot = int(sys.argv[1])
    arguments = exporter_arguments("beside.py", sys.argv[2:])
    from exporter.kernel import interfaces, singleton

    interfaces.TcAttacher.__init__.__defaults__ = (
        PRIORITY_OF_SLOT[slot], HANDLE_BASE + slot, f"beside{slot}", f"beside{slot}")
    singleton.claim_netns.__defaults__ = (f"\0ebpf-net-exporter-beside-{slot}".encode(),)
    run_exporter(arguments)


if __name__ == "__main__":
    main()
