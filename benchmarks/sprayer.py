"""Distinct UDP flows by the million: 64-byte frames built with numpy and sent from pod a's
eth0 through an AF_PACKET socket, each from its own (source address, source port), to the
node's discard port. They enter the node through the monitored veth like any packet, so the
classifier counts them on its ordinary path; the node drops them after that (nothing listens,
and it has no route back to their sources)."""

from __future__ import annotations

import ipaddress
import json
import socket

import numpy as np

from lab.testnode import TestNode, in_netns

FRAME = 64
SOURCE_BASE = int(ipaddress.IPv4Address("172.16.0.0"))     # room for 2^20 sources
SOURCE_PORT_BASE = 40000                                    # ephemeral: folded to *
DISCARD_PORT = 9


def _mac(node: TestNode, ns: str, device: str) -> bytes:
    out = node.run(ns, ["ip", "-j", "link", "show", "dev", device]).stdout
    return bytes.fromhex(json.loads(out)[0]["address"].replace(":", ""))


def frames(count: int, ports_per_source: int, src_mac: bytes, dst_mac: bytes,
           dst_ip: str) -> np.ndarray:
    """`count` frames, flow i from source SOURCE_BASE + i // ports_per_source and port
    SOURCE_PORT_BASE + i % ports_per_source; IPv4 header checksums included."""
    out = np.zeros((count, FRAME), dtype=np.uint8)
    out[:, 0:6] = np.frombuffer(dst_mac, dtype=np.uint8)
    out[:, 6:12] = np.frombuffer(src_mac, dtype=np.uint8)
    out[:, 12:14] = (0x08, 0x00)
    header = bytes((0x45, 0, 0, FRAME - 14, 0, 0, 0x40, 0, 64, 17, 0, 0))
    out[:, 14:26] = np.frombuffer(header, dtype=np.uint8)
    flow = np.arange(count, dtype=np.uint32)
    sources = (SOURCE_BASE + flow // ports_per_source).astype(">u4")
    out[:, 26:30] = sources.view(np.uint8).reshape(count, 4)
    out[:, 30:34] = np.frombuffer(ipaddress.IPv4Address(dst_ip).packed, dtype=np.uint8)
    ports = (SOURCE_PORT_BASE + flow % ports_per_source).astype(">u2")
    out[:, 34:36] = ports.view(np.uint8).reshape(count, 2)
    out[:, 36:38] = np.frombuffer(DISCARD_PORT.to_bytes(2, "big"), dtype=np.uint8)
    out[:, 38:40] = np.frombuffer((FRAME - 34).to_bytes(2, "big"), dtype=np.uint8)
    words = np.ascontiguousarray(out[:, 14:34]).view(">u2").astype(np.uint32).sum(axis=1)
    while (words >> 16).any():
        words = (words & 0xFFFF) + (words >> 16)
    out[:, 24:26] = (~words & 0xFFFF).astype(">u2").view(np.uint8).reshape(count, 2)
    return out


class Sprayer:
    """Sends prepared frames out of pod a towards the node."""

    def __init__(self, node: TestNode, count: int, ports_per_source: int) -> None:
        self.count = count
        self.sources = -(-count // ports_per_source)
        self._frames = frames(count, ports_per_source, _mac(node, node.a_ns, "eth0"),
                              _mac(node, node.node_ns, node.veth_a), node.node_ip_a)
        with in_netns(node.a_ns):
            self._socket = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        self._socket.bind(("eth0", 0))
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 22)

    def spray(self) -> None:
        send = self._socket.send
        flat = memoryview(self._frames.reshape(-1))
        for start in range(0, self.count * FRAME, FRAME):
            send(flat[start:start + FRAME])

    def close(self) -> None:
        self._socket.close()
