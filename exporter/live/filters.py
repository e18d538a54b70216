"""Which lines the live view prints: `--tcp --udp --dns --http` choose kinds (none: all),
`--host` and `--port` match either end, `--namespace` either end's Kubernetes namespace."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from .events import End
from .identity import Identity

IPPROTO_TCP, IPPROTO_UDP = 6, 17
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class FilterError(Exception):
    pass


def parse_host(text: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError as e:
        raise FilterError(f"--host: expected an address or a network, got {text!r}") from e


@dataclass
class LineFilter:
    kinds: frozenset[str]               # tcp, udp, dns, http; empty: everything
    hosts: Sequence[Network] = ()
    ports: Sequence[int] = ()
    namespaces: Sequence[str] = ()
    identity: Identity | None = None

    def __post_init__(self) -> None:
        if self.namespaces and not (self.identity and self.identity.kubernetes):
            raise FilterError("--namespace needs Kubernetes metadata, which this view does not "
                              "have; filter with --host instead")

    def flow_kind(self, protocol: int) -> str:
        return {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}.get(protocol, "other")

    def wants(self, kind: str, ends: Sequence[End]) -> bool:
        # --http selects HTTPS, HTTP/2 and gRPC exchanges too
        if self.kinds and ("http" if kind in ("https", "http2", "grpc") else kind) \
                not in self.kinds:
            return False
        if self.hosts and not any(ipaddress.ip_address(end.ip) in net
                                  for end in ends for net in self.hosts):
            return False
        if self.ports and not any(end.port in self.ports for end in ends):
            return False
        if self.namespaces and self.identity:
            names = {self.identity.describe(end.ip).get("namespace") for end in ends}
            if not names & set(self.namespaces):
                return False
        return True
