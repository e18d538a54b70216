"""gRPC metrics: calls by grpc_status and the whole call's latency (request HEADERS to the
trailers), from the HTTP/2 streams whose request's content-type is application/grpc
(exporter/decoding/http2.py). src is the client; dst is the server, with its port."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from ..decoding.http2 import LATENCY, REQUEST, GrpcKey
from ..naming.endpoints import EndpointLabels, PortFolder
from ..naming.httpnames import GrpcMethodLabel
from ..serving import histogram
from ..serving.cardinality import SeriesStore
from ..serving.exposition import StoreFamily, store_family
from ..serving.selfmetrics import KernelStats
from .base import PairCollector


class GrpcCollector(PairCollector):
    name = "grpc"

    def __init__(self, source: object, endpoints: EndpointLabels, ports: PortFolder,
                 stats: KernelStats, max_series: int, ttl_seconds: float,
                 method_label: GrpcMethodLabel | None = None) -> None:
        super().__init__(source, endpoints, ports, stats, max_series, ttl_seconds)
        self.method_label = method_label
        extra = ["grpc_status", *(["grpc_method"] if method_label else [])]
        self._calls = self.store("ebpf_net_grpc_requests_total", extra)
        self._duration = self.store("ebpf_net_grpc_request_duration_seconds", extra,
                                    width=histogram.WIDTH)

    def stores(self) -> Sequence[SeriesStore]:
        return (self._calls, self._duration)

    def _fold(self, counts: dict[GrpcKey, int]) -> None:
        calls: defaultdict[tuple[str, ...], float] = defaultdict(float)
        duration: defaultdict[tuple[str, ...], list[float]] = defaultdict(
            lambda: [0.0] * histogram.WIDTH)
        for (family, client, server, port, kind, status, variant, path), value in \
                counts.items():
            labels = (*self._pair(family, client, server, port), status,
                      *((self.method_label(path),) if self.method_label else ()))
            if kind == REQUEST:
                calls[labels] += value
            elif kind == LATENCY:
                index = histogram.index_of(variant)
                if index is not None:
                    duration[labels][index] += value
        for labels, value in calls.items():
            self._calls.add(labels, (value,))
        for labels, slots in duration.items():
            self._duration.add(labels, slots)

    def _families(self) -> list[StoreFamily]:
        calls = store_family(
            "ebpf_net_grpc_requests", "gRPC calls (HTTP/2 requests with content-type "
            "application/grpc) by grpc_status: the code's name from the grpc-status trailer; "
            "none: the call ended without one (reset, connection closed); unparsed: its headers "
            "could not be decoded; untracked: past the streams followed per connection.",
            "counter", self._calls)
        duration = store_family(
            "ebpf_net_grpc_request_duration_seconds", "Time from a gRPC call's request "
            "HEADERS to its trailers (the whole call), stamped in the kernel.", "histogram",
            self._duration)
        return [calls, duration]
