"""The HTTPS program's uprobes (bpf/tls.c), attached once per file with OpenSSL that this
node's processes map (exporter/kernel/tlslibs.py), and detached when no process maps it any more.

A uprobe sits on the file, not on a process: every process that maps the file, already
running or started later, runs it. So only a file not seen before needs a scan to find it.
The program counts exec() calls (sched:sched_process_exec); a scan of the processes started
since the last one runs at most `NEW_PROCESS_SECONDS` after an exec, and a full scan every
`https.rescan_interval` finds libraries loaded later (dlopen) and files no longer mapped."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from .. import logs
from ..config import Config
from ..serving.selfmetrics import KernelStats
from . import bpfsys, elfsymbols, oncepercluster, perfevents, privileges, sockfields
from .loader import LoadedProgram, index_flags
from .maps import CounterArray
from .tlslibs import FileId, FileScan, MappedFile

log = logs.get("https")

NEW_PROCESS_SECONDS = 0.25
# where a call's socket is seen (Linux >= 6.3), when to look for new files, and threads' ends
TRACEPOINTS = ("sock/sock_send_length", "sock/sock_recv_length", "sched/sched_process_exec",
               "sched/sched_process_exit")
# what the scanning thread keeps: reading other processes' maps and files (ptrace access,
# file permissions) and attaching uprobes (perf events, BPF)
SCAN_CAPABILITIES = (privileges.CAP_SYS_PTRACE, privileges.CAP_DAC_READ_SEARCH,
                     privileges.CAP_PERFMON, privileges.CAP_BPF, privileges.CAP_SYS_ADMIN)
# (symbol, entry function, return function or None, required)
PROBES = (
    ("SSL_write", "ssl_write_entry", "ssl_write_return", True),
    ("SSL_read", "ssl_read_entry", "ssl_read_return", True),
    ("SSL_write_ex", "ssl_write_ex_entry", "ssl_write_ex_return", False),
    ("SSL_read_ex", "ssl_read_ex_entry", "ssl_read_ex_return", False),
    ("SSL_do_handshake", "ssl_handshake_entry", "ssl_handshake_return", False),
    ("SSL_connect", "ssl_handshake_entry", "ssl_handshake_return", False),
    ("SSL_accept", "ssl_handshake_entry", "ssl_handshake_return", False),
    ("SSL_free", "ssl_free_entry", None, False),
)
# the slots of map_update_failures (C name, the map's name in the self-metrics) and of
# parse_errors (C name, the protocol label) in bpf/tls.c, given to it as -D flags
FAILURES = (("HTTP_EVENTS", "https_events"), ("HTTP_CONNS", "https_conns"),
            ("TLS_CALLS", "tls_calls"), ("H2_RECORDS", "https_http2_records"))
FAILURE_MAPS = [label for _, label in FAILURES]
PARSE_ERRORS = (("HTTP", "https"), ("HTTP2", "http2"))


class AttachError(Exception):
    pass


def program_flags(config: Config, once_per_cluster: bool) -> list[str]:
    """-D flags of bpf/tls.c; SockFieldsError when the socket fields cannot be located."""
    flags = [*index_flags("FAILURE", [name for name, _ in FAILURES]),
             *index_flags("PARSE_ERROR", [name for name, _ in PARSE_ERRORS]),
             *sockfields.program_flags(),
             f"-DHTTP_CONN_CAPACITY={config.maps.http_conn_capacity}",
             f"-DHTTP_EVENT_CAPACITY={config.maps.http_event_capacity}"]
    if config.http.paths:
        flags.append("-DHTTP_PATHS")
    if config.http.http2:
        flags += ["-DWITH_HTTP2", f"-DH2_TLS_CAPACITY={2 * config.maps.http2_conn_capacity}",
                  f"-DH2_RING_PAGES={config.maps.http2_ring_mib * 256}"]
    if once_per_cluster:
        flags += oncepercluster.cflags(config)
    return flags


def load(program: LoadedProgram) -> dict[str, int] | None:
    """Loads every probe function now, so that attaching one later, from the scanning thread,
    loads nothing: for uprobe_multi links where the kernel has them (their descriptors by
    function name), else for a perf event per probe (None)."""
    names = sorted({fn for _, entry, exit_, _ in PROBES for fn in (entry, exit_) if fn})
    if bpfsys.has_uprobe_multi():
        return {name: program.load_uprobe_multi(name) for name in names}
    log.info("the kernel has no uprobe_multi links (Linux < 6.6): a perf event per probe, "
             "each some 100 ms to close")
    for name in names:
        program.load_probe(name)
    return None


def has_openssl(path: str) -> bool:
    """Whether an executable carries OpenSSL's SSL_write and SSL_read itself."""
    return elfsymbols.defines(path, ("SSL_write", "SSL_read"))


