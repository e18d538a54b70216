"""The kernel's tick rate (CONFIG_HZ), which user space is never told: bpf/tcp.c counts its RTT
sampling window in jiffies, the unit of the socket timestamps it reads.

Measured by the kernel itself: tcp.c's `sample_clock`, run with BPF_PROG_TEST_RUN twice 0.1 s
apart, reads jiffies and the monotonic clock together. Ticks per second, rounded to the nearest
configurable rate when that close (a tick either way is 4% at HZ=250). /proc/timer_list shows
both clocks too, but container runtimes mask it."""

from __future__ import annotations

import time
from typing import Any

from . import bpfsys
from .loader import LoadError

CONFIGURABLE = (100, 250, 300, 1000)    # CONFIG_HZ choices on x86 and arm64
GAP_SECONDS = 0.1
SNAP_TOLERANCE = 0.08
JIFFIES, NANOSECONDS = 0, 1             # indexes of clock_sample in bpf/tcp.c


class JiffiesError(Exception):
    pass


def rate(first: tuple[int, int], second: tuple[int, int]) -> int:
    """Ticks per second between two (monotonic ns, jiffies) samples, snapped to a configurable
    rate when near one."""
    nanoseconds, ticks = second[0] - first[0], second[1] - first[1]
    if nanoseconds <= 0 or ticks <= 0:
        raise JiffiesError("the clock or the jiffies did not advance")
    measured = ticks * 1e9 / nanoseconds
    nearest = min(CONFIGURABLE, key=lambda hz: abs(hz - measured))
    if abs(nearest - measured) <= SNAP_TOLERANCE * nearest:
        return nearest
    return round(measured)


def sample(function_fd: int, clocks: Any) -> tuple[int, int]:
    """(monotonic ns, jiffies) read together by one run of sample_clock into `clocks`."""
    try:
        bpfsys.test_run(function_fd)
    except OSError as e:
        raise JiffiesError(str(e)) from e
    return int(clocks[NANOSECONDS].value), int(clocks[JIFFIES].value)


def kernel_hz(program: Any) -> int:
    """The tick rate, from two runs of the loaded tcp program's sample_clock."""
    try:
        function = program.load_tc("sample_clock")
    except LoadError as e:
        raise JiffiesError(str(e)) from e
    clocks = program.table("clock_sample")
    first = sample(function.fd, clocks)
    time.sleep(GAP_SECONDS)
    return rate(first, sample(function.fd, clocks))
