"""The live view's lines: JSON objects (--json) or one short text line each."""

from __future__ import annotations

import json
import time
from typing import Any

from ..naming.dnsnames import decode_name, qtype_name, rcode_name, transport_name
from ..naming.endpoints import family_name, protocol_name
from ..naming.httpnames import method_name
from .events import End, Exchange
from .flowtable import FlowLine
from .identity import Identity

_TARGET_END = (b" ", b"\0", b"\r", b"\n")


def _timestamp(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int(wall % 1 * 1000):03d}Z"


def http_target(raw: bytes) -> str:
    end = min((i for i in (raw.find(c) for c in _TARGET_END) if i >= 0), default=len(raw))
    return raw[:end].decode("ascii", "replace")


class Formatter:
    def __init__(self, identity: Identity, as_json: bool, cgroups: Any = None) -> None:
        self.identity = identity
        self.as_json = as_json
        self.cgroups = cgroups      # cgroup id -> {"cgroup", "pod_uid", "container_id"}

    def _end(self, end: End) -> dict[str, Any]:
        return {"ip": end.ip, "port": end.port, **self.identity.describe(end.ip)}

    def flow(self, line: FlowLine, wall: float) -> str:
        record: dict[str, Any] = {
            "time": _timestamp(wall), "type": "flow",
            "protocol": protocol_name(line.flow.protocol),
            "family": family_name(line.flow.family), "state": line.state,
            "src": self._end(line.src), "dst": self._end(line.dst),
            "src_bytes": line.src_bytes, "dst_bytes": line.dst_bytes,
            "src_packets": line.src_packets, "dst_packets": line.dst_packets,
            "duration_seconds": line.duration_seconds,
            "rtt_seconds": line.rtt_us / 1e6 if line.rtt_us is not None else None,
        }
        if line.process:
            record["process"] = line.process
        if line.cgroup_id and self.cgroups is not None:
            record.update(self.cgroups.describe(line.cgroup_id))
        if self.as_json:
            return json.dumps(record)
        rtt = f" rtt={line.rtt_us}us" if line.rtt_us is not None else ""
        process = f" process={line.process}" if line.process else ""
        traffic = (f"sent={line.src_bytes}B/{line.src_packets}p "
                   f"received={line.dst_bytes}B/{line.dst_packets}p"
                   if line.src_packets is not None else "packets=unseen")
        return (f"{record['time']} FLOW {record['protocol']} {_text(line.src)} -> "
                f"{_text(line.dst)} {line.state} {traffic}{rtt}{process}")

    def exchange(self, ex: Exchange, wall: float) -> str:
        record: dict[str, Any] = {"time": _timestamp(wall), "type": ex.kind,
                                  "src": self._end(ex.client), "dst": self._end(ex.server)}
        if ex.kind == "dns":
            record.update({
                "transport": transport_name(ex.transport), "qtype": qtype_name(ex.what),
                "query": decode_name(ex.name), "rcode": "timeout" if ex.timed_out
                else rcode_name(ex.code),
                "latency_seconds": None if ex.timed_out else ex.latency_us / 1e6})
            detail = f"{record['qtype']} {record['query']} {record['rcode']}"
        elif ex.kind == "grpc":
            record.update({"method": http_target(ex.name), "grpc_status": ex.status_name,
                           "scheme": "https" if ex.transport else "http",
                           "latency_seconds": ex.latency_us / 1e6})
            detail = f"{record['method']} {ex.status_name}"
        else:
            record.update({"method": method_name(ex.what), "path": http_target(ex.name),
                           "status": ex.code, "latency_seconds": ex.latency_us / 1e6})
            if ex.kind == "http2":
                record.update({"version": "2", "scheme": "https" if ex.transport else "http"})
            detail = f"{record['method']} {record['path']} {ex.code}"
        if self.as_json:
            return json.dumps(record)
        latency = "" if ex.timed_out else f" {ex.latency_us}us"
        return (f"{record['time']} {ex.kind.upper()} {_text(ex.client)} -> {_text(ex.server)} "
                f"{detail}{latency}")


def _text(end: End) -> str:
    host = f"[{end.ip}]" if ":" in end.ip else end.ip
    return f"{host}:{end.port}" if end.port else host
