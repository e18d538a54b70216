"""A program's HTTP/2 records (the classifier's, the HTTPS program's), read from their ring
buffer by a thread of their own and followed by an Http2Tracker; the HTTP and gRPC
collectors drain the counts at scrape time."""

from __future__ import annotations

import threading
import time

import numpy as np

from ..collectors.http import HTTP_KEY, HTTP_KEY_PATHS, HttpBatch
from ..kernel.ringbuf import FixedRecordRing, PollThread
from ..serving.selfmetrics import KernelStats
from .http2 import RECORD, GrpcKey, Http2Tracker

# The kernel writes records without waking anyone (BPF_RB_NO_WAKEUP); the ring is read on this
# period. At 20,000 gRPC calls a second some 60,000 to 80,000 records (12 to 16 MB) a second
# arrive: the ring (maps.http2_ring_mib, 4 MiB) holds some 0.3 s of them.
POLL_SECONDS = 0.05
SWEEP_SECONDS = 5.0


class Http2Source:
    """The HTTP/2 records of one program: the classifier's (scheme "http", h2c) or the HTTPS
    program's ("https", HTTP/2 inside TLS)."""

    def __init__(self, program: object, idle_seconds: float, max_streams: int,
                 conn_capacity: int, paths: bool = False, grpc_methods: bool = False,
                 scheme: str = "http") -> None:
        self.scheme = scheme
        # its maps' name in the self-metrics
        self.name = "http2" if scheme == "http" else f"{scheme}_http2"
        self.ring = FixedRecordRing.of(program, "h2_records", RECORD)
        self.tracker = Http2Tracker(max_streams, int(idle_seconds * 1e9), paths, grpc_methods)
        self.paths = paths
        self.conn_capacity = conn_capacity
        self._lock = threading.Lock()
        self._reader = PollThread(f"{self.name}-records", "HTTP/2 records", self.poll,
                                  POLL_SECONDS)
        self._last_sweep = time.monotonic()

    def start(self) -> None:
        self._reader.start()

    def stop(self) -> None:
        self._reader.stop()
        self.ring.close()

    def poll(self) -> None:
        """Reads and follows every record the kernel committed, and sweeps idle connections."""
        records = self.ring.read()
        with self._lock:
            if len(records):
                self.tracker.feed(records)
            if time.monotonic() - self._last_sweep >= SWEEP_SECONDS:
                self._last_sweep = time.monotonic()
                self.tracker.sweep(time.monotonic_ns())

    def sweep(self) -> None:
        """The HTTP collector's sweep: idle connections go in poll()."""

    def drain(self) -> HttpBatch:
        """The HTTP counts since the last drain, in the shape of the kernel's."""
        with self._lock:
            http = self.tracker.take_http()
            conns = len(self.tracker.conns)
        dtype = HTTP_KEY_PATHS if self.paths else HTTP_KEY
        keys = np.zeros(len(http), dtype=dtype)
        counts = np.zeros(len(http), dtype=np.uint64)
        for row, (key, value) in enumerate(http.items()):
            family, client, server, port, kind, method, status, variant, path = key
            keys[row]["family"], keys[row]["server_port"] = family, port
            keys[row]["client"] = np.frombuffer(client, dtype=np.uint8)
            keys[row]["server"] = np.frombuffer(server, dtype=np.uint8)
            keys[row]["kind"], keys[row]["method"] = kind, method
            keys[row]["status"], keys[row]["variant"] = status, variant
            if self.paths and path:
                keys[row]["path"][:len(path)] = np.frombuffer(path, dtype=np.uint8)
            counts[row] = value
        return HttpBatch(keys, counts, conns=conns, conn_capacity=self.conn_capacity,
                         scheme=self.scheme, name=self.name)

    def drain_grpc(self) -> dict[GrpcKey, int]:
        """The gRPC counts since the last call."""
        with self._lock:
            return self.tracker.take_grpc()

    def report(self, stats: KernelStats) -> None:
        with self._lock:
            errors = self.tracker.take_parse_errors()
        stats.add_parse_errors("http2", float(errors))
        # the ring: records waiting at its last read, of the records it holds
        stats.record_map(f"{self.name}_records", self.ring.pending, self.ring.capacity)


class GrpcCounts:
    """The gRPC side of the Http2Sources (h2c, and HTTP/2 inside TLS), as the gRPC
    collector's source."""

    def __init__(self, sources: list[Http2Source]) -> None:
        self.sources = sources

    def drain(self) -> dict[GrpcKey, int]:
        counts: dict[GrpcKey, int] = {}
        for source in self.sources:
            for key, value in source.drain_grpc().items():
                counts[key] = counts.get(key, 0) + value
        return counts
