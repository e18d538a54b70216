"""Wires the exporter together: kernel environment, BPF programs, interfaces, collectors and
the HTTP endpoint; and takes them down again in reverse order."""

from __future__ import annotations

import platform
import threading
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from . import __version__, classifier, environment, logs
from .collectors.base import PairCollector
from .collectors.dns import DnsCollector, KernelDnsSource
from .collectors.flows import FlowsCollector, KernelFlowSource
from .collectors.http import HttpCollector, KernelHttpSource
from .collectors.tcp import KernelTcpSource, TcpCollector
from .config import Config
from .dnsnames import QueryLabel
from .endpoints import KUBERNETES_LABELS, EndpointLabels, PortFolder, read_ephemeral_floor
from .httpnames import PathLabel
from .interfaces import InterfaceMonitor, Link, NameFilter, TcAttacher
from .loader import Program
from .namepolicy import Globs, NamePolicy
from .selfmetrics import ExporterCollector, KernelStats, SignalCollector
from .server import WebServer, make_app

if TYPE_CHECKING:      # the kubernetes client is imported only when Kubernetes is on
    from .k8s.metadata import KubernetesMetadata

log = logs.get("main")

IFACE_ETHERNET = 1          # bpf/packet.h
TRACEFS_EVENTS = environment.TRACEFS / "events"
ADDRESS_LABELS = ("ip", "ip_type", "port")
KUBERNETES_DEFAULT_LABELS = ("namespace", "workload", "workload_kind", "service", "node",
                             "ip_type", "port")
TCP_TRACEPOINTS = ("sock/inet_sock_set_state", "tcp/tcp_retransmit_skb", "tcp/tcp_receive_reset",
                   "tcp/tcp_send_reset", "tcp/tcp_probe")


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


class EndpointLabelSets:
    """The endpoint labels of each metric family: labels.endpoint (or its auto choice), per
    family and side as labels.per_metric says, with the names folded by the allowlists."""

    def __init__(self, config: Config, kubernetes: KubernetesMetadata | None) -> None:
        settings = config.labels
        self.resolver = kubernetes
        self.policy = NamePolicy(Globs(settings.namespace_allow, settings.namespace_deny),
                                 Globs(settings.workload_allow, settings.workload_deny),
                                 Globs(settings.service_allow, settings.service_deny),
                                 settings.pod_namespaces)
        self.default = self._names(settings.endpoint)
        self.per_metric = settings.per_metric

    def _names(self, names: tuple[str, ...] | None) -> tuple[str, ...]:
        if names is None:
            if self.resolver is None:
                return ADDRESS_LABELS
            pods = ("pod",) if self.policy.pod_namespaces else ()
            return KUBERNETES_DEFAULT_LABELS + pods
        if self.resolver is None and set(names) & set(KUBERNETES_LABELS):
            dropped = sorted(set(names) & set(KUBERNETES_LABELS))
            log.warning("kubernetes labels off: endpoint labels left out",
                        extra={"labels": ",".join(dropped)})
            names = tuple(n for n in names if n not in KUBERNETES_LABELS)
        return names

    def of(self, family: str) -> EndpointLabels:
        sides = self.per_metric.get(family, {})
        src, dst = (self._names(sides[side]) if sides.get(side) is not None else self.default
                    for side in ("src", "dst"))
        return EndpointLabels(src, dst, self.resolver, self.policy)


