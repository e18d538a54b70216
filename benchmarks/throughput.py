"""iperf3 TCP bulk and 64-byte UDP from pod a to pod b, through the test node's two veths (and
our programs, when attached): timed runs for part 1 and compare, commands for part 2's streams.
Part 1's counting rule also sends UDP the other way, from pod b to a server on pod a."""

from __future__ import annotations

import json
import math

from lab.testnode import TestNode

# 14 (Ethernet) + 20 (IPv4) + 8 (UDP) + 22 = a 64-byte frame on the veths
UDP_PAYLOAD = 22
UDP_FRAME = 64
UDP_OPTIONS = ("-u", "-b", "0", "-l", str(UDP_PAYLOAD))    # unthrottled


def iperf3_argv(node: TestNode, seconds: float, *extra: str, server: str | None = None
                ) -> list[str]:
    """An iperf3 client sending to pod b's server (or `server`) for `seconds` (whole seconds)."""
    return ["iperf3", "-c", server or node.b_ip, "-t", f"{math.ceil(seconds)}", *extra]


def _iperf3(node: TestNode, seconds: float, *extra: str, client_ns: str | None = None,
            server: str | None = None) -> dict:
    """iperf3's summary of a run from pod a to pod b, or from `client_ns` to `server`."""
    argv = iperf3_argv(node, seconds, "-J", *extra, server=server)
    result = node.run(client_ns or node.a_ns, argv, timeout=seconds + 30)
    return json.loads(result.stdout)["end"]


def tcp_gbits(node: TestNode, seconds: float) -> float:
    """Received TCP goodput in Gbit/s of one iperf3 stream."""
    end = _iperf3(node, seconds)
    return float(end["sum_received"]["bits_per_second"]) / 1e9


def udp_kpps(node: TestNode, seconds: float) -> float:
    """64-byte UDP datagrams received per second (thousands), one unthrottled iperf3 stream."""
    end = _iperf3(node, seconds, *UDP_OPTIONS)
    received = end["sum_received"]
    return float(received["bytes"]) / UDP_PAYLOAD / float(received["seconds"]) / 1e3


def udp_datagrams(node: TestNode, seconds: float, client_ns: str, server: str) -> int:
    """64-byte UDP datagrams the server received from one unthrottled iperf3 stream of
    `client_ns` (pod b to a server on pod a, for the counting rule's uplink)."""
    end = _iperf3(node, seconds, *UDP_OPTIONS, client_ns=client_ns, server=server)
    return round(float(end["sum_received"]["bytes"]) / UDP_PAYLOAD)
