"""Wires the exporter together: kernel environment, BPF programs, interfaces, collectors and
the HTTP endpoint; and takes them down again in reverse order."""

from __future__ import annotations

import platform
import socket
import threading
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from . import __version__, classifier, environment, logs, privileges, singleton
from .collectors.base import PairCollector
from .collectors.dns import DnsCollector, KernelDnsSource
from .collectors.flows import FlowsCollector, KernelFlowSource
from .collectors.http import HttpCollector, KernelHttpSource
from .collectors.tcp import KernelTcpSource, TcpCollector
from .config import Config, field_paths
from .dnsnames import QueryLabel
from .endpoints import EndpointLabels, PortFolder, read_ephemeral_floor
from .httpnames import PathLabel
from .interfaces import InterfaceMonitor, Link, NameFilter, TcAttacher
from .loader import Program
from .selfmetrics import ExporterCollector, KernelStats, SignalCollector
from .server import WebServer, make_app
from .webconfig import WebConfig

log = logs.get("main")

IFACE_ETHERNET = 1          # bpf/packet.h
TRACEFS_EVENTS = environment.TRACEFS / "events"
TCP_TRACEPOINTS = ("sock/inet_sock_set_state", "tcp/tcp_retransmit_skb", "tcp/tcp_receive_reset",
                   "tcp/tcp_send_reset", "tcp/tcp_probe")


def _value(config: Config, path: str) -> Any:
    value: Any = config
    for name in path.split("."):
        value = getattr(value, name)
    return value


class StartupError(Exception):
    """The exporter cannot start; the message is the one line the user sees."""


def _missing_tracepoints(names: tuple[str, ...]) -> list[str]:
    return [name for name in names if not (TRACEFS_EVENTS / name / "format").is_file()]


def tcp_program_flags(config: Config) -> list[str]:
    flags = [f"-DEVENT_CAPACITY={config.maps.tcp_event_capacity}",
             f"-DSOCKET_CAPACITY={config.maps.tcp_socket_capacity}",
             f"-DRTT_SAMPLE_INTERVAL_NS={int(config.tcp.rtt_sample_interval * 1e9)}ULL"]
    # kernels >= 6.10 give tcp_send_reset's addresses as sockaddrs of 28 bytes
    reset_format = TRACEFS_EVENTS / "tcp/tcp_send_reset/format"
    if "saddr[28]" in reset_format.read_text():
        flags.append("-DTCP_SEND_RESET_SOCKADDR")
    return flags


