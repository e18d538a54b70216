"""Runs the live view: its own copies of the classifier, the TCP program and the HTTPS program,
compiled with -DWITH_EVENTS so they send a ring-buffer record per completed DNS, HTTP or HTTPS
exchange and per closed TCP socket, and attached on their own (tcx links after the exporter's,
or clsact filters of their own: interfaces.attach, as for the exporter; uprobes of its own on
the same OpenSSL files).

Beside a running exporter: the exporter's programs and maps are untouched (these are other
programs with other maps), and the view's attachments never replace the exporter's (see
attach.py)."""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from typing import Any

from .. import logs
from ..collectors.dns import KernelDnsSource
from ..collectors.flows import KernelFlowSource
from ..collectors.http import KernelHttpSource
from ..collectors.tcp import KernelTcpSource
from ..config import Config
from ..decoding.http2 import RECORD, Http2Tracker
from ..kernel import classifier, environment, sockfields, tlsprobes
from ..kernel.cgroups import CgroupNames
from ..kernel.interfaces import InterfaceMonitor
from ..kernel.loader import Program
from ..kernel.programs import (
    PROCESS_TRACEPOINTS,
    TCP_TRACEPOINTS,
    choose_attacher,
    missing_tracepoints,
    tcp_program_flags,
)
from ..kernel.ringbuf import FixedRecordRing
from ..kernel.tlsprobes import TlsWatch
from ..naming.endpoints import PortFolder, address_text, read_ephemeral_floor
from .attach import LiveAttacher, LiveTcxAttacher
from .events import End, Exchange, TcpClose, decode
from .filters import LineFilter
from .flowtable import FlowTable
from .output import Formatter

log = logs.get("live")

TICK_SECONDS = 0.25         # flows are drained this often
POLL_MILLISECONDS = 50


def classifier_flags(config: Config) -> list[str]:
    return [*classifier.cflags(config), "-DWITH_EVENTS"]


