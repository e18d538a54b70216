"""Summaries of repeated measurements: medians, spreads and ratios."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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

    @property
    def spread(self) -> float:
        """The interquartile range relative to the median (0.05 = +/-2.5%)."""
        return (self.p75 - self.p25) / self.median if self.median else float("nan")


def summarize(samples: Sequence[float]) -> Summary:
    if not samples:
        raise ValueError("no samples to summarize")
    values = np.asarray(samples, dtype=np.float64)
    p25, median, p75 = np.percentile(values, [25, 50, 75])
    return Summary(float(median), float(p25), float(p75), float(values.min()),
                   float(values.max()), len(values))


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