def local_addresses() -> list[str]:
    """This host's own addresses (its network namespace's), but loopback."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        addresses = [msg.get_attr("IFA_ADDRESS") for msg in ipr.get_addr()]
    return [a for a in addresses if a and not a.startswith(("127.", "::1"))]


class Exporter:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        self.stats = KernelStats()
        self.programs: list[Program] = []
        self.monitor: InterfaceMonitor | None = None
        self.sweeping: list[PairCollector] = []   # collectors that may sweep in a thread
        self.web: WebServer | None = None
        self.kubernetes: KubernetesMetadata | None = None
        self._ready = threading.Event()

    def ready(self) -> bool:
        return self._ready.is_set()

    def start(self) -> None:
        config = self.config
        environment.prepare()
        # bind the port before compiling: a port in use fails in milliseconds
        app = make_app(self.registry, config.web.telemetry_path, self.ready)
        self.web = WebServer(config.web.listen_address, app)
        self.web.start()
        log.info("listening", extra={"address": config.web.listen_address,
                                     "path": config.web.telemetry_path})

        floor = config.ports.ephemeral_floor or read_ephemeral_floor()
        ports = PortFolder(floor, config.ports.server)
        self.kubernetes = self._kubernetes()
        labels = EndpointLabelSets(config, self.kubernetes)
        series = (self.stats, config.series.max_per_metric, config.series.ttl)
        collectors: list[SignalCollector] = []

        if config.collectors.tcp:
            missing = _missing_tracepoints(TCP_TRACEPOINTS)
            if missing:
                raise StartupError(f"the kernel lacks tracepoints {', '.join(missing)}: "
                                   "run with --no-collector.tcp")
            tcp = self._program("tcp", "tcp.c", tcp_program_flags(config))
            collectors.append(TcpCollector(KernelTcpSource(tcp), labels.of("tcp"), ports,
                                           *series))
        reporters = []
        if classifier.wanted(config):
            program = self._program("classifier", "classifier.c", classifier.cflags(config))
            ingress, egress = classifier.load(program, config)
            reporters.append(classifier.ClassifierCounters(program).report)
            if config.collectors.flows:
                collectors.append(FlowsCollector(KernelFlowSource(program), labels.of("flows"),
                                                 ports, *series))
            if config.collectors.dns:
                names = config.dns.query_names
                dns = DnsCollector(
                    KernelDnsSource(program, config.dns.timeout, query_names=bool(names)),
                    labels.of("dns"), ports, *series,
                    query_label=QueryLabel(names) if names else None)
                collectors.append(dns)
                self.sweeping.append(dns)
            if config.collectors.http:
                paths = config.http.paths
                http = HttpCollector(
                    KernelHttpSource(program, config.http.idle_timeout, paths=bool(paths)),
                    labels.of("http"), ports, *series,
                    path_label=PathLabel(paths, config.http.path_max_length) if paths else None)
                collectors.append(http)
                self.sweeping.append(http)
            self.monitor = self._monitor(program, ingress.fd, egress.fd)

        self.registry.register(ExporterCollector(
            collectors, self.stats, self._build_labels(), self.attached_interfaces, reporters))
        if self.kubernetes:
            self.registry.register(self.kubernetes)
        for standard in (ProcessCollector, PlatformCollector, GCCollector):
            standard(registry=self.registry)

        # the watches start once the programs load: a start-up that fails on the kernel side
        # never loads the API server with a cluster-wide list
        if self.kubernetes:
            self.kubernetes.start()
        if self.monitor:
            self.monitor.start()
        for collector in self.sweeping:
            collector.start()
        self._ready.set()
        log.info("ready", extra={"collectors": ",".join(c.name for c in collectors),
                                 "ephemeral_floor": floor})

    def _kubernetes(self) -> KubernetesMetadata | None:
        """Watches of the API server when there is one to reach; None (with a log line saying
        why) when Kubernetes labels are off."""
        from .k8s.connection import KubernetesConfigError, connect
        from .k8s.metadata import KubernetesMetadata

        settings = self.config.kubernetes
        if settings.enabled == "false":
            log.info("kubernetes labels off (kubernetes.enabled=false); ip labels on")
            return None
        try:
            api, source = connect(settings.kubeconfig)
        except KubernetesConfigError as e:
            raise StartupError(str(e)) from e
        if api is None:
            if settings.enabled == "true":
                raise StartupError(f"kubernetes.enabled is true but there is {source}: "
                                   "give --kubeconfig or run in a pod")
            log.info(f"kubernetes labels off: {source}; ip labels on")
            return None
        metadata = KubernetesMetadata(api, settings.deleted_pod_grace)
        if settings.node_name:
            metadata.state.set_local_node(settings.node_name, local_addresses())
        log.info("kubernetes labels on", extra={"from": source,
                                                "node": settings.node_name or "unset"})
        return metadata

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
        # no scrape may see the collectors half torn down (it would read as failing)
        if self.web:
            self.web.stop()
        if self.kubernetes:
            self.kubernetes.stop()
        for collector in self.sweeping:
            collector.stop()
        if self.monitor:
            self.monitor.stop()
            log.info("detached from every interface")
        for program in self.programs:
            program.close()