class LiveView:
    def __init__(self, config: Config, line_filter: LineFilter, formatter: Formatter,
                 write: Callable[[str], None], idle_seconds: float,
                 interval_seconds: float) -> None:
        self.config = config
        self.filter = line_filter
        self.formatter = formatter
        self.write = write
        self.programs: list[Program] = []
        self.monitor: InterfaceMonitor | None = None
        floor = config.ports.ephemeral_floor or read_ephemeral_floor()
        self.table = FlowTable(PortFolder(floor, config.ports.server), idle_seconds,
                               interval_seconds)
        self._sources: list[Any] = []
        self._output_closed = False     # the reader went away (| head)
        self._flows: KernelFlowSource | None = None
        self._dns: KernelDnsSource | None = None
        self.tls: TlsWatch | None = None
        # HTTP/2 records: the classifier's (transport 0) and the HTTPS program's (1)
        self._h2: list[tuple[FixedRecordRing, Http2Tracker, int]] = []

    def start(self) -> None:
        environment.prepare()
        config = self.config
        packets = Program("live-classifier", "classifier.c", classifier_flags(config))
        self.programs.append(packets)
        ingress, egress = classifier.load(packets, config)
        self._flows = KernelFlowSource(packets)
        self._dns = KernelDnsSource(packets, config.dns.timeout, query_names=True)
        self._sources = [KernelHttpSource(packets, config.http.idle_timeout, paths=True)]
        packets.bpf[b"live_events"].open_ring_buffer(self._on_record)
        if classifier.http2_wanted(config):
            self._follow_http2(packets, 0)
        if not missing_tracepoints(TCP_TRACEPOINTS):
            # the process of each connection where the kernel gives it
            process = not missing_tracepoints(PROCESS_TRACEPOINTS)
            flags = [f for f in tcp_program_flags(config) if f != "-DWITH_PROCESS"]
            flags += ["-DWITH_EVENTS", *(["-DWITH_PROCESS"] if process else [])]
            tcp = Program("live-tcp", "tcp.c", flags)
            self.programs.append(tcp)
            self._sources.append(KernelTcpSource(tcp, process=process))
            if process:
                self.formatter.cgroups = CgroupNames()
            tcp.bpf[b"live_events"].open_ring_buffer(self._on_record)
        else:
            log.warning("no TCP tracepoints: flows show no RTT and end only when idle")
        self.tls = self._https()
        self.monitor = classifier.interface_monitor(packets, self.config, choose_attacher(
            config.interfaces.attach, ingress.fd, egress.fd, LiveTcxAttacher, LiveAttacher))
        self.monitor.start()
        if self.tls:
            self.tls.start()
        log.info("ready", extra={"interfaces": len(self.monitor.attached)})

    def _https(self) -> TlsWatch | None:
        """The HTTPS program and the watch of its uprobes; None, with a warning, where the
        kernel cannot tie a TLS call to its socket."""
        config = self.config
        if not config.collectors.https:
            return None
        missing = missing_tracepoints(tlsprobes.TRACEPOINTS)
        if missing:
            log.warning(f"no HTTPS: the kernel lacks tracepoints {', '.join(missing)}")
            return None
        try:
            flags = [*tlsprobes.program_flags(config, False), "-DWITH_EVENTS"]
        except sockfields.SockFieldsError as e:
            log.warning("no HTTPS: cannot locate the socket fields", extra={"error": str(e)})
            return None
        tls = Program("live-https", "tls.c", flags)
        self.programs.append(tls)
        link_programs = tlsprobes.load(tls)
        self._sources.append(KernelHttpSource(tls, config.http.idle_timeout, paths=True,
                                              scheme="https"))
        tls.bpf[b"live_events"].open_ring_buffer(self._on_record)
        if config.http.http2:
            self._follow_http2(tls, 1)
        return TlsWatch(tls, link_programs, config.https.rescan_interval)

    def _follow_http2(self, program: Program, transport: int) -> None:
        tracker = Http2Tracker(self.config.http.http2_streams,
                               int(self.config.http.idle_timeout * 1e9), paths=True,
                               grpc_methods=True)
        tracker.exchanges = []
        self._h2.append((FixedRecordRing.of(program, "h2_records", RECORD), tracker, transport))

    def _on_record(self, _ctx: Any, data: Any, size: int) -> None:
        # called from C: an exception here would be printed and dropped, so it is noted
        try:
            self._record(ctypes.string_at(data, size))
        except BrokenPipeError:
            self._output_closed = True

    def _record(self, raw: bytes) -> None:
        record = decode(raw)
        if isinstance(record, TcpClose):
            self.table.add_close(record, time.monotonic())
        elif isinstance(record, Exchange):
            self._exchange(record)

    def _http2(self) -> None:
        """HTTP/2 requests and gRPC calls completed since the last poll, as exchanges."""
        for ring, tracker, transport in self._h2:
            tracker.feed(ring.read())
            done, tracker.exchanges = tracker.exchanges or [], []
            for ex in done:
                family, client, client_port, server, server_port = ex.key
                try:
                    self._exchange(Exchange(
                        ex.kind, family, End(address_text(family, client), client_port),
                        End(address_text(family, server), server_port),
                        max(ex.latency_ns, 0) // 1000,
                        ex.status if isinstance(ex.status, int) else 0, ex.method, ex.path,
                        transport, status_name=ex.status if isinstance(ex.status, str) else ""))
                except BrokenPipeError:
                    self._output_closed = True
                    return

    def _exchange(self, exchange: Exchange) -> None:
        if self.filter.wants(exchange.kind, (exchange.client, exchange.server)):
            self.write(self.formatter.exchange(exchange, time.time()))

    def run(self, stop: threading.Event) -> None:
        next_tick = time.monotonic()
        while not stop.is_set():
            for program in self.programs:
                program.bpf.ring_buffer_poll(POLL_MILLISECONDS)
            self._http2()
            if self._output_closed:
                raise BrokenPipeError("the output was closed")
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_SECONDS
                self._tick(now)
        self._tick(time.monotonic())
        for line in self.table.flush(time.monotonic()):
            self._print_flow(line)

    def _tick(self, now: float) -> None:
        assert self._flows is not None and self._dns is not None
        batch = self._flows.drain()
        self.table.add_counts(batch.keys, batch.values, now)
        for timeout in self._dns.drain().timeouts:
            family = timeout.family
            self._exchange(Exchange(
                "dns", family, End(address_text(family, timeout.client), 0),
                End(address_text(family, timeout.server), timeout.server_port), 0, 0,
                timeout.qtype, timeout.name, timeout.transport, timed_out=True))
        for source in self._sources:
            source.drain()      # keeps the counter maps this view does not use empty
        for line in self.table.due(now):
            self._print_flow(line)

    def _print_flow(self, line: Any) -> None:
        kind = self.filter.flow_kind(line.flow.protocol)
        if self.filter.wants(kind, (line.src, line.dst)):
            self.write(self.formatter.flow(line, time.time()))

    def stop(self) -> None:
        if self.monitor:
            self.monitor.stop()
        if self.tls:
            self.tls.stop()
        for program in self.programs:
            program.close()
        if self.formatter.cgroups is not None:
            self.formatter.cgroups.close()
