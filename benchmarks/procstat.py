"""What a process costs, read from /proc: CPU time and memory."""

from __future__ import annotations

import os
from dataclasses import dataclass

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the whole process, exited threads included (1/CLK_TCK
    resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS   # utime, stime


@dataclass(frozen=True)
class Memory:
    rss_mib: float
    pss_mib: float
    peak_rss_mib: float     # VmHWM


def peak_rss_mib(pid: int) -> float:
    """The process's peak RSS (VmHWM); OSError once it is gone."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise OSError(f"/proc/{pid}/status has no VmHWM")


def memory(pid: int) -> Memory:
    values: dict[str, float] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("Rss", "Pss"):
                values[name] = int(rest.split()[0]) / 1024
    return Memory(values["Rss"], values["Pss"], peak_rss_mib(pid))
