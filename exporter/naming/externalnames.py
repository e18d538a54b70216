"""The `dns_name` endpoint label: for an address outside the cluster, the name a client on this
node resolved to reach it, from the DNS answers the classifier copies (bpf/dns.h,
dns_answers).

The rules (docs/metrics.md, "External names"):
- an answer names each of its addresses for that client, for the answer's TTL bounded by
  dns.name_min_ttl and dns.name_max_ttl; a later answer to the same client naming the same
  address replaces the earlier one (the most recent answer wins);
- while the client keeps exchanging packets with the address, the name stays (each scrape
  that sees their traffic keeps it at least dns.name_min_ttl longer), so a long-lived
  connection keeps its name past the TTL;
- a name that expired between two scrapes still names the traffic of that interval;
- a client that resolved no name for the address (a dual-stack pod asking over IPv4 for an
  IPv6 address, a process that read a cache) takes the most recent answer naming the address
  to any client of this node;
- the label is the first name along the chain (the question's name, then each CNAME) that
  matches a glob of labels.external_names, else `other`; "" when no answer named the address
  for that client.
Entries are kept per (client, address) and per address (for any client); past
dns_name_capacity the least recently used go."""

from __future__ import annotations

import fnmatch
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from cachetools import LRUCache
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from .. import logs
from ..decoding.dnsanswers import DnsAnswerError, Response, parse_response
from ..kernel.ringbuf import FixedRecordRing, PollThread
from ..serving.selfmetrics import KernelStats
from .endpoints import address_text

log = logs.get("dns")

OTHER = "other"
NO_NAME = ""
ANY_CLIENT = ""         # the client of an address's entry for every client
# struct dns_answer_record (bpf/dns.h)
CAPTURE = 512
ANSWER_RECORD = np.dtype([("family", "u1"), ("cut", "u1"), ("length", "<u2"), ("pad", "<u4"),
                          ("client", "u1", 16), ("message", "u1", CAPTURE)])
# the ring is read on this period (the kernel does not wake the reader); a connection opened
# right after its answer is named, since a scrape reads the ring before it labels traffic
POLL_SECONDS = 0.1
# an expired entry is forgotten this long after it expired: until then it still names the
# traffic of a scrape interval that began before it expired
EXPIRED_KEEP_SECONDS = 600.0


