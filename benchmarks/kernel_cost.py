"""Part 1: what our BPF programs cost per run, from the kernel's own accounting.

With run-time statistics on (BPF_ENABLE_STATS, the same switch as `sysctl
kernel.bpf_stats_enabled=1`, but off again when its file descriptor closes), the kernel adds
the sched_clock() time of every program run to the program's run_time_ns and counts the run in
run_cnt. A tail call jumps into the target program inside the same run: the time of parse_dns
and parse_http is accounted to the classifier run that tail-called them, and their own run_cnt
stays 0. The classifier's ns per run is therefore the whole per-packet cost.

The floor (floor.c, a program that returns at once) is attached behind our program on the same
four hooks, the way the exporter attaches (a tcx link appended after ours on Linux >= 6.6, else a
clsact filter of a later priority), so it runs on exactly the same packets in the same
seconds."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute

from exporter.kernel import bpfsys
from lab.exporter_process import fd_infos
from lab.testnode import TestNode, in_netns

FLOOR_SOURCE = Path(__file__).with_name("floor.c")
FLOOR_FUNCTION = "bench_floor"
FLOOR_PRIORITY = 2          # after the exporter's filter (priority 1), which never decides
FLOOR_HANDLE = 0xBE0C
BESIDE_FLOOR_PRIORITY = 3   # after the two exporters of compare --side-by-side (beside.py)
HOOKS = (0xFFFFFFF2, 0xFFFFFFF3)     # clsact ingress, egress
TCX_HOOKS = {0xFFFFFFF2: bpfsys.TCX_INGRESS, 0xFFFFFFF3: bpfsys.TCX_EGRESS}
TC_PROGRAMS = ("classify_ingress", "classify_egress")

_BPF_STATS_RUN_TIME = 0
T = TypeVar("T")


@contextlib.contextmanager
def run_time_statistics() -> Iterator[None]:
    """The kernel accounts run time per program while inside."""
    fd = bpfsys.bpf(bpfsys.ENABLE_STATS, ctypes.c_uint32(_BPF_STATS_RUN_TIME), "BPF_ENABLE_STATS")
    try:
        yield
    finally:
        os.close(fd)


def prog_ids_of(pid: int) -> set[int]:
    """The BPF programs a process holds open (bcc keeps every loaded program's fd; a tcx
    link's fdinfo names its program too)."""
    return {int(info["prog_id"]) for info in fd_infos(pid) if "prog_id" in info}


@dataclass(frozen=True)
class ProgStats:
    name: str
    run_time_ns: int
    run_cnt: int


def read_stats(ids: set[int]) -> dict[int, ProgStats]:
    """run_time_ns and run_cnt of these programs (bpftool prog show)."""
    out = subprocess.run(["bpftool", "prog", "show", "--json"], capture_output=True, text=True,
                         check=True).stdout
    return {p["id"]: ProgStats(p.get("name", "?"), int(p.get("run_time_ns", 0)),
                               int(p.get("run_cnt", 0)))
            for p in json.loads(out) if p["id"] in ids}


class Floor:
    """floor.c loaded in this process and attached behind the exporter on the node's veths."""

    def __init__(self, node: TestNode, devices: list[str], priority: int = FLOOR_PRIORITY
                 ) -> None:
        import bcc

        self.node = node
        self.devices = devices
        self.priority = priority
        self.bpf = bcc.BPF(src_file=str(FLOOR_SOURCE).encode())
        self.function = self.bpf.load_func(FLOOR_FUNCTION.encode(), bcc.BPF.SCHED_CLS)
        self.prog_id = self._own_prog_id()
        self.tcx = bpfsys.has_tcx(self.function.fd)     # as the exporter's interfaces.attach: auto
        self._links: list[int] = []

    def _own_prog_id(self) -> int:
        with open(f"/proc/self/fdinfo/{self.function.fd}") as f:
            for line in f:
                if line.startswith("prog_id:"):
                    return int(line.split()[1])
        raise RuntimeError("floor program has no id")

    def _each_hook(self, action: Callable[[IPRoute, int, int], None]) -> None:
        with in_netns(self.node.node_ns):
            ipr = IPRoute()
        try:
            for device in self.devices:
                index = ipr.link_lookup(ifname=device)[0]
                for parent in HOOKS:
                    action(ipr, index, parent)
        finally:
            ipr.close()

    def attach(self) -> None:
        def add(ipr: IPRoute, index: int, parent: int) -> None:
            if self.tcx:        # no flags: after every program already on the hook
                # the interface index is looked up in the calling thread's network namespace
                with in_netns(self.node.node_ns):
                    self._links.append(bpfsys.tcx_link(self.function.fd, index,
                                                       TCX_HOOKS[parent], flags=0))
                return
            ipr.tc("add-filter", "bpf", index, handle=FLOOR_HANDLE, fd=self.function.fd,
                   name=FLOOR_FUNCTION, parent=parent, classid=1, direct_action=True,
                   prio=self.priority)
        self._each_hook(add)

    def detach(self) -> None:
        def delete(ipr: IPRoute, index: int, parent: int) -> None:
            with contextlib.suppress(Exception):
                ipr.tc("del-filter", "bpf", index, handle=FLOOR_HANDLE, parent=parent,
                       prio=self.priority)
        while self._links:
            os.close(self._links.pop())
        if not self.tcx:
            self._each_hook(delete)

    def close(self) -> None:
        self.bpf.cleanup()


@dataclass(frozen=True)
class ProgramCost:
    name: str
    runs: int
    ns_per_run: float


@dataclass(frozen=True)
class WorkloadCost:
    """One workload's accounting: per program, the floor's, and per packet."""
    workload: str
    programs: list[ProgramCost]
    floor_runs: int
    floor_ns_per_run: float
    tc_ns_per_run: float            # classify_ingress and classify_egress together
    packets: float                  # each packet passes two hooks: one ingress, one egress
    tc_ns_per_packet: float
    floor_ns_per_packet: float
    seconds: float                  # how long the workload ran
    added_ns: float                 # every program of ours (tracepoints too) minus the floor

    @property
    def core_share(self) -> float:
        """The CPU time our programs added, as a share of one core over the workload."""
        return self.added_ns / (self.seconds * 1e9)

    @property
    def over_floor_per_run(self) -> float:
        return self.tc_ns_per_run - self.floor_ns_per_run

    @property
    def over_floor_per_packet(self) -> float:
        return self.tc_ns_per_packet - self.floor_ns_per_packet

    def program(self, name: str) -> ProgramCost:
        """One program's accounting (no runs: zero)."""
        return next((p for p in self.programs if p.name == name), ProgramCost(name, 0, 0.0))

    @property
    def ingress_over_floor_per_run(self) -> float:
        """classify_ingress's ns per run minus the floor's: what one ingress hook costs, for
        streams whose ingress runs are all on the hooks being measured (the counting rule's
        uplinks). The floor's figure is per run over both hooks: it does the same on each."""
        return self.program("classify_ingress").ns_per_run - self.floor_ns_per_run


def _deltas(ids: set[int], run: Callable[[], T]) -> tuple[dict[int, ProgStats], T, float]:
    """What each program accounted while run() ran, run()'s result and its seconds."""
    before = read_stats(ids)
    began = time.monotonic()
    outcome = run()
    seconds = time.monotonic() - began
    after = read_stats(ids)
    deltas = {i: ProgStats(after[i].name, after[i].run_time_ns - before[i].run_time_ns,
                           after[i].run_cnt - before[i].run_cnt) for i in ids if i in after}
    return deltas, outcome, seconds


def _costs(deltas: dict[int, ProgStats]) -> list[ProgramCost]:
    return [ProgramCost(d.name, d.run_cnt, d.run_time_ns / d.run_cnt if d.run_cnt else 0.0)
            for d in sorted(deltas.values(), key=lambda d: d.name)]


def measure(workload: str, exporter_pid: int, floor: Floor, run: Callable[[], object]
            ) -> WorkloadCost:
    """Runs a workload through the node with statistics on; what the kernel accounted."""
    deltas, _, seconds = _deltas(prog_ids_of(exporter_pid) | {floor.prog_id}, run)
    floor_delta = deltas.pop(floor.prog_id)
    tc = [d for d in deltas.values() if d.name in TC_PROGRAMS]
    tc_time = sum(d.run_time_ns for d in tc)
    tc_runs = sum(d.run_cnt for d in tc)
    packets = floor_delta.run_cnt / 2
    if not tc_runs or not floor_delta.run_cnt:
        raise RuntimeError(f"{workload}: no program runs were accounted")
    added = sum(d.run_time_ns for d in deltas.values()) - floor_delta.run_time_ns
    return WorkloadCost(workload, _costs(deltas), floor_delta.run_cnt,
                        floor_delta.run_time_ns / floor_delta.run_cnt, tc_time / tc_runs,
                        packets, tc_time / packets, floor_delta.run_time_ns / packets, seconds,
                        added)


def measure_beside(exporter_pids: list[int], floor: Floor, run: Callable[[], object]
                   ) -> list[float]:
    """For exporters attached side by side (compare --side-by-side): each one's TC programs,
    ns per packet over the floor, all measured on the same packets in the same seconds."""
    owned = {pid: prog_ids_of(pid) for pid in exporter_pids}
    deltas, _, _ = _deltas(set().union(*owned.values()) | {floor.prog_id}, run)
    floor_delta = deltas.pop(floor.prog_id)
    if not floor_delta.run_cnt:
        raise RuntimeError("no packets reached the floor")
    packets = floor_delta.run_cnt / 2
    return [(sum(deltas[i].run_time_ns for i in owned[pid]
                 if i in deltas and deltas[i].name in TC_PROGRAMS)
             - floor_delta.run_time_ns) / packets for pid in exporter_pids]


@dataclass(frozen=True)
class ConnectionCost:
    """The tracepoint programs' accounting over a loop of TCP connections."""
    connections: int
    programs: list[ProgramCost]
    seconds: float

    @property
    def core_share(self) -> float:
        """The CPU time of the tracepoint programs, as a share of one core over the loop."""
        return sum(p.runs * p.ns_per_run for p in self.programs) / (self.seconds * 1e9)

    @property
    def ns_per_connection(self) -> float:
        return sum(p.runs * p.ns_per_run for p in self.programs) / self.connections


def measure_connections(exporter_pid: int, run: Callable[[], tuple[int, float]]
                        ) -> ConnectionCost:
    deltas, outcome, seconds = _deltas(prog_ids_of(exporter_pid), run)
    return ConnectionCost(outcome[0], _costs(deltas), seconds)
