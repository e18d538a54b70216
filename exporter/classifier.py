"""The TC classifier program (bpf/classifier.c): which parts it is compiled with, and the
counters it keeps for every part (parse errors, failed map updates)."""

from __future__ import annotations

import threading

from .config import Config
from .loader import Program
from .maps import CounterArray
from .selfmetrics import KernelStats

# indexes of map_update_failures and parse_errors in bpf/classifier.c
FAILURE_MAPS = ["flows", "dns_events", "dns_pending"]
PARSE_ERROR_PROTOCOLS = ["ip", "dns"]


def cflags(config: Config) -> list[str]:
    flags = [f"-DFLOW_CAPACITY={config.maps.flow_capacity}",
             f"-DDNS_PENDING_CAPACITY={config.maps.dns_pending_capacity}",
             f"-DDNS_EVENT_CAPACITY={config.maps.dns_event_capacity}"]
    if config.collectors.flows:
        flags.append("-DWITH_FLOWS")
    if config.collectors.dns:
        ports = "||".join(f"(p)=={port}" for port in config.dns.ports)
        flags += ["-DWITH_DNS", f"-DDNS_PORT(p)=({ports})"]
        if config.dns.query_names:
            flags.append("-DDNS_QUERY_NAMES")
    return flags


def wanted(config: Config) -> bool:
    return config.collectors.flows or config.collectors.dns


class ClassifierCounters:
    """Reads the classifier's failure and parse-error arrays into the exporter's stats."""

    def __init__(self, program: Program) -> None:
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