@dataclass
class Attached:
    mapped: MappedFile
    links: list[int] = field(default_factory=list)      # uprobe_multi link descriptors
    events: list[int] = field(default_factory=list)     # or perf events, one per probe


class TlsProbes:
    """The program's probes on each file, and what attaching them did. With uprobe_multi
    links (Linux >= 6.6), one link per function and file: 11 per file, closed at once (a perf
    event per probe waits for an RCU grace period when closed, some 100 ms each)."""

    def __init__(self, program: LoadedProgram, link_programs: dict[str, int] | None) -> None:
        self.program = program
        self.link_programs = link_programs
        self.attached: dict[FileId, Attached] = {}
        self.failed: dict[FileId, str] = {}         # files not attached, and why
        self.failures = 0
        self.paused = False         # probes off (the benchmarks' switch): files only noted

    def sync(self, files: dict[FileId, MappedFile]) -> None:
        for file in [f for f in self.attached if f not in files]:
            self._detach(file)
        for file in [f for f in self.failed if f not in files]:
            del self.failed[file]           # a file that comes back is tried again
        for file, mapped in files.items():
            if file not in self.attached and file not in self.failed:
                if self.paused:
                    self.attached[file] = Attached(mapped)  # probed when switched on
                    continue
                try:
                    self.attached[file] = self._probe(mapped)
                except AttachError as e:
                    self.failures += 1
                    self.failed[file] = str(e)
                    log.warning("cannot probe OpenSSL", extra={
                        "file": mapped.path, "pid": mapped.pid, "error": str(e)})
                    continue
                log.info("probing OpenSSL", extra={"file": mapped.path, "pid": mapped.pid})

    @staticmethod
    def _places(mapped: MappedFile) -> dict[tuple[str, bool], list[int]]:
        """(function, at return) -> the file offsets it goes to; AttachError when a required
        symbol is missing."""
        offsets = elfsymbols.function_offsets(mapped.reach, [symbol for symbol, *_ in PROBES])
        places: dict[tuple[str, bool], list[int]] = {}
        for symbol, entry, exit_, required in PROBES:
            offset = offsets.get(symbol)
            if offset is None:
                if required:
                    raise AttachError(f"no symbol {symbol}")
                continue
            for function, returns in ((entry, False), (exit_, True)):
                if function:
                    places.setdefault((function, returns), []).append(offset)
        return places

    def _probe(self, mapped: MappedFile) -> Attached:
        """The file's probes: one uprobe_multi link per function where the kernel has them,
        else a perf event per probe. AttachError, with nothing left attached, when one
        fails."""
        done = Attached(mapped)
        try:
            for (function, returns), offsets in self._places(mapped).items():
                if self.link_programs is not None:
                    done.links.append(bpfsys.uprobe_multi_link(
                        self.link_programs[function], mapped.reach, offsets, returns))
                    continue
                prog_fd = self.program.load_probe(function).fd     # loaded at start: cached
                for offset in offsets:
                    done.events.append(perfevents.uprobe(prog_fd, mapped.reach, offset,
                                                         returns))
        except OSError as e:
            self._close(done)
            raise AttachError(str(e)) from e
        return done

    def set_attached(self, on: bool) -> int:
        """Takes every probe off (links and perf events closed; the files stay known) or puts
        them back, their offsets read again from the files: the benchmarks' switch. Returns
        how many links or events changed."""
        changed = 0
        for attached in self.attached.values():
            if not on:
                changed += len(attached.links) + len(attached.events)
                self._close(attached)
            elif not attached.links and not attached.events:
                try:
                    made = self._probe(attached.mapped)
                except AttachError as e:
                    log.warning("cannot probe OpenSSL again", extra={
                        "file": attached.mapped.path, "error": str(e)})
                    continue
                attached.links, attached.events = made.links, made.events
                changed += len(made.links) + len(made.events)
        self.paused = not on
        return changed

    def _detach(self, file: FileId) -> None:
        attached = self.attached.pop(file)
        self._close(attached)
        log.info("no process maps it any more: detached", extra={"file": attached.mapped.path})

    def _close(self, attached: Attached) -> None:
        for fd in [*attached.links, *attached.events]:
            os.close(fd)
        attached.links, attached.events = [], []

    def close(self) -> None:
        for file in list(self.attached):
            self._close(self.attached.pop(file))


