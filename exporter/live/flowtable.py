"""Flows for the live view: the TC classifier's per-direction counts, drained a few times a
second, merged into one record per connection (both directions), with what the TCP tracepoints
say when its sockets close.

A flow is printed once when it ends: its TCP sockets on this node closed (after a short grace,
so the other side's close and the last packets are in), or no packet for `idle_seconds` (UDP,
ICMP, and TCP whose sockets are not on this node). A flow still going after `interval_seconds`
is printed with state "active" and printed again each interval; figures are totals since the
flow was first seen."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ..naming.endpoints import PortFolder, address_text
from .events import End, TcpClose

FLOW_SAW_SYN = 1        # bpf/flows.h: the sender is the client
FLOW_SAW_SYNACK = 2     # the sender is the server
CLOSE_GRACE_SECONDS = 0.5
# a flow printed as closed absorbs the late close of its other socket (and stray packets) this
# long, rather than showing as a new flow
ENDED_MEMORY_SECONDS = 5.0
IPPROTO_TCP = 6

FlowKey = tuple[int, int, str, int, str, int]   # family, protocol, lower end, higher end


@dataclass
class Flow:
    family: int
    protocol: int
    ends: tuple[End, End]                       # as in the key: the lower end first
    first_seen: float
    last_seen: float
    bytes: list[int] = field(default_factory=lambda: [0, 0])     # sent by ends[0], ends[1]
    packets: list[int] = field(default_factory=lambda: [0, 0])
    client_index: int | None = None             # which end opened it, when seen
    first_sender: int = 0                       # which end sent the first packet seen
    closes: list[TcpClose] = field(default_factory=list)
    closing_since: float | None = None
    last_printed: float | None = None


@dataclass(frozen=True)
class FlowLine:
    """One printed flow: src is the client where known (the end that opened it), else the
    sender of its first packet seen."""
    flow: Flow
    state: str                  # closed, refused, timeout, aborted, idle or active
    src: End
    dst: End
    src_bytes: int | None       # None: no packet of it crossed a monitored interface (a
    dst_bytes: int | None       # connection over lo, say, known from its sockets only)
    src_packets: int | None
    dst_packets: int | None
    rtt_us: int | None
    process: str
    cgroup_id: int
    duration_seconds: float


def flow_key(family: int, protocol: int, a: End, b: End) -> tuple[FlowKey, bool]:
    """The key of a flow between a and b, and whether a is its lower end."""
    a_first = (a.ip, a.port) <= (b.ip, b.port)
    lo, hi = (a, b) if a_first else (b, a)
    return (family, protocol, lo.ip, lo.port, hi.ip, hi.port), a_first


class FlowTable:
    def __init__(self, ports: PortFolder, idle_seconds: float, interval_seconds: float) -> None:
        self.ports = ports
        self.idle_seconds = idle_seconds
        self.interval_seconds = interval_seconds
        self.flows: dict[FlowKey, Flow] = {}
        self._ended: dict[FlowKey, float] = {}

    def add_counts(self, keys: np.ndarray, values: np.ndarray, now: float) -> None:
        """Adds one drain of the classifier's flows map (FLOW_KEY rows, summed values)."""
        for key, value in zip(keys, values, strict=True):
            family = int(key["family"])
            src = End(address_text(family, key["saddr"].tobytes()), int(key["sport"]))
            dst = End(address_text(family, key["daddr"].tobytes()), int(key["dport"]))
            fkey, src_first = flow_key(family, int(key["protocol"]), src, dst)
            if fkey in self._ended:
                continue
            flow = self._flow(fkey, now, src_first)
            side = 0 if src_first else 1
            flow.bytes[side] += int(value["bytes"])
            flow.packets[side] += int(value["packets"])
            flow.last_seen = now
            handshake = int(value["handshake"])
            if handshake & FLOW_SAW_SYN:
                flow.client_index = side
                self.ports.learn_server(dst.ip, dst.port)
            elif handshake & FLOW_SAW_SYNACK and flow.client_index is None:
                flow.client_index = 1 - side
                self.ports.learn_server(src.ip, src.port)

    def add_close(self, close: TcpClose, now: float) -> None:
        fkey, client_first = flow_key(close.family, IPPROTO_TCP, close.client, close.server)
        if fkey in self._ended:
            return
        flow = self._flow(fkey, now, client_first)
        if close.role in ("client", "server"):
            flow.client_index = 0 if client_first else 1
        flow.closes.append(close)
        if flow.closing_since is None:
            flow.closing_since = now

    def _flow(self, fkey: FlowKey, now: float, first_is_sender: bool) -> Flow:
        flow = self.flows.get(fkey)
        if flow is None:
            family, protocol, lo_ip, lo_port, hi_ip, hi_port = fkey
            flow = Flow(family, protocol, (End(lo_ip, lo_port), End(hi_ip, hi_port)), now, now,
                        first_sender=0 if first_is_sender else 1)
            self.flows[fkey] = flow
        return flow

    def due(self, now: float) -> Iterator[FlowLine]:
        """Lines for flows that ended, idled out or are due an interim line; ended and idle
        flows are forgotten."""
        for fkey, flow in list(self.flows.items()):
            if flow.closing_since is not None and now - flow.closing_since >= CLOSE_GRACE_SECONDS:
                del self.flows[fkey]
                self._ended[fkey] = now
                yield self._line(flow, self._outcome(flow), now)
            elif flow.closing_since is None and now - flow.last_seen >= self.idle_seconds:
                del self.flows[fkey]
                yield self._line(flow, "idle", now)
            elif now - (flow.last_printed or flow.first_seen) >= self.interval_seconds:
                flow.last_printed = now
                yield self._line(flow, "active", now)
        for fkey, ended in list(self._ended.items()):
            if now - ended >= ENDED_MEMORY_SECONDS:
                del self._ended[fkey]

    def flush(self, now: float) -> Iterable[FlowLine]:
        """Lines for every flow still open (the view is stopping)."""
        lines = [self._line(flow, "active", now) for flow in self.flows.values()]
        self.flows.clear()
        return lines

    @staticmethod
    def _outcome(flow: Flow) -> str:
        outcomes = {close.outcome for close in flow.closes}
        for failure in ("refused", "timeout", "aborted"):
            if failure in outcomes:
                return failure
        return "closed"

    def _client_index(self, flow: Flow) -> int:
        if flow.client_index is not None:
            return flow.client_index
        a, b = flow.ends
        if a.port and b.port:
            if self.ports.server_is_remote(a.ip, a.port, b.ip, b.port):
                return 0
            return 1
        return flow.first_sender

    def _line(self, flow: Flow, state: str, now: float) -> FlowLine:
        c = self._client_index(flow)
        s = 1 - c
        # the client's socket names the process that opened the connection; else the server's
        by_role = {close.role: close for close in flow.closes}
        chosen = by_role.get("client") or by_role.get("server") or \
            (flow.closes[0] if flow.closes else None)
        rtts = [close.srtt_us for close in flow.closes if close.srtt_us]
        seen = any(flow.packets)
        return FlowLine(flow, state, flow.ends[c], flow.ends[s],
                        flow.bytes[c] if seen else None, flow.bytes[s] if seen else None,
                        flow.packets[c] if seen else None, flow.packets[s] if seen else None,
                        max(rtts) if rtts else None,
                        chosen.comm if chosen else "", chosen.cgroup_id if chosen else 0,
                        round(max(now - flow.first_seen, 0.0), 3))
