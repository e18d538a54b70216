"""iperf3 TCP bulk and 64-byte UDP from pod a to pod b, through the test node's two veths (and
our programs, when attached): timed runs for part 1 and compare, commands for part 2's streams."""

from __future__ import annotations

import json
import math

from tests.testnode import TestNode

# 14 (Ethernet) + 20 (IPv4) + 8 (UDP) + 22 = a 64-byte frame on the veths
UDP_PAYLOAD = 22
UDP_FRAME = 64
UDP_OPTIONS = ("-u", "-b", "0", "-l", str(UDP_PAYLOAD))    # unthrottled


def iperf3_argv(node: TestNode, seconds: float, *extra: str) -> list[str]:
    """An iperf3 client of pod a sending to pod b's server for `seconds` (whole seconds)."""
    return ["iperf3", "-c", node.b_ip, "-t", f"{math.ceil(seconds)}", *extra]


def _iperf3(node: TestNode, seconds: float, *extra: str) -> dict:
    result = node.run(node.a_ns, iperf3_argv(node, seconds, "-J", *extra), timeout=seconds + 30)
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
