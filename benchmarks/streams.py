"""Parts 2 and 5's workloads as streams: each runs on while the exporter's programs are switched
off and on under it, and a window's rate is what the kernel counted in between, read from the
namespace's own counters (/proc/net/snmp and netstat of the receiving pod) before and after.

Against timed runs (a fresh iperf3 or loop per measurement), the same minutes give nearly twice
the pairs, without a client's start, handshake and ramp in each, and the two windows of a pair
are half a second apart. Measured side by side in alternating 20 s blocks (80 s each; the width of
the ratio's 95% interval, timed 1 s runs / 0.5 s windows): UDP 0.057 / 0.027, the connection
loop 0.071 / 0.047, TCP 0.075 / 0.063."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lab.testnode import TestNode, in_netns

from . import connections, throughput, tls_requests

WARM_UP_SECONDS = 0.5       # the stream's start (a TCP ramp, the loop's interpreter) left out
STOP_MARGIN_SECONDS = 10.0  # a stream is stopped once its pairs are done; this is its slack


class StreamError(Exception):
    """A stream's process ended before its windows did."""


def kernel_counter(ns: str, table: str, group: str, name: str) -> int:
    """A counter of /proc/net/<table> (snmp, netstat) as namespace `ns` keeps it."""
    with in_netns(ns):  # /proc/thread-self/net is the calling thread's namespace
        with open(f"/proc/thread-self/net/{table}") as f:
            lines = f.read().splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=True):
        if header.startswith(f"{group}:"):
            return int(dict(zip(header.split()[1:], values.split()[1:], strict=True))[name])
    raise KeyError(f"/proc/net/{table} of {ns} has no {group} {name}")


@dataclass(frozen=True)
class Stream:
    unit: str
    scale: float                                    # counter units per second -> the unit
    namespace: Callable[[TestNode], str]            # where the workload runs
    command: Callable[[TestNode, float], list[str]]
    count: Callable[[TestNode], int]                # what it has done so far
    uprobes: bool = False                           # it runs OpenSSL: switch the uprobes too

    @contextlib.contextmanager
    def running(self, node: TestNode, seconds: float) -> Iterator[Callable[[float], float]]:
        """Starts the workload for at most `seconds`; yields a function that measures its rate
        over a window of so many seconds; stops it on leaving."""
        log = f"{node.tmpdir}/stream-{time.monotonic_ns()}.log"
        with open(log, "w") as out:
            proc = node.spawn(self.namespace(node), self.command(node, seconds),
                              stdout=out, stderr=out)

        def rate(window: float) -> float:
            before, started = self.count(node), time.monotonic()
            time.sleep(window)
            after, ended = self.count(node), time.monotonic()
            if proc.poll() is not None:
                with open(log) as f:
                    raise StreamError(f"{self.unit}: the workload ended with {proc.returncode} "
                                      f"before its windows did:\n{f.read()[-2000:]}")
            return (after - before) / (ended - started) * self.scale

        try:
            time.sleep(WARM_UP_SECONDS)
            yield rate
        finally:
            node.stop(proc)


STREAMS: dict[str, Stream] = {
    "tcp": Stream(
        "Gbit/s of IP packets received (iperf3, one stream)", 8 / 1e9,
        lambda node: node.a_ns, throughput.iperf3_argv,
        lambda node: kernel_counter(node.b_ns, "netstat", "IpExt", "InOctets")),
    "udp": Stream(
        "kpps of 64-byte frames delivered to the socket", 1 / 1e3,
        lambda node: node.a_ns,
        lambda node, seconds: throughput.iperf3_argv(node, seconds, *throughput.UDP_OPTIONS),
        lambda node: kernel_counter(node.b_ns, "snmp", "Udp", "InDatagrams")),
    "connections": Stream(
        "connections/s (connect, 1 byte, close)", 1.0,
        lambda node: node.a_ns, connections.loop_argv,
        lambda node: kernel_counter(node.a_ns, "snmp", "Tcp", "ActiveOpens")),
    "tls": Stream(
        "HTTPS requests/s (keep-alive, OpenSSL)", 1.0,
        lambda node: node.a_ns, tls_requests.loop_argv, tls_requests.requests_done,
        uprobes=True),
}
