"""Decoding the live view's ring-buffer records (struct live_event in bpf/events.h) into the
records it prints."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..naming.endpoints import address_text

LIVE_DNS, LIVE_HTTP, LIVE_TCP_CLOSE = 1, 2, 3
NAME_BYTES = 128
LIVE_EVENT = np.dtype({
    "names": ["kind", "family", "transport", "client_port", "server_port", "client", "server",
              "latency_us", "code", "what", "cgroup_id", "comm", "name"],
    "formats": ["u1", "u1", "u1", "<u2", "<u2", ("u1", 16), ("u1", 16), "<u8", "<u4", "<u4",
                "<u8", ("u1", 16), ("u1", NAME_BYTES)],
    "offsets": [0, 1, 2, 4, 6, 8, 24, 40, 48, 52, 56, 64, 80],
    "itemsize": 80 + NAME_BYTES,
})
# code of a LIVE_TCP_CLOSE record (LIVE_TCP_* in bpf/events.h)
TCP_OUTCOMES = {0: "closed", 1: "refused", 2: "timeout", 3: "aborted"}
ROLES = {0: "unknown", 1: "client", 2: "server"}


@dataclass(frozen=True)
class End:
    ip: str
    port: int


@dataclass
class Exchange:
    """A DNS, HTTP, HTTPS, HTTP/2 or gRPC exchange (kind "dns", "http", "https", "http2" or
    "grpc") as it completed."""
    kind: str
    family: int
    client: End
    server: End
    latency_us: int
    code: int               # rcode or status
    what: int               # qtype or method
    name: bytes             # DNS question (wire format) or HTTP target, NUL padded
    transport: int = 0      # DNS: 0 udp, 1 tcp; HTTP/2 and gRPC: 0 in clear, 1 inside TLS
    timed_out: bool = False
    status_name: str = ""   # gRPC: the grpc_status


@dataclass
class TcpClose:
    """A TCP socket on this node closed (or its connect failed)."""
    family: int
    client: End
    server: End
    role: str
    outcome: str
    srtt_us: int
    comm: str = ""
    cgroup_id: int = 0
    extra: dict[str, str] = field(default_factory=dict)


def decode(raw: bytes) -> Exchange | TcpClose | None:
    if len(raw) < LIVE_EVENT.itemsize:
        return None
    record = np.frombuffer(raw[:LIVE_EVENT.itemsize], dtype=LIVE_EVENT)[0]
    family = int(record["family"])
    client = End(address_text(family, record["client"].tobytes()), int(record["client_port"]))
    server = End(address_text(family, record["server"].tobytes()), int(record["server_port"]))
    kind = int(record["kind"])
    if kind in (LIVE_DNS, LIVE_HTTP):
        # an HTTP record's transport is its scheme: 0 http, 1 https (bpf/tls.c)
        name = "dns" if kind == LIVE_DNS else ("https" if int(record["transport"]) else "http")
        return Exchange(name, family, client, server,
                        int(record["latency_us"]), int(record["code"]), int(record["what"]),
                        record["name"].tobytes(), int(record["transport"]))
    if kind == LIVE_TCP_CLOSE:
        comm = record["comm"].tobytes().split(b"\0", 1)[0].decode(errors="replace")
        return TcpClose(family, client, server, ROLES.get(int(record["transport"]), "unknown"),
                        TCP_OUTCOMES.get(int(record["code"]), "closed"),
                        int(record["latency_us"]), comm, int(record["cgroup_id"]))
    return None
