"""Wires the exporter together: kernel environment, BPF programs, interfaces, collectors and
the HTTP endpoint; and takes them down again in reverse order."""

from __future__ import annotations

import platform
import socket
import threading
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from . import __version__, logs
from .collectors.base import PairCollector
from .collectors.bash import BashCollector
from .collectors.dns import DnsCollector
from .collectors.grpc import GrpcCollector
from .collectors.http import HttpCollector
from .config import Config, field_paths
from .decoding.http2source import Http2Source
from .errors import StartupError
from .kernel import environment, oncepercluster, privileges, singleton
from .kernel.compiler import CompiledProgram
from .kernel.interfaces import InterfaceMonitor, NameFilter
from .kernel.tlsprobes import TlsWatch
from .naming.dnsnames import QueryLabel
from .naming.endpoints import PortFolder, read_ephemeral_floor
from .naming.externalnames import ExternalNames, NameTable
from .naming.httpnames import GrpcMethodLabel, PathLabel
from .naming.labelsets import EndpointLabelSets
from .registry import REGISTRY, Wiring
from .serving.kubeauth import KubernetesAuth
from .serving.selfmetrics import ExporterCollector, KernelStats, SignalCollector
from .serving.server import WebServer, make_app
from .serving.webconfig import WebConfig

if TYPE_CHECKING:      # the kubernetes client is imported only when Kubernetes is on
    from .k8s.metadata import KubernetesMetadata

log = logs.get("main")


def _value(config: Config, path: str) -> Any:
    value: Any = config
    for name in path.split("."):
        value = getattr(value, name)
    return value


