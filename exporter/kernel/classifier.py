"""The TC classifier program (bpf/classifier.c): which parts it is compiled with, and the
counters it keeps for every part (parse errors, failed map updates)."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

from ..collectors.flows import HANDSHAKE_SHIFT
from ..config import Config
from ..serving.selfmetrics import KernelStats
from . import oncepercluster
from .iface_slots import InterfaceSlots
from .interfaces import Attacher, InterfaceMonitor, Link, NameFilter
from .loader import LoadedProgram, index_flags
from .maps import CounterArray
from .oncepercluster import ClusterCounting
from .rtnetlink import RtNetlink

# the slots of map_update_failures (C name, the map's name in the self-metrics), of
# parse_errors and of the parsers tail-call array in bpf/classifier.c, given to it as -D flags
FAILURES = (("FLOWS", "flows"), ("DNS_EVENTS", "dns_events"), ("DNS_PENDING", "dns_pending"),
            ("HTTP_EVENTS", "http_events"), ("HTTP_CONNS", "http_conns"),
            ("H2_RECORDS", "http2_records"), ("DNS_ANSWERS", "dns_answers"))
FAILURE_MAPS = [label for _, label in FAILURES]
PARSE_ERROR_PROTOCOLS = ["ip", "dns", "http", "http2"]
PARSERS = {name: index for index, name in enumerate(("dns", "http", "http2"))}


def constant_flags() -> list[str]:
    """The indexes above, and the flow value's handshake bits, as bpf/classifier.c takes them."""
    return [*index_flags("FAILURE", [name for name, _ in FAILURES]),
            *index_flags("PARSE_ERROR", [p.upper() for p in PARSE_ERROR_PROTOCOLS]),
            *index_flags("PARSER", [p.upper() for p in PARSERS]),
            f"-DFLOW_HANDSHAKE_SHIFT={HANDSHAKE_SHIFT}"]


def cflags(config: Config, once_per_cluster: bool = False,
           answering_servers: bool = False) -> list[str]:
    """answering_servers: remember the server that answered each SYN (the flow metrics carry
    dst_zone)."""
    flags = [*(oncepercluster.cflags(config) if once_per_cluster else []),
             f"-DFLOW_CAPACITY={config.maps.flow_capacity}",
             f"-DDNS_PENDING_CAPACITY={config.maps.dns_pending_capacity}",
             f"-DDNS_EVENT_CAPACITY={config.maps.dns_event_capacity}", *constant_flags()]
    if config.collectors.flows:
        flags.append("-DWITH_FLOWS")
        if answering_servers:
            flags.append("-DWITH_ANSWERING_SERVERS")
    if config.collectors.dns:
        ports = "||".join(f"(p)=={port}" for port in config.dns.ports)
        flags += ["-DWITH_DNS", f"-DDNS_PORT(p)=({ports})"]
        if config.dns.query_names:
            flags.append("-DDNS_QUERY_NAMES")
        if config.labels.external_names:
            flags += ["-DDNS_ANSWERS",
                      f"-DDNS_ANSWER_PAGES={config.maps.dns_answer_ring_mib * 256}"]
    if config.collectors.http:
        flags += ["-DWITH_HTTP", f"-DHTTP_CONN_CAPACITY={config.maps.http_conn_capacity}",
                  f"-DHTTP_EVENT_CAPACITY={config.maps.http_event_capacity}"]
        if config.http.paths:
            flags.append("-DHTTP_PATHS")
        if config.http.http2:
            flags += ["-DWITH_HTTP2",
                      f"-DH2_DIR_CAPACITY={2 * config.maps.http2_conn_capacity}",
                      f"-DH2_RING_PAGES={config.maps.http2_ring_mib * 256}"]
        if config.http.ports:
            ports = "||".join(f"(p)=={port}" for port in config.http.ports)
            flags.append(f"-DHTTP_PORT(p)=({ports})")
    return flags


def wanted(config: Config) -> bool:
    return config.collectors.flows or config.collectors.dns or config.collectors.http