class Exporter:
    def __init__(self, config: Config, web_config: WebConfig | None = None) -> None:
        self.config = config
        self.web_config = web_config
        self.registry = CollectorRegistry()
        self.stats = KernelStats()
        self.programs: list[Program] = []
        self.monitor: InterfaceMonitor | None = None
        self.sweeping: list[PairCollector] = []   # collectors that may sweep in a thread
        self.web: WebServer | None = None
        self._claim: socket.socket | None = None
        self._ready = threading.Event()

    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        config = self.config
        environment.prepare()
        try:
            self._claim = singleton.claim_netns()
        except singleton.AlreadyRunning as e:
            raise StartupError(str(e)) from None
        # bind the port before compiling: a port in use fails in milliseconds
        web = self.web_config
        app = make_app(self.registry, config.web.telemetry_path, self.ready, web)
        self.web = WebServer(config.web.listen_address, app, web.tls if web else None)
        self.web.start()
        log.info("listening", extra={"address": config.web.listen_address,
                                     "path": config.web.telemetry_path,
                                     "scheme": web.scheme if web else "http",
                                     "basic_auth": bool(web and web.users)})

        floor = config.ports.ephemeral_floor or read_ephemeral_floor()
        ports = PortFolder(floor, config.ports.server)
        endpoints = EndpointLabels(config.labels.endpoint)
        series = (self.stats, config.series.max_per_metric, config.series.ttl)
        collectors: list[SignalCollector] = []

        if config.collectors.tcp:
            missing = _missing_tracepoints(TCP_TRACEPOINTS)
            if missing:
                raise StartupError(f"the kernel lacks tracepoints {', '.join(missing)}: "
                                   "run with --no-collector.tcp")
            tcp = self._program("tcp", "tcp.c", tcp_program_flags(config))
            collectors.append(TcpCollector(KernelTcpSource(tcp), endpoints, ports, *series))
        reporters = []
        if classifier.wanted(config):
            program = self._program("classifier", "classifier.c", classifier.cflags(config))
            ingress, egress = classifier.load(program, config)
            reporters.append(classifier.ClassifierCounters(program).report)
            if config.collectors.flows:
                collectors.append(FlowsCollector(KernelFlowSource(program), endpoints, ports,
                                                 *series))
            if config.collectors.dns:
                names = config.dns.query_names
                dns = DnsCollector(
                    KernelDnsSource(program, config.dns.timeout, query_names=bool(names)),
                    endpoints, ports, *series, query_label=QueryLabel(names) if names else None)
                collectors.append(dns)
                self.sweeping.append(dns)
            if config.collectors.http:
                paths = config.http.paths
                http = HttpCollector(
                    KernelHttpSource(program, config.http.idle_timeout, paths=bool(paths)),
                    endpoints, ports, *series,
                    path_label=PathLabel(paths, config.http.path_max_length) if paths else None)
                collectors.append(http)
                self.sweeping.append(http)
            self.monitor = self._monitor(program, ingress.fd, egress.fd)

        self.registry.register(ExporterCollector(
            collectors, self.stats, self._build_labels(), self.attached_interfaces, reporters))
        self.registry.register(logs.LogFailuresCollector())
        for standard in (ProcessCollector, PlatformCollector, GCCollector):
            standard(registry=self.registry)

        if self.monitor:
            self.monitor.start()
        # programs loaded and attached: this thread, and the sweepers it starts, need nothing
        dropped = privileges.keep_only(())
        if dropped:
            log.info("capabilities dropped", extra={"dropped": privileges.names(
                dropped & privileges.EXPORTER_CAPABILITIES), "kept_by_interface_monitor":
                "CAP_NET_ADMIN"})
        for collector in self.sweeping:
            collector.start()
        self._ready.set()
        log.info("ready", extra={"collectors": ",".join(c.name for c in collectors),
                                 "ephemeral_floor": floor})

    def reload(self, new: Config) -> list[str]:
        """Applies a re-read configuration without touching the programs or the counts:
        interfaces to monitor, the DNS and HTTP label allowlists (when on before and after)
        and the log level. Returns the changed settings that need a restart."""
        old, applied = self.config, {"interfaces.include", "interfaces.exclude", "log.level"}
        if self.monitor and new.interfaces != old.interfaces:
            self.monitor.set_names(NameFilter(new.interfaces.include, new.interfaces.exclude))
        logs.set_level(new.log.level)
        for collector in self.sweeping:
            if isinstance(collector, DnsCollector) and collector.query_label and \
                    new.dns.query_names:
                collector.query_label = QueryLabel(new.dns.query_names)
                applied.add("dns.query_names")
            if isinstance(collector, HttpCollector) and collector.path_label and new.http.paths:
                collector.path_label = PathLabel(new.http.paths, new.http.path_max_length)
                applied |= {"http.paths", "http.path_max_length"}
        changed = [path for path in field_paths() if _value(old, path) != _value(new, path)]
        self.config = new
        return [path for path in changed if path not in applied]

    def _program(self, name: str, source: str, cflags: list[str]) -> Program:
        program = Program(name, source, cflags)
        self.programs.append(program)
        return program

    def _monitor(self, classifier: Program, ingress_fd: int, egress_fd: int) -> InterfaceMonitor:
        interfaces = classifier.table("monitored_ifaces")

        def on_attach(link: Link) -> None:
            interfaces[interfaces.Key(link.index)] = interfaces.Leaf(
                IFACE_ETHERNET if link.ethernet else 0)

        def on_detach(link: Link) -> None:
            try:
                del interfaces[interfaces.Key(link.index)]
            except KeyError:
                pass

        names = NameFilter(self.config.interfaces.include, self.config.interfaces.exclude)
        return InterfaceMonitor(names, lambda: TcAttacher(ingress_fd, egress_fd), on_attach,
                                on_detach)

    def attached_interfaces(self) -> int:
        return len(self.monitor.attached) if self.monitor else 0

    @staticmethod
    def _build_labels() -> dict[str, str]:
        try:
            import bcc

            bcc_version = str(getattr(bcc, "__version__", "unknown"))
        except ImportError:
            bcc_version = "unknown"
        return {"version": __version__, "bcc_version": bcc_version, "kernel": platform.release()}

    def stop(self) -> None:
        self._ready.clear()
        for collector in self.sweeping:
            collector.stop()
        if self.monitor:
            self.monitor.stop()
            log.info("detached from every interface")
        for program in self.programs:
            program.close()
        if self.web:
            self.web.stop()
        if self._claim:
            self._claim.close()

