"""What the benchmarks ran on: kernel, CPU, cores, date, and how busy the machine was."""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import dataclass


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# Ahead of the other users of a shared machine, so that their load moves the figures less.
# Every process started by a benchmark inherits it: workloads, servers and the exporter alike.
NICENESS = -10


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


@dataclass(frozen=True)
class Machine:
    kernel: str
    cpu: str
    cores: int
    memory_gib: float
    date: str

    @classmethod
    def describe(cls) -> Machine:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        return cls(platform.release(), cpu_model(), os.cpu_count() or 0,
                   round(pages / 2**30, 1), now)
