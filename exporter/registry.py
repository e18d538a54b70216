"""The collectors and the kernel programs they read, each declared once, in the manner of
node_exporter's registerCollector: a collector's name (its `collectors.<name>` setting and
`--collector.<name>` flag), when it is wanted, and how it is built. Exporter.start loops over
REGISTRY; a collector asks `Wiring` for the programs it reads, and each program is compiled,
loaded and hooked up the first time one asks for it (the classifier feeds flows, DNS and HTTP;
the HTTPS program feeds HTTP and gRPC).

Adding a collector: a module under collectors/, a `collectors.<name>` field in config.py (with
its flag in cli.py), and a Registration here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import logs
from .collectors import drops
from .collectors.bash import BashCollector, CommandLog, KernelBashSource
from .collectors.dns import DnsCollector, KernelDnsSource
from .collectors.flows import FlowsCollector, KernelFlowSource
from .collectors.grpc import GrpcCollector
from .collectors.http import HttpCollector, KernelHttpSource, SchemeSources
from .collectors.tcp import KernelTcpSource, TcpCollector
from .config import Config
from .decoding.http2source import GrpcCounts, Http2Source
from .errors import StartupError
from .kernel import classifier, jiffies, oncepercluster, sockfields, tlsprobes
from .kernel.clustermap import KernelClusterMap
from .kernel.compiler import CompiledProgram, Compiler
from .kernel.interfaces import InterfaceMonitor
from .kernel.loader import LoadError
from .kernel.programs import (
    PROCESS_TRACEPOINTS,
    TCP_TRACEPOINTS,
    TRACEFS_EVENTS,
    choose_attacher,
    missing_tracepoints,
    tcp_program_flags,
)
from .kernel.tlsprobes import TlsWatch
from .naming.dnsnames import QueryLabel
from .naming.endpoints import EndpointLabels, PortFolder
from .naming.externalnames import ExternalNames
from .naming.httpnames import GrpcMethodLabel, PathLabel
from .naming.labelsets import EndpointLabelSets
from .serving.selfmetrics import KernelStats, SignalCollector

if TYPE_CHECKING:      # the kubernetes client is imported only when Kubernetes is on
    from .k8s.metadata import KubernetesMetadata

log = logs.get("main")


@dataclass
class Wiring:
    """What collectors are built from, and what loading the programs made: the exporter
    starts, reports, registers and stops these."""
    config: Config
    labels: EndpointLabelSets
    ports: PortFolder
    stats: KernelStats
    kubernetes: KubernetesMetadata | None
    external: ExternalNames | None
    programs: list[CompiledProgram] = field(default_factory=list)
    monitor: InterfaceMonitor | None = None
    counting: oncepercluster.ClusterCounting | None = None
    tls: TlsWatch | None = None
    http2: list[Http2Source] = field(default_factory=list)    # h2c, and HTTP/2 inside TLS
    reporters: list[Callable[[KernelStats], None]] = field(default_factory=list)
    _loaded: dict[str, Any] = field(default_factory=dict)
    _once: bool | None = None
    _compiler: Compiler | None = None
    bcc_version: str = "unknown"        # as the compiler process reported it

    @property
    def series(self) -> tuple[KernelStats, int, float]:
        return (self.stats, self.config.series.max_per_metric, self.config.series.ttl)

    @property
    def flow_labels(self) -> EndpointLabels:
        """The flow metrics' label set, chosen when the classifier loads (its flags depend on
        whether the flows carry zones)."""
        self.classifier()
        return self._loaded["flow_labels"]

    def compile(self, name: str, source: str, cflags: list[str]) -> CompiledProgram:
        """Compiled and loaded by the compiler process, which start-up runs once, on the
        first program (exporter/kernel/compiler.py)."""
        if self._compiler is None:
            self._compiler = Compiler(self.config.log.level, self.config.log.format)
        program = self._compiler.compile(name, source, cflags)
        self.programs.append(program)
        return program

    def finish(self) -> None:
        """Ends the compiler process: every program is loaded and hooked up."""
        if self._compiler is not None:
            self.bcc_version = self._compiler.bcc_version
            self._compiler.close()
            self._compiler = None
        for program in self.programs:
            program.forget_btf()

    def once(self) -> bool:
        """Whether the classifier and the HTTPS program count once per cluster."""
        if self._once is None:
            self._once, why = oncepercluster.wanted(self.config, self.kubernetes)
            log.info(f"counting once per {'cluster' if self._once else 'node'}",
                     extra={"because": why})
        return self._once

    def classifier(self) -> CompiledProgram:
        """The TC classifier (flows, DNS, HTTP in clear, h2c), loaded and on its interfaces'
        monitor the first time a collector asks."""
        if "classifier" not in self._loaded:
            self._loaded["classifier"] = self._load_classifier()
        return self._loaded["classifier"]

    def https(self) -> TlsWatch | None:
        """The HTTPS program and the watch of its uprobes; None, with a warning, where the
        kernel cannot tie a TLS call to its socket."""
        if "https" not in self._loaded:
            self._loaded["https"] = self.tls = self._load_https()
        return self._loaded["https"]

    def _load_classifier(self) -> CompiledProgram:
        config = self.config
        once = self.once()
        flow_labels = self.labels.of("flows") if config.collectors.flows else None
        servers = flow_labels is not None and flow_labels.wants_server_zones
        self._loaded["flow_labels"] = flow_labels
        program = self.compile("classifier", "classifier.c",
                               classifier.cflags(config, once, servers))
        ingress, egress = classifier.load(program, config)
        if once:
            self._count_once(program)
        self.reporters.append(classifier.ClassifierCounters(program).report)
        if self.external:
            self.external.read_from(program)
            self.reporters.append(self.external.report)
        if classifier.http2_wanted(config):
            self.http2.append(self._http2_source(program, "http"))
        self.monitor = classifier.interface_monitor(
            program, config, choose_attacher(config.interfaces.attach, ingress.fd, egress.fd),
            self.counting)
        return program

    def _load_https(self) -> TlsWatch | None:
        missing = missing_tracepoints(tlsprobes.TRACEPOINTS)
        if missing:
            log.warning(f"no HTTPS: the kernel lacks tracepoints {', '.join(missing)} "
                        "(Linux >= 6.3); run with --no-collector.https to silence this")
            return None
        once = self.once()
        try:
            flags = tlsprobes.program_flags(self.config, once)
        except sockfields.SockFieldsError as e:
            log.warning("no HTTPS: cannot locate the socket fields a TLS call's endpoints are "
                        "read from; run with --no-collector.https to silence this",
                        extra={"error": str(e)})
            return None
        program = self.compile("https", "tls.c", flags)
        link_programs = tlsprobes.load(program)
        if once:
            self._count_once(program)
        watch = TlsWatch(program, link_programs, self.config.https.rescan_interval)
        self.reporters.append(watch.report)
        if self.config.http.http2:
            self.http2.append(self._http2_source(program, "https"))
        return watch

    def _count_once(self, program: CompiledProgram) -> None:
        """Applies the once-per-cluster rule to one more program: the first one's maps are
        the rule's, and the others mirror them."""
        if self.counting:
            self.counting.map.mirror_to(program)
        else:
            self.counting = oncepercluster.ClusterCounting(
                KernelClusterMap.of(program), self.config, self.kubernetes, self.stats)

    def _http2_source(self, program: CompiledProgram, scheme: str) -> Http2Source:
        config = self.config
        source = Http2Source(program, config.http.idle_timeout, config.http.http2_streams,
                             config.maps.http2_conn_capacity, paths=bool(config.http.paths),
                             grpc_methods=bool(config.http.grpc_services), scheme=scheme)
        self.reporters.append(source.report)
        return source


