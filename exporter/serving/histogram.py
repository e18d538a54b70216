"""Kernel log2 histograms (slots of microseconds, see bpf/common.h) as Prometheus buckets.

Slot i counts values v with 2^(i-1) < v <= 2^i us (slot 0: v <= 1), so its cumulative bucket
has exactly le = 2^i us: 1us, 2us, 4us ... 33.5 s. Slot INF_SLOT counts values past the last
bound and feeds only +Inf."""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client.utils import floatToGoString

INF_SLOT = 26           # HIST_INF_SLOT in bpf/common.h
SUM_SLOT = 63           # HIST_SUM_SLOT in bpf/common.h
SLOTS = INF_SLOT + 1
# A histogram series in user space: SLOTS counts, then the sum of the observed microseconds.
WIDTH = SLOTS + 1
SUM_INDEX = SLOTS

UPPER_BOUNDS_SECONDS = tuple((1 << slot) * 1e-6 for slot in range(INF_SLOT))
_BOUND_LABELS = (*tuple(floatToGoString(b) for b in UPPER_BOUNDS_SECONDS), "+Inf")


def slot_of(microseconds: int) -> int:
    """The slot the kernel files a value in: ceil(log2(v)), 0 for v <= 1 (log2_slot in C)."""
    if microseconds <= 1:
        return 0
    return min((int(microseconds) - 1).bit_length(), INF_SLOT)


def index_of(kernel_slot: int) -> int | None:
    """Where a kernel slot number lands in a user-space series, None when unknown."""
    if 0 <= kernel_slot <= INF_SLOT:
        return kernel_slot
    if kernel_slot == SUM_SLOT:
        return SUM_INDEX
    return None


def buckets(series: Sequence[float]) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) pairs ending with +Inf, and the sum in seconds."""
    result = []
    running = 0.0
    for label, count in zip(_BOUND_LABELS, series[:SLOTS], strict=True):
        running += count
        result.append((label, running))
    return result, series[SUM_INDEX] * 1e-6