def parser_wanted(config: Config, name: str) -> bool:
    if name == "http2":
        return http2_wanted(config)
    return bool(getattr(config.collectors, name))


def http2_wanted(config: Config) -> bool:
    return config.collectors.http and config.http.http2


def load(program: LoadedProgram, config: Config) -> tuple[Any, Any]:
    """Loads the TC entry points and the protocol parsers they tail-call; returns the
    ingress and egress functions."""
    ingress = program.load_tc("classify_ingress")
    egress = program.load_tc("classify_egress")
    parsers = program.table("parsers")
    for name, index in PARSERS.items():
        if parser_wanted(config, name):
            parser = program.load_tc(f"parse_{name}")
            parsers[ctypes.c_int(index)] = ctypes.c_int(parser.fd)
    return ingress, egress


class ClassifierCounters:
    """Reads the classifier's failure and parse-error arrays into the exporter's stats."""

    def __init__(self, program: LoadedProgram) -> None:
        self._failures = CounterArray("map_update_failures", program.table("map_update_failures"))
        self._parse_errors = CounterArray("parse_errors", program.table("parse_errors"))
        self._lock = threading.Lock()

    def report(self, stats: KernelStats) -> None:
        with self._lock:
            failures = self._failures.read_deltas()
            parse_errors = self._parse_errors.read_deltas()
        for index, name in enumerate(FAILURE_MAPS):
            stats.add_failures(name, float(failures[index]))
        for index, protocol in enumerate(PARSE_ERROR_PROTOCOLS):
            stats.add_parse_errors(protocol, float(parse_errors[index]))


IFACE_ETHERNET = 1          # bpf/packet.h


class _KernelInterfaceMaps:
    """The classifier's iface_slots array and monitored_ifaces hash, written by InterfaceSlots."""

    def __init__(self, program: LoadedProgram) -> None:
        self.slots = program.table("iface_slots")
        self.overflow = program.table("monitored_ifaces")

    def write_slot(self, slot: int, ifindex: int, flags: int, collided: bool) -> None:
        self.slots[self.slots.Key(slot)] = self.slots.Leaf(ifindex, flags, int(collided))

    def put_overflow(self, ifindex: int, flags: int) -> None:
        self.overflow[self.overflow.Key(ifindex)] = self.overflow.Leaf(flags)

    def delete_overflow(self, ifindex: int) -> None:
        try:
            del self.overflow[self.overflow.Key(ifindex)]
        except KeyError:
            pass


def interface_monitor(program: LoadedProgram, config: Config,
                      make_attacher: Callable[[], Attacher],
                      counting: ClusterCounting | None = None) -> InterfaceMonitor:
    """A monitor of the configured interfaces that tells `program` (its iface_slots and
    monitored_ifaces maps) about each interface before attaching it, and forgets it after
    detaching. With once-per-cluster `counting`, each interface's flags also say whether it
    faces the network, re-read from the routes before every reconcile."""
    maps = _KernelInterfaceMaps(program)
    placement = InterfaceSlots(maps.slots.max_entries, maps)
    lock = threading.Lock()

    def flags_of(link: Link) -> int:
        flags = IFACE_ETHERNET if link.ethernet else 0
        return flags | (counting.flags(link.index) if counting else 0)

    def on_attach(link: Link) -> None:
        with lock:
            placement.add(link.index, flags_of(link))

    def on_detach(link: Link) -> None:
        with lock:
            placement.remove(link.index)

    routes: list[RtNetlink] = []    # opened in the monitor's thread, the only one to use it

    def before_reconcile(attached: dict[int, Link]) -> None:
        assert counting is not None
        if not routes:
            routes.append(RtNetlink())
        for index in counting.refresh_routes(routes[0], attached):
            with lock:
                placement.add(index, flags_of(attached[index]))

    names = NameFilter(config.interfaces.include, config.interfaces.exclude)
    monitor = InterfaceMonitor(names, make_attacher, on_attach, on_detach,
                               before_reconcile if counting else None)
    if counting:
        counting.on_probes_changed = monitor.poke
        counting.attached = lambda: list(monitor.attached)
    return monitor
