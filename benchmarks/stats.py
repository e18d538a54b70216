"""Summaries of repeated measurements: medians, spreads and ratios."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import comb

import numpy as np


@dataclass(frozen=True)
class Summary:
    """The median of some samples with their interquartile range and extremes."""
    median: float
    p25: float
    p75: float
    low: float
    high: float
    count: int
    median_low: float       # the 95% confidence interval of the median (median_interval)
    median_high: float

    @property
    def spread(self) -> float:
        """The interquartile range relative to the median (0.05 = +/-2.5%)."""
        return (self.p75 - self.p25) / self.median if self.median else float("nan")


def summarize(samples: Sequence[float]) -> Summary:
    if not samples:
        raise ValueError("no samples to summarize")
    values = np.asarray(samples, dtype=np.float64)
    p25, median, p75 = np.percentile(values, [25, 50, 75])
    median_low, median_high = median_interval(samples)
    return Summary(float(median), float(p25), float(p75), float(values.min()),
                   float(values.max()), len(values), median_low, median_high)


def median_interval(samples: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """A confidence interval of the median that assumes nothing of the samples' distribution:
    the k-th smallest and k-th largest sample, for the largest k such that fewer than k of n
    samples fall below the median with probability at most (1 - confidence) / 2 (a binomial
    tail with p = 1/2). Unlike the interquartile range, it narrows as rounds are added: 20
    rounds give about the 6th to 15th samples. Too few samples for the confidence: min, max."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    n = len(ordered)
    tail = (1 - confidence) / 2
    k = 1
    # P(at most k samples below the median) <= tail: the (k + 1)-th smallest still qualifies
    while k < n // 2 and sum(comb(n, i) for i in range(k + 1)) / 2 ** n <= tail:
        k += 1
    return float(ordered[k - 1]), float(ordered[n - k])


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between samples."""
    if not samples:
        raise ValueError("no samples")
    return float(np.percentile(np.asarray(samples, dtype=np.float64), q))


def paired_ratios(baseline: Sequence[float], measured: Sequence[float]) -> list[float]:
    """measured[i] / baseline[i] for the rounds of an interleaved A/B run: each ratio compares
    two runs taken seconds apart, so slow drifts of the machine cancel."""
    if len(baseline) != len(measured):
        raise ValueError(f"{len(baseline)} baseline rounds but {len(measured)} measured")
    return [m / b for b, m in zip(baseline, measured, strict=True) if b > 0]
