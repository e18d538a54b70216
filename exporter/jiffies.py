"""The kernel's tick rate (CONFIG_HZ), which user space is never told directly: bpf/tcp.c counts
its RTT sampling interval in jiffies, the unit of the socket timestamps it reads.

Measured from /proc/timer_list, whose head gives the monotonic clock ("now at N nsecs") and, at
the end of the first CPU's section, the jiffies counter: two reads 0.1 s apart give ticks per
second, rounded to the nearest configurable rate when it is that close (it is to within a tick,
4% at HZ=250)."""

from __future__ import annotations

import re
import time
from pathlib import Path

TIMER_LIST = Path("/proc/timer_list")
CONFIGURABLE = (100, 250, 300, 1000)    # CONFIG_HZ choices on x86 and arm64
GAP_SECONDS = 0.1
SNAP_TOLERANCE = 0.08

_NOW = re.compile(rb"^now at (\d+) nsecs$", re.M)
_JIFFIES = re.compile(rb"^jiffies: (\d+)$", re.M)
_READ_LIMIT = 1 << 20       # the first CPU's section holds the first "jiffies:" line


class JiffiesError(Exception):
    pass


def sample(path: Path = TIMER_LIST) -> tuple[int, int]:
    """(monotonic ns, jiffies) read together from timer_list."""
    head = b""
    try:
        with path.open("rb") as f:
            while len(head) < _READ_LIMIT:
                chunk = f.read(65536)
                if not chunk:
                    break
                head += chunk
                if _JIFFIES.search(head):
                    break
    except OSError as e:
        raise JiffiesError(f"{path}: {e.strerror}") from e
    now, jiffies = _NOW.search(head), _JIFFIES.search(head)
    if now is None or jiffies is None:
        raise JiffiesError(f"{path}: no 'now at' or 'jiffies:' line")
    return int(now.group(1)), int(jiffies.group(1))


def rate(first: tuple[int, int], second: tuple[int, int]) -> int:
    """Ticks per second between two samples, snapped to a configurable rate when near one."""
    nanoseconds, ticks = second[0] - first[0], second[1] - first[1]
    if nanoseconds <= 0 or ticks <= 0:
        raise JiffiesError("timer_list: the clock or the jiffies did not advance")
    measured = ticks * 1e9 / nanoseconds
    nearest = min(CONFIGURABLE, key=lambda hz: abs(hz - measured))
    if abs(nearest - measured) <= SNAP_TOLERANCE * nearest:
        return nearest
    return round(measured)


def kernel_hz(path: Path = TIMER_LIST) -> int:
    first = sample(path)
    time.sleep(GAP_SECONDS)
    return rate(first, sample(path))