class Exporter:
    def __init__(self, config: Config, web_config: WebConfig | None = None) -> None:
        self.config = config
        self.web_config = web_config
        self.registry = CollectorRegistry()
        self.stats = KernelStats()
        self.programs: list[CompiledProgram] = []
        self.monitor: InterfaceMonitor | None = None
        # collectors that may sweep or poll in a thread of their own
        self.sweeping: list[PairCollector | BashCollector] = []
        self.web: WebServer | None = None
        self._claim: socket.socket | None = None
        self.kubernetes: KubernetesMetadata | None = None
        self.label_sets: EndpointLabelSets | None = None
        self.counting: oncepercluster.ClusterCounting | None = None
        self.tls: TlsWatch | None = None
        self.http2: list[Http2Source] = []       # h2c, and HTTP/2 inside TLS
        self.external: ExternalNames | None = None  # the dns_name label's DNS answers
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
        auth = self._scrape_auth()
        tls = web.tls if web else None
        if auth and tls is None:    # tokens never cross the network in clear
            # cryptography only here: importing it cost every other exporter 2.6 MiB of RSS
            from .serving import selfsigned

            tls = selfsigned.server_context(selfsigned.default_names(),
                                            [config.web.listen_address.rsplit(":", 1)[0]])
        app = make_app(self.registry, config.web.telemetry_path, self.ready, web, auth)
        self.web = WebServer(config.web.listen_address, app, tls)
        self.web.start()
        log.info("listening", extra={"address": config.web.listen_address,
                                     "path": config.web.telemetry_path,
                                     "scheme": "https" if tls else "http",
                                     "basic_auth": bool(web and web.users),
                                     "kubernetes_auth": bool(auth),
                                     "certificate": "configured" if web and web.tls else
                                     "made at start" if tls else "none"})

        floor = config.ports.ephemeral_floor or read_ephemeral_floor()
        ports = PortFolder(floor, config.ports.server)
        self.kubernetes = self._kubernetes()
        if config.labels.external_names:
            table = NameTable(config.maps.dns_name_capacity, config.dns.name_min_ttl,
                              config.dns.name_max_ttl)
            self.external = ExternalNames(table, config.labels.external_names, self.stats)
        labels = self.label_sets = EndpointLabelSets(config, self.kubernetes, self.external)
        # each collector asks for the programs it reads; they load the first time one asks
        wiring = Wiring(config, labels, ports, self.stats, self.kubernetes, self.external,
                        programs=self.programs, http2=self.http2)
        collectors: list[SignalCollector] = []
        try:
            for registration in REGISTRY:
                collector = registration.build(wiring) if registration.wanted(config) else None
                if collector is not None:
                    collectors.append(collector)
                    if registration.sweeps:
                        self.sweeping.append(collector)
        finally:
            wiring.finish()
        self.monitor, self.tls, self.counting = wiring.monitor, wiring.tls, wiring.counting
        reporters = wiring.reporters

        self.registry.register(ExporterCollector(
            collectors, self.stats, self._build_labels(wiring.bcc_version),
            self.attached_interfaces, reporters))
        self.registry.register(logs.LogFailuresCollector())
        if self.kubernetes:
            self.registry.register(self.kubernetes)
        if self.counting:
            self.registry.register(self.counting)
        if self.tls:
            self.registry.register(self.tls.metrics)
        if self.external:
            self.registry.register(self.external)
        for standard in (ProcessCollector, PlatformCollector, GCCollector):
            standard(registry=self.registry)

        if self.monitor:
            self.monitor.start()
        if self.tls:        # its thread keeps what attaching uprobes later needs
            self.tls.start()
        # programs loaded and attached: this thread, and the watches and sweepers it starts,
        # need nothing (the interface monitor's thread kept CAP_NET_ADMIN)
        dropped = privileges.keep_only(())
        if dropped:
            log.info("capabilities dropped", extra={"dropped": privileges.names(
                dropped & privileges.EXPORTER_CAPABILITIES), "kept_by_interface_monitor":
                "CAP_NET_ADMIN"})
        for source in self.http2:   # the rings are mapped: reading them needs nothing
            source.start()
        if self.external:
            self.external.start()
        # the watches start once the programs load: a start-up that fails on the kernel side
        # never loads the API server with a cluster-wide list
        if self.kubernetes:
            self.kubernetes.start()
        if self.counting:
            self.counting.start()
        for collector in self.sweeping:
            collector.start()
        self._ready.set()
        log.info("ready", extra={"collectors": ",".join(c.name for c in collectors),
                                 "ephemeral_floor": floor})

    def set_attached(self, on: bool, uprobes: bool = False) -> int:
        """Takes every program off the kernel's paths, or puts it back, keeping maps, counts
        and threads: the tcx links or clsact filters, the tracepoints and, with `uprobes`, the
        HTTPS probes (bash's readline probe stays). For benchmarks that compare a workload
        with and without the programs a second apart (benchmarks/switchable.py): the calling
        thread needs the capabilities to attach (CAP_BPF, CAP_PERFMON). Returns how many
        attachments changed."""
        changed = self.tls.set_probes_attached(on) if uprobes and self.tls else 0
        for program in self.programs:
            changed += program.set_tracepoints_attached(on)
        if self.monitor:
            changed += self.monitor.set_programs_linked(on)
        return changed

    def reload(self, new: Config) -> list[str]:
        """Applies a re-read configuration without touching the programs or the counts:
        interfaces to monitor, the DNS and HTTP label allowlists (when on before and after),
        the Kubernetes name allowlists and the log level. Returns the changed settings that
        need a restart."""
        old, applied = self.config, {"interfaces.include", "interfaces.exclude", "log.level"}
        if self.monitor and new.interfaces != old.interfaces:
            self.monitor.set_names(NameFilter(new.interfaces.include, new.interfaces.exclude))
        logs.set_level(new.log.level)
        if self.label_sets:
            applied |= self.label_sets.reload(new)
        if self.external and new.labels.external_names:
            self.external.set_patterns(new.labels.external_names)
            self.external.table.set_ttls(new.dns.name_min_ttl, new.dns.name_max_ttl)
            applied |= {"labels.external_names", "dns.name_min_ttl", "dns.name_max_ttl"}
        for collector in self.sweeping:
            if isinstance(collector, DnsCollector) and collector.query_label and \
                    new.dns.query_names:
                collector.query_label = QueryLabel(new.dns.query_names)
                applied.add("dns.query_names")
            if isinstance(collector, HttpCollector) and collector.path_label and new.http.paths:
                collector.path_label = PathLabel(new.http.paths, new.http.path_max_length)
                applied |= {"http.paths", "http.path_max_length"}
            if isinstance(collector, GrpcCollector) and collector.method_label and \
                    new.http.grpc_services:
                collector.method_label = GrpcMethodLabel(new.http.grpc_services)
                applied.add("http.grpc_services")
        changed = [path for path in field_paths() if _value(old, path) != _value(new, path)]
        self.config = new
        return [path for path in changed if path not in applied]

    def _scrape_auth(self) -> KubernetesAuth | None:
        """The API server's check of scrapers' tokens (web.kubernetes_auth), registered with
        its self-metrics; None when off."""
        from .k8s.connection import KubernetesConfigError, connect

        settings = self.config.web
        if not settings.kubernetes_auth:
            return None
        if self.web_config and self.web_config.users:
            raise StartupError("web.kubernetes_auth and the basic_auth_users of "
                               "--web.config.file both read the Authorization header: "
                               "choose one")
        try:
            api, source = connect(self.config.kubernetes.kubeconfig)
        except KubernetesConfigError as e:
            raise StartupError(f"web.kubernetes_auth: {e}") from e
        if api is None:
            raise StartupError(f"web.kubernetes_auth needs the API server, but there is "
                               f"{source}: run in a pod or give --kubeconfig")
        auth = KubernetesAuth(api, settings.telemetry_path, settings.kubernetes_auth_cache)
        self.registry.register(auth)
        log.info("scrapes checked by the API server", extra={
            "from": source, "cache_seconds": settings.kubernetes_auth_cache})
        return auth

    def _kubernetes(self) -> KubernetesMetadata | None:
        """Watches of the API server when there is one to reach; None (with a log line saying
        why) when Kubernetes labels are off."""
        from .k8s.connection import KubernetesConfigError, open_metadata

        settings = self.config.kubernetes
        try:
            metadata, source = open_metadata(settings)
        except KubernetesConfigError as e:
            raise StartupError(str(e)) from e
        if metadata is None:
            log.info(f"kubernetes labels off: {source}; ip labels on")
            return None
        log.info("kubernetes labels on", extra={"from": source,
                                                "node": settings.node_name or "unset"})
        return metadata

    def attached_interfaces(self) -> int:
        return len(self.monitor.attached) if self.monitor else 0

    @staticmethod
    def _build_labels(bcc_version: str) -> dict[str, str]:
        """bcc's version as the compiler process reported it (the exporter never imports
        bcc)."""
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
        if self.counting:
            self.counting.stop()
        if self.tls:
            self.tls.stop()
        for source in self.http2:
            source.stop()
        if self.external:
            self.external.stop()
        if self.monitor and self.monitor.stop():
            log.info("detached from every interface")
        for program in self.programs:
            program.close()
        if self._claim:
            self._claim.close()