@dataclass(frozen=True)
class Registration:
    name: str
    wanted: Callable[[Config], bool]
    build: Callable[[Wiring], SignalCollector | None]
    sweeps: bool = False        # has a thread of its own (started after start-up, stopped first)


def _tcp(wiring: Wiring) -> SignalCollector:
    config = wiring.config
    missing = missing_tracepoints(TCP_TRACEPOINTS)
    if missing:
        raise StartupError(f"the kernel lacks tracepoints {', '.join(missing)}: "
                           "run with --no-collector.tcp")
    process = config.tcp.process_label
    missing = missing_tracepoints(PROCESS_TRACEPOINTS) if process else []
    if missing:
        raise StartupError(f"tcp.process_label needs tracepoints {', '.join(missing)} "
                           "(Linux >= 6.3): turn it off")
    flags = tcp_program_flags(config)
    tcp = wiring.compile("tcp", "tcp.c", flags)
    if sockfields.CLOSE_ONLY_FLAG in flags:
        log.info("RTT sampled at close only (tcp.rtt_sample_interval: off)")
    elif sockfields.ENABLED_FLAG in flags:
        try:
            sockfields.start_rtt_sampling(tcp, config.tcp.rtt_sample_interval)
        except jiffies.JiffiesError as e:
            log.warning("cannot measure the kernel's tick rate: RTT is sampled at close only",
                        extra={"error": str(e)})
    return TcpCollector(KernelTcpSource(tcp, process=process), wiring.labels.of("tcp"),
                        wiring.ports, *wiring.series, process_label=process)


