"""The /metrics response, with a fast path for the traffic families.

prometheus_client builds a Sample (a dict of labels) for every series and validates and escapes
every label of every sample at each scrape: at 20k flow series that was half of a scrape's CPU
(docs/benchmarks.md). The traffic families are instead StoreFamily objects, snapshots of a
SeriesStore whose label text was rendered once, when each series was created; this module writes
their lines directly. Everything else (self metrics, process_*, python_*) and the format
headers of every family still come from prometheus_client's encoders, which also keep doing the
content negotiation (text 0.0.4 or OpenMetrics), gzip, and ?name[] filtering. To prometheus_client
(unit tests, registry.get_sample_value, generate_latest) a StoreFamily is an ordinary family:
its samples are built on first access with the library's own family classes."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import gzip
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from . import histogram

LabelValues = tuple[str, ...]
# a series' label text: "{a="1",b="2"}" ("" without labels); a histogram's also has the bucket
# line's text on either side of its le label, which sorts among the others
HistogramText = tuple[str, str, str]
LabelText = str | HistogramText
Row = tuple[LabelValues, LabelText, Sequence[float]]
StartResponse = Callable[..., Any]

_LEGACY_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_OPENMETRICS_EOF = b"# EOF\n"
# escaping schemes that leave legacy metric and label names as they are
_PLAIN_NAME_ESCAPINGS = (openmetrics.UNDERSCORES, openmetrics.ALLOWUTF8, openmetrics.VALUES)


def value_text(value: float) -> str:
    """floatToGoString, whose answer below 1e6 is Python's repr (counters mostly are)."""
    if type(value) is float and 0.0 <= value < 1e6:
        return repr(value)
    return floatToGoString(value)


def escape_value(value: str) -> str:
    """A label value as both formats quote it (prometheus_client's ALLOWUTF8 escaping)."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class LabelRenderer:
    """Renders a label set the way prometheus_client does: names sorted, values escaped."""

    def __init__(self, label_names: Sequence[str], histogram: bool = False) -> None:
        for name in label_names:
            if not _LEGACY_LABEL_NAME.match(name) or (name == "le" and histogram):
                raise ValueError(f"label name {name!r} cannot be served by the fast path")
        self._order = sorted(range(len(label_names)), key=lambda i: label_names[i])
        self._names = [label_names[i] for i in self._order]
        self._before_le = sum(1 for name in self._names if name < "le")
        self.histogram = histogram

    def __call__(self, labels: LabelValues) -> LabelText:
        pairs = [f'{name}="{escape_value(labels[i])}"'
                 for name, i in zip(self._names, self._order, strict=True)]
        full = "{" + ",".join(pairs) + "}" if pairs else ""
        if not self.histogram:
            return full
        before, after = pairs[:self._before_le], pairs[self._before_le:]
        return (full, "{" + "".join(p + "," for p in before),
                "".join("," + p for p in after) + "}")


_LIBRARY_FAMILIES: dict[str, Any] = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily,
                                     "histogram": HistogramMetricFamily}


class StoreFamily(Metric):
    """A counter, gauge or histogram family made of rows (label values, label text, values):
    one value for a counter or gauge, histogram.WIDTH for a histogram."""

    def __init__(self, name: str, documentation: str, typ: str, label_names: Sequence[str],
                 rows: Iterable[Row]) -> None:
        # the library family checks the name and strips a counter's _total, as it would
        self._empty = _LIBRARY_FAMILIES[typ](name, documentation, labels=label_names)
        super().__init__(self._empty.name, documentation, typ)
        self.label_names = list(label_names)
        self.rows = list(rows)
        self._samples: list[Sample] | None = None

    # prometheus_client's view: samples, built on first access
    def _get_samples(self) -> list[Sample]:
        if self._samples is None:
            family = _LIBRARY_FAMILIES[self.type](
                self.name, self.documentation, labels=self.label_names)
            for labels, _, values in self.rows:
                if self.type == "histogram":
                    buckets, total = histogram.buckets(values)
                    family.add_metric(list(labels), buckets, total)
                else:
                    family.add_metric(list(labels), values[0])
            self._samples = family.samples
        return self._samples

    def _set_samples(self, samples: list[Sample]) -> None:     # Metric.__init__ sets []
        self._samples = samples or None

    samples = property(_get_samples, _set_samples)  # type: ignore[assignment]

    def header(self) -> Metric:
        """The family without samples: what the library's encoders turn into its header."""
        return self._empty

    def lines(self) -> str:
        if self.type == "histogram":
            return self._histogram_lines()
        name = self.name + "_total" if self.type == "counter" else self.name
        return "".join([f"{name}{text} {value_text(values[0])}\n"
                        for _, text, values in self.rows])

    def _histogram_lines(self) -> str:
        bucket, count, total = self.name + "_bucket", self.name + "_count", self.name + "_sum"
        out = []
        for _, text, values in self.rows:
            full, opening, closing = text
            buckets, seconds = histogram.buckets(values)
            out.extend(f'{bucket}{opening}le="{le}"{closing} {value_text(value)}\n'
                       for le, value in buckets)
            out.append(f"{count}{full} {value_text(buckets[-1][1])}\n")
            out.append(f"{total}{full} {value_text(seconds)}\n")
        return "".join(out)


