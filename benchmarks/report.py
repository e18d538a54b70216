"""Turns the measurements into the headline table (figure, measured, target, met) and the
Markdown of docs/benchmarks.md."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .stats import Summary

NO_TARGET = "-"
# the least rate with the exporter, as a fraction of the rate without, per stream of part 2, 5
RATIO_TARGETS = {"tcp": 0.97, "udp": 0.93, "connections": 0.95, "tls": 0.95}


@dataclass(frozen=True)
class Headline:
    figure: str
    measured: str
    target: str             # NO_TARGET when there is none
    met: bool | None        # None: no target, or the spread straddles it


def verdict(headline: Headline) -> str:
    if headline.target == NO_TARGET:
        return "-"
    if headline.met is None:
        return "not resolved"
    return "met" if headline.met else "MISSED"


def at_most(low: float, high: float, target: float) -> bool | None:
    """Whether a measurement whose spread is low..high is at most `target` (None: straddles)."""
    if high <= target:
        return True
    if low > target:
        return False
    return None


def against(low: float, high: float, target: float) -> bool | None:
    """Whether a measurement whose spread is low..high is at least `target`: None when the
    spread straddles it (the run cannot tell)."""
    if low >= target:
        return True
    if high < target:
        return False
    return None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    def line(row: Sequence[str]) -> str:
        return "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def headline_rows(headlines: Sequence[Headline]) -> list[list[str]]:
    return [[h.figure, h.measured, h.target, verdict(h)] for h in headlines]


HEADLINE_HEADER = ("figure", "measured (median)", "target", "")


def spread_text(summary: Summary, digits: int = 3) -> str:
    """'median (IQR p25-p75, n=N)'."""
    return (f"{summary.median:.{digits}g} (IQR {summary.p25:.{digits}g}-{summary.p75:.{digits}g}"
            f", n={summary.count})")
