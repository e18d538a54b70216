"""Runs a source tree's exporter in a network namespace that holds another one, for
`benchmarks.compare --side-by-side`: `python beside.py SLOT python -m exporter ARGS...`, with the
tree as the working directory.

Two exporters in one namespace would replace each other's filters, so the exporter refuses the
second one (exporter/singleton.py). Here each slot gets a filter priority, handle, name and
qdisc-ownership record of its own, and a claim name of its own; everything else (programs,
maps, flags) is the tree's, unchanged. Both trees' classifiers then run on the same packets in
the same seconds, which is what makes their difference steadier than alternated runs."""

from __future__ import annotations

import os
import runpy
import sys

# priorities 1 and 2 run before the floor's (kernel_cost.BESIDE_FLOOR_PRIORITY)
PRIORITY_OF_SLOT = (1, 2)
HANDLE_BASE = 0xEB50


def main() -> None:
    slot = int(sys.argv[1])
    command = sys.argv[2:]
    if command[1:3] != ["-m", "exporter"]:
        raise SystemExit(f"beside.py: expected `python -m exporter ...`, got {command[:3]}")
    sys.path.insert(0, os.getcwd())             # the tree's exporter package
    from exporter import interfaces, singleton

    interfaces.TcAttacher.__init__.__defaults__ = (
        PRIORITY_OF_SLOT[slot], HANDLE_BASE + slot, f"beside{slot}", f"beside{slot}")
    singleton.claim_netns.__defaults__ = (f"\0ebpf-net-exporter-beside-{slot}".encode(),)
    sys.argv = ["exporter", *command[3:]]
    runpy.run_module("exporter", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