class SeriesSource(Protocol):
    label_names: tuple[str, ...]

    def rows(self) -> list[Row]: ...


def store_family(name: str, documentation: str, typ: str, store: SeriesSource) -> StoreFamily:
    """A family of every series in a store, as it is now."""
    return StoreFamily(name, documentation, typ, store.label_names, store.rows())


class _Families:
    """A run of families handed to a prometheus_client encoder, which takes a collector."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Sequence[Metric]:
        return self._families


_scrapes_running = 0
_scrapes_lock = threading.Lock()
_gc_was_enabled = True


@contextmanager
def _without_cyclic_gc() -> Iterator[None]:
    """The cyclic garbage collector off while scrapes run. A large scrape makes a million
    short-lived containers (label tuples, rows, lines) that outlive the young generations and
    then set off a full collection of the whole heap (every stored series) in mid-scrape: 0.5 s
    of a 1M-flow scrape. Reference counting frees them at the end of the scrape anyway."""
    global _scrapes_running, _gc_was_enabled
    with _scrapes_lock:
        _scrapes_running += 1
        if _scrapes_running == 1:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
    try:
        yield
    finally:
        with _scrapes_lock:
            _scrapes_running -= 1
            if _scrapes_running == 0 and _gc_was_enabled:
                gc.enable()


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or nothing where there is none."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0) and None


_release_free_memory = _malloc_trim()


class _ThenReleaseMemory(list):
    """A response body whose close() (called by the server once it is sent) gives the pages of
    a large scrape's freed buffers (map reads, rows, text) back to the system: they sit in the
    allocator's arenas otherwise, one per thread, and every scrape runs in a thread of its own
    (100k flows: RSS 250 -> 196 MiB)."""

    def close(self) -> None:
        _release_free_memory()


def generate(registry: CollectorRegistry, accept_header: str | None) -> tuple[bytes, str]:
    """The exposition in the format the Accept header negotiates, and its content type."""
    with _without_cyclic_gc():
        return _generate(registry, accept_header)


def _generate(registry: CollectorRegistry, accept_header: str | None) -> tuple[bytes, str]:
    encoder, content_type = choose_encoder(accept_header or "")
    escaping = getattr(encoder, "keywords", {}).get("escaping", openmetrics.UNDERSCORES)
    if escaping not in _PLAIN_NAME_ESCAPINGS:   # names would change: the library does it all
        return encoder(registry), content_type
    is_openmetrics = content_type.startswith("application/openmetrics-text")

    def encode(families: Sequence[Metric]) -> bytes:
        text = encoder(_Families(families))
        return text[:-len(_OPENMETRICS_EOF)] if is_openmetrics else text

    parts: list[bytes] = []
    others: list[Metric] = []
    for metric in registry.collect():
        if not isinstance(metric, StoreFamily):
            others.append(metric)
            continue
        if others:
            parts.append(encode(others))
            others = []
        parts.append(encode([metric.header()]))
        parts.append(metric.lines().encode())
    if others:
        parts.append(encode(others))
    if is_openmetrics:
        parts.append(_OPENMETRICS_EOF)
    return b"".join(parts), content_type


def make_metrics_app(registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """prometheus_client's WSGI app, with GET of the whole exposition through generate()."""
    library = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "GET" or \
                "name[]" in parse_qs(environ.get("QUERY_STRING", "")):
            return library(environ, start_response)
        output, content_type = generate(registry, environ.get("HTTP_ACCEPT"))
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING") or ""):
            output = gzip.compress(output)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return _ThenReleaseMemory([output])

    return app