class NameLabel:
    """The label of a chain of names: its first name an allowlisted glob matches, else
    `other`."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(p.lower().rstrip(".") for p in patterns)
        self._cache: LRUCache[tuple[str, ...], str] = LRUCache(maxsize=65536)

    def __call__(self, names: tuple[str, ...]) -> str:
        label = self._cache.get(names)
        if label is None:
            label = next((name for name in names
                          if any(fnmatch.fnmatchcase(name, p) for p in self.patterns)), OTHER)
            self._cache[names] = label
        return label


class NameTable:
    """(client, address) -> (the chain of names, when it expires). Thread-safe."""

    def __init__(self, capacity: int, min_ttl: float, max_ttl: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.min_ttl, self.max_ttl = min_ttl, max_ttl
        self.clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[tuple[str, ...], float]] = \
            OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def set_ttls(self, min_ttl: float, max_ttl: float) -> None:
        """New bounds (SIGHUP), for the answers learned from now on."""
        self.min_ttl, self.max_ttl = min_ttl, max_ttl

    def __len__(self) -> int:
        return len(self._entries)

    def learn(self, client: str, response: Response) -> None:
        now = self.clock()
        with self._lock:
            for answer in response.answers:
                ttl = min(max(answer.ttl, self.min_ttl), self.max_ttl)
                for key in ((client, answer.address), (ANY_CLIENT, answer.address)):
                    self._entries[key] = (answer.names, now + ttl)
                    self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
                self.evictions += 1

    def names(self, client: str, address: str, since: float) -> tuple[str, ...] | None:
        """The names of `address` for `client` (else for any client) for traffic seen since
        `since` (a clock time), or None; an entry found is kept at least min_ttl from now."""
        with self._lock:
            for key in ((client, address), (ANY_CLIENT, address)):
                entry = self._entries.get(key)
                if entry is not None and entry[1] >= since:
                    break
            else:
                return None
            names, expires = entry
            now = self.clock()
            if expires < now + self.min_ttl:
                self._entries[key] = (names, now + self.min_ttl)
            self._entries.move_to_end(key)
            return names

    def sweep(self) -> None:
        """Forgets entries expired long enough that no scrape interval can still need them."""
        cutoff = self.clock() - EXPIRED_KEEP_SECONDS
        with self._lock:
            for key in [k for k, (_, expires) in self._entries.items() if expires < cutoff]:
                del self._entries[key]


class ExternalNames:
    """The DNS answers of the classifier's ring, read by a thread of their own into a
    NameTable, and the dns_name label they give; also the table's self-metrics."""

    def __init__(self, table: NameTable, patterns: Sequence[str], stats: KernelStats) -> None:
        self.table = table
        self.label_of = NameLabel(patterns)
        self.stats = stats
        self.ring: FixedRecordRing | None = None
        self.read = 0           # responses read
        self.cut = 0            # responses longer than the bytes kept, whose last records fell
        self._read_lock = threading.Lock()
        self._reader = PollThread("dns-answers", "DNS answers", self.poll, POLL_SECONDS)
        self._last_sweep = time.monotonic()

    def read_from(self, program: object) -> None:
        """Reads the answers `program` (the classifier) copies to its dns_answers ring."""
        self.ring = FixedRecordRing.of(program, "dns_answers", ANSWER_RECORD)

    def set_patterns(self, patterns: Sequence[str]) -> None:
        """New globs (SIGHUP): labels follow them from the next scrape on."""
        self.label_of = NameLabel(patterns)

    def label(self, client: str, address: str, since: float) -> str:
        names = self.table.names(client, address, since)
        return NO_NAME if names is None else self.label_of(names)

    def start(self) -> None:
        self._reader.start()

    def stop(self) -> None:
        self._reader.stop()
        if self.ring:
            self.ring.close()

    def poll(self) -> None:
        """Learns the names of every response the kernel copied since the last poll. Called by
        the thread, and by each scrape before it labels traffic."""
        if self.ring is None:
            return
        with self._read_lock:
            self.feed(self.ring.read())
            if time.monotonic() - self._last_sweep >= EXPIRED_KEEP_SECONDS / 10:
                self._last_sweep = time.monotonic()
                self.table.sweep()

    def feed(self, records: np.ndarray) -> None:
        errors = 0
        for record in records:
            length = min(int(record["length"]), CAPTURE)
            message = record["message"][:length].tobytes()
            try:
                response = parse_response(message, cut=bool(record["cut"]))
            except DnsAnswerError as e:
                errors += 1
                log.debug("a DNS response's answers are malformed", extra={"error": str(e)})
                continue
            self.read += 1
            self.cut += response.cut
            self.table.learn(address_text(int(record["family"]), record["client"].tobytes()),
                             response)
        if errors:
            self.stats.add_parse_errors("dns", float(errors))

    def report(self, stats: KernelStats) -> None:
        if self.ring:
            stats.record_map("dns_answers", self.ring.pending, self.ring.capacity)

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        entries = GaugeMetricFamily(
            "ebpf_net_exporter_dns_names", "(client, address) -> name entries kept for the "
            "dns_name label.", value=len(self.table))
        capacity = GaugeMetricFamily(
            "ebpf_net_exporter_dns_names_capacity", "Entries the dns_name table holds at most "
            "(maps.dns_name_capacity).", value=self.table.capacity)
        evicted = CounterMetricFamily(
            "ebpf_net_exporter_dns_name_evictions", "Entries forgotten before they expired to "
            "make room for newer answers: raise maps.dns_name_capacity if this grows.",
            value=self.table.evictions)
        read = CounterMetricFamily(
            "ebpf_net_exporter_dns_answers_read", "DNS responses with answers read for the "
            "dns_name label.", value=self.read)
        cut = CounterMetricFamily(
            "ebpf_net_exporter_dns_answers_cut", "DNS responses longer than the 512 bytes "
            "the kernel copies whose last answers were not read.", value=self.cut)
        return [entries, capacity, evicted, read, cut]