def _drops(wiring: Wiring) -> SignalCollector:
    if not drops.tracepoint_has_reason(TRACEFS_EVENTS):
        raise StartupError("the kernel lacks the skb:kfree_skb tracepoint with a drop "
                           "reason (Linux >= 5.17): run with --no-collector.drops")
    reasons = drops.reason_names(TRACEFS_EVENTS)
    program = wiring.compile("drops", "drops.c",
                             drops.program_flags(wiring.config.maps.drop_capacity, reasons))
    return drops.DropsCollector(drops.KernelDropSource(program), wiring.labels.of("drops"),
                                wiring.ports, *wiring.series, reasons=reasons)


def _bash(wiring: Wiring) -> SignalCollector:
    binary = wiring.config.bash.binary
    program = wiring.compile("bash", "bash.c", [])
    try:
        program.attach_uretprobe(binary, "readline", "on_readline_return")
    except LoadError as e:
        raise StartupError(f"bash audit: cannot probe readline in {binary} (uprobes, "
                           f"and a bash with its symbols, are needed): {e}") from e
    return BashCollector(KernelBashSource(program), CommandLog(wiring.config.bash.log_file),
                         *wiring.series)


def _flows(wiring: Wiring) -> SignalCollector:
    labels = wiring.flow_labels
    return FlowsCollector(KernelFlowSource(wiring.classifier(), labels.wants_server_zones),
                          labels, wiring.ports, *wiring.series)


def _dns(wiring: Wiring) -> SignalCollector:
    config = wiring.config
    names = config.dns.query_names
    return DnsCollector(
        KernelDnsSource(wiring.classifier(), config.dns.timeout, query_names=bool(names)),
        wiring.labels.of("dns"), wiring.ports, *wiring.series,
        query_label=QueryLabel(names) if names else None)


def _http_wanted(config: Config) -> bool:
    return config.collectors.http or config.collectors.https


def _http(wiring: Wiring) -> SignalCollector | None:
    """HTTP/1.x in clear (the classifier) and inside TLS (the HTTPS program), and HTTP/2 of
    both, in one family told apart by `scheme` and `version`."""
    config = wiring.config
    sources: list[KernelHttpSource | Http2Source] = []
    if config.collectors.http:
        sources.append(KernelHttpSource(wiring.classifier(), config.http.idle_timeout,
                                        paths=bool(config.http.paths)))
    tls = wiring.https() if config.collectors.https else None
    if tls:
        sources.append(KernelHttpSource(tls.program, config.http.idle_timeout,
                                        paths=bool(config.http.paths), scheme="https"))
    sources += wiring.http2
    if not sources:
        return None
    paths = config.http.paths
    return HttpCollector(
        SchemeSources(sources), wiring.labels.of("http"), wiring.ports, *wiring.series,
        path_label=PathLabel(paths, config.http.path_max_length) if paths else None)


def _grpc(wiring: Wiring) -> SignalCollector | None:
    """gRPC calls, from the HTTP/2 records of the classifier (h2c) and of the HTTPS program;
    they carry the HTTP metrics' endpoint labels (labels.per_metric.http)."""
    config = wiring.config
    if classifier.wanted(config):
        wiring.classifier()
    if config.collectors.https:
        wiring.https()
    if not wiring.http2:
        return None
    services = wiring.config.http.grpc_services
    return GrpcCollector(GrpcCounts(wiring.http2), wiring.labels.of("http"), wiring.ports,
                         *wiring.series, GrpcMethodLabel(services) if services else None)


def _on(name: str) -> Callable[[Config], bool]:
    return lambda config: bool(getattr(config.collectors, name))


# in the order the programs are loaded and the collectors run at a scrape
REGISTRY = (
    Registration("tcp", _on("tcp"), _tcp),
    Registration("drops", _on("drops"), _drops),
    Registration("bash", _on("bash"), _bash, sweeps=True),
    Registration("flows", _on("flows"), _flows),
    Registration("dns", _on("dns"), _dns, sweeps=True),
    Registration("grpc", _http_wanted, _grpc, sweeps=True),
    Registration("http", _http_wanted, _http, sweeps=True),
)