class TlsWatch:
    """Keeps the probes on the files with OpenSSL, in a thread of its own; the self-metrics of
    the HTTPS program."""

    def __init__(self, program: LoadedProgram, link_programs: dict[str, int] | None,
                 rescan_seconds: float, scan: FileScan | None = None) -> None:
        self.program = program
        self.probes = TlsProbes(program, link_programs)
        self.scan = scan or FileScan(has_openssl)
        self.rescan_seconds = rescan_seconds
        self._execs = CounterArray("execs", program.table("execs"))
        self._unbound = CounterArray("tls_unbound", program.table("tls_unbound"))
        self._sides = CounterArray("tls_sides", program.table("tls_sides"))
        self.metrics = HttpsMetrics()
        self._failures = CounterArray("map_update_failures", program.table("map_update_failures"))
        self._parse_errors = CounterArray("parse_errors", program.table("parse_errors"))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.scans = 0
        self._denied_logged = False

    def refresh(self, full: bool) -> None:
        """One scan and the probes it calls for."""
        files = self.scan.scan(full)
        if self.scan.denied and not self._denied_logged:
            self._denied_logged = True
            log.warning("cannot read the memory maps of other users' processes: HTTPS in them "
                        "is not seen (grant CAP_SYS_PTRACE)",
                        extra={"processes": self.scan.denied})
        with self._lock:
            self.probes.sync(files)
            self.scans += 1

    def start(self) -> None:
        self.refresh(full=True)
        if not self.probes.attached:
            log.info("no process maps OpenSSL yet: HTTPS is counted once one does")
        self._thread = threading.Thread(target=self._run, name="https-scan", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        privileges.keep_only(SCAN_CAPABILITIES)
        self._execs.read_deltas()
        next_full = time.monotonic() + self.rescan_seconds
        while not self._stop.wait(NEW_PROCESS_SECONDS):
            try:
                now = time.monotonic()
                execs = int(self._execs.read_deltas()[0])
                if now >= next_full:
                    self.refresh(full=True)
                    next_full = now + self.rescan_seconds
                elif execs:
                    self.refresh(full=False)
            except Exception as e:  # keep watching; the log says what failed
                log.warning("scan for OpenSSL failed", extra={"error": str(e)})

    def set_probes_attached(self, on: bool) -> int:
        """TlsProbes.set_attached, between two scans."""
        with self._lock:
            return self.probes.set_attached(on)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        with self._lock:
            self.probes.close()

    def report(self, stats: KernelStats) -> None:
        """The program's failed map updates and parse errors, into the exporter's stats; and
        the HTTPS self-metrics, as of now (called at the start of each scrape)."""
        with self._lock:
            map_failures = self._failures.read_deltas()
            parse_errors = self._parse_errors.read_deltas()
            unbound = float(self._unbound.read_deltas()[0])
            sides = [float(count) for count in self._sides.read_deltas()]
            attached = list(self.probes.attached.values())
            failures = self.probes.failures
        self.metrics.update(attached, failures, unbound, sides)
        for index, name in enumerate(FAILURE_MAPS):
            stats.add_failures(name, float(map_failures[index]))
        for index, (_, protocol) in enumerate(PARSE_ERRORS):
            stats.add_parse_errors(protocol, float(parse_errors[index]))


class HttpsMetrics:
    """The self-metrics of HTTPS, as of the last scrape's report."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.shared = self.static = 0
        self.failures = 0
        self.unbound = 0.0
        self.sides = [0.0, 0.0]         # client, server

    def update(self, attached: list[Attached], failures: int, unbound: float,
               sides: list[float]) -> None:
        with self._lock:
            self.shared = sum(1 for a in attached if a.mapped.shared_library)
            self.static = len(attached) - self.shared
            self.failures = failures
            self.unbound += unbound
            self.sides = [total + new for total, new in zip(self.sides, sides, strict=True)]

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            shared, static, failures = self.shared, self.static, self.failures
            unbound, sides = self.unbound, list(self.sides)
        files = GaugeMetricFamily(
            "ebpf_net_exporter_tls_files",
            "Files with OpenSSL whose SSL_* functions are probed for HTTPS, by kind: shared "
            "(a libssl) or static (an executable with OpenSSL linked in).", labels=["kind"])
        files.add_metric(["shared"], shared)
        files.add_metric(["static"], static)
        failed = CounterMetricFamily(
            "ebpf_net_exporter_tls_attach_failures",
            "Files with OpenSSL the HTTPS probes could not be attached to (the log says why).")
        failed.add_metric([], failures)
        unbound_family = CounterMetricFamily(
            "ebpf_net_exporter_https_unbound_requests",
            "HTTPS requests counted with no endpoint labels: their connection's TCP socket "
            "was not found.")
        unbound_family.add_metric([], unbound)
        by_side = CounterMetricFamily(
            "ebpf_net_exporter_https_requests",
            "HTTPS requests counted, by the side whose TLS library counted them and measured "
            "their latency: the client, or the server when no client on this node claimed the "
            "connection.", labels=["side"])
        by_side.add_metric(["client"], sides[0])
        by_side.add_metric(["server"], sides[1])
        return [files, failed, unbound_family, by_side]
