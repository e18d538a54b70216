"""Monotonic series totals per metric, with a series cap and TTL expiry.

Collectors fold each scrape's kernel deltas into a SeriesStore. Totals only grow, so counters
stay monotonic however the kernel maps are drained. A new label set past the cap is folded into
the metric's ``overflow`` series (its endpoint labels read ``overflow``; totals stay exact) and
counted. A series without new counts for the TTL is dropped (Prometheus treats its return as a
counter reset). Each series keeps its label text, rendered once when it is created, for the
/metrics fast path (exposition.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from ..naming.endpoints import OVERFLOW
from .exposition import LabelRenderer, LabelText, LabelValues, Row


class SeriesStore:
    def __init__(
        self,
        metric: str,
        label_names: Sequence[str],
        endpoint_label_names: Iterable[str],
        max_series: int,
        ttl_seconds: float,
        width: int = 1,
        clock: Callable[[], float] = time.monotonic,
        text_from: SeriesStore | None = None,
    ) -> None:
        self.metric = metric
        self.label_names = tuple(label_names)
        endpoint = set(endpoint_label_names)
        self._endpoint_positions = tuple(
            i for i, name in enumerate(self.label_names) if name in endpoint)
        self.max_series = max_series
        self.ttl_seconds = ttl_seconds
        self.width = width
        self._clock = clock
        self._render = LabelRenderer(self.label_names, histogram=width > 1)
        self._values: dict[LabelValues, list[float]] = {}
        self._last_change: dict[LabelValues, float] = {}
        self._text: dict[LabelValues, LabelText] = {}
        # a store with the same label names and series (flow bytes and packets) whose label
        # texts this one reuses: one string per series, not two
        self._text_from = text_from._text if text_from is not None else None
        self.overflowed_series_total = 0

    def __len__(self) -> int:
        return len(self._values)

    def overflow_labels(self, labels: LabelValues) -> LabelValues:
        return tuple(OVERFLOW if i in self._endpoint_positions else value
                     for i, value in enumerate(labels))

    def add(self, labels: LabelValues, delta: Sequence[float]) -> None:
        """Adds a delta (width values) to a series, creating it if the cap allows."""
        now = self._clock()
        current = self._values.get(labels)
        if current is None:
            if len(self._values) >= self.max_series:
                self.overflowed_series_total += 1
                labels = self.overflow_labels(labels)
                current = self._values.get(labels)
            if current is None:
                # the overflow series itself may exceed the cap by the few non-endpoint variants
                current = self._values[labels] = [0.0] * self.width
                shared = self._text_from.get(labels) if self._text_from is not None else None
                self._text[labels] = shared if shared is not None else self._render(labels)
        for i, value in enumerate(delta):
            current[i] += value
        self._last_change[labels] = now

    def add_counts(self, labels: Iterable[LabelValues], counts: Iterable[float]) -> None:
        """add() for many series of a store of width 1 at once (a drain's label sets), one count
        each: one clock read, and the series that exist already (most, from the second scrape
        on) updated in place."""
        if self.width != 1:
            raise ValueError(f"{self.metric}: add_counts needs a store of width 1")
        now = self._clock()
        values, last_change = self._values, self._last_change
        for series, count in zip(labels, counts, strict=True):
            current = values.get(series)
            if current is None:
                self.add(series, (count,))
                continue
            current[0] += count
            last_change[series] = now

    def get(self, labels: LabelValues) -> list[float] | None:
        return self._values.get(labels)

    def expire(self, keep: Callable[[LabelValues], bool] | None = None) -> int:
        """Drops series idle for the TTL (unless keep() says otherwise); returns how many."""
        deadline = self._clock() - self.ttl_seconds
        stale = [labels for labels, changed in self._last_change.items()
                 if changed < deadline and not (keep and keep(labels))]
        for labels in stale:
            del self._values[labels]
            del self._last_change[labels]
            del self._text[labels]
        return len(stale)

    def items(self) -> list[tuple[LabelValues, list[float]]]:
        return [(labels, list(values)) for labels, values in self._values.items()]

    def rows(self) -> list[Row]:
        """A snapshot for a StoreFamily: label values, label text, values."""
        values = self._values     # zip and map: no Python-level loop over the series
        return list(zip(values, map(self._text.__getitem__, values),
                        map(list, values.values()), strict=True))
